"""flashmla.mha_prefill on the GPU: the SM90 kernel against the float32 reference (run on the GPU) on
fresh random inputs, over the matrix of the kernel's cases: b 1 / 3 / 17, lengths 1 to 16k (ragged,
zero-length sequences, cached prefixes s_k >= s_q, and s_k < s_q), h_q 1 / 16 / 128 with h_k 1, h_q / 8
and h_q, both (d_qk, d_v) pairs, bf16 and fp16, causal and not; NaN rows that no sequence owns (their out
must be 0 and lse +inf, and they must never reach another row); strided inputs; sequences cut by
max_seqlen; inconsistent cu_seqlens. Tolerances: tests/attention_asserts.py (MHA_PREFILL_TOL)."""
from __future__ import annotations

import zlib

import pytest
import torch

import torch_flashmla as F
from torch_flashmla import _registration, reference, testing as T

from attention_asserts import assert_mha_prefill_close

pytestmark = pytest.mark.cuda

C = T.MHAPrefillCase
BF16, FP16 = torch.bfloat16, torch.float16
CASES = {
    "b1_s4096_h128_d192_causal": C(b=1, h_q=128, h_k=128, seqlen_q=4096, varlen=False),
    "b1_s16384_h16_gqa8_d192_causal": C(b=1, h_q=16, h_k=2, seqlen_q=16384, varlen=False),
    "b1_s16384_h1_mqa_d128_noncausal": C(b=1, h_q=1, h_k=1, d_qk=128, seqlen_q=16384, varlen=False, causal=False),
    "b3_ragged_prefix_h16_d128_fp16": C(b=3, h_q=16, h_k=16, d_qk=128, seqlen_q=3000, kv_prefix=2500, dtype=FP16),
    "b3_ragged_h16_mqa_d192_noncausal": C(b=3, h_q=16, h_k=1, seqlen_q=1500, kv_prefix=700, causal=False),
    "b17_ragged_zero_h128_gqa_d192": C(b=17, h_q=128, h_k=16, seqlen_q=600, kv_prefix=300, zero_lengths=True),
    "b17_ragged_zero_h1_d128_fp16": C(b=17, h_q=1, h_k=1, d_qk=128, seqlen_q=900, kv_prefix=900, zero_lengths=True,
                                      dtype=FP16),
    "b17_h16_gqa_d192_fp16_noncausal": C(b=17, h_q=16, h_k=2, seqlen_q=400, kv_prefix=50, dtype=FP16, causal=False),
    # block edges: lengths around multiples of the 128-row / 128-key tiles, prefixes of all sizes
    "block_edges_causal": C(h_q=16, h_k=16, q_lens=(1, 127, 128, 129, 255, 257, 1), k_lens=(1, 127, 300, 129, 700,
                                                                                             257, 1000)),
    "block_edges_noncausal_d128": C(h_q=16, h_k=2, d_qk=128, q_lens=(1, 129, 64, 383), k_lens=(129, 1, 256, 383),
                                    causal=False),
    # s_k < s_q with causal: the first n_q - n_k rows see nothing (out 0, lse +inf)
    "short_keys_causal": C(h_q=16, h_k=8, q_lens=(300, 5, 0, 130), k_lens=(100, 0, 3, 129)),
    "zero_keys_noncausal": C(h_q=16, h_k=2, q_lens=(200, 40), k_lens=(0, 170), causal=False),
    "single_token_h128": C(h_q=128, h_k=128, q_lens=(1,), k_lens=(1,)),
}


def _reference(a, **kw):
    return reference.mha_prefill(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"],
                                 a["max_seqlen_k"], kw.get("scale", a["q"].shape[-1] ** -0.5), a["causal"])


def _kernel(a, **kw):
    return F.mha_prefill(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"],
                         a["max_seqlen_k"], causal=a["causal"], **kw)


def test_cuda_calls_run_the_sm90_kernel():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an SM90 GPU")
    assert _registration.cuda_path("mha_prefill", torch.device("cuda")) == "sm90"


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name):
    a = T.mha_prefill_inputs(CASES[name], device="cuda", seed=zlib.crc32(name.encode()) % 1000)
    out, lse = _kernel(a)
    assert_mha_prefill_close(out, lse, *_reference(a))


def test_explicit_softmax_scale():
    a = T.mha_prefill_inputs(C(h_q=16, h_k=4, seqlen_q=300, kv_prefix=200), device="cuda", seed=3)
    out, lse = _kernel(a, softmax_scale=0.3)
    assert_mha_prefill_close(out, lse, *_reference(a, scale=0.3))


def test_strided_and_misaligned_inputs():
    """q, k, v as slices of packed qkv rows (the qkvpacked form), and a q that starts 2 bytes into its
    storage (copied for TMA, same result)."""
    a = T.mha_prefill_inputs(C(b=3, h_q=16, h_k=16, seqlen_q=200, pad_tokens=0, max_seqlen_slack=0), device="cuda",
                             seed=4)
    q, k, v = a["q"], a["k"], a["v"]
    packed = torch.cat([q, k, torch.nn.functional.pad(v, (0, 64))], dim=-1)   # [total, h, 192 + 192 + 192]
    strided = dict(a, q=packed[..., :192], k=packed[..., 192:384], v=packed[..., 384:512])
    assert not strided["q"].is_contiguous()
    want = _reference(a)
    assert_mha_prefill_close(*_kernel(strided), *want)
    storage = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")
    shifted = storage[1:].view(q.shape)
    shifted.copy_(q)
    assert shifted.data_ptr() % 16 != 0
    assert_mha_prefill_close(*_kernel(dict(a, q=shifted)), *want)


def test_sequences_cut_by_max_seqlen_never_read_the_cut_rows():
    """A sequence longer than max_seqlen_* is cut to its first max_seqlen_* rows; its cut key rows are
    NaN here and must not reach any result (the last block's V rows past the cut are zeroed)."""
    a = T.mha_prefill_inputs(C(h_q=16, h_k=2, q_lens=(300, 200), k_lens=(400, 330), pad_tokens=0), device="cuda",
                             seed=5)
    a["max_seqlen_q"], a["max_seqlen_k"] = 250, 333
    a["k"][333:400] = float("nan")
    a["v"][333:400] = float("nan")
    a["q"][250:300] = float("nan")
    out, lse = _kernel(a)
    assert_mha_prefill_close(out, lse, *_reference(a))


@pytest.mark.parametrize("cu_q,cu_k", [
    ([3, 50, 20, 400], [0, 90, 95, 600]),      # decreasing, a negative length
    ([-40, 60, 100, 420], [-100, 0, 700, 900]),  # starts before row 0
    ([0, 100, 200, 450], [0, 300, 700, 1200]),   # rows and keys past the end of q / k
])
def test_inconsistent_cu_seqlens_have_the_reference_meaning(cu_q, cu_k):
    a = T.mha_prefill_inputs(C(h_q=16, h_k=4, q_lens=(150, 150, 110), k_lens=(300, 300, 350), pad_tokens=0),
                             device="cuda", seed=6)
    a["cu_seqlens_q"] = torch.tensor(cu_q, dtype=torch.int32, device="cuda")
    a["cu_seqlens_k"] = torch.tensor(cu_k, dtype=torch.int32, device="cuda")
    a["max_seqlen_q"], a["max_seqlen_k"] = 320, 520
    out, lse = _kernel(a)
    ref_out, ref_lse = _reference(a)
    # rows owned by two sequences (decreasing cu_seqlens_q) may hold either result: compare the others
    starts, lens = a["cu_seqlens_q"][:-1].long(), (a["cu_seqlens_q"][1:] - a["cu_seqlens_q"][:-1]).long()
    rows = torch.arange(out.shape[0], device="cuda")
    owners = ((rows[:, None] >= starts) & (rows[:, None] < starts + lens.clamp(0, a["max_seqlen_q"]))).sum(1)
    single = owners <= 1
    assert_mha_prefill_close(out[single], lse[single], ref_out[single], ref_lse[single])


def test_cuda_graph_replay_matches_eager():
    case = C(b=4, h_q=16, h_k=4, seqlen_q=300, kv_prefix=200, pad_tokens=0, max_seqlen_slack=0)
    static = T.mha_prefill_inputs(case, device="cuda", seed=7)
    graph, (out, lse) = T.capture_cuda_graph(lambda: _kernel(static))
    g = torch.Generator(device="cuda").manual_seed(8)
    for name in ("q", "k", "v"):
        static[name].copy_(torch.randn(static[name].shape, generator=g, device="cuda").to(static[name].dtype))
    graph.replay()
    torch.cuda.synchronize()
    eager = _kernel(static)
    assert torch.equal(out, eager[0]) and torch.equal(lse, eager[1])
    assert_mha_prefill_close(out, lse, *_reference(static))
