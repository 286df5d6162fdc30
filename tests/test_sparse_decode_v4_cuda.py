"""GPU tests of the SM90 sparse decode kernel over DeepSeek V4 ("MODEL1") FP8 pages, d_qk 512
(torch.ops.flashmla.sparse_mla_decode with a [num_blocks, page_size, 1, 584] cache), against the
float32 reference (torch_flashmla.reference.sparse_mla_decode) on the same GPU inputs.

Inputs come from the shared generator (torch_flashmla.testing.sparse_decode_inputs with d_qk=512) and
are then re-laid on the GPU with FlashMLA's padded page stride (or an odd one), every byte the kernel
must not read poisoned: page padding 0xFF, and every token that no attended index selects (unused
slots, the NaN token behind skipped indices past topk_length) 0xFF in its data and scale bytes
(e4m3 NaN values, UE8M0 NaN scales, NaN RoPE). Outputs come from an allocator filled with NaN.
Shapes: a covering subset of FlashMLA's V4 sparse-decode test (b up to 148, topk 64..16384, extra
topk 512..1024, page sizes 64/256 main and 2/64 extra, zero-length and all-invalid rows), odd head
counts, s_q 1..4, plans of 1..200 partitions, a CUDA-graph replay. Tolerances: those of the V3.2 sparse
decode tests (tests/test_sparse_decode_cuda.py, docs/design.md §7).
"""
from __future__ import annotations

import zlib

import pytest
import torch

pytestmark = pytest.mark.cuda

torch_flashmla = pytest.importorskip("torch_flashmla")
from torch_flashmla import _registration  # noqa: E402
from torch_flashmla import kv_cache as kvc  # noqa: E402
from torch_flashmla import reference  # noqa: E402
from torch_flashmla.testing import SparseDecodeCase, sparse_decode_inputs  # noqa: E402

from sm90 import require_sm90_kernel  # noqa: E402

require_sm90_kernel("sparse_mla_decode")

from test_sparse_decode_cuda import (DET_REPEATS, assert_all_empty, capture_decode_graph, check_close,  # noqa: E402
                                      plan, poison_allocator)

DEV = torch.device("cuda")
D_QK, D_V = kvc.V4_D_QK, 512
SCALE = D_QK ** -0.5
INPUT_KEYS = ("q", "kv_cache", "indices", "topk_length", "attn_sink", "extra_kv_cache", "extra_indices",
              "extra_topk_length")


def V4(**kw) -> SparseDecodeCase:
    return SparseDecodeCase(d_qk=D_QK, **kw)


def case_id(c: SparseDecodeCase) -> str:
    flags = ("L" if c.with_topk_length else "") + (f"E{c.extra_topk}p{c.extra_page_size}" if c.extra_topk else "") \
        + ("S" if c.with_attn_sink else "")
    return f"b{c.b}-h{c.h_q}-sq{c.s_q}-k{c.topk}-nb{c.num_blocks}p{c.page_size}" + (f"-{flags}" if flags else "")


def case_seed(case: SparseDecodeCase) -> int:
    return zlib.crc32(case_id(case).encode()) % 10007


# --------------------------------------------------------------------------------------------
# inputs: padded pages, poison everywhere the kernel must not look
# --------------------------------------------------------------------------------------------
def attended_slots(cache, indices, lengths):
    """bool [num_slots]: slots that some attended index selects."""
    n = cache.shape[0] * cache.shape[1]
    topk = indices.shape[-1]
    valid = (indices >= 0) & (indices < n)
    if lengths is not None:
        valid &= torch.arange(topk, device=indices.device)[None, None, :] < lengths[:, None, None]
    used = torch.zeros(n + 1, dtype=torch.bool, device=indices.device)
    used[torch.where(valid, indices, n).long().flatten()] = True
    return used[:n]


def relay(cache, used, page_stride=None, dtype=torch.uint8):
    """The V4 cache re-laid on the GPU with ``page_stride`` (default FlashMLA's), page padding 0xFF,
    and every slot not in ``used`` overwritten with 0xFF bytes (NaN values, NaN scales, NaN RoPE)."""
    num_blocks, page_size = cache.shape[0], cache.shape[1]
    if page_stride is None:
        out = kvc.new_fp8_v4_cache(num_blocks, page_size, device=DEV, fill=0xFF)
    else:
        storage = torch.full((num_blocks * page_stride,), 0xFF, dtype=torch.uint8, device=DEV).untyped_storage()
        out = torch.empty(0, dtype=torch.uint8, device=DEV).set_(
            storage, 0, (num_blocks, page_size, 1, kvc.V4_TOKEN_BYTES), (page_stride, kvc.V4_TOKEN_BYTES,
                                                                          kvc.V4_TOKEN_BYTES, 1))
    kvc.fp8_v4_pages(out).copy_(kvc.fp8_v4_pages(cache.to(DEV)))
    data, scales = kvc._v4_split(kvc.fp8_v4_pages(out), page_size)
    unused = (~used).nonzero().flatten()
    blk, off = unused // page_size, unused % page_size
    data[blk, off] = 0xFF
    scales[blk, off] = 0xFF
    return out if dtype == torch.uint8 else out.view(dtype)


def make_inputs(case: SparseDecodeCase, seed: int = 0, num_sm_parts=None, page_stride=None, extra_page_stride=None,
                dtype=torch.uint8):
    inp = sparse_decode_inputs(case, device=DEV, seed=seed, num_sm_parts=num_sm_parts)
    inp["kv_cache"] = relay(inp["kv_cache"], attended_slots(inp["kv_cache"], inp["indices"], inp["topk_length"]),
                            page_stride, dtype)
    if inp["extra_kv_cache"] is not None:
        used = attended_slots(inp["extra_kv_cache"], inp["extra_indices"], inp["extra_topk_length"])
        inp["extra_kv_cache"] = relay(inp["extra_kv_cache"], used, extra_page_stride, dtype)
    return inp


def run_kernel(inp):
    b, s_q, h_q, _ = inp["q"].shape
    poison_allocator([b * s_q * h_q * D_V * 2 + 256, b * s_q * h_q * 4 + 256])
    return torch_flashmla.sparse_mla_decode(**inp, softmax_scale=SCALE)


def run_reference(inp):
    return reference.sparse_mla_decode(*(inp[k] for k in INPUT_KEYS), D_V, SCALE)


def check_inputs(inp, tag):
    out, lse = run_kernel(inp)
    ref_out, ref_lse = run_reference(inp)
    torch.cuda.synchronize()
    check_close(out, lse, ref_out, ref_lse, tag)
    return out, lse, ref_out, ref_lse


def check_case(case, **kw):
    return check_inputs(make_inputs(case, seed=case_seed(case), **kw), case_id(case))


# --------------------------------------------------------------------------------------------
# 0. V4 calls reach the kernel
# --------------------------------------------------------------------------------------------
def test_v4_routed_to_sm90_kernel():
    assert _registration.cuda_path("sparse_mla_decode", DEV) == "sm90"


# --------------------------------------------------------------------------------------------
# 1. FlashMLA's V4 shapes (a covering subset), odd head counts, s_q 1..4
# --------------------------------------------------------------------------------------------
MATRIX = [
    V4(b=2, h_q=64, s_q=1, topk=64, num_blocks=16, page_size=64),
    V4(b=2, h_q=128, s_q=2, topk=128, num_blocks=8, page_size=256, with_topk_length=True, with_attn_sink=True,
       extra_topk=512, extra_page_size=2),
    V4(b=64, h_q=64, s_q=2, topk=512, num_blocks=64, page_size=64, with_topk_length=True, extra_topk=1024,
       extra_page_size=64),
    V4(b=74, h_q=128, s_q=1, topk=2048, num_blocks=32, page_size=256, with_attn_sink=True),
    V4(b=148, h_q=128, s_q=2, topk=128, num_blocks=256, page_size=64, with_topk_length=True, with_attn_sink=True,
       extra_topk=1024, extra_page_size=2),
    V4(b=148, h_q=64, s_q=2, topk=128, num_blocks=64, page_size=256, with_attn_sink=True, extra_topk=512,
       extra_page_size=64),
    V4(b=6, h_q=128, s_q=4, topk=16384, num_blocks=128, page_size=256, with_topk_length=True, with_attn_sink=True,
       extra_topk=512, extra_page_size=64),
    V4(b=148, h_q=64, s_q=1, topk=16384, num_blocks=512, page_size=64, with_topk_length=True),
    V4(b=3, h_q=128, s_q=3, topk=1024, num_blocks=32, page_size=64, extra_topk=1024, extra_page_size=2),
    V4(b=4, h_q=128, s_q=2, topk=4096, num_blocks=64, page_size=64, with_topk_length=True, extra_topk=1024,
       extra_page_size=64, with_attn_sink=True),
]
ODD = [V4(b=3, h_q=h, s_q=s, topk=k, num_blocks=32, page_size=64, with_topk_length=bool(i & 1),
          with_attn_sink=bool(i & 2), extra_topk=512 if i & 1 else 0, extra_page_size=2)
       for i, (h, s, k) in enumerate([(1, 1, 64), (16, 4, 256), (32, 2, 128), (100, 2, 512), (127, 1, 2048),
                                      # few heads on long index lists (h_q <= 16: the transposed kernel,
                                      # 8- or 16-head tile)
                                      (8, 2, 4096), (24, 1, 16384), (12, 2, 1024), (32, 2, 1024), (9, 1, 2048),
                                      (5, 2, 512)])]


@pytest.mark.parametrize("case", MATRIX + ODD, ids=[case_id(c) for c in MATRIX + ODD])
def test_sparse_decode_v4_matrix(case):
    check_case(case)


# --------------------------------------------------------------------------------------------
# 2. page strides and dtypes: FlashMLA's (multiple of 576), the tightest 16-byte one, an 8-byte one
#    (copied by the entry point), a float8_e4m3fn view
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stride_pad,dtype", [(None, torch.uint8), (0, torch.uint8), (8, torch.uint8),
                                              (None, torch.float8_e4m3fn)])
def test_sparse_decode_v4_page_strides(stride_pad, dtype):
    case = V4(b=5, h_q=128, s_q=2, topk=512, num_blocks=16, page_size=64, with_topk_length=True,
              with_attn_sink=True, extra_topk=512, extra_page_size=2)
    ps = None if stride_pad is None else 64 * kvc.V4_TOKEN_BYTES + stride_pad
    eps = None if stride_pad is None else 2 * kvc.V4_TOKEN_BYTES + stride_pad + (8 if stride_pad == 0 else 0)
    inp = make_inputs(case, seed=31, page_stride=ps, extra_page_stride=eps, dtype=dtype)
    if ps is not None:
        assert inp["kv_cache"].stride(0) == ps
    check_inputs(inp, f"page stride {ps}/{eps} {dtype}")


# --------------------------------------------------------------------------------------------
# 3. nothing to attend to; skipped indices
# --------------------------------------------------------------------------------------------
EMPTY = [V4(b=5, h_q=64, s_q=2, topk=512, num_blocks=16, page_size=64, with_attn_sink=True),
         V4(b=4, h_q=128, s_q=1, topk=2048, num_blocks=16, page_size=256, with_topk_length=True,
            with_attn_sink=True, extra_topk=1024, extra_page_size=64)]


@pytest.mark.parametrize("case", EMPTY, ids=[case_id(c) for c in EMPTY])
def test_v4_all_indices_invalid(case):
    inp = make_inputs(case, seed=3)
    inp["indices"] = torch.full_like(inp["indices"], -1)
    if inp["extra_indices"] is not None:
        inp["extra_indices"] = torch.full_like(inp["extra_indices"], -1)
    out, lse, _, _ = check_inputs(inp, case_id(case) + " all -1")
    assert_all_empty(out, lse, case_id(case) + " all -1")


@pytest.mark.parametrize("extra", [False, True])
def test_v4_zero_lengths(extra):
    case = V4(b=6, h_q=128, s_q=2, topk=512, num_blocks=16, page_size=64, with_topk_length=True,
              with_attn_sink=True, extra_topk=512 if extra else 0, extra_page_size=2, invalid_fraction=0.0)
    inp = make_inputs(case, seed=4)
    inp["topk_length"] = torch.zeros_like(inp["topk_length"])
    if extra:
        inp["extra_topk_length"] = torch.zeros_like(inp["extra_topk_length"])
    inp["tile_scheduler_metadata"], inp["num_splits"] = plan(inp)
    out, lse, _, _ = check_inputs(inp, "topk_length = 0")
    assert_all_empty(out, lse, "topk_length = 0")


def test_v4_mixed_empty_rows_and_out_of_range():
    """Requests with every index -1 next to full ones; indices >= num_slots (up to INT32_MAX) in both caches."""
    case = V4(b=9, h_q=128, s_q=2, topk=1024, num_blocks=16, page_size=64, with_attn_sink=True, extra_topk=512,
              extra_page_size=64)
    inp = make_inputs(case, seed=5)
    g = torch.Generator(device="cpu").manual_seed(5)
    for key, cache_key in (("indices", "kv_cache"), ("extra_indices", "extra_kv_cache")):
        n = inp[cache_key].shape[0] * inp[cache_key].shape[1]
        idx = inp[key].cpu()
        bad = torch.tensor([n, n + 1, 2 * n, 2 ** 30, 2 ** 31 - 1], dtype=torch.int32)
        pick = bad[torch.randint(0, len(bad), idx.shape, generator=g)]
        idx = torch.where(torch.rand(idx.shape, generator=g) < 0.25, pick, idx)
        idx[1::3] = -1
        inp[key] = idx.to(DEV)
    out, lse, _, ref_lse = check_inputs(inp, "mixed empty rows, out-of-range indices")
    assert torch.isposinf(ref_lse[1::3]).all() and torch.isfinite(ref_lse[0]).all()


# --------------------------------------------------------------------------------------------
# 4. the plan only changes the work split; CUDA graph replay
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_sm_parts", [1, 7, 200])
def test_v4_plan_split_invariance(num_sm_parts):
    case = V4(b=4, h_q=128, s_q=2, topk=2048, num_blocks=32, page_size=64, with_topk_length=True,
              with_attn_sink=True, extra_topk=512, extra_page_size=2)
    inp = make_inputs(case, seed=8, num_sm_parts=num_sm_parts)
    check_inputs(inp, f"num_sm_parts={num_sm_parts}")


@pytest.mark.parametrize("case", [V4(b=8, h_q=64, s_q=2, topk=512, num_blocks=16, page_size=64,
                                     with_topk_length=True, with_attn_sink=True, extra_topk=512, extra_page_size=2),
                                  V4(b=5, h_q=128, s_q=1, topk=2048, num_blocks=16, page_size=256)],
                         ids=case_id)
def test_v4_cuda_graph_replay(case):
    static = make_inputs(case, seed=20)
    graph, out, lse, changing = capture_decode_graph(static, SCALE)
    for r in range(3):
        # Same shapes; the fresh indices may select slots poisoned in the captured caches, so the
        # caches' bytes are refreshed in place too (the kernel reads them through the same pointers).
        fresh = make_inputs(case, seed=100 + r)
        for k in changing + ["q"]:
            static[k].copy_(fresh[k])
        for k in ("kv_cache", "extra_kv_cache"):
            if static[k] is not None:
                kvc.fp8_v4_pages(static[k]).copy_(kvc.fp8_v4_pages(fresh[k]))
        if r == 1 and static["topk_length"] is not None:   # a plan for fewer real requests than captured
            static["topk_length"][case.b // 2:] = 0
            if static["extra_topk_length"] is not None:
                static["extra_topk_length"][case.b // 2:] = 0
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = run_reference(static)
        check_close(out, lse, ref_out, ref_lse, f"{case_id(case)} graph replay {r}")
        if r == 1 and static["topk_length"] is not None:
            assert torch.isposinf(lse[case.b // 2:]).all() and (out[case.b // 2:] == 0).all()


@pytest.mark.parametrize("h_q", [16, 64, 128])  # the few-head, single-CTA and cluster kernels
def test_v4_deterministic(h_q):
    case = V4(b=16, h_q=h_q, s_q=2, topk=2048, num_blocks=64, page_size=64, with_topk_length=True, extra_topk=512,
              extra_page_size=2)
    inp = make_inputs(case, seed=9)
    out1, lse1 = run_kernel(inp)
    assert not torch.isnan(out1).any() and not torch.isnan(lse1).any()
    for i in range(DET_REPEATS):
        out2, lse2 = run_kernel(inp)
        assert torch.equal(out1, out2) and torch.equal(lse1, lse2), f"call {i + 2} differs from the first"


def test_v4_layout_mismatch_refused():
    """The extra cache must have the main cache's layout; q's width must match it."""
    case = V4(b=2, h_q=64, s_q=1, topk=64, num_blocks=4, extra_topk=512, extra_page_size=64)
    inp = make_inputs(case, seed=1)
    v32 = sparse_decode_inputs(SparseDecodeCase(b=2, h_q=64, s_q=1, topk=64, num_blocks=4), device=DEV)
    bad = dict(inp, extra_kv_cache=v32["kv_cache"])
    with pytest.raises((ValueError, RuntimeError)):
        torch_flashmla.sparse_mla_decode(**bad, softmax_scale=SCALE)
    bad = dict(inp, q=v32["q"])
    with pytest.raises((ValueError, RuntimeError)):
        torch_flashmla.sparse_mla_decode(**bad, softmax_scale=SCALE)

