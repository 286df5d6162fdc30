"""Seeded random configurations of the attention ops on the GPU, drawn between and off the grid points of
the per-op matrices (any h_q with h_kv dividing it, s_q 1..4, any length, page sizes that are not a power of
two, odd partition counts, topk of any size with duplicate and mostly invalid indices, every optional
input), with the per-op files' input generators and poisoning (imported from them). The configurations are
drawn once from a fixed seed: the same ids, and the same inputs, in every run.

Each output element is checked against the reference's error model of the kernel (``reference.*_error_bound``:
P and out rounded to 16 bits, docs/design.md §7) rather than the matrices' fixed tolerances: those assume
that a row averages many distinct keys, which index lists full of duplicates or of invalid entries (and
causal rows near a sequence start) do not, while the model holds for any input. lse keeps the fixed
relative tolerance; the FP8 dense cases use their own model (``reference.mla_decode_fp8_error_bound``).

    python -m pytest -q -m cuda tests/test_random_sweep_cuda.py
"""
from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

pytestmark = pytest.mark.cuda

pytest.importorskip("torch_flashmla")
import torch_flashmla  # noqa: E402
from torch_flashmla import kv_cache as kvc, reference, testing as T  # noqa: E402
from torch_flashmla.testing import SparseDecodeCase, SparsePrefillCase  # noqa: E402

# The per-op test modules skip (at import) without an SM90 GPU and kernels; so does this one.
import test_dense_decode_cuda as dense16  # noqa: E402
import test_dense_decode_fp8_cuda as dense8  # noqa: E402
import test_sparse_decode_cuda as sparse32  # noqa: E402
import test_sparse_decode_v4_cuda as sparse4  # noqa: E402
import test_sparse_prefill_cuda as prefill  # noqa: E402
import test_mha_prefill_cuda as mha  # noqa: E402
import paged_decode_inputs as paged  # noqa: E402
from attention_asserts import DECODE_TOL, MHA_PREFILL_TOL, PREFILL_TOL, assert_within_error_model  # noqa: E402

_rng = random.Random(20261204)


def _log_uniform(lo: int, hi: int) -> int:
    return int(round(math.exp(_rng.uniform(math.log(lo), math.log(hi)))))


def _length(short_hi: int, long_lo: int, long_hi: int) -> int:
    """Half short (log-uniform from 1: single chunks, partial chunks, the short-request paths), half long
    (many chunks per partition, split requests and the combine)."""
    return _log_uniform(1, short_hi) if _rng.random() < 0.5 else _rng.randint(long_lo, long_hi)


@dataclasses.dataclass(frozen=True)
class DenseConfig:
    b: int
    s_q: int
    h_q: int
    h_kv: int
    s_k: int
    page_size: int
    causal: bool
    varlen: bool
    zeros: bool
    half: bool          # fp16 (16-bit cache) / an e4m3 q (FP8 cache)
    num_sm_parts: int   # 0: the default plan
    bad_pages: float

    def id(self) -> str:
        return (f"b{self.b}-sq{self.s_q}-h{self.h_q}_{self.h_kv}-sk{self.s_k}-p{self.page_size}"
                f"{'-c' if self.causal else ''}{'-v' if self.varlen else ''}{'-z' if self.zeros else ''}"
                f"{'-h' if self.half else ''}{f'-n{self.num_sm_parts}' if self.num_sm_parts else ''}"
                f"{'-bad' if self.bad_pages else ''}")


def _dense_config() -> DenseConfig:
    h_kv = _rng.choice([1, 1, 1, 1, 2, 4, 8])
    return DenseConfig(b=_rng.randint(1, 9), s_q=_rng.randint(1, 4), h_q=h_kv * _rng.randint(1, 128 // h_kv),
                       h_kv=h_kv, s_k=_length(2000, 1025, 20000),
                       page_size=_rng.choice([64, 64, 64, 128, 256, 1, 2, 7, 16, 32, 48, 80, 100]),
                       causal=_rng.random() < 0.5, varlen=_rng.random() < 0.6, zeros=_rng.random() < 0.3,
                       half=_rng.random() < 0.5, num_sm_parts=_rng.choice([0, 0, _rng.randint(1, 200)]),
                       bad_pages=_rng.choice([0.0, 0.0, 0.2]))


def _sparse_case(v4: bool) -> SparseDecodeCase:
    page_size = _rng.choice([64, 64, 256, 1, 2, 5] if v4 else [64, 64, 1, 5, 16, 32, 100, 128])
    topk = _length(1000, 1000, 9000)
    extra = _rng.random() < 0.5
    return SparseDecodeCase(
        b=_rng.randint(1, 9), s_q=_rng.randint(1, 4), h_q=_rng.randint(1, 128), topk=topk,
        num_blocks=max(2, _log_uniform(64, 8192) // page_size), page_size=page_size,
        with_topk_length=_rng.random() < 0.5, with_attn_sink=_rng.random() < 0.5,
        extra_topk=_log_uniform(1, 1200) if extra else 0, extra_page_size=_rng.choice([1, 2, 16, 32, 64, 128]),
        invalid_fraction=_rng.choice([0.0, 0.2, 0.2, 0.9]), d_qk=512 if v4 else 576)


def _sparse_prefill_case() -> SparsePrefillCase:
    return SparsePrefillCase(s_q=_log_uniform(1, 600), s_kv=_log_uniform(1, 9000), h_q=_rng.randint(1, 128),
                             topk=_length(1000, 1000, 4000), d_qk=_rng.choice([576, 512]),
                             with_topk_length=_rng.random() < 0.5, with_attn_sink=_rng.random() < 0.5,
                             invalid_fraction=_rng.choice([0.0, 0.2, 0.2, 0.9]))


def _mha_prefill_case() -> T.MHAPrefillCase:
    h_k = _rng.choice([1, 2, 4, 8, 16, 32, 64, 128])
    h_q = h_k * _rng.randint(1, 128 // h_k)
    b = _rng.randint(1, 9)
    lens = None
    if _rng.random() < 0.4:  # lengths of their own: key counts below the query counts too, zero lengths
        lens = (tuple(_log_uniform(1, 3000) - 1 for _ in range(b)), tuple(_log_uniform(1, 3000) - 1 for _ in range(b)))
    return T.MHAPrefillCase(b=b, h_q=h_q, h_k=h_k, d_qk=_rng.choice([192, 128]), seqlen_q=_log_uniform(1, 3000),
                            kv_prefix=_rng.choice([0, _log_uniform(1, 3000)]), varlen=_rng.random() < 0.7,
                            zero_lengths=_rng.random() < 0.3, causal=_rng.random() < 0.6,
                            dtype=_rng.choice([torch.bfloat16, torch.float16]),
                            q_lens=lens[0] if lens else None, k_lens=lens[1] if lens else None)


def _parts_or_default():
    return _rng.choice([None, None, _rng.randint(1, 200)])


DENSE16 = [_dense_config() for _ in range(150)]
DENSE8 = [_dense_config() for _ in range(100)]
SPARSE_V32 = [(_sparse_case(False), _parts_or_default()) for _ in range(100)]
SPARSE_V4 = [(_sparse_case(True), _parts_or_default()) for _ in range(60)]
SPARSE_PREFILL = [_sparse_prefill_case() for _ in range(60)]
MHA_PREFILL = [_mha_prefill_case() for _ in range(60)]
# concat_and_cache_mla: (kv_cache_dtype, input dtype, tokens, blocks, page size); bit-exact against the reference
CACHE_WRITES = []
for _ in range(40):
    _kind = _rng.choice(["auto", "fp8_ds_mla", "fp8_ds_mla_v4", "fp8", "fp8_e4m3"])
    _page = _rng.choice([1, 2, 3, 16, 33, 64, 100, 128, 256])
    _blocks = max(1, _log_uniform(1, 6000) // _page)
    CACHE_WRITES.append((_kind, _rng.choice([torch.bfloat16, torch.float16]) if _kind in ("auto", "fp8", "fp8_e4m3")
                         else torch.bfloat16, _rng.randint(0, _blocks * _page), _blocks, _page))
# sparse decode with a plan made from other lengths (docs/design.md §4.1: it still covers every token)
SPARSE_STALE_PLAN = [(_sparse_case(_rng.random() < 0.4), _parts_or_default()) for _ in range(24)]
# plan + decode captured in one CUDA graph, replayed on fresh inputs copied into the captured tensors
GRAPH_DENSE = [_dense_config() for _ in range(16)]
GRAPH_SPARSE = [_sparse_case(_rng.random() < 0.4) for _ in range(16)]


def _parts(c: DenseConfig):
    return c.num_sm_parts or None


DENSE16_SCALE = dense16.D_QK ** -0.5


def _assert_dense16(out, lse, q, cache, table, lens, causal, tag):
    """16-bit dense decode outputs against the reference and its error model (docs/design.md §7)."""
    ref_out, ref_lse = reference.mla_decode(q, cache, table, lens, dense16.D_V, DENSE16_SCALE, causal)
    bound = reference.mla_decode_error_bound(q, cache, table, lens, dense16.D_V, DENSE16_SCALE, causal)
    assert_within_error_model(out, lse, ref_out, ref_lse, bound, DECODE_TOL["lse_rtol"], tag)


@pytest.mark.parametrize("c", DENSE16, ids=[c.id() for c in DENSE16])
def test_random_dense_16bit(c):
    dtype = torch.float16 if c.half else torch.bfloat16
    q, cache, table, lens, plan = paged.make_inputs(c.b, c.s_q, c.h_q, c.h_kv, c.s_k, page_size=c.page_size,
                                                    varlen=c.varlen, zeros=c.zeros, dtype=dtype,
                                                    seed=DENSE16.index(c), num_sm_parts=_parts(c),
                                                    bad_pages=c.bad_pages)
    out, lse = dense16.run_kernel(q, cache, table, lens, plan, c.causal, DENSE16_SCALE)
    _assert_dense16(out, lse, q, cache, table, lens, c.causal, c.id())


@pytest.mark.parametrize("c", DENSE8, ids=[c.id() for c in DENSE8])
def test_random_dense_fp8(c):
    dense8.check_case(c.b, c.s_q, c.h_q, c.h_kv, c.s_k, c.causal, c.half, c.varlen, c.zeros,
                      seed=100 + DENSE8.index(c), num_sm_parts=_parts(c), page_size=c.page_size,
                      bad_pages=c.bad_pages)


def _sparse_id(case, parts, module) -> str:
    return module.case_id(case) + f"-i{case.invalid_fraction}" + (f"-n{parts}" if parts else "")


def _check_sparse_decode(module, inp, tag):
    out, lse = module.run_kernel(inp)
    ref_out, ref_lse = module.run_reference(inp)
    bound = reference.sparse_mla_decode_error_bound(*(inp[k] for k in module.INPUT_KEYS), module.D_V, module.SCALE)
    assert_within_error_model(out, lse, ref_out, ref_lse, bound, DECODE_TOL["lse_rtol"], tag)


@pytest.mark.parametrize("case,parts", SPARSE_V32, ids=[_sparse_id(c, n, sparse32) for c, n in SPARSE_V32])
def test_random_sparse_v32(case, parts):
    _check_sparse_decode(sparse32, sparse32.make_inputs(case, sparse32.case_seed(case), parts), sparse32.case_id(case))


@pytest.mark.parametrize("case,parts", SPARSE_V4, ids=[_sparse_id(c, n, sparse4) for c, n in SPARSE_V4])
def test_random_sparse_v4(case, parts):
    _check_sparse_decode(sparse4, sparse4.make_inputs(case, seed=sparse4.case_seed(case), num_sm_parts=parts),
                         sparse4.case_id(case))


@pytest.mark.parametrize("case", SPARSE_PREFILL,
                         ids=[prefill.case_id(c) + f"-i{c.invalid_fraction}" for c in SPARSE_PREFILL])
def test_random_sparse_prefill(case):
    inp = prefill.make_inputs(case, SPARSE_PREFILL.index(case))
    scale = case.d_qk ** -0.5
    out, max_logits, lse = prefill.run_kernel(inp, scale)
    ref_out, ref_max, ref_lse = prefill.run_reference(inp, scale)
    bound = reference.sparse_mla_prefill_error_bound(*(inp[k] for k in ("q", "kv", "indices")), scale, prefill.D_V,
                                                     inp["attn_sink"], inp["topk_length"])
    tag = prefill.case_id(case)
    assert_within_error_model(out, lse, ref_out, ref_lse, bound, PREFILL_TOL["lse_rtol"], tag)
    assert torch.equal(torch.isneginf(ref_max), torch.isneginf(max_logits)), f"{tag}: -inf pattern of max_logits"
    fin = torch.isfinite(ref_max)
    err = (max_logits[fin] - ref_max[fin]).abs()
    assert (err <= PREFILL_TOL["lse_rtol"] * ref_max[fin].abs().clamp_min(1.0)).all(), f"{tag}: max_logits mismatch"


def _mha_id(c: T.MHAPrefillCase) -> str:
    lens = f"q{sum(c.q_lens)}k{sum(c.k_lens)}" if c.q_lens else f"s{c.seqlen_q}p{c.kv_prefix}"
    return (f"b{c.b}-h{c.h_q}_{c.h_k}-d{c.d_qk}-{lens}{'-v' if c.varlen else ''}{'-z' if c.zero_lengths else ''}"
            f"{'-c' if c.causal else ''}{'-fp16' if c.dtype == torch.float16 else ''}")


@pytest.mark.parametrize("case", MHA_PREFILL, ids=[_mha_id(c) for c in MHA_PREFILL])
def test_random_mha_prefill(case):
    a = T.mha_prefill_inputs(case, device="cuda", seed=MHA_PREFILL.index(case))
    out, lse = mha._kernel(a)
    ref_out, ref_lse = mha._reference(a)
    args = (a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"], a["max_seqlen_k"])
    bound = reference.mha_prefill_error_bound(*args, a["q"].shape[-1] ** -0.5, a["causal"])
    assert_within_error_model(out, lse, ref_out, ref_lse, bound, MHA_PREFILL_TOL["lse_rtol"], _mha_id(case))


@pytest.mark.parametrize("kind,dtype,tokens,blocks,page", CACHE_WRITES,
                         ids=[f"{k}-{str(d)[6:]}-t{t}-nb{b}p{p}" for k, d, t, b, p in CACHE_WRITES])
def test_random_cache_write(kind, dtype, tokens, blocks, page):
    a = T.cache_write_inputs(num_tokens=tokens, num_blocks=blocks, page_size=page, kv_cache_dtype=kind, dtype=dtype,
                             device="cuda", seed=CACHE_WRITES.index((kind, dtype, tokens, blocks, page)))
    expected = a["kv_cache"].clone()
    kvc.concat_and_cache_mla(a["kv_c"], a["k_pe"], expected, a["slot_mapping"], kind, a["scale"])
    torch.ops.flashmla.concat_and_cache_mla(a["kv_c"], a["k_pe"], a["kv_cache"], a["slot_mapping"], kind, a["scale"])
    assert torch.equal(a["kv_cache"].view(torch.uint8), expected.view(torch.uint8)), "cache bytes differ"


@pytest.mark.parametrize("case,parts", SPARSE_STALE_PLAN,
                         ids=[_sparse_id(c, n, sparse32) for c, n in SPARSE_STALE_PLAN])
def test_random_sparse_stale_plan(case, parts):
    module = sparse4 if case.d_qk == 512 else sparse32
    inp = module.make_inputs(case, seed=module.case_seed(case), num_sm_parts=parts)
    b, s_q, h_q, _ = inp["q"].shape
    total = case.topk + case.extra_topk
    g = torch.Generator(device="cuda").manual_seed(SPARSE_STALE_PLAN.index((case, parts)))
    other = torch.randint(0, total + 1, (b,), generator=g, device="cuda", dtype=torch.int32)
    inp["tile_scheduler_metadata"], inp["num_splits"] = torch.ops.flashmla.get_mla_metadata(
        other, s_q * h_q, 1, h_q, True, total, parts or module.plan(inp)[0].shape[0])
    _check_sparse_decode(module, inp, module.case_id(case) + "-stale")


GRAPH_REPLAYS = 3


@pytest.mark.parametrize("c", GRAPH_DENSE, ids=[c.id() for c in GRAPH_DENSE])
def test_random_dense_graph_replay(c):
    """16-bit (c.half: fp16) or, for odd indices, the FP8 cache (c.half: an e4m3 q)."""
    fp8 = GRAPH_DENSE.index(c) % 2 == 1
    make = dense8.make_inputs if fp8 else paged.make_inputs
    kw = dict(page_size=c.page_size, varlen=c.varlen, zeros=c.zeros, bad_pages=c.bad_pages)
    if fp8:
        kw["q_fp8"] = c.half
    else:
        kw["dtype"] = torch.float16 if c.half else torch.bfloat16

    def fresh(seed):
        got = make(c.b, c.s_q, c.h_q, c.h_kv, c.s_k, seed=seed, **kw)
        return list(got[:4]) + (list(got[5:]) if fp8 else [None, None])  # q, cache, table, lens, dq, dk

    static = fresh(0)
    q, cache, table, lens, dq, dk = static
    rows = c.s_q * c.h_q // c.h_kv

    def step():
        meta, splits = torch_flashmla.get_mla_metadata(lens, rows, c.h_kv, c.h_q, is_fp8_kvcache=fp8,
                                                       num_sm_parts=_parts(c))
        return torch.ops.flashmla.mla_decode(q, cache, table, lens, dense16.D_V, DENSE16_SCALE, c.causal, meta, splits,
                                             dq, dk)

    graph, (out, lse) = T.capture_cuda_graph(step, warmup_iters=2)
    for r in range(GRAPH_REPLAYS):
        for dst, src in zip(static, fresh(1000 + r)):
            if dst is not None:
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        tag = f"{c.id()} replay {r}"
        if fp8:
            dense8.assert_fp8_close(out, lse, q, cache, table, lens, c.causal, dq, dk)
            continue
        _assert_dense16(out, lse, q, cache, table, lens, c.causal, tag)


@pytest.mark.parametrize("case", GRAPH_SPARSE, ids=[sparse32.case_id(c) for c in GRAPH_SPARSE])
def test_random_sparse_graph_replay(case):
    module = sparse4 if case.d_qk == 512 else sparse32
    static = module.make_inputs(case, seed=0)
    graph, out, lse, _ = sparse32.capture_decode_graph(static, module.SCALE)
    for r in range(GRAPH_REPLAYS):
        new = module.make_inputs(case, seed=1000 + r)
        for k, v in static.items():
            if isinstance(v, torch.Tensor):
                v.copy_(new[k])
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = module.run_reference(static)
        bound = reference.sparse_mla_decode_error_bound(*(static[k] for k in module.INPUT_KEYS), module.D_V,
                                                        module.SCALE)
        assert_within_error_model(out, lse, ref_out, ref_lse, bound, DECODE_TOL["lse_rtol"],
                                  f"{module.case_id(case)} replay {r}")


# dense decode (16-bit, and the FP8 cache for odd indices) with a plan made from other lengths: each request's
# last piece runs to the request's real end (docs/design.md §4.1), so every token is still attended. Defined
# last, so that the configurations above keep their random draws.
DENSE_STALE_PLAN = [_dense_config() for _ in range(24)]


@pytest.mark.parametrize("c", DENSE_STALE_PLAN, ids=[c.id() for c in DENSE_STALE_PLAN])
def test_random_dense_stale_plan(c):
    i = DENSE_STALE_PLAN.index(c)
    fp8 = i % 2 == 1
    kw = dict(page_size=c.page_size, varlen=c.varlen, zeros=c.zeros, seed=300 + i, num_sm_parts=_parts(c),
              bad_pages=c.bad_pages)
    if fp8:
        q, cache, table, lens, plan, dq, dk = dense8.make_inputs(c.b, c.s_q, c.h_q, c.h_kv, c.s_k, q_fp8=c.half, **kw)
    else:
        dtype = torch.float16 if c.half else torch.bfloat16
        q, cache, table, lens, plan = paged.make_inputs(c.b, c.s_q, c.h_q, c.h_kv, c.s_k, dtype=dtype, **kw)
    g = torch.Generator(device="cuda").manual_seed(i)
    other = torch.randint(0, c.s_k + 1, (c.b,), generator=g, device="cuda", dtype=torch.int32)
    plan = torch_flashmla.get_mla_metadata(other, c.s_q * c.h_q // c.h_kv, c.h_kv, c.h_q, is_fp8_kvcache=fp8,
                                           num_sm_parts=plan[0].shape[0])
    if fp8:
        out, lse = dense8.run_fp8(q, cache, table, lens, plan, c.causal, dq, dk)
        dense8.assert_fp8_close(out, lse, q, cache, table, lens, c.causal, dq, dk)
        return
    out, lse = dense16.run_kernel(q, cache, table, lens, plan, c.causal, DENSE16_SCALE)
    _assert_dense16(out, lse, q, cache, table, lens, c.causal, c.id() + "-stale")
