"""GPU tests of the SM90 dense MLA decode over the per-tensor e4m3 cache (``mla_decode`` with
``descale_k``, q bf16 or float8_e4m3fn with ``descale_q``), against the float32 reference evaluated on
the same GPU (torch_flashmla.reference.mla_decode: attention over the dequantized cache and q, a bf16 q
first quantized per row as the kernel does).

Error model (docs/design.md §5.1): QK multiplies e4m3 by e4m3 on FP8 tensor cores (exact products); P is
rounded to e4m3 before PV. Every output element must lie within reference.mla_decode_fp8_error_bound
(2^-4 relative per weight from P's rounding, 2^-10 absolute in e4m3's subnormal range, the scores'
accumulation by the FP8 tensor cores, the bf16 output); lse within its bound there (the accumulation only:
lse does not see P's rounding) + 1e-6. Against the BF16 kernel on the same dequantized data: the sum of
the two kernels' bounds.

Inputs: NaN (e4m3 0x7F) in every cache slot outside a sequence, garbage block-table tails, zero-length
requests, the allocator poisoned with NaN before the call.
"""
from __future__ import annotations

import itertools

import pytest
import torch

pytestmark = pytest.mark.cuda

torch_flashmla = pytest.importorskip("torch_flashmla")
from torch_flashmla import compat, reference  # noqa: E402
from torch_flashmla import kv_cache as kvc  # noqa: E402
from torch_flashmla.testing import capture_cuda_graph  # noqa: E402

from attention_asserts import assert_attention_close  # noqa: E402
import paged_decode_inputs as paged  # noqa: E402
from paged_decode_inputs import poison_allocator  # noqa: E402
from sm90 import require_sm90_kernel  # noqa: E402

require_sm90_kernel("mla_decode")

DEV = torch.device("cuda")
D_QK, D_V = 576, 512
SCALE = D_QK ** -0.5


def make_inputs(b, s_q, h_q, h_kv, s_k, *, page_size=64, varlen=False, zeros=False, q_fp8=False, seed=0,
                descale_k=0.0123, descale_q=0.0171, num_sm_parts=None, bad_pages=0.0):
    """The 16-bit decode inputs (tests/paged_decode_inputs.py, unit-variance values: the abs part of the
    tolerance assumes that scale) with the cache quantized per tensor to e4m3 (NaN slots -> 0x7F) and q
    optionally too. Returns (q, cache e4m3, table, lens, plan, descale_q or None, descale_k)."""
    q, cache, table, lens, plan = paged.make_inputs(b, s_q, h_q, h_kv, s_k, page_size=page_size, varlen=varlen,
                                                    zeros=zeros, seed=seed, num_sm_parts=num_sm_parts,
                                                    is_fp8_kvcache=True, bad_pages=bad_pages)
    dk = torch.tensor([descale_k], dtype=torch.float32, device=DEV)
    cache8 = kvc.quantize_per_tensor_e4m3(cache, dk).view(torch.float8_e4m3fn)
    dq = None
    if q_fp8:
        dq = torch.tensor([descale_q], dtype=torch.float32, device=DEV)
        q = kvc.quantize_per_tensor_e4m3(q, dq).view(torch.float8_e4m3fn)
    return q, cache8, table, lens, plan, dq, dk


def run_fp8(q, cache, table, lens, plan, causal, dq, dk):
    b, s_q, h_q, _ = q.shape
    poison_allocator([b * s_q * h_q * D_V // 2 + 64, b * s_q * h_q + 64])
    return torch.ops.flashmla.mla_decode(q, cache, table, lens, D_V, SCALE, causal, plan[0], plan[1], dq, dk)


def assert_fp8_close(out, lse, q, cache, table, lens, causal, dq, dk):
    """out and lse within the FP8 error bounds of the reference (+ 1e-6), +inf lse exactly where the
    reference has it, no NaN. Returns the reference's (out, lse, out bound, lse bound)."""
    ref_out, ref_lse = reference.mla_decode(q, cache, table, lens, D_V, SCALE, causal, None, None, dq, dk)
    bound, lse_bound = reference.mla_decode_fp8_error_bound(q, cache, table, lens, D_V, SCALE, causal, dq, dk)
    torch.cuda.synchronize()
    assert out.dtype == torch.bfloat16 and not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(torch.isposinf(lse), torch.isposinf(ref_lse))
    err = (out.double() - ref_out.double()).abs()
    bad = err > bound.double() + 1e-6
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} elements past the bound, worst err / bound "
                           f"{(err / (bound.double() + 1e-6)).max().item():.3g}, first at {bad.nonzero()[:3].tolist()}")
    fin = torch.isfinite(ref_lse)
    lse_err = (lse[fin].double() - ref_lse[fin].double()).abs()
    lse_bad = lse_err > lse_bound[fin].double() + 1e-6
    assert not lse_bad.any(), (f"{int(lse_bad.sum())} lse values past the bound, worst err / bound "
                               f"{(lse_err / (lse_bound[fin].double() + 1e-6)).max().item():.3g}")
    return ref_out, ref_lse, bound, lse_bound


def check_case(b, s_q, h_q, h_kv, s_k, causal, q_fp8, varlen, zeros, seed, **kw):
    q, cache, table, lens, plan, dq, dk = make_inputs(b, s_q, h_q, h_kv, s_k, varlen=varlen, zeros=zeros,
                                                      q_fp8=q_fp8, seed=seed, **kw)
    out, lse = run_fp8(q, cache, table, lens, plan, causal, dq, dk)
    assert_fp8_close(out, lse, q, cache, table, lens, causal, dq, dk)
    return out, lse


# Up to 32 query rows per kv head (s_q * h_q / h_kv) run the transposed 32-row kernel, more the 64-row one:
# h_q 1 and 64 / 8 kv heads are all 32-row cases, h_q 9 is 32-row at s_q 1, 2 and 64-row at s_q 4.
HEADS = [(1, 1), (9, 1), (64, 1), (128, 1), (126, 2), (64, 8)]
SMALL = list(itertools.product(HEADS, [1, 2, 4], [20, 140, 1500, 4096]))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,s_q,s_k", SMALL, ids=[f"h{h}_{k}-sq{s}-sk{n}" for (h, k), s, n in SMALL])
def test_fp8_decode_matrix(heads, s_q, s_k, causal):
    h_q, h_kv = heads
    i = SMALL.index((heads, s_q, s_k))
    b = [1, 2, 6][i % 3]
    check_case(b, s_q, h_q, h_kv, s_k, causal, q_fp8=(i + causal) % 2 == 1, varlen=(i % 2 == 1) and b > 1,
               zeros=(i % 4 == 3), seed=i)


LARGE = [
    (64, 1, 16, 1, 32768, False, False),
    (128, 1, 64, 1, 8192, False, True),
    (128, 1, 128, 1, 4096, False, False),
    (128, 2, 128, 1, 4096, True, True),
    (64, 4, 128, 1, 8192, True, False),
    (4096, 1, 16, 1, 300, False, False),
    (2, 2, 64, 1, 131072, True, False),
    (128, 2, 16, 1, 8192, True, True),  # 32 query rows: the transposed (32-row) kernel, causal, e4m3 q
]


@pytest.mark.parametrize("case", LARGE, ids=[f"b{c[0]}-sq{c[1]}-h{c[2]}_{c[3]}-sk{c[4]}-qfp8{int(c[6])}" for c in LARGE])
def test_fp8_decode_large(case):
    b, s_q, h_q, h_kv, s_k, causal, q_fp8 = case
    check_case(b, s_q, h_q, h_kv, s_k, causal, q_fp8, varlen=True, zeros=True, seed=sum(case[:5]))


# h_q 64 at s_q 2: 128 query rows; h_q 32 at s_q 2: 64 rows, one tile of the 64-row kernel.
@pytest.mark.parametrize("h_q", [64, 32])
@pytest.mark.parametrize("num_sm_parts", [1, 3, 200])
def test_fp8_decode_odd_partitions(num_sm_parts, h_q):
    check_case(6, 2, h_q, 1, 1000, True, False, True, True, seed=num_sm_parts + (h_q == 32), num_sm_parts=num_sm_parts)


# Many requests per CTA on the large-page 64-row kernel, whose WG0 refills Q at every request boundary while the
# product warpgroups store the previous request: h_q 48 leaves rows 48-63 of the tile past m_total, zero-length
# requests are skipped between, q bf16 and e4m3.
@pytest.mark.parametrize("q_fp8", [False, True])
@pytest.mark.parametrize("h_q", [48, 64])
def test_fp8_decode_many_requests_per_cta(h_q, q_fp8):
    check_case(11, 1, h_q, 1, 700, False, q_fp8, True, True, seed=h_q + q_fp8, num_sm_parts=2)


# h_q 32: the 32-row kernel, h_q 64: the 64-row kernel; page ids outside the cache in one case.
@pytest.mark.parametrize("h_q,bad_pages", [(32, 0.0), (64, 0.0), (64, 0.2)])
@pytest.mark.parametrize("page_size", [128, 256])
def test_fp8_decode_page_sizes(page_size, h_q, bad_pages):
    seed = page_size if h_q == 32 else page_size + h_q + int(bad_pages * 10)
    check_case(6, 1, h_q, 1, 2900, False, True, True, True, seed=seed, page_size=page_size, bad_pages=bad_pages)


# Pages that are not a multiple of 64 tokens (e4m3 pairs loaded in page slices, then converted): short
# (precise path) and long requests, out-of-range ids inside the sequences, q bf16 and e4m3.
SMALL_PAGES = [1, 2, 3, 4, 16, 32, 48, 96]
PAGE_CASES = [
    # b, s_q, h_q, h_kv, s_k, causal, q_fp8, bad_pages
    (6, 1, 32, 1, 900, False, True, 0.0),
    (4, 2, 64, 1, 2900, True, False, 0.3),
    (3, 1, 128, 1, 1500, False, False, 0.0),
]


@pytest.mark.parametrize("case", range(len(PAGE_CASES)))
@pytest.mark.parametrize("page_size", SMALL_PAGES)
def test_fp8_decode_small_pages(page_size, case):
    b, s_q, h_q, h_kv, s_k, causal, q_fp8, bad = PAGE_CASES[case]
    check_case(b, s_q, h_q, h_kv, s_k, causal, q_fp8, varlen=True, zeros=True, seed=page_size * 10 + case,
               page_size=page_size, bad_pages=bad)


def test_fp8_uint8_cache_same_as_float8():
    q, cache, table, lens, plan, dq, dk = make_inputs(4, 1, 64, 1, 3000, varlen=True, zeros=True, seed=3)
    a = run_fp8(q, cache, table, lens, plan, False, dq, dk)
    b = run_fp8(q, cache.view(torch.uint8), table, lens, plan, False, dq, dk)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("h_q,s_k", [(16, 3000), (64, 500), (128, 5000)])
def test_fp8_vs_bf16_kernel_on_dequantized_data(h_q, s_k):
    """Bound on the difference from the BF16 kernel over the same dequantized values (descale 2^-6 makes
    e4m3 * descale exact in bf16; the BF16 kernel gets q as the FP8 kernel quantizes it, also exact in
    bf16): the FP8 bound plus the 16-bit decode tolerance (abs 8e-4 + rel 2/128 of the reference)."""
    q, cache, table, lens, plan, dq, dk = make_inputs(8, 2, h_q, 1, s_k, varlen=True, zeros=True, seed=h_q,
                                                      descale_k=2.0 ** -6)
    out8, lse8 = run_fp8(q, cache, table, lens, plan, True, dq, dk)
    deq = kvc.dequantize_per_tensor_e4m3(cache, dk).to(torch.bfloat16)
    assert torch.equal(deq.float().nan_to_num(), kvc.dequantize_per_tensor_e4m3(cache, dk).nan_to_num())
    q8, factor = kvc.quantize_rows_e4m3_pow2(q)
    q16 = (q8.float() / factor).to(torch.bfloat16)
    assert torch.equal(q16.float(), q8.float() / factor)
    out16, lse16 = torch.ops.flashmla.mla_decode(q16, deq, table, lens, D_V, SCALE, True, plan[0], plan[1])
    ref_out, ref_lse, bound, lse_bound = assert_fp8_close(out8, lse8, q, cache, table, lens, True, dq, dk)
    assert_attention_close(out16, lse16, ref_out, ref_lse)
    diff = (out8.double() - out16.double()).abs()
    assert (diff <= bound.double() + 8e-4 + (2 / 128) * ref_out.double().abs()).all(), f"max diff {diff.max().item():.3g}"
    fin = torch.isfinite(ref_lse)
    assert ((lse8 - lse16)[fin].abs() <= lse_bound[fin] + 1e-6 + (8 / 65536) * ref_lse[fin].abs()).all()


@pytest.mark.parametrize("page_size", [64, 2])
@pytest.mark.parametrize("h_q", [64, 16])
def test_fp8_decode_cuda_graph_replay(page_size, h_q):
    """Plan + FP8 decode captured once, replayed with new lengths, block tables and a new descale_k value
    (read on the device at replay). h_q 16 with s_q 2 is 32 query rows: the transposed kernel."""
    b, s_q, s_k = 8, 2, 2000
    q, cache, table, lens, _, dq, dk = make_inputs(b, s_q, h_q, 1, s_k, varlen=True, zeros=True, q_fp8=True, seed=11,
                                                   page_size=page_size)
    static_lens, static_table, static_dk = lens.clone(), table.clone(), dk.clone()

    def step():
        meta, splits = torch_flashmla.get_mla_metadata(static_lens, s_q * h_q, 1, h_q, is_fp8_kvcache=True)
        return torch_flashmla.mla_decode(q, cache, static_table, static_lens, meta, splits, causal=True,
                                         descale_q=dq, descale_k=static_dk)

    graph, (out, lse) = capture_cuda_graph(step, warmup_iters=2)
    for seed in range(3):
        _, _, table2, lens2, _, _, _ = make_inputs(b, s_q, h_q, 1, s_k, varlen=True, zeros=(seed != 1), seed=100 + seed,
                                                   page_size=page_size)
        lens2 = torch.minimum(lens2, lens)  # stay within the pages this cache fills
        static_lens.copy_(lens2)
        static_table.copy_(table)
        static_dk.fill_(0.0123 * (0.5 + 0.25 * seed))  # new values, dequantized magnitudes <= the written ones
        graph.replay()
        torch.cuda.synchronize()
        assert_fp8_close(out, lse, q, cache, table, lens2, True, dq, static_dk)


def test_fp8_compat_flash_mla_with_kvcache():
    """The FP8 dense fork's call form: is_fp8_kvcache=True with descale_q / descale_k."""
    q, cache, table, lens, plan, dq, dk = make_inputs(4, 2, 128, 1, 1700, varlen=True, zeros=True, q_fp8=True, seed=21)
    meta, splits = compat.get_mla_metadata(lens, 2 * 128, 1, 128, True)
    out, lse = compat.flash_mla_with_kvcache(q, cache, table, lens, D_V, meta, splits, causal=True,
                                             is_fp8_kvcache=True, descale_q=dq, descale_k=dk)
    assert_fp8_close(out, lse, q, cache, table, lens, True, dq, dk)
