"""GPU tests of the SM90 sparse FP8 decode kernel (torch.ops.flashmla_cuda.sparse_mla_decode, reached
through torch.ops.flashmla.sparse_mla_decode / torch_flashmla.sparse_mla_decode) against the float32
reference (torch_flashmla.reference.sparse_mla_decode) evaluated on the same GPU inputs.

Inputs come from the shared generator (torch_flashmla.testing.sparse_decode_inputs): a NaN record
in the last slot of the main cache that only skipped indices (past ``topk_length``) point at, -1
indices mixed in, duplicate indices where topk exceeds the cache. Tests add: all-invalid rows,
``topk_length == 0``, indices ``>= num_slots``, a NaN record behind the extra cache's skipped tail,
plans with 1..200 SM partitions, CUDA-graph replay with new indices and lengths, determinism.
The caching allocator is filled with NaN before each call, so outputs the kernel leaves unwritten
show up as NaN. Tolerances (FlashMLA's sparse-decode test): out abs 1e-3 + rel 2/128 and
1 - 2<x,y>/(|x|^2+|y|^2) <= 5e-6 over the non-empty rows; lse rel 8/65536; rows with nothing to
attend to: out exactly 0, lse exactly +inf.
"""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch

pytestmark = pytest.mark.cuda

torch_flashmla = pytest.importorskip("torch_flashmla")
from torch_flashmla import reference  # noqa: E402
from torch_flashmla import _registration  # noqa: E402
from torch_flashmla import kv_cache as kvc  # noqa: E402
from torch_flashmla.testing import SparseDecodeCase, capture_cuda_graph, sparse_decode_inputs  # noqa: E402

from attention_asserts import assert_out_rows_close  # noqa: E402
from sm90 import require_sm90_kernel  # noqa: E402

require_sm90_kernel("sparse_mla_decode")

DEV = torch.device("cuda")
D_QK, D_V = 576, 512
SCALE = D_QK ** -0.5
OUT_ABS, OUT_REL, COS_TOL, LSE_REL = 1e-3, 2 / 128, 5e-6, 8 / 65536
INPUT_KEYS = ("q", "kv_cache", "indices", "topk_length", "attn_sink", "extra_kv_cache", "extra_indices",
              "extra_topk_length")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def case_id(c: SparseDecodeCase) -> str:
    flags = ("L" if c.with_topk_length else "") + (f"E{c.extra_topk}p{c.extra_page_size}" if c.extra_topk else "") \
        + ("S" if c.with_attn_sink else "")
    return f"b{c.b}-h{c.h_q}-sq{c.s_q}-k{c.topk}-nb{c.num_blocks}p{c.page_size}" + (f"-{flags}" if flags else "")


def case_seed(case: SparseDecodeCase) -> int:
    """A seed that is stable across processes (str hashes are salted)."""
    return zlib.crc32(case_id(case).encode()) % 10007


def make_inputs(case: SparseDecodeCase, seed: int = 0, num_sm_parts=None):
    return sparse_decode_inputs(case, device=DEV, seed=seed, num_sm_parts=num_sm_parts)


def plan_seqlens(inp):
    """What the planner sees per request: topk_length (or topk) plus extra_topk_length (or extra_topk).
    Pure tensor ops, so it also runs inside a CUDA graph capture."""
    b, topk = inp["indices"].shape[0], inp["indices"].shape[-1]
    seqlens = inp["topk_length"] if inp["topk_length"] is not None else \
        torch.full((b,), topk, dtype=torch.int32, device=inp["indices"].device)
    if inp["extra_kv_cache"] is not None:
        extra = inp["extra_topk_length"] if inp["extra_topk_length"] is not None else inp["extra_indices"].shape[-1]
        seqlens = seqlens + extra
    return seqlens.to(torch.int32)


def plan(inp, num_sm_parts=None):
    """The plan of ``inp`` (the same call the generator makes), with ``num_sm_parts`` partitions."""
    _, s_q, h_q, _ = inp["q"].shape
    topk = inp["indices"].shape[-1] + (inp["extra_indices"].shape[-1] if inp["extra_indices"] is not None else 0)
    return torch_flashmla.get_mla_metadata(plan_seqlens(inp), s_q * h_q, 1, h_q, is_fp8_kvcache=True, topk=topk,
                                           num_sm_parts=num_sm_parts)


def replan(inp, num_sm_parts=None):
    inp["tile_scheduler_metadata"], inp["num_splits"] = plan(inp, num_sm_parts)
    return inp


def poison_allocator(nbytes):
    """Leave NaN in the caching allocator's next blocks, so unwritten outputs show up."""
    junk = [torch.full((max(1, n // 4),), float("nan"), dtype=torch.float32, device=DEV) for n in nbytes]
    del junk


def run_kernel(inp, poison=True):
    b, s_q, h_q, _ = inp["q"].shape
    if poison:
        poison_allocator([b * s_q * h_q * D_V * 2 + 256, b * s_q * h_q * 4 + 256])
    return torch_flashmla.sparse_mla_decode(**inp, softmax_scale=SCALE)


def run_reference(inp):
    return reference.sparse_mla_decode(*(inp[k] for k in INPUT_KEYS), D_V, SCALE)


def check_close(out, lse, ref_out, ref_lse, tag=""):
    b, s_q, h_q, _ = ref_out.shape
    assert out.shape == ref_out.shape and out.dtype == torch.bfloat16, f"{tag}: out {out.shape} {out.dtype}"
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32, f"{tag}: lse {lse.shape} {lse.dtype}"
    assert not torch.isnan(out).any(), f"{tag}: NaN in out at {torch.isnan(out).nonzero()[:5].tolist()}"
    assert not torch.isnan(lse).any(), f"{tag}: NaN in lse at {torch.isnan(lse).nonzero()[:5].tolist()}"
    assert not torch.isinf(out).any(), f"{tag}: inf in out"
    # Empty rows (nothing to attend to): lse exactly +inf, out exactly 0.
    empty = torch.isposinf(ref_lse)                                   # [b, h_q, s_q]
    lse_empty = torch.isposinf(lse)
    assert torch.equal(empty, lse_empty), \
        f"{tag}: +inf pattern of lse differs at {(empty != lse_empty).nonzero()[:5].tolist()}"
    assert torch.isfinite(ref_lse[~empty]).all(), f"{tag}: reference lse not finite"
    assert torch.isfinite(lse[~empty]).all(), f"{tag}: -inf in lse"
    empty_rows = empty.permute(0, 2, 1)                               # [b, s_q, h_q]
    assert (out[empty_rows] == 0).all(), f"{tag}: out of empty rows is not 0"
    # Non-empty rows: elementwise and cosine-like tolerance.
    full = ~empty_rows
    assert_out_rows_close(out, ref_out, full, OUT_ABS, OUT_REL, COS_TOL, tag)
    if full.any():
        fin = ~empty
        lerr = (lse[fin] - ref_lse[fin]).abs()
        lbad = lerr > LSE_REL * ref_lse[fin].abs().clamp_min(1.0)
        assert not lbad.any(), f"{tag}: lse mismatch ({int(lbad.sum())} rows), max err {lerr.max().item():.3g}"


def check_inputs(inp, tag):
    out, lse = run_kernel(inp)
    ref_out, ref_lse = run_reference(inp)
    torch.cuda.synchronize()
    check_close(out, lse, ref_out, ref_lse, tag)
    return out, lse, ref_out, ref_lse


def check_case(case: SparseDecodeCase, seed: int = 0, num_sm_parts=None):
    return check_inputs(make_inputs(case, seed, num_sm_parts), case_id(case))


def flags_of(i: int):
    """The i-th rotation of (with_topk_length, extra cache, attn_sink)."""
    return dict(with_topk_length=bool(i & 1), extra_topk=256 if i & 2 else 0, with_attn_sink=bool(i & 4))


def poison_extra_tail(inp):
    """Put a NaN record in the extra cache's last slot and point every extra index past
    extra_topk_length at it (valid extra indices that hit that slot are moved to slot 0)."""
    flat = inp["extra_kv_cache"].view(torch.uint8).view(-1, kvc.FP8_RECORD_BYTES)
    last = flat.shape[0] - 1
    flat[last] = kvc.quantize_kv_fp8(torch.full((D_QK,), float("nan"), dtype=torch.bfloat16, device=DEV))
    idx, lens = inp["extra_indices"], inp["extra_topk_length"]
    idx = torch.where(idx == last, 0, idx)
    tail = torch.arange(idx.shape[-1], device=idx.device)[None, None, :] >= lens[:, None, None]
    inp["extra_indices"] = torch.where(tail, last, idx).to(torch.int32)
    return inp


def num_slots(cache):
    return cache.shape[0] * cache.shape[1]


# --------------------------------------------------------------------------------------------
# 0. the fast path is taken
# --------------------------------------------------------------------------------------------
def test_path_is_sm90():
    assert _registration.cuda_path("sparse_mla_decode", DEV) == "sm90"


@pytest.mark.parametrize("b,topk,num_sm_parts", [(2, 2048, 132), (74, 512, 66), (128, 16384, 7)])
def test_sparse_planner_matches_reference(b, topk, num_sm_parts):
    """The GPU planner with is_fp8_kvcache/topk set gives the reference's plan."""
    g = torch.Generator().manual_seed(b + topk)
    lens = torch.randint(0, topk + 1, (b,), generator=g).to(torch.int32)
    lens[1::4] = 0
    args = (64 * 2, 1, 64, True, topk, num_sm_parts)
    meta, splits = torch.ops.flashmla.get_mla_metadata(lens.to(DEV), *args)
    ref_meta, ref_splits = reference.get_mla_metadata(lens, *args)
    assert torch.equal(meta.cpu(), ref_meta) and torch.equal(splits.cpu(), ref_splits)


# --------------------------------------------------------------------------------------------
# 1. FlashMLA's sparse-decode matrix (a covering subset)
# --------------------------------------------------------------------------------------------
MATRIX = []
for _i, (_b, _h, _s, _k) in enumerate(itertools.product([2, 64, 74, 128], [64, 128], [1, 2], [128, 512, 2048])):
    # page size 64: 4096, 32768 or 1024 slots (topk 2048 over 1024 slots: duplicate indices)
    MATRIX.append(SparseDecodeCase(b=_b, h_q=_h, s_q=_s, topk=_k, num_blocks=[64, 512, 16][(_i // 2) % 3],
                                   **flags_of(_i)))
ALL_ON = [
    SparseDecodeCase(b=128, h_q=128, s_q=2, topk=2048, num_blocks=512, with_topk_length=True, with_attn_sink=True,
                     extra_topk=256, extra_page_size=32),
    SparseDecodeCase(b=74, h_q=64, s_q=1, topk=512, num_blocks=128, with_topk_length=True, with_attn_sink=True,
                     extra_topk=512, extra_page_size=64),
    SparseDecodeCase(b=64, h_q=128, s_q=4, topk=2048, num_blocks=256, with_topk_length=True, with_attn_sink=True,
                     extra_topk=128, extra_page_size=1),
    SparseDecodeCase(b=2, h_q=64, s_q=2, topk=128, num_blocks=4096, page_size=1, with_topk_length=True,
                     with_attn_sink=True, extra_topk=256, extra_page_size=128),
]


@pytest.mark.parametrize("case", MATRIX + ALL_ON, ids=[case_id(c) for c in MATRIX + ALL_ON])
def test_sparse_decode_matrix(case):
    check_case(case, seed=case_seed(case))


# --------------------------------------------------------------------------------------------
# 2. small head counts (padded to the kernel's head tile), other page sizes, huge topk
# --------------------------------------------------------------------------------------------
SMALL = []
for _i, (_h, _s) in enumerate(itertools.product([8, 16, 32], [1, 2, 4])):
    _ps = [64, 1, 32, 128][_i % 4]
    SMALL.append(SparseDecodeCase(b=[1, 3, 6][_i % 3], h_q=_h, s_q=_s, topk=64, page_size=_ps,
                                  num_blocks=max(2, 2048 // _ps), **flags_of(_i + 3)))
SMALL += [
    SparseDecodeCase(b=2, h_q=16, s_q=2, topk=16384, num_blocks=512, page_size=64, with_topk_length=True,
                     with_attn_sink=True, extra_topk=256, extra_page_size=32),
    SparseDecodeCase(b=3, h_q=8, s_q=4, topk=16384, num_blocks=200, page_size=128),
]


@pytest.mark.parametrize("case", SMALL, ids=[case_id(c) for c in SMALL])
def test_sparse_decode_small_heads(case):
    check_case(case, seed=case_seed(case))


ODD = [SparseDecodeCase(b=3, h_q=h, s_q=s, topk=k, num_blocks=64, **flags_of(i + 5))
       for i, (h, s, k) in enumerate([(1, 1, 128), (3, 2, 512), (63, 2, 256), (126, 1, 2048),
                                      # either side of the few-head kernel's 16-head tile (h_q <= 16; the
                                      # 64-head kernel above), of h_q 32 and of its 8-head tile (h_q <= 8)
                                      (15, 2, 1024), (16, 1, 640), (17, 1, 512), (31, 2, 2048), (33, 1, 640),
                                      (7, 1, 2048), (9, 2, 1024)])]


@pytest.mark.parametrize("case", ODD, ids=[case_id(c) for c in ODD])
def test_sparse_decode_odd_heads(case):
    """docs/design.md §2: any h_q in 1..128."""
    check_case(case, seed=case_seed(case))


# --------------------------------------------------------------------------------------------
# 3. nothing to attend to: out exactly 0, lse exactly +inf
# --------------------------------------------------------------------------------------------
EMPTY = [SparseDecodeCase(b=5, h_q=64, s_q=2, topk=512, num_blocks=32, with_attn_sink=True),
         SparseDecodeCase(b=4, h_q=128, s_q=1, topk=2048, num_blocks=64, with_topk_length=True, with_attn_sink=True,
                          extra_topk=256),
         SparseDecodeCase(b=3, h_q=16, s_q=4, topk=64, num_blocks=8, page_size=32, extra_topk=128)]


def assert_all_empty(out, lse, tag):
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), f"{tag}: NaN"
    assert (out == 0).all(), f"{tag}: out must be exactly 0, max |out| {out.float().abs().max().item():.3g}"
    assert torch.isposinf(lse).all(), f"{tag}: lse must be +inf"


@pytest.mark.parametrize("case", EMPTY, ids=[case_id(c) for c in EMPTY])
def test_all_indices_invalid(case):
    inp = make_inputs(case, seed=3)
    inp["indices"] = torch.full_like(inp["indices"], -1)
    if inp["extra_indices"] is not None:
        inp["extra_indices"] = torch.full_like(inp["extra_indices"], -1)
    out, lse, _, _ = check_inputs(inp, case_id(case) + " all -1")
    assert_all_empty(out, lse, case_id(case) + " all -1")


@pytest.mark.parametrize("extra", [False, True])
def test_topk_length_all_zero(extra):
    """Valid indices everywhere, but topk_length (and extra_topk_length) zero: nothing is attended."""
    case = SparseDecodeCase(b=6, h_q=64, s_q=2, topk=512, num_blocks=32, with_topk_length=True, with_attn_sink=True,
                            extra_topk=256 if extra else 0, invalid_fraction=0.0)
    inp = make_inputs(case, seed=4)
    inp["topk_length"] = torch.zeros_like(inp["topk_length"])
    if extra:
        inp["extra_topk_length"] = torch.zeros_like(inp["extra_topk_length"])
    replan(inp)
    out, lse, _, _ = check_inputs(inp, "topk_length = 0")
    assert_all_empty(out, lse, "topk_length = 0")


@pytest.mark.parametrize("extra", [False, True])
def test_main_cache_of_empty_pages(extra):
    """A main cache of pages with no tokens ([num_blocks, 0, 1, 656]: no slot, every index skipped), alone or
    next to a real extra cache: as the reference (nothing attended, or only the extra cache)."""
    case = SparseDecodeCase(b=4, h_q=64, s_q=2, topk=128, num_blocks=16, page_size=32, with_topk_length=True,
                            with_attn_sink=True, extra_topk=128 if extra else 0)
    inp = make_inputs(case, seed=8)
    inp["kv_cache"] = torch.empty(16, 0, 1, kvc.FP8_RECORD_BYTES, dtype=torch.uint8, device=DEV)
    out, lse, _, _ = check_inputs(inp, f"empty main pages, extra={extra}")
    if not extra:
        assert_all_empty(out, lse, "empty main pages")


def test_empty_rows_mixed():
    """Some requests (and one query of request 0) with all -1 next to full ones, one plan."""
    case = SparseDecodeCase(b=9, h_q=128, s_q=2, topk=2048, num_blocks=128, with_attn_sink=True)
    inp = make_inputs(case, seed=5)
    idx = inp["indices"].clone()
    idx[1::3] = -1
    idx[0, 1] = -1
    inp["indices"] = idx
    out, lse, _, ref_lse = check_inputs(inp, "mixed empty rows")
    assert torch.isposinf(ref_lse[1::3]).all() and torch.isposinf(ref_lse[0, :, 1]).all()
    assert torch.isfinite(ref_lse[0, :, 0]).all()


# --------------------------------------------------------------------------------------------
# 4. skipped indices pointing at NaN records or outside the cache
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [False, True])
def test_masked_nan_slots(extra):
    """Indices past topk_length point at a NaN record (main and extra cache): must not matter."""
    case = SparseDecodeCase(b=8, h_q=64, s_q=2, topk=1024, num_blocks=64, with_topk_length=True,
                            extra_topk=256 if extra else 0, invalid_fraction=0.3)
    inp = make_inputs(case, seed=6)
    if extra:
        poison_extra_tail(inp)
        assert (inp["extra_indices"] == num_slots(inp["extra_kv_cache"]) - 1).any()
    last = num_slots(inp["kv_cache"]) - 1
    assert (inp["indices"] == last).any(), "the test must point some skipped index at the NaN record"
    assert torch.isnan(kvc.dequantize_kv_fp8(inp["kv_cache"].view(-1, kvc.FP8_RECORD_BYTES)[last]).float()).all()
    check_inputs(inp, f"NaN tails extra={extra}")


@pytest.mark.parametrize("with_topk_length", [False, True])
def test_out_of_range_indices(with_topk_length):
    """-1 mixed with indices >= num_slots (up to INT32_MAX), in both caches: all skipped."""
    case = SparseDecodeCase(b=6, h_q=128, s_q=2, topk=512, num_blocks=16, with_topk_length=with_topk_length,
                            with_attn_sink=True, extra_topk=256, extra_page_size=32, invalid_fraction=0.2)
    inp = make_inputs(case, seed=7)
    g = torch.Generator(device="cpu").manual_seed(7)
    for key, cache_key in (("indices", "kv_cache"), ("extra_indices", "extra_kv_cache")):
        n = num_slots(inp[cache_key])
        idx = inp[key].cpu()
        bad_values = torch.tensor([n, n + 1, 2 * n, n + 4095, 2 ** 30, 2 ** 31 - 1], dtype=torch.int32)
        r = torch.rand(idx.shape, generator=g)
        pick = bad_values[torch.randint(0, len(bad_values), idx.shape, generator=g)]
        idx = torch.where(r < 0.25, pick, idx)
        idx[-1, :, : idx.shape[-1] // 2] = pick[-1, :, : idx.shape[-1] // 2]   # a long run of them
        inp[key] = idx.to(DEV)
    check_inputs(inp, f"out-of-range indices, topk_length={with_topk_length}")


# --------------------------------------------------------------------------------------------
# 5. the plan only changes the work split
# --------------------------------------------------------------------------------------------
SPLIT_CASES = [SparseDecodeCase(b=2, h_q=128, s_q=2, topk=2048, num_blocks=512, with_topk_length=True,
                                with_attn_sink=True, extra_topk=256),
               SparseDecodeCase(b=74, h_q=64, s_q=1, topk=512, num_blocks=64, with_topk_length=True),
               # few heads: split partials of the transposed kernel's 16-head tile, and h_q 24 (64-head kernel)
               SparseDecodeCase(b=9, h_q=16, s_q=2, topk=2048, num_blocks=256, with_topk_length=True,
                                with_attn_sink=True, extra_topk=256),
               SparseDecodeCase(b=33, h_q=24, s_q=1, topk=512, num_blocks=64, with_topk_length=True,
                                with_attn_sink=True)]


@pytest.mark.parametrize("num_sm_parts", [1, 7, 64, 132, 200])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=[case_id(c) for c in SPLIT_CASES])
def test_plan_split_invariance(case, num_sm_parts):
    inp = make_inputs(case, seed=8, num_sm_parts=num_sm_parts)
    assert inp["tile_scheduler_metadata"].shape[0] == num_sm_parts
    check_inputs(inp, f"{case_id(case)} num_sm_parts={num_sm_parts}")


# Long partitions: one or a few CTA pairs walk hundreds of chunks, as in the benchmarks (124 to
# 1000+ chunks per CTA). The producer's per-chunk synchronisation (stage barriers, the named
# barrier before the bulk copy to the peer) only meets its rare interleavings over long walks.
LONG_CASES = [SparseDecodeCase(b=16, h_q=128, s_q=2, topk=2048, num_blocks=512),
              SparseDecodeCase(b=16, h_q=64, s_q=1, topk=2048, num_blocks=512, with_topk_length=True),
              SparseDecodeCase(b=16, h_q=32, s_q=2, topk=2048, num_blocks=512, with_topk_length=True),
              SparseDecodeCase(b=16, h_q=8, s_q=1, topk=2048, num_blocks=512)]


@pytest.mark.parametrize("num_sm_parts", [1, 4])
@pytest.mark.parametrize("case", LONG_CASES, ids=[case_id(c) for c in LONG_CASES])
def test_long_partitions(case, num_sm_parts):
    inp = make_inputs(case, seed=11, num_sm_parts=num_sm_parts)
    check_inputs(inp, f"{case_id(case)} num_sm_parts={num_sm_parts}")


# --------------------------------------------------------------------------------------------
# 6. CUDA graph: planner + decode captured once, replayed with new indices and lengths
# --------------------------------------------------------------------------------------------
GRAPH_CASES = [SparseDecodeCase(b=8, h_q=64, s_q=2, topk=512, num_blocks=64, with_topk_length=True,
                                with_attn_sink=True, extra_topk=128),
               SparseDecodeCase(b=5, h_q=128, s_q=1, topk=2048, num_blocks=128),
               SparseDecodeCase(b=8, h_q=16, s_q=2, topk=512, num_blocks=64, with_topk_length=True,
                                with_attn_sink=True, extra_topk=128),
               SparseDecodeCase(b=6, h_q=32, s_q=1, topk=2048, num_blocks=128, with_topk_length=True)]


def capture_decode_graph(static, scale=SCALE):
    """The planner and sparse_mla_decode on ``static`` (inputs of make_inputs, their plan dropped here) captured in
    one CUDA graph. Returns the graph, its static out / lse, and the index tensors a replay may change (V3.2 and V4
    graph tests)."""
    static.pop("tile_scheduler_metadata")
    static.pop("num_splits")

    def step():
        meta, splits = plan(static)
        return torch_flashmla.sparse_mla_decode(**static, tile_scheduler_metadata=meta, num_splits=splits,
                                                softmax_scale=scale)

    graph, (out, lse) = capture_cuda_graph(step, warmup_iters=2)
    changing = [k for k in ("indices", "topk_length", "extra_indices", "extra_topk_length") if static[k] is not None]
    return graph, out, lse, changing


@pytest.mark.parametrize("case", GRAPH_CASES, ids=[case_id(c) for c in GRAPH_CASES])
def test_cuda_graph_replay(case):
    static = make_inputs(case, seed=20)
    graph, out, lse, changing = capture_decode_graph(static)
    for r in range(4):
        fresh = make_inputs(case, seed=100 + r)   # same shapes: its indices fit the captured caches
        for k in changing:
            static[k].copy_(fresh[k])
        if r == 1:
            static["q"].copy_(fresh["q"])
        if r == 2 and static["topk_length"] is not None:   # a plan for fewer real requests than captured
            static["topk_length"][case.b // 2:] = 0
            if static["extra_topk_length"] is not None:
                static["extra_topk_length"][case.b // 2:] = 0
        if r == 3:                                          # every index valid and every length full
            static["indices"].copy_(fresh["indices"].clamp_min(0) % (num_slots(static["kv_cache"]) - 1))
            if static["topk_length"] is not None:
                static["topk_length"].fill_(case.topk)
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = run_reference(static)
        check_close(out, lse, ref_out, ref_lse, f"{case_id(case)} graph replay {r}")
        if r == 2 and static["topk_length"] is not None:   # extra_topk_length (if any) is 0 there too
            assert torch.isposinf(lse[case.b // 2:]).all() and (out[case.b // 2:] == 0).all()


# --------------------------------------------------------------------------------------------
# 7. determinism, cache dtype views, strided inputs
# --------------------------------------------------------------------------------------------
DET_CASES = [SparseDecodeCase(b=2, h_q=64, s_q=1, topk=2048, num_blocks=512, with_topk_length=True,
                              with_attn_sink=True, extra_topk=256),
             SparseDecodeCase(b=128, h_q=128, s_q=2, topk=2048, num_blocks=256, with_topk_length=True,
                              extra_topk=256),
             SparseDecodeCase(b=64, h_q=16, s_q=2, topk=2048, num_blocks=256, with_topk_length=True,
                              extra_topk=256)]
# The producers write each stage with generic stores and only the math warpgroups fence the proxies
# (docs/design.md §5.2): a missing order between the two would show as calls that differ.
DET_REPEATS = 30


@pytest.mark.parametrize("case", DET_CASES, ids=[case_id(c) for c in DET_CASES])
def test_deterministic(case):
    inp = make_inputs(case, seed=9)
    out1, lse1 = run_kernel(inp)
    out1, lse1 = out1.clone(), lse1.clone()
    assert not torch.isnan(out1).any() and not torch.isnan(lse1).any()
    for i in range(DET_REPEATS):
        out2, lse2 = run_kernel(inp)
        assert torch.equal(out1, out2) and torch.equal(lse1, lse2), f"call {i + 2} differs from the first"


def test_fp8_view_of_cache():
    """A float8_e4m3fn view of the same cache bytes gives bitwise the same result as uint8."""
    case = SparseDecodeCase(b=4, h_q=64, s_q=2, topk=512, num_blocks=32, with_topk_length=True, extra_topk=128)
    inp = make_inputs(case, seed=10)
    out_u8, lse_u8 = (t.clone() for t in run_kernel(inp))
    viewed = dict(inp, kv_cache=inp["kv_cache"].view(torch.float8_e4m3fn),
                  extra_kv_cache=inp["extra_kv_cache"].view(torch.float8_e4m3fn))
    out_f8, lse_f8 = run_kernel(viewed)
    torch.cuda.synchronize()
    check_close(out_u8, lse_u8, *run_reference(inp), "uint8 cache")
    assert torch.equal(out_u8, out_f8) and torch.equal(lse_u8, lse_f8)


def test_strided_inputs():
    """Views accepted by the checks: q with a head stride, indices sliced from a wider buffer, caches
    whose block stride is padded (engines allocate pages in one padded buffer)."""
    case = SparseDecodeCase(b=5, h_q=64, s_q=2, topk=512, num_blocks=32, with_topk_length=True,
                            with_attn_sink=True, extra_topk=128, extra_page_size=32)
    inp = make_inputs(case, seed=12)
    b, s_q, h_q, _ = inp["q"].shape
    wide_q = torch.full((b, s_q, 2 * h_q, D_QK), float("nan"), dtype=inp["q"].dtype, device=DEV)
    wide_q[:, :, ::2] = inp["q"]
    wide_idx = torch.full((b, s_q, case.topk + 40), -1, dtype=torch.int32, device=DEV)
    wide_idx[..., 7:7 + case.topk] = inp["indices"]
    strided = dict(inp, q=wide_q[:, :, ::2], indices=wide_idx[..., 7:7 + case.topk])
    for key in ("kv_cache", "extra_kv_cache"):
        cache = inp[key]
        nb, ps = cache.shape[:2]
        buf = torch.full((nb, ps * kvc.FP8_RECORD_BYTES + 1024), 0xFF, dtype=torch.uint8, device=DEV)
        buf[:, :ps * kvc.FP8_RECORD_BYTES] = cache.reshape(nb, -1)
        strided[key] = buf[:, :ps * kvc.FP8_RECORD_BYTES].view(nb, ps, 1, kvc.FP8_RECORD_BYTES)
        assert not strided[key].is_contiguous()
    assert not strided["q"].is_contiguous() and not strided["indices"].is_contiguous()
    out, lse = run_kernel(strided)
    ref_out, ref_lse = run_reference(inp)
    torch.cuda.synchronize()
    check_close(out, lse, ref_out, ref_lse, "strided inputs")


def test_broadcast_and_single_row_q():
    """q with a broadcast (stride 0) dim is copied before the kernel's TMA map is made; q of one request
    and one query token (size-1 dims, whatever their strides) maps without a copy."""
    case = SparseDecodeCase(b=4, h_q=128, s_q=2, topk=256, num_blocks=32, with_topk_length=True)
    inp = make_inputs(case, seed=21)
    one = inp["q"][:1].clone()
    inp["q"] = one.expand(case.b, -1, -1, -1)  # every request asks the same question
    assert inp["q"].stride(0) == 0
    out, lse = run_kernel(inp)
    ref_out, ref_lse = run_reference(dict(inp, q=inp["q"].contiguous()))
    torch.cuda.synchronize()
    check_close(out, lse, ref_out, ref_lse, "broadcast q")

    single = SparseDecodeCase(b=1, h_q=64, s_q=1, topk=192, num_blocks=16)
    inp1 = make_inputs(single, seed=22)
    wide = torch.full((1, 1, 64, 2 * D_QK), float("nan"), dtype=inp1["q"].dtype, device=DEV)
    wide[..., :D_QK] = inp1["q"]
    inp1_view = dict(inp1, q=wide[..., :D_QK])  # head stride 2 * 576, size-1 batch and token dims
    out1, lse1 = run_kernel(inp1_view)
    torch.cuda.synchronize()
    check_close(out1, lse1, *run_reference(inp1), "single-row q")
