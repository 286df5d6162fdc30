"""GPU tests of the SM90 dense MLA decode kernels (torch.ops.flashmla_cuda.{get_mla_metadata,
mla_decode}, reached through torch.ops.flashmla.*) against the float32 reference
(torch_flashmla.reference) evaluated on the same GPU.

Inputs are drawn on the GPU: NaN in every cache slot that is not part of a sequence (tails of
last pages, unused pages), garbage in block-table tails (huge ids, -1, random ids), the output
memory poisoned with NaN before the call. Tolerances (docs/design.md §7): out abs 8e-4 / rel 2/128 and
cosine distance <= 5e-6; lse rel 8/65536.
"""
from __future__ import annotations

import itertools

import pytest
import torch

pytestmark = pytest.mark.cuda

torch_flashmla = pytest.importorskip("torch_flashmla")
from torch_flashmla import reference  # noqa: E402
from torch_flashmla import _registration  # noqa: E402
from torch_flashmla.testing import capture_cuda_graph  # noqa: E402

from paged_decode_inputs import make_inputs, poison_allocator  # noqa: E402
from sm90 import require_sm90_kernel  # noqa: E402

require_sm90_kernel("mla_decode")

DEV = torch.device("cuda")
D_QK, D_V = 576, 512


def run_kernel(q, cache, table, lens, plan, causal, scale):
    b, s_q, h_q, _ = q.shape
    poison_allocator([b * s_q * h_q * D_V // 2 + 64, b * s_q * h_q + 64])
    return torch.ops.flashmla.mla_decode(q, cache, table, lens, D_V, scale, causal, plan[0], plan[1])


def check_close(out, lse, ref_out, ref_lse, tag=""):
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert not torch.isnan(out).any(), f"{tag}: NaN in out"
    assert not torch.isnan(lse).any(), f"{tag}: NaN in lse"
    o, r = out.float(), ref_out.float()
    err = (o - r).abs()
    bad = err > 8e-4 + (2 / 128) * r.abs()
    assert not bad.any(), f"{tag}: out mismatch at {bad.nonzero()[:5].tolist()}, max err {err.max().item():.3g}"
    od, rd = o.double().flatten(), r.double().flatten()
    denom = (od.norm() * rd.norm()).item()
    if denom > 0:
        cos_dist = 1 - (od @ rd).item() / denom
        assert cos_dist <= 5e-6, f"{tag}: cosine distance {cos_dist:.3g}"
    inf_ok = torch.isinf(ref_lse) == torch.isinf(lse)
    assert inf_ok.all(), f"{tag}: lse inf pattern differs at {(~inf_ok).nonzero()[:5].tolist()}"
    fin = torch.isfinite(ref_lse)
    assert (lse[~fin] == ref_lse[~fin]).all(), f"{tag}: lse of empty rows must be +inf"
    lerr = (lse[fin] - ref_lse[fin]).abs()
    lbad = lerr > (8 / 65536) * ref_lse[fin].abs().clamp_min(1.0)
    assert not lbad.any(), f"{tag}: lse mismatch, max err {lerr.max().item():.3g}"


def check_case(b, s_q, h_q, h_kv, s_k, causal, dtype, varlen, zeros, seed, num_sm_parts=None, page_size=64,
               bad_pages=0.0):
    q, cache, table, lens, plan = make_inputs(b, s_q, h_q, h_kv, s_k, varlen=varlen, zeros=zeros, dtype=dtype,
                                              seed=seed, num_sm_parts=num_sm_parts, page_size=page_size,
                                              bad_pages=bad_pages)
    scale = D_QK ** -0.5
    out, lse = run_kernel(q, cache, table, lens, plan, causal, scale)
    ref_out, ref_lse = reference.mla_decode(q, cache, table, lens, D_V, scale, causal)
    torch.cuda.synchronize()
    check_close(out, lse, ref_out, ref_lse, tag=f"b={b} s_q={s_q} h_q={h_q} h_kv={h_kv} s_k={s_k} causal={causal} "
                                                f"{dtype} varlen={varlen} zeros={zeros} page={page_size} "
                                                f"bad_pages={bad_pages}")


def test_path_is_sm90():
    assert _registration.cuda_path("mla_decode", DEV) == "sm90"
    assert _registration.cuda_path("get_mla_metadata", DEV) == "sm90"


@pytest.mark.parametrize("b", [1, 2, 5, 64, 128, 1000, 4096])
@pytest.mark.parametrize("num_sm_parts", [1, 7, 33, 66, 132])
def test_planner_matches_reference(b, num_sm_parts):
    g = torch.Generator().manual_seed(b * 1000 + num_sm_parts)
    lens = torch.randint(0, 20000, (b,), generator=g).to(torch.int32)
    lens[::4] = 0
    lens[1::5] = torch.randint(0, 130, lens[1::5].shape, generator=g).to(torch.int32)
    meta, splits = torch.ops.flashmla.get_mla_metadata(lens.to(DEV), 64, 1, 64, False, None, num_sm_parts)
    ref_meta, ref_splits = reference.get_mla_metadata(lens, 64, 1, 64, False, None, num_sm_parts)
    assert torch.equal(meta.cpu(), ref_meta) and torch.equal(splits.cpu(), ref_splits)


HEADS = [(1, 1), (3, 1), (9, 1), (63, 1), (64, 1), (126, 1), (128, 1), (2, 2), (126, 2), (128, 2), (8, 8), (64, 8),
         (128, 8)]
SMALL = list(itertools.product(HEADS, [1, 2, 4], [20, 140, 4096]))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,s_q,s_k", SMALL, ids=[f"h{h}_{k}-sq{s}-sk{n}" for (h, k), s, n in SMALL])
def test_decode_matrix(heads, s_q, s_k, causal):
    h_q, h_kv = heads
    i = SMALL.index((heads, s_q, s_k))
    b = [1, 2, 6][i % 3]
    dtype = torch.bfloat16 if (i + causal) % 2 == 0 else torch.float16
    varlen = (i % 2 == 1) and b > 1
    check_case(b, s_q, h_q, h_kv, s_k, causal, dtype, varlen, zeros=(i % 4 == 3), seed=i)


LARGE = [
    (64, 1, 16, 1, 32768, False, torch.bfloat16, True, True),
    (128, 1, 128, 1, 4096, False, torch.bfloat16, False, False),
    (128, 2, 128, 1, 4096, True, torch.float16, True, True),
    (64, 4, 128, 1, 32768, True, torch.bfloat16, True, False),
    (128, 1, 64, 2, 4096, False, torch.float16, True, True),
    (64, 2, 63, 1, 8192, True, torch.bfloat16, True, True),
    (6, 1, 128, 1, 32768, False, torch.bfloat16, False, False),
    (4096, 1, 16, 1, 300, False, torch.bfloat16, True, True),      # the largest batch of the contract
    (2, 2, 64, 1, 131072, True, torch.bfloat16, True, False),     # 128k-token sequences
]


@pytest.mark.parametrize("case", LARGE, ids=[f"b{c[0]}-sq{c[1]}-h{c[2]}_{c[3]}-sk{c[4]}" for c in LARGE])
def test_decode_large(case):
    b, s_q, h_q, h_kv, s_k, causal, dtype, varlen, zeros = case
    check_case(b, s_q, h_q, h_kv, s_k, causal, dtype, varlen, zeros, seed=hash(case) % 1000)


@pytest.mark.parametrize("num_sm_parts", [1, 3, 200])
def test_decode_odd_partitions(num_sm_parts):
    check_case(6, 2, 64, 1, 1000, True, torch.bfloat16, True, True, seed=num_sm_parts, num_sm_parts=num_sm_parts)


@pytest.mark.parametrize("page_size", [128, 256])
def test_decode_page_sizes(page_size):
    check_case(6, 1, 32, 1, 900, False, torch.bfloat16, True, True, seed=page_size, page_size=page_size)


# Pages that are not a multiple of 64 tokens: each tile of a 64-token chunk is 64 / gcd(page_size, 64) TMA
# loads (writes of 1-32 rows into the 128B-swizzled tile), the page mask is per token. Short requests
# (<= 1024 tokens, the precise path) and long ones (the seesaw path), varlen with zero lengths, causal,
# h_kv > 1, out-of-range ids inside the sequences (whole chunks and single pages skipped), odd partitions.
SMALL_PAGES = [1, 2, 3, 4, 5, 16, 32, 48, 96, 100, 128]
PAGE_CASES = [
    # b, s_q, h_q, h_kv, s_k, causal, dtype, varlen, zeros, bad_pages, num_sm_parts
    (6, 1, 32, 1, 900, False, torch.bfloat16, True, True, 0.0, None),
    (4, 2, 64, 1, 3000, True, torch.float16, True, True, 0.0, None),
    (3, 1, 128, 2, 2000, False, torch.bfloat16, True, False, 0.3, None),
    (5, 2, 16, 1, 700, True, torch.float16, True, True, 0.3, 7),
]


@pytest.mark.parametrize("case", range(len(PAGE_CASES)))
@pytest.mark.parametrize("page_size", SMALL_PAGES)
def test_decode_small_pages(page_size, case):
    b, s_q, h_q, h_kv, s_k, causal, dtype, varlen, zeros, bad, parts = PAGE_CASES[case]
    check_case(b, s_q, h_q, h_kv, s_k, causal, dtype, varlen, zeros, seed=page_size * 10 + case,
               num_sm_parts=parts, page_size=page_size, bad_pages=bad)


def test_decode_small_pages_long():
    """Page size 16 over 32k-token sequences (many chunks per partition, splits and combine)."""
    check_case(8, 1, 128, 1, 32768, False, torch.bfloat16, True, True, seed=3, page_size=16, bad_pages=0.05)


@pytest.mark.parametrize("page_size", [64, 16])
def test_decode_bad_page_ids_inside_sequences(page_size):
    """Out-of-range ids in used block-table entries: those pages' tokens are skipped (never read)."""
    check_case(6, 2, 64, 1, 2500, True, torch.bfloat16, True, True, seed=5, page_size=page_size, bad_pages=0.3)


def test_decode_padded_cache_rows():
    """A cache whose row stride is padded (a view of a wider buffer)."""
    q, cache, table, lens, plan = make_inputs(4, 1, 16, 1, 300, varlen=True, seed=5)
    wide = torch.full((*cache.shape[:3], 640), float("nan"), dtype=cache.dtype, device=DEV)
    wide[..., :D_QK] = cache
    view = wide[..., :D_QK]
    scale = D_QK ** -0.5
    out, lse = run_kernel(q, view, table, lens, plan, False, scale)
    ref_out, ref_lse = reference.mla_decode(q, cache, table, lens, D_V, scale, False)
    check_close(out, lse, ref_out, ref_lse, "padded rows")


@pytest.mark.parametrize("h_q", [64, 16])  # the 64-row kernel; the 32-row (transposed) kernel
@pytest.mark.parametrize("page_size", [64, 16, 1])
def test_decode_cuda_graph_replay(page_size, h_q):
    """Plan + decode captured once, replayed with new lengths and block tables."""
    b, s_q, s_k = 8, 2, 2000
    q, cache, table, lens, _ = make_inputs(b, s_q, h_q, 1, s_k, varlen=True, zeros=True, seed=11, page_size=page_size)
    scale = D_QK ** -0.5
    static_lens = lens.clone()
    static_table = table.clone()
    def step():
        meta, splits = torch_flashmla.get_mla_metadata(static_lens, s_q * h_q, 1, h_q)
        return torch.ops.flashmla.mla_decode(q, cache, static_table, static_lens, D_V, scale, True, meta, splits)

    graph, (out, lse) = capture_cuda_graph(step, warmup_iters=2)
    for seed in range(3):
        _, _, table2, lens2, _ = make_inputs(b, s_q, h_q, 1, s_k, varlen=True, zeros=(seed != 1), seed=100 + seed,
                                             page_size=page_size)
        # keep the cache (same shape): new lengths must stay within the pages this cache fills
        lens2 = torch.minimum(lens2, lens)
        if seed == 2:  # move every page elsewhere and rewrite the block table accordingly
            moved = torch.randperm(cache.shape[0], device=DEV)
            old_cache = cache.clone()
            cache[moved] = old_cache
            valid = (table >= 0) & (table < cache.shape[0])
            table = torch.where(valid, moved[table.clamp(0, cache.shape[0] - 1).long()].to(torch.int32), table)
        static_lens.copy_(lens2)
        static_table.copy_(table)
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = reference.mla_decode(q, cache, table, lens2, D_V, scale, True)
        check_close(out, lse, ref_out, ref_lse, f"graph replay {seed}")
