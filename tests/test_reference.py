"""The float32 references (the CPU kernels of the ops) against the float64 oracle, semantic by semantic."""
import math
import zlib

import pytest
import torch

import torch_flashmla as F
from torch_flashmla import reference, testing as T

import oracle


def assert_close_attention(out, lse, ref_out, ref_lse, atol=2e-2):
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isposinf(lse), torch.isposinf(ref_lse)), "empty queries must get lse = +inf"
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=1e-4, rtol=1e-4)
    # bf16 output: one rounding of values of magnitude <~ 3
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=1e-2)


DENSE_CASES = {
    "single": T.DenseDecodeCase(b=1, s_q=1, h_q=4, seqlen=70),
    "varlen_zero": T.DenseDecodeCase(b=5, h_q=3, seqlen=150, varlen=True, zero_lengths=True),
    "mtp_noncausal": T.DenseDecodeCase(b=2, s_q=3, h_q=4, seqlen=100),
    "mtp_causal": T.DenseDecodeCase(b=3, s_q=4, h_q=4, seqlen=130, causal=True, varlen=True),
    "causal_short": T.DenseDecodeCase(b=2, s_q=4, h_q=2, seqlen=2, causal=True),  # some queries see nothing
    "h_kv2": T.DenseDecodeCase(b=2, s_q=2, h_q=6, h_kv=2, seqlen=90, causal=True),
    "fp16_page128": T.DenseDecodeCase(b=2, h_q=4, seqlen=200, page_size=128, dtype=torch.float16, varlen=True),
}


@pytest.mark.parametrize("name", list(DENSE_CASES))
def test_dense_decode_reference(name):
    case = DENSE_CASES[name]
    args = T.dense_decode_inputs(case, seed=zlib.crc32(name.encode()))
    out, lse = F.mla_decode(**args)
    assert out.dtype == case.dtype and out.shape == (case.b, case.s_q, case.h_q, 512)
    assert lse.dtype == torch.float32 and lse.shape == (case.b, case.h_q, case.s_q)
    ref_out, ref_lse = oracle.dense_decode(args["q"], args["kv_cache"], args["block_table"], args["cache_seqlens"],
                                           576 ** -0.5, case.causal)
    assert_close_attention(out, lse, ref_out, ref_lse)


def test_dense_decode_ignores_unused_slots_and_table_tails():
    args = T.dense_decode_inputs(T.DenseDecodeCase(b=3, h_q=4, seqlen=100, varlen=True), seed=3)
    out, lse = F.mla_decode(**args)
    # The generator already poisons; make it worse: every value past each sequence becomes NaN/inf,
    # and table tails become ids of live pages of other requests.
    cache = args["kv_cache"].clone()
    table = args["block_table"].clone()
    for i, n in enumerate(args["cache_seqlens"].tolist()):
        pages = -(-n // 64)
        for t in range(n, pages * 64):
            cache[table[i, t // 64], t % 64] = float("inf")
        table[i, pages:] = table[(i + 1) % 3, 0]
    out2, lse2 = F.mla_decode(**{**args, "kv_cache": cache, "block_table": table})
    # Other requests' pages are only affected at positions we did not touch; recompute out on the
    # original cache with the new table must equal the first result.
    out3, lse3 = F.mla_decode(**{**args, "block_table": table})
    assert torch.equal(out3, out) and torch.equal(lse3, lse)
    assert not torch.isnan(out2).any()


def test_dense_zero_length_gives_zero_and_inf():
    args = T.dense_decode_inputs(T.DenseDecodeCase(b=4, h_q=2, seqlen=64, zero_lengths=True), seed=1)
    out, lse = F.mla_decode(**args)
    zero = args["cache_seqlens"] == 0
    assert zero.any()
    assert torch.all(out[zero] == 0) and torch.all(torch.isposinf(lse[zero]))
    assert torch.all(torch.isfinite(lse[~zero]))


def test_dense_softmax_scale_is_used():
    args = T.dense_decode_inputs(T.DenseDecodeCase(b=1, h_q=2, seqlen=64), seed=5)
    _, lse1 = F.mla_decode(**args)
    _, lse2 = F.mla_decode(**args, softmax_scale=0.5 * 576 ** -0.5)
    assert not torch.allclose(lse1, lse2)
    ref_out, ref_lse = oracle.dense_decode(args["q"], args["kv_cache"], args["block_table"], args["cache_seqlens"],
                                           0.5 * 576 ** -0.5, False)
    torch.testing.assert_close(lse2.double(), ref_lse, atol=1e-4, rtol=1e-4)


SPARSE_DECODE_CASES = {
    "plain": T.SparseDecodeCase(b=2, h_q=4, topk=64),
    "mtp_topk_length": T.SparseDecodeCase(b=3, s_q=2, h_q=4, topk=64, with_topk_length=True),
    "sink": T.SparseDecodeCase(b=2, h_q=8, topk=64, with_attn_sink=True),
    "extra": T.SparseDecodeCase(b=2, s_q=2, h_q=4, topk=64, extra_topk=32, extra_page_size=16),
    "extra_lengths_sink": T.SparseDecodeCase(b=3, h_q=4, topk=64, extra_topk=32, with_topk_length=True,
                                             with_attn_sink=True),
}


@pytest.mark.parametrize("name", list(SPARSE_DECODE_CASES))
def test_sparse_decode_reference(name):
    case = SPARSE_DECODE_CASES[name]
    args = T.sparse_decode_inputs(case, seed=zlib.crc32(name.encode()))
    out, lse = F.sparse_mla_decode(**args)
    assert out.shape == (case.b, case.s_q, case.h_q, 512) and out.dtype == torch.bfloat16
    keys = ("q", "kv_cache", "indices", "topk_length", "attn_sink", "extra_kv_cache", "extra_indices",
            "extra_topk_length")
    ref_out, ref_lse = oracle.sparse_decode(*(args[k] for k in keys), softmax_scale=576 ** -0.5)
    assert_close_attention(out, lse, ref_out, ref_lse)


def test_sparse_decode_all_invalid():
    args = T.sparse_decode_inputs(T.SparseDecodeCase(b=2, h_q=4, topk=64, with_attn_sink=True), seed=2)
    args["indices"] = torch.full_like(args["indices"], -1)
    out, lse = F.sparse_mla_decode(**args)
    assert torch.all(out == 0) and torch.all(torch.isposinf(lse))


def test_sparse_decode_fp8_view_equals_uint8():
    args = T.sparse_decode_inputs(T.SparseDecodeCase(b=2, h_q=4, topk=64), seed=4)
    out, lse = F.sparse_mla_decode(**args)
    out8, lse8 = F.sparse_mla_decode(**{**args, "kv_cache": args["kv_cache"].view(torch.float8_e4m3fn)})
    assert torch.equal(out, out8) and torch.equal(lse, lse8)


SPARSE_PREFILL_CASES = {
    "plain": T.SparsePrefillCase(),
    "topk_length": T.SparsePrefillCase(with_topk_length=True, topk=96),
    "sink": T.SparsePrefillCase(with_attn_sink=True, h_q=8),
    "d512": T.SparsePrefillCase(d_qk=512),
}


@pytest.mark.parametrize("name", list(SPARSE_PREFILL_CASES))
def test_sparse_prefill_reference(name):
    case = SPARSE_PREFILL_CASES[name]
    args = T.sparse_prefill_inputs(case, seed=zlib.crc32(name.encode()))
    out, max_logits, lse = F.sparse_mla_prefill(**args)
    ref_out, ref_max, ref_lse = oracle.sparse_prefill(args["q"], args["kv"], args["indices"], case.d_qk ** -0.5,
                                                      args["attn_sink"], args["topk_length"])
    assert_close_attention(out, lse, ref_out, ref_lse)
    assert torch.equal(torch.isneginf(max_logits), torch.isneginf(ref_max))
    finite = torch.isfinite(ref_max)
    torch.testing.assert_close(max_logits[finite].double(), ref_max[finite], atol=1e-4, rtol=1e-4)
    assert torch.isposinf(lse[1]).all() and torch.isneginf(max_logits[1]).all() and (out[1] == 0).all()


def test_sparse_prefill_sink_plus_inf_zeroes_output():
    args = T.sparse_prefill_inputs(T.SparsePrefillCase(h_q=4), seed=9)
    out0, _, lse0 = F.sparse_mla_prefill(**args)
    sink = torch.tensor([math.inf, -math.inf, 0.0, 1.0])
    out, _, lse = F.sparse_mla_prefill(**{**args, "attn_sink": sink})
    assert (out[:, 0] == 0).all()
    assert torch.equal(out[:, 1], out0[:, 1])
    assert torch.equal(lse, lse0)  # the sink never enters lse


# --- planner -----------------------------------------------------------------------------------

@pytest.mark.parametrize("lengths,parts", [([0], 4), ([5000], 132), ([1, 2, 3, 0, 4096], 7), (list(range(0, 9000, 97)), 33),
                                           ([128] * 300, 132)])
def test_planner_covers_every_token_once(lengths, parts):
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    meta, num_splits = F.get_mla_metadata(seqlens, 128, 1, 128, num_sm_parts=parts)
    assert meta.shape == (parts, 8) and num_splits.shape == (len(lengths) + 1,)
    assert num_splits[0] == 0 and torch.all(num_splits[1:] - num_splits[:-1] >= 1)
    covered = {i: [] for i in range(len(lengths))}
    for begin_req, begin_tok, end_req, end_tok, begin_split, *_ in meta.tolist():
        for r in range(begin_req, end_req + 1):
            start = begin_tok if r == begin_req else 0
            end = min(end_tok, lengths[r]) if r == end_req else lengths[r]
            split = begin_split if r == begin_req else 0
            covered[r].append((split, start, end))
            if r == end_req:  # a last piece is open-ended (runs to the length at decode time), no other is
                last = split == int(num_splits[r + 1] - num_splits[r]) - 1
                assert (end_tok == reference.PLAN_OPEN_END) == last, (r, split, end_tok)
    for r, pieces in covered.items():
        pieces.sort()
        n = int(num_splits[r + 1] - num_splits[r])
        assert [p[0] for p in pieces] == list(range(n)), f"request {r}: split ids {pieces}"
        assert pieces[0][1] == 0 and pieces[-1][2] == lengths[r]
        for (_, _, end), (_, start, _) in zip(pieces, pieces[1:]):
            assert end == start and start % 64 == 0
    assert num_splits[-1] <= len(lengths) + parts


# --- FP8 layout --------------------------------------------------------------------------------

def test_fp8_record_layout_bit_exact():
    kv = torch.zeros(576, dtype=torch.bfloat16)
    kv[0] = 448.0           # tile 0: amax 448 -> scale 1
    kv[1] = -1.5
    kv[128] = 0.001         # tile 1: amax/448 < 1e-4 -> scale 2^ceil(log2(1e-4)) = 2^-13
    kv[256:384] = 3.0       # tile 2: 3/448 -> scale 2^-7, value 384
    kv[512] = 1.25          # rope, stored as bf16
    kv[575] = -2.0
    rec = F.quantize_kv_fp8(kv)
    assert rec.dtype == torch.uint8 and rec.shape == (656,)
    scales = rec[512:528].view(torch.float32)
    assert scales.tolist() == [1.0, 2.0 ** -13, 2.0 ** -7, 2.0 ** -13]
    vals = rec[:512].view(torch.float8_e4m3fn).float()
    assert vals[0] == 448 and vals[1] == -1.5 and vals[256] == 384
    assert rec[0].item() == 0x7E and rec[1].item() == 0xBC  # e4m3fn encodings of 448 and -1.5
    rope = rec[528:].view(torch.bfloat16)
    assert rope[0] == 1.25 and rope[63] == -2.0 and torch.all(rope[1:63] == 0)
    back = F.dequantize_kv_fp8(rec)
    assert back[0] == 448 and back[1] == -1.5 and back[512] == 1.25 and back[256] == 3.0


def test_fp8_round_trip_within_e4m3_rounding():
    kv = (torch.randn(64, 576) * torch.logspace(-3, 2, 64)[:, None]).to(torch.bfloat16)
    back = F.dequantize_kv_fp8(F.quantize_kv_fp8(kv)).float()
    x = kv.float()
    scales = torch_flashmla_scales(x)
    # e4m3: 3 mantissa bits -> relative half-ulp 2^-4 for normals; absolute 2^-10 * scale for subnormals
    bound = torch.maximum(x.abs() * 2 ** -4, scales * 2 ** -10)
    bound[:, 512:] = 0
    assert torch.all((back - x).abs() <= bound + 1e-30)
    assert torch.equal(back[:, 512:], x[:, 512:])


def torch_flashmla_scales(x):
    from torch_flashmla.kv_cache import fp8_scales
    return torch.cat([fp8_scales(x[:, :512]).repeat_interleave(128, dim=1), torch.zeros(x.shape[0], 64)], dim=1)


def test_fp8_dequantize_matches_record_oracle():
    kv = torch.randn(5, 576).to(torch.bfloat16)
    rec = F.quantize_kv_fp8(kv)
    for i in range(5):
        assert torch.equal(F.dequantize_kv_fp8(rec[i]).double(), oracle.dequantize_record(rec[i]).to(torch.bfloat16).double())


def test_fp8_nan_policy():
    kv = torch.randn(2, 576).to(torch.bfloat16)
    kv[0, 3] = float("nan")
    kv[1, 200] = float("inf")
    back = F.dequantize_kv_fp8(F.quantize_kv_fp8(kv)).float()
    assert torch.isnan(back[0, :128]).all() and torch.isfinite(back[0, 128:]).all()
    assert torch.isnan(back[1, 128:256]).all() and torch.isfinite(back[1, :128]).all()


# --- cache writes ------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_ds_mla"])
def test_concat_and_cache_writes_only_named_slots(kv_cache_dtype):
    args = T.cache_write_inputs(num_tokens=12, num_blocks=3, page_size=16, kv_cache_dtype=kv_cache_dtype, seed=7)
    before = args["kv_cache"].clone()
    F.concat_and_cache_mla(**args)
    cache = args["kv_cache"].view(-1, args["kv_cache"].shape[-1])
    old = before.view(-1, before.shape[-1])
    rows = torch.cat([args["kv_c"], args["k_pe"]], dim=-1)
    written = set()
    for t, slot in enumerate(args["slot_mapping"].tolist()):
        if slot < 0:
            continue
        written.add(slot)
        expect = rows[t] if kv_cache_dtype == "auto" else F.quantize_kv_fp8(rows[t])
        assert torch.equal(cache[slot], expect)
    untouched = [s for s in range(cache.shape[0]) if s not in written]
    assert torch.equal(cache[untouched].view(torch.uint8), old[untouched].view(torch.uint8))


def test_fp8_non_finite_tiles_bytes():
    kv = torch.randn(2, 576).to(torch.bfloat16)
    kv[0, 5], kv[0, 6] = float("inf"), float("-inf")   # tile 0 of row 0: inf, no NaN
    kv[1, 130] = -float("nan")                           # tile 1 of row 1: NaN
    rec = F.quantize_kv_fp8(kv)
    scale_bits = rec[:, 512:528].contiguous().view(torch.int32)
    assert rec[0, 512:516].view(torch.float32).item() == float("inf")
    assert rec[0, 5] == 0x7F and rec[0, 6] == 0x7F
    others = torch.cat([rec[0, :5], rec[0, 7:128]])
    assert torch.all((others & 0x7F) == 0)               # finite / inf = signed zero
    assert scale_bits[1, 1].item() == 0x7FFFFFFF and torch.all(rec[1, 128:256] == 0x7F)
    assert torch.isfinite(rec[1, 512:516].view(torch.float32)).all()


def test_fp8_scale_is_exact_at_powers_of_two():
    # amax = 448 * 2^k exactly: scale 2^k (not 2^(k+1)); the next bf16 value up needs 2^(k+1).
    for k in range(-12, 20):
        kv = torch.zeros(576, dtype=torch.bfloat16)
        kv[0] = 448 * 2.0 ** k
        assert F.quantize_kv_fp8(kv)[512:516].view(torch.float32).item() == 2.0 ** k
        kv[0] = (torch.tensor(448 * 2.0 ** k).to(torch.bfloat16).view(torch.int16) + 1).view(torch.bfloat16)
        assert F.quantize_kv_fp8(kv)[512:516].view(torch.float32).item() == 2.0 ** (k + 1)


def test_concat_and_cache_skips_slots_past_the_cache():
    a = T.cache_write_inputs(num_tokens=4, num_blocks=2, page_size=16, seed=1)
    a["slot_mapping"] = torch.tensor([0, 32, 10 ** 9, -5])
    before = a["kv_cache"].clone()
    F.concat_and_cache_mla(**a)
    flat, old = a["kv_cache"].view(32, -1), before.view(32, -1)
    assert torch.equal(flat[0], torch.cat([a["kv_c"][0], a["k_pe"][0]]))
    assert torch.equal(flat[1:].view(torch.uint8), old[1:].view(torch.uint8))


@pytest.mark.parametrize("p_dtype", [torch.bfloat16, torch.float16])
def test_rounded_p_bound_holds_and_is_tight(p_dtype):
    """The 16-bit kernels' error model (reference._rounded_p_bound, docs/design.md §7) against an emulation of
    their arithmetic on the rows where it is worst: few distinct keys, each repeated many times (the rounding
    of P is then the same for every copy and does not average out). Emulated: e_j = exp(s_j - max) rounded to
    p_dtype, out = sum_j e_j v_j / sum_j exp(s_j - max) in float32, rounded to p_dtype. Every element within
    the bound, and the worst at more than a tenth of it (the bound is not vacuous)."""
    g = torch.Generator().manual_seed(7)
    rows, distinct, copies, d = 64, 3, 700, 512
    v = torch.randn(rows, distinct, d, generator=g).repeat(1, copies, 1)            # [rows, n, d]
    s = (torch.randn(rows, distinct, generator=g) * 2).repeat(1, copies)            # [rows, n]
    probs = torch.softmax(s, dim=-1)
    ref = torch.einsum("rn,rnd->rd", probs, v)
    e = torch.exp(s - s.amax(dim=-1, keepdim=True))
    emulated = torch.einsum("rn,rnd->rd", e.to(p_dtype).float(), v) / e.sum(dim=-1, keepdim=True)
    err = (emulated.to(p_dtype).double() - ref.to(p_dtype).double()).abs()
    bound = reference._rounded_p_bound(torch.einsum("rn,rnd->rd", probs, v.abs()), ref, v.shape[1], p_dtype)
    assert (err <= bound.double()).all()
    assert (err / bound.double()).max() > 0.1


def _bound_cases():
    """(name, reference call, bound call) on the shared generator's CPU inputs; the bounds' own inputs."""
    from torch_flashmla import reference as R
    d = T.dense_decode_inputs(T.DenseDecodeCase(b=3, s_q=2, h_q=4, h_kv=2, seqlen=150, causal=True, varlen=True,
                                                zero_lengths=True), seed=1)
    dense = (d["q"], d["kv_cache"], d["block_table"], d["cache_seqlens"], 512, 576 ** -0.5, True)
    s = T.sparse_decode_inputs(T.SparseDecodeCase(b=3, s_q=2, h_q=4, topk=96, with_topk_length=True,
                                                  with_attn_sink=True, extra_topk=40), seed=2)
    keys = ("q", "kv_cache", "indices", "topk_length", "attn_sink", "extra_kv_cache", "extra_indices",
            "extra_topk_length")
    sparse = tuple(s[k] for k in keys) + (512, 576 ** -0.5)
    p = T.sparse_prefill_inputs(T.SparsePrefillCase(s_q=9, h_q=4, with_attn_sink=True, with_topk_length=True),
                                seed=3)
    prefill_args = (p["q"], p["kv"], p["indices"], 576 ** -0.5, 512, p["attn_sink"], p["topk_length"])
    m = T.mha_prefill_inputs(T.MHAPrefillCase(zero_lengths=True), seed=4)
    mha = (m["q"], m["k"], m["v"], m["cu_seqlens_q"], m["cu_seqlens_k"], m["max_seqlen_q"], m["max_seqlen_k"],
           192 ** -0.5, True)
    return [("mla_decode", lambda: R.mla_decode(*dense), lambda: R.mla_decode_error_bound(*dense)),
            ("sparse_mla_decode", lambda: R.sparse_mla_decode(*sparse),
             lambda: R.sparse_mla_decode_error_bound(*sparse)),
            ("sparse_mla_prefill", lambda: R.sparse_mla_prefill(*prefill_args),
             lambda: R.sparse_mla_prefill_error_bound(*prefill_args)),
            ("mha_prefill", lambda: R.mha_prefill(*mha), lambda: R.mha_prefill_error_bound(*mha))]


@pytest.mark.parametrize("name", ["mla_decode", "sparse_mla_decode", "sparse_mla_prefill", "mha_prefill"])
def test_error_bounds_cover_the_output_rounding(name):
    """Each op's error bound (docs/design.md §7) has out's shape, is finite and at least 1e-6, and covers the
    reference's own rounding of out to its 16-bit type (a part of the model the kernels share)."""
    ref_call, bound_call = next((r, b) for n, r, b in _bound_cases() if n == name)
    out = ref_call()[0]
    bound = bound_call()
    assert bound.shape == out.shape and bound.dtype == torch.float32
    assert torch.isfinite(bound).all() and (bound >= 1e-6).all()
    # The 16-bit out's rounding error is at most u |out|, inside the bound.
    assert (bound >= reference.UNIT_ROUNDOFF[out.dtype] * out.float().abs()).all()
