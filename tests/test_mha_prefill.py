"""flashmla.mha_prefill (dense MHA-mode varlen prefill): the float32 reference against the float64
oracle (tests/oracle.py), the defined meaning of every cu_seqlens / max_seqlen value, NaN poison,
chunked prefill merged by lse, bounded memory, bad input, torch.compile, the compat wrappers; on a
GPU, the CUDA path against the CPU reference and CUDA-graph capture with new cu_seqlens contents."""
from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo.testing
from torch._dynamo.utils import counters

import torch_flashmla as F
from torch_flashmla import compat, reference, testing as T

import oracle
from attention_asserts import assert_mha_prefill_close

needs_gpu = pytest.mark.cuda

CASES = {
    "d192_gqa_causal_varlen_zero": T.MHAPrefillCase(b=5, h_q=8, h_k=2, seqlen_q=30, kv_prefix=20, zero_lengths=True),
    "d192_mha_noncausal": T.MHAPrefillCase(b=3, h_q=4, h_k=4, seqlen_q=25, kv_prefix=10, causal=False),
    "d192_mqa_fp16": T.MHAPrefillCase(b=3, h_q=6, h_k=1, seqlen_q=20, kv_prefix=40, dtype=torch.float16),
    "d128_gqa_causal": T.MHAPrefillCase(b=4, h_q=8, h_k=4, d_qk=128, seqlen_q=33, kv_prefix=70),
    "d128_mha_fp16_noncausal": T.MHAPrefillCase(b=2, h_q=2, h_k=2, d_qk=128, seqlen_q=17, causal=False,
                                                dtype=torch.float16, zero_lengths=True),
    # n_k < n_q with causal: the first n_q - n_k queries see nothing (out 0, lse +inf)
    "causal_short_keys": T.MHAPrefillCase(h_q=4, h_k=2, q_lens=(12, 5, 0, 7), k_lens=(4, 0, 3, 7)),
    "noncausal_zero_keys": T.MHAPrefillCase(h_q=4, h_k=2, q_lens=(3, 4), k_lens=(0, 6), causal=False),
    "fixed_length_no_padding": T.MHAPrefillCase(b=2, h_q=4, h_k=1, seqlen_q=16, varlen=False, pad_tokens=0,
                                                max_seqlen_slack=0),
    "single_token": T.MHAPrefillCase(h_q=2, h_k=2, q_lens=(1,), k_lens=(1,)),
}


def _call(a, **kw):
    return F.mha_prefill(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"],
                         a["max_seqlen_k"], causal=a["causal"], **kw)


def _oracle(a, scale=None):
    scale = a["q"].shape[-1] ** -0.5 if scale is None else scale
    return oracle.mha_prefill(a["q"].cpu(), a["k"].cpu(), a["v"].cpu(), a["cu_seqlens_q"].cpu(),
                              a["cu_seqlens_k"].cpu(), a["max_seqlen_q"], a["max_seqlen_k"], scale, a["causal"])


def _assert_matches(out, lse, want_out, want_lse, rows=None, out_atol=2e-2, out_rtol=1e-2, lse_tol=1e-4):
    """out within the 16-bit tolerances, lse 1e-4; +inf pattern identical; out exactly 0 where lse is +inf."""
    out, lse = out.cpu(), lse.cpu()
    if rows is not None:
        out, lse, want_out, want_lse = out[rows], lse[rows], want_out[rows], want_lse[rows]
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isposinf(lse), torch.isposinf(want_lse))
    assert not torch.isneginf(lse).any()
    empty = torch.isposinf(lse)
    assert torch.all(out[empty] == 0)
    torch.testing.assert_close(out.double(), want_out, atol=out_atol, rtol=out_rtol)
    torch.testing.assert_close(lse[~empty].double(), want_lse[~empty], atol=lse_tol, rtol=lse_tol)


def _assert_same(out, lse, want_out, want_lse):
    """Two float32 reference runs that batch the work differently (rounding of the float32 sums only)."""
    torch.testing.assert_close(out.float(), want_out.float(), atol=8e-3, rtol=2 / 128)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# reference vs float64 oracle
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_oracle(name):
    case = CASES[name]
    a = T.mha_prefill_inputs(case, seed=len(name))
    out, lse = _call(a)
    total_q, h_q, _ = a["q"].shape
    assert out.shape == (total_q, h_q, case.d_v) and out.dtype == case.dtype
    assert lse.shape == (total_q, h_q) and lse.dtype == torch.float32
    assert out.is_contiguous() and lse.is_contiguous()
    _assert_matches(out, lse, *_oracle(a))


def test_empty_rows_are_zero_and_plus_inf():
    """Rows with nothing to attend to: causal queries before the first key, sequences without keys,
    and padding rows that no sequence owns."""
    a = T.mha_prefill_inputs(T.MHAPrefillCase(h_q=4, h_k=2, q_lens=(6, 3), k_lens=(2, 0), pad_tokens=4), seed=1)
    out, lse = _call(a)
    empty_rows = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12]   # 6 - 2 = 4 blind queries; sequence 1; 4 padding rows
    assert torch.all(torch.isposinf(lse[empty_rows])) and torch.all(out[empty_rows] == 0)
    assert torch.isfinite(lse[[4, 5]]).all()


def test_softmax_scale_default_and_explicit():
    a = T.mha_prefill_inputs(CASES["d192_gqa_causal_varlen_zero"], seed=2)
    out, lse = _call(a)
    out2, lse2 = _call(a, softmax_scale=192 ** -0.5)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    out3, lse3 = _call(a, softmax_scale=0.3)
    _assert_matches(out3, lse3, *_oracle(a, scale=0.3))


# ------------------------------------------------------------------------------------------------
# NaN poison and isolation between sequences
# ------------------------------------------------------------------------------------------------
def test_padding_never_reaches_a_result():
    """Every row that is not a sequence's (padding after the last sequence, reached by the padded views
    because max_seqlen exceeds every length) may hold NaN or inf: the results are bitwise unchanged."""
    case = T.MHAPrefillCase(b=4, h_q=4, h_k=2, seqlen_q=20, kv_prefix=9, pad_tokens=30, max_seqlen_slack=40)
    a = T.mha_prefill_inputs(case, seed=3)
    out, lse = _call(a)
    assert not torch.isnan(out).any()
    for fill in (float("inf"), -float("inf"), 0.0, 1e30):
        b = dict(a)
        for name in ("q", "k", "v"):
            t = a[name].clone()
            t[-case.pad_tokens:] = fill
            b[name] = t
        out2, lse2 = _call(b)
        assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_sequences_do_not_see_each_other():
    """Changing one sequence's q/k/v changes only that sequence's rows."""
    a = T.mha_prefill_inputs(T.MHAPrefillCase(h_q=4, h_k=2, q_lens=(7, 5, 9), k_lens=(9, 5, 12)), seed=4)
    out, lse = _call(a)
    b = dict(a, q=a["q"].clone(), k=a["k"].clone(), v=a["v"].clone())
    b["q"][7:12] = float("nan")          # sequence 1's queries
    b["k"][9:14] = float("nan")          # and keys
    out2, lse2 = _call(b)
    others = list(range(0, 7)) + list(range(12, 21))
    assert torch.equal(out[others], out2[others]) and torch.equal(lse[others], lse2[others])


# ------------------------------------------------------------------------------------------------
# chunked prefill over a cached prefix: bottom-right causal, merge by lse
# ------------------------------------------------------------------------------------------------
def _merge(out1, lse1, out2, lse2):
    """Attention over two disjoint key sets merged by their lse (+inf marks an empty set)."""
    l1 = torch.where(torch.isposinf(lse1), -math.inf, lse1)
    l2 = torch.where(torch.isposinf(lse2), -math.inf, lse2)
    m = torch.maximum(l1, l2)
    m_safe = torch.where(torch.isneginf(m), 0.0, m)
    w1, w2 = torch.exp(l1 - m_safe), torch.exp(l2 - m_safe)
    denom = w1 + w2
    out = (out1.float() * w1[..., None] + out2.float() * w2[..., None]) / torch.where(denom == 0, 1.0, denom)[..., None]
    return out, torch.where(denom == 0, math.inf, m_safe + torch.log(denom))


@pytest.mark.parametrize("d_qk", [192, 128])
def test_chunked_prefill_matches_whole_prompt(d_qk):
    """A prompt of n tokens prefilled at once equals: chunk 1 (first c queries over the first c keys),
    then chunk 2 (last n - c queries over all n keys, bottom-right causal); and chunk 2 also equals
    the lse-merge of (its queries over the cached prefix, non-causal) and (over its own keys, causal)."""
    n, c, h_q, h_k = 50, 18, 4, 2
    g = torch.Generator().manual_seed(5)
    q = torch.randn(n, h_q, d_qk, generator=g).bfloat16()
    k = torch.randn(n, h_k, d_qk, generator=g).bfloat16()
    v = torch.randn(n, h_k, 128, generator=g).bfloat16()
    cu = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    full_out, full_lse = F.mha_prefill(q, k, v, cu(0, n), cu(0, n), n, n, causal=True)
    out1, lse1 = F.mha_prefill(q[:c], k[:c], v[:c], cu(0, c), cu(0, c), c, c, causal=True)
    out2, lse2 = F.mha_prefill(q[c:], k, v, cu(0, n - c), cu(0, n), n - c, n, causal=True)
    torch.testing.assert_close(torch.cat([out1, out2]).float(), full_out.float(), atol=8e-3, rtol=2 / 128)
    torch.testing.assert_close(torch.cat([lse1, lse2]), full_lse, atol=1e-5, rtol=1e-5)
    # the same chunk as two pieces merged by lse (what an engine does with a cached prefix)
    pre_out, pre_lse = F.mha_prefill(q[c:], k[:c], v[:c], cu(0, n - c), cu(0, c), n - c, c, causal=False)
    own_out, own_lse = F.mha_prefill(q[c:], k[c:], v[c:], cu(0, n - c), cu(0, n - c), n - c, n - c, causal=True)
    merged_out, merged_lse = _merge(pre_out, pre_lse, own_out, own_lse)
    torch.testing.assert_close(merged_out, out2.float(), atol=1.6e-2, rtol=2 / 128)
    torch.testing.assert_close(merged_lse, lse2, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# values that cannot be refused without a host sync: their defined meaning
# ------------------------------------------------------------------------------------------------
def test_max_seqlen_smaller_than_a_sequence_cuts_it():
    """Sequence 0 has 9 queries and 14 keys, max_seqlen_q = 6, max_seqlen_k = 10: its first 6 queries
    are computed over its first 10 keys (causal aligned on the cut counts 6 and 10); its rows 6..8 get
    out 0 and lse +inf; sequence 1 (within the bounds) is unaffected."""
    a = T.mha_prefill_inputs(T.MHAPrefillCase(h_q=4, h_k=2, q_lens=(9, 4), k_lens=(14, 5), max_seqlen_slack=0),
                             seed=6)
    a.update(max_seqlen_q=6, max_seqlen_k=10)
    out, lse = _call(a)
    _assert_matches(out, lse, *_oracle(a))
    assert torch.all(torch.isposinf(lse[6:9])) and torch.all(out[6:9] == 0)
    cu = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    cut_out, cut_lse = F.mha_prefill(a["q"][:6], a["k"][:10], a["v"][:10], cu(0, 6), cu(0, 10), 6, 10, causal=True)
    _assert_same(out[:6], lse[:6], cut_out, cut_lse)
    whole_out, whole_lse = F.mha_prefill(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], 9, 14,
                                         causal=True)
    _assert_same(out[9:13], lse[9:13], whole_out[9:13], whole_lse[9:13])


def test_zero_max_seqlen_gives_the_empty_result():
    a = T.mha_prefill_inputs(CASES["d192_gqa_causal_varlen_zero"], seed=7)
    for mq, mk in ((0, a["max_seqlen_k"]), (a["max_seqlen_q"], 0)):
        out, lse = F.mha_prefill(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], mq, mk, causal=True)
        assert torch.all(out == 0) and torch.all(torch.isposinf(lse))


@pytest.mark.parametrize("cu_q,cu_k", [
    ([2, 5, 9], [0, 4, 10]),        # does not start at 0: rows 0, 1 belong to no sequence
    ([0, 3, 5], [0, 4, 10]),        # ends before the token count: rows 5.. are padding
    ([0, 4, 30], [0, 4, 10]),       # runs past the token count: rows >= total_q are not computed
    ([0, 3, 9], [0, 6, 40]),        # keys past the tensor are not attended
    ([-3, 2, 9], [-5, 3, 10]),      # negative starts: rows / keys before 0 do not exist
    ([0, 9, 4], [0, 8, 3]),         # decreasing: a negative length counts as 0
])
def test_inconsistent_cu_seqlens_have_a_defined_meaning(cu_q, cu_k):
    g = torch.Generator().manual_seed(8)
    q = torch.randn(11, 4, 192, generator=g).bfloat16()
    k = torch.randn(12, 2, 192, generator=g).bfloat16()
    v = torch.randn(12, 2, 128, generator=g).bfloat16()
    a = dict(q=q, k=k, v=v, cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32),
             cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32), max_seqlen_q=40, max_seqlen_k=40, causal=True)
    out, lse = _call(a)
    _assert_matches(out, lse, *_oracle(a))


def test_overlapping_sequences_give_one_of_their_results():
    """cu_seqlens_q = [0, 6, 3, 9]: sequence 2 owns rows 3..8, so rows 3..5 are owned twice (by
    sequences 0 and 2): each element of their out and lse is the value of one of the two (which one
    is unspecified, possibly element by element); the other rows are defined as usual."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(9, 2, 128, generator=g).bfloat16(), torch.randn(9, 2, 128, generator=g).bfloat16(),
               torch.randn(9, 2, 128, generator=g).bfloat16())
    cu_q, cu_k = torch.tensor([0, 6, 3, 9], dtype=torch.int32), torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    out, lse = F.mha_prefill(q, k, v, cu_q, cu_k, 8, 8, causal=False)
    cu = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    seq0 = F.mha_prefill(q[0:6], k[0:3], v[0:3], cu(0, 6), cu(0, 3), 6, 3, causal=False)
    seq2 = F.mha_prefill(q[3:9], k[5:9], v[5:9], cu(0, 6), cu(0, 4), 6, 4, causal=False)
    _assert_same(out[:3], lse[:3], seq0[0][:3], seq0[1][:3])
    _assert_same(out[6:], lse[6:], seq2[0][3:], seq2[1][3:])
    close = lambda x, y, tol: torch.isclose(x.float(), y.float(), atol=tol, rtol=tol)  # noqa: E731
    assert torch.all(close(out[3:6], seq0[0][3:6], 1e-2) | close(out[3:6], seq2[0][:3], 1e-2))
    assert torch.all(close(lse[3:6], seq0[1][3:6], 1e-5) | close(lse[3:6], seq2[1][:3], 1e-5))


def test_zero_size_inputs():
    z = lambda *s: torch.zeros(*s, dtype=torch.bfloat16)  # noqa: E731
    cu0 = torch.zeros(1, dtype=torch.int32)
    out, lse = F.mha_prefill(z(0, 4, 192), z(0, 2, 192), z(0, 2, 128), cu0, cu0, 0, 0)   # batch 0
    assert out.shape == (0, 4, 128) and lse.shape == (0, 4)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    out, lse = F.mha_prefill(torch.randn(3, 4, 192).bfloat16(), z(0, 2, 192), z(0, 2, 128), cu,
                             torch.tensor([0, 5], dtype=torch.int32), 3, 5)                # no key rows at all
    assert torch.all(out == 0) and torch.all(torch.isposinf(lse))


# ------------------------------------------------------------------------------------------------
# bounded memory
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,h_q,h_k,s", [(1, 128, 128, 16384), (1, 128, 128, 131072), (17, 128, 16, 16384),
                                         (1024, 128, 1, 2048), (3, 16, 2, 65536)])
def test_block_sizes_bound_the_intermediates(b, h_q, h_k, s):
    seqs, rows, keys = reference.mha_prefill_blocks(b, h_q, h_k, 192, 128, s, s)
    budget = reference.MHA_PREFILL_BLOCK_ELEMS
    assert 1 <= seqs <= b and 1 <= rows <= s and 1 <= keys <= s
    assert seqs * h_q * rows * keys <= budget                 # scores (and probabilities)
    assert seqs * keys * h_k * (192 + 128) <= budget          # gathered keys and values
    assert seqs * rows * h_q * (192 + 128) <= budget          # gathered queries and the accumulator


def test_small_blocks_give_the_same_result(monkeypatch):
    """Many sequence groups, query blocks and key blocks (online softmax across key blocks)."""
    a = T.mha_prefill_inputs(T.MHAPrefillCase(b=5, h_q=4, h_k=2, d_qk=128, seqlen_q=14, kv_prefix=9,
                                              zero_lengths=True), seed=10)
    out, lse = _call(a)
    monkeypatch.setattr(reference, "MHA_PREFILL_ROWS", 5)
    monkeypatch.setattr(reference, "MHA_PREFILL_KEYS", 7)
    monkeypatch.setattr(reference, "MHA_PREFILL_BLOCK_ELEMS", 2 * 5 * 4 * 256)
    assert reference.mha_prefill_blocks(5, 4, 2, 128, 128, a["max_seqlen_q"], a["max_seqlen_k"]) == (2, 5, 7)
    out2, lse2 = _call(a)
    torch.testing.assert_close(out2.float(), out.float(), atol=8e-3, rtol=2 / 128)
    torch.testing.assert_close(lse2, lse, atol=1e-5, rtol=1e-5)
    _assert_matches(out2, lse2, *_oracle(a))


def test_long_sequence_runs_in_blocks():
    """16k cached keys under 64 new queries (a late chunk of a long prompt): a [h, s, s] score tensor
    would not be needed; the result matches the lse-merge of the two key halves."""
    s_k, s_q, h = 16384, 64, 2
    g = torch.Generator().manual_seed(11)
    q = torch.randn(s_q, h, 128, generator=g).bfloat16()
    k = torch.randn(s_k, h, 128, generator=g).bfloat16()
    v = torch.randn(s_k, h, 128, generator=g).bfloat16()
    cu = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    out, lse = F.mha_prefill(q, k, v, cu(0, s_q), cu(0, s_k), s_q, s_k, causal=True)
    half = s_k // 2
    o1, l1 = F.mha_prefill(q, k[:half], v[:half], cu(0, s_q), cu(0, half), s_q, half, causal=False)
    o2, l2 = F.mha_prefill(q, k[half:], v[half:], cu(0, s_q), cu(0, half), s_q, half, causal=True)
    mo, ml = _merge(o1, l1, o2, l2)
    torch.testing.assert_close(mo, out.float(), atol=8e-3, rtol=2 / 128)
    torch.testing.assert_close(ml, lse, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# bad input: ValueError naming the argument, before any work
# ------------------------------------------------------------------------------------------------
def _good():
    a = T.mha_prefill_inputs(T.MHAPrefillCase(b=2, h_q=4, h_k=2, seqlen_q=5), seed=12)
    return [a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"], a["max_seqlen_k"],
            0.1, True]


BAD = [
    ("q_fp32", 0, lambda a: a[0].float(), "q"),
    ("q_2d", 0, lambda a: a[0][:, 0], "q"),
    ("d_qk_64", None, lambda a: [a[0][..., :64], a[1][..., :64]] + a[2:], "q"),
    ("d_qk_576", None, lambda a: [torch.zeros(3, 4, 576, dtype=torch.bfloat16),
                                  torch.zeros(3, 2, 576, dtype=torch.bfloat16)] + a[2:], "q"),
    ("d_v_192", 2, lambda a: torch.zeros(a[2].shape[0], 2, 192, dtype=torch.bfloat16), "v"),
    ("d_v_64", 2, lambda a: a[2][..., :64], "v"),
    ("k_dtype", 1, lambda a: a[1].half(), "k"),
    ("k_d_qk", 1, lambda a: a[1][..., :128], "k"),
    ("h_q_not_multiple", 1, lambda a: torch.zeros(a[1].shape[0], 3, 192, dtype=torch.bfloat16), "k"),
    ("v_rows", 2, lambda a: a[2][:-1], "v"),
    ("v_heads", 2, lambda a: a[2][:, :1], "v"),
    ("v_dtype", 2, lambda a: a[2].half(), "v"),
    ("last_dim_strided", 0, lambda a: torch.zeros(a[0].shape[0], 4, 384, dtype=torch.bfloat16)[..., ::2], "q"),
    ("cu_q_int64", 3, lambda a: a[3].long(), "cu_seqlens_q"),
    ("cu_q_2d", 3, lambda a: a[3][None], "cu_seqlens_q"),
    ("cu_q_empty", None, lambda a: a[:3] + [a[3][:0], a[4][:0]] + a[5:], "cu_seqlens_q"),
    ("cu_k_batch", 4, lambda a: a[4][:-1], "cu_seqlens_k"),
    ("cu_k_strided", 4, lambda a: torch.zeros(2 * a[4].shape[0], dtype=torch.int32)[::2], "cu_seqlens_k"),
    ("max_q_negative", 5, lambda a: -1, "max_seqlen_q"),
    ("scale_nan", 7, lambda a: float("nan"), "softmax_scale"),
    ("scale_zero", 7, lambda a: 0.0, "softmax_scale"),
]


@pytest.mark.parametrize("name,index,make,arg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(name, index, make, arg):
    args = _good()
    if index is None:
        args = make(args)
    else:
        args[index] = make(args)
    with pytest.raises(ValueError, match=f"flashmla.mha_prefill: argument '{arg}'"):
        torch.ops.flashmla.mha_prefill(*args)


def test_inference_only():
    args = _good()
    args[0] = args[0].float().requires_grad_().bfloat16()
    with pytest.raises(RuntimeError, match="inference-only"):
        torch.ops.flashmla.mha_prefill(*args)
    with torch.no_grad():
        torch.ops.flashmla.mha_prefill(*args)


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------
def _prefill_layer(q, k, v, cu_q, cu_k, max_q: int, max_k: int):
    out, lse = F.mha_prefill(q * 1.0, k, v, cu_q, cu_k, max_q, max_k, causal=True)
    out2, _ = compat.flash_attn_varlen_kvpacked_func(q, torch.cat([k, v], dim=-1), cu_q, cu_k, max_q, max_k,
                                                     k.shape[2], causal=True)
    return out + out2, lse


def test_compile_fullgraph_no_graph_breaks():
    torch._dynamo.reset()
    counters.clear()
    a = T.mha_prefill_inputs(CASES["d192_gqa_causal_varlen_zero"], seed=13)
    args = (a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"], a["max_seqlen_k"])
    expected = _prefill_layer(*args)
    backend = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = torch.compile(_prefill_layer, fullgraph=True, backend=backend)
    got = step(*args)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # new cu_seqlens contents (same shapes): same graph
    cu_q = torch.tensor([0, 10, 10, 20, 20, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 12, 12, 30, 30, 40], dtype=torch.int32)
    q, k, v = (torch.randn_like(a[name]) for name in ("q", "k", "v"))
    got = step(q, k, v, cu_q, cu_k, a["max_seqlen_q"], a["max_seqlen_k"])
    want = _prefill_layer(q, k, v, cu_q, cu_k, a["max_seqlen_q"], a["max_seqlen_k"])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert backend.frame_count == 1
    assert sum(counters["graph_break"].values()) == 0
    torch._dynamo.reset()


def test_compile_inductor_dynamic_token_count():
    torch._dynamo.reset()
    counters.clear()
    backend = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    fn = torch.compile(lambda q, k, v, cq, ck: F.mha_prefill(q, k, v, cq, ck, 48, 64, causal=True),
                       fullgraph=True, dynamic=True, backend=backend)
    compiles = []
    with torch.fx.experimental._config.patch(use_duck_shape=False):
        for seed, b in enumerate((3, 5, 6)):
            case = T.MHAPrefillCase(b=b, h_q=4, h_k=2, d_qk=128, seqlen_q=30 + b, kv_prefix=20 - b)
            a = T.mha_prefill_inputs(case, seed=20 + seed)
            got = fn(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"])
            want = F.mha_prefill(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], 48, 64, causal=True)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            compiles.append(backend.frame_count)
    # as in test_compile.py: the first call may reach the backend twice; later token counts and
    # batch sizes add nothing
    assert compiles[0] >= 1 and compiles[1:] == [compiles[0]] * 2, f"recompiled: {compiles}"
    assert sum(counters["graph_break"].values()) == 0
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# compat: FlashMLA's three varlen entry points
# ------------------------------------------------------------------------------------------------
def test_compat_varlen_func_is_the_op():
    a = T.mha_prefill_inputs(CASES["d192_gqa_causal_varlen_zero"], seed=15)
    want = _call(a)
    got = compat.flash_attn_varlen_func(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"],
                                        a["max_seqlen_q"], a["max_seqlen_k"], causal=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("d_qk", [192, 128])
def test_compat_qkvpacked(d_qk):
    a = T.mha_prefill_inputs(T.MHAPrefillCase(b=3, h_q=4, h_k=4, d_qk=d_qk, seqlen_q=12), seed=16)
    qkv = torch.cat([a["q"], a["k"], a["v"]], dim=-1)
    got = compat.flash_attn_varlen_qkvpacked_func(qkv, a["cu_seqlens_q"], a["max_seqlen_q"], d_qk, causal=True)
    want = F.mha_prefill(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_q"], a["max_seqlen_q"],
                         a["max_seqlen_q"], causal=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_compat_kvpacked():
    a = T.mha_prefill_inputs(T.MHAPrefillCase(b=3, h_q=8, h_k=2, seqlen_q=12, kv_prefix=9), seed=17)
    kv = torch.cat([a["k"], a["v"]], dim=-1)
    got = compat.flash_attn_varlen_kvpacked_func(a["q"], kv, a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"],
                                                 a["max_seqlen_k"], 192, softmax_scale=0.05, causal=True)
    want = F.mha_prefill(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"],
                         a["max_seqlen_k"], softmax_scale=0.05, causal=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_compat_packed_bad_input():
    qkv = torch.zeros(6, 2, 512, dtype=torch.bfloat16)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="argument 'qkv'"):
        compat.flash_attn_varlen_qkvpacked_func(qkv, cu, 6, 256)           # nothing left for v
    with pytest.raises(ValueError, match="argument 'head_dim_qk'"):
        compat.flash_attn_varlen_qkvpacked_func(qkv, cu, 6, 0)
    with pytest.raises(ValueError, match="argument 'kv'"):
        compat.flash_attn_varlen_kvpacked_func(qkv[..., :192], qkv[:, :, :192], cu, cu, 6, 6, 192)
    with pytest.raises(ValueError, match="argument 'dropout_p'"):
        compat.flash_attn_varlen_qkvpacked_func(qkv, cu, 6, 192, dropout_p=0.1)
    with pytest.raises(ValueError, match="argument 'v'"):
        compat.flash_attn_varlen_qkvpacked_func(torch.zeros(6, 2, 448, dtype=torch.bfloat16), cu, 6, 192)  # d_v 64


# ------------------------------------------------------------------------------------------------
# GPU: the CUDA path (the SM90 kernel on an H100/H200) and CUDA graphs; the kernel's own matrix is in
# tests/test_mha_prefill_cuda.py
# ------------------------------------------------------------------------------------------------
GPU_CASES = [
    T.MHAPrefillCase(b=1, h_q=16, h_k=16, seqlen_q=1000, varlen=False),
    T.MHAPrefillCase(b=3, h_q=16, h_k=2, seqlen_q=700, kv_prefix=900, zero_lengths=True),
    T.MHAPrefillCase(b=17, h_q=8, h_k=1, d_qk=128, seqlen_q=300, kv_prefix=100, dtype=torch.float16),
    T.MHAPrefillCase(b=4, h_q=128, h_k=128, seqlen_q=256, causal=False),
    T.MHAPrefillCase(h_q=16, h_k=2, q_lens=(200, 0, 37), k_lens=(150, 80, 37)),
]


@needs_gpu
@pytest.mark.parametrize("index", range(len(GPU_CASES)))
def test_gpu_matches_cpu_reference(index):
    a = T.mha_prefill_inputs(GPU_CASES[index], device="cuda", seed=30 + index)
    out, lse = _call(a)
    assert out.device.type == "cuda" and lse.device.type == "cuda"
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    assert_mha_prefill_close(out, lse, *_call(cpu))


@needs_gpu
def test_gpu_long_sequence_memory_is_bounded():
    """One 16k-token causal prompt, 16 heads: a full score tensor would take 16 GiB."""
    a = T.mha_prefill_inputs(T.MHAPrefillCase(b=1, h_q=16, h_k=16, d_qk=128, seqlen_q=16384, varlen=False,
                                              pad_tokens=0), device="cuda", seed=40)  # every row owned
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out, lse = _call(a)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 2 * 1024 ** 3
    assert not torch.isnan(out).any() and torch.isfinite(lse).all()


@needs_gpu
def test_gpu_cuda_graph_replays_with_new_cu_seqlens():
    """Captured once; replayed after new cu_seqlens contents (other lengths, a zero-length sequence,
    padding rows) and new q/k/v are copied into the captured buffers."""
    case = T.MHAPrefillCase(b=4, h_q=16, h_k=4, seqlen_q=120, kv_prefix=60, pad_tokens=0, max_seqlen_slack=0)
    static = T.mha_prefill_inputs(case, device="cuda", seed=41)
    max_q, max_k = 160, 200
    args = lambda: (static["q"], static["k"], static["v"], static["cu_seqlens_q"], static["cu_seqlens_k"],  # noqa: E731
                    max_q, max_k)
    graph, (out, lse) = T.capture_cuda_graph(lambda: F.mha_prefill(*args(), causal=True))
    total_q, total_k = static["q"].shape[0], static["k"].shape[0]
    g = torch.Generator().manual_seed(42)
    for cu_q, cu_k in (([0, 50, 50, 160, 170], [0, 90, 95, 200, 230]),
                       ([0, 1, 2, 3, 3], [0, 150, 300, 301, 301]),
                       ([0, total_q - 5, total_q - 5, total_q - 5, total_q - 5], [0, 0, 0, 0, 0])):
        cu_q = [min(x, total_q) for x in cu_q]
        cu_k = [min(x, total_k) for x in cu_k]
        static["cu_seqlens_q"].copy_(torch.tensor(cu_q, dtype=torch.int32))
        static["cu_seqlens_k"].copy_(torch.tensor(cu_k, dtype=torch.int32))
        for name in ("q", "k", "v"):
            static[name].copy_(torch.randn(static[name].shape, generator=g).to(static[name].dtype))
        graph.replay()
        torch.cuda.synchronize()
        cpu = [t.cpu() if isinstance(t, torch.Tensor) else t for t in args()]
        assert_mha_prefill_close(out, lse, *F.mha_prefill(*cpu, causal=True))
