"""CPU tests of mla_decode over the per-tensor e4m3 cache (``descale_q`` / ``descale_k``): the float32
reference against attention over the dequantized values, opcheck, the fake, bad input, and the
``compat.flash_mla_with_kvcache`` FP8 dense call form. The SM90 kernel is tested in
test_dense_decode_fp8_cuda.py."""
from __future__ import annotations

import pytest
import torch

import torch_flashmla as F
from torch_flashmla import compat, reference
from torch_flashmla import kv_cache as kvc
from torch_flashmla import testing as T

SCALE = 576 ** -0.5


def fp8_args(q_fp8=False, seed=0, **case):
    """Dense decode inputs of the shared generator with the cache quantized to per-tensor e4m3 (NaN poison
    becomes 0x7F) and, optionally, q too. Keyword arguments of F.mla_decode."""
    a = T.dense_decode_inputs(T.DenseDecodeCase(**{"b": 3, "h_q": 4, "seqlen": 150, "varlen": True,
                                                   "zero_lengths": True, **case}), seed=seed)
    dk = torch.tensor([0.0123])
    a["kv_cache"] = kvc.quantize_per_tensor_e4m3(a["kv_cache"], dk).view(torch.float8_e4m3fn)
    a["descale_k"] = dk
    if q_fp8:
        a["descale_q"] = torch.tensor([0.0171])
        a["q"] = kvc.quantize_per_tensor_e4m3(a["q"], a["descale_q"]).view(torch.float8_e4m3fn)
    return a


def dequantized_reference(a):
    """Attention over the dequantized values; a bf16 q quantized per row first (the FP8 kernel's QK is e4m3 x e4m3)."""
    if "descale_q" in a:
        q = a["q"].float() * a["descale_q"]
    else:
        q8, factor = kvc.quantize_rows_e4m3_pow2(a["q"])
        q = q8.float() / factor
    kv = kvc.dequantize_per_tensor_e4m3(a["kv_cache"], a["descale_k"])
    return reference.mla_decode(q, kv, a["block_table"], a["cache_seqlens"], 512, SCALE, a["causal"])


@pytest.mark.parametrize("q_fp8", [False, True])
@pytest.mark.parametrize("causal,s_q,h_kv", [(False, 1, 1), (True, 2, 2), (True, 4, 1)])
def test_reference_is_attention_over_dequantized_values(q_fp8, causal, s_q, h_kv):
    a = fp8_args(q_fp8, seed=s_q + 10 * h_kv, s_q=s_q, h_kv=h_kv, causal=causal)
    out, lse = F.mla_decode(**a)
    ref_out, ref_lse = dequantized_reference(a)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.float(), ref_out.float().to(torch.bfloat16).float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    assert torch.isposinf(lse[a["cache_seqlens"] == 0]).all()
    assert (out[a["cache_seqlens"] == 0] == 0).all()


def test_row_quantization_of_q():
    """quantize_rows_e4m3_pow2: a power-of-two factor per row, the row's largest |value| lands in (224, 448]
    (as large as possible), values are the nearest e4m3; zero rows take factor 1."""
    x = torch.randn(5, 3, 576, dtype=torch.bfloat16) * torch.tensor([1e-3, 1.0, 37.0])[None, :, None]
    x[0, 0] = 0
    x[1, 1, 7] = 7.0   # 1.75 * 2^2: 1.m == 1.75 exactly, the larger factor (2^6) still fits
    q8, factor = kvc.quantize_rows_e4m3_pow2(x)
    assert q8.dtype == torch.float8_e4m3fn and factor.shape == (5, 3, 1)
    mant, _ = torch.frexp(factor)
    assert (mant == 0.5).all(), "factors are powers of two"
    amax = x.float().abs().amax(-1, keepdim=True)
    scaled = amax * factor
    nonzero = amax > 0
    assert (scaled[nonzero] <= 448).all() and (scaled[nonzero] > 224).all()
    assert (factor[~nonzero] == 1).all()
    torch.testing.assert_close(q8.float(), (x.float() * factor).to(torch.float8_e4m3fn).float(), atol=0, rtol=0)
    assert (q8.float()[1, 1, 7] == 448)


def test_uint8_cache_and_scalar_descales():
    a = fp8_args(True, seed=3)
    out, lse = F.mla_decode(**a)
    b = dict(a, kv_cache=a["kv_cache"].view(torch.uint8), descale_k=a["descale_k"].reshape(()),
             descale_q=a["descale_q"].reshape(()))
    out2, lse2 = F.mla_decode(**b)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_descale_k_scales_scores_and_values():
    """Doubling descale_k doubles the dequantized keys and values: out doubles exactly when the
    softmax scale is halved."""
    a = fp8_args(seed=4)
    out, _ = F.mla_decode(**a)
    out2, _ = F.mla_decode(**dict(a, descale_k=a["descale_k"] * 2), softmax_scale=SCALE / 2)
    torch.testing.assert_close(out2.float(), 2 * out.float(), atol=1e-2, rtol=1e-2)


def _op_args(a):
    return (a["q"], a["kv_cache"], a["block_table"], a["cache_seqlens"], 512, SCALE, a["causal"],
            a["tile_scheduler_metadata"], a["num_splits"], a.get("descale_q"), a["descale_k"])


def test_opcheck_uint8_cache():
    """opcheck multiplies inputs: float8 tensors cannot be, so the cache goes as its uint8 bytes (q bf16)."""
    a = fp8_args(seed=5)
    a["kv_cache"] = a["kv_cache"].view(torch.uint8)
    torch.library.opcheck(torch.ops.flashmla.mla_decode.default, _op_args(a))


@pytest.mark.parametrize("q_fp8", [False, True])
def test_fake_shapes_and_dtypes(q_fp8):
    from torch._subclasses.fake_tensor import FakeTensorMode
    a = fp8_args(q_fp8, seed=6)
    with FakeTensorMode() as mode:
        fa = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in a.items()}
        out, lse = torch.ops.flashmla.mla_decode(*_op_args(fa))
    b, s_q, h_q, _ = a["q"].shape
    assert out.shape == (b, s_q, h_q, 512) and out.dtype == torch.bfloat16
    assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32


def _bad_cases():
    dk = torch.tensor([0.5])
    return [
        (dict(descale_k=None), "descale_k"),
        (dict(descale_k=dk.double()), "descale_k"),
        (dict(descale_k=torch.ones(2)), "descale_k"),
        (dict(descale_k=torch.ones(1, 1)), "descale_k"),
        (dict(descale_q=dk), "descale_q"),                       # bf16 q takes no descale_q
        (dict(q_fp8=True, descale_q=None), "descale_q"),
        (dict(q_half=True), "q"),                                # fp16 q with an FP8 cache
        (dict(bf16_cache=True), "descale"),                      # descales with a 16-bit cache
    ]


@pytest.mark.parametrize("over,arg", _bad_cases(), ids=[f"{i}-{c[1]}" for i, c in enumerate(_bad_cases())])
def test_bad_input(over, arg):
    over = dict(over)
    a = fp8_args(over.pop("q_fp8", False), seed=7)
    if over.pop("q_half", False):
        a["q"] = a["q"].half()
    if over.pop("bf16_cache", False):
        a["kv_cache"] = kvc.dequantize_per_tensor_e4m3(a["kv_cache"], a["descale_k"]).to(torch.bfloat16)
    a.update(over)
    with pytest.raises(ValueError, match=f"mla_decode: argument '{arg}"):
        F.mla_decode(**a)


def test_compat_dense_fp8_call_form():
    a = fp8_args(True, seed=8, s_q=2, causal=True)
    b, s_q, h_q, _ = a["q"].shape
    meta, splits = compat.get_mla_metadata(a["cache_seqlens"], s_q * h_q, 1, h_q, True)
    out, lse = compat.flash_mla_with_kvcache(a["q"], a["kv_cache"], a["block_table"], a["cache_seqlens"], 512, meta,
                                             splits, causal=True, is_fp8_kvcache=True, descale_q=a["descale_q"],
                                             descale_k=a["descale_k"])
    ref_out, ref_lse = F.mla_decode(**a)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    # the object form of the planner too
    sched, _ = compat.get_mla_metadata()
    out2, _ = compat.flash_mla_with_kvcache(a["q"], a["kv_cache"], a["block_table"], a["cache_seqlens"], 512, sched,
                                            causal=True, is_fp8_kvcache=True, descale_q=a["descale_q"],
                                            descale_k=a["descale_k"])
    assert torch.equal(out2, ref_out)


def test_compat_refusals():
    a = fp8_args(seed=9)
    meta, splits = a["tile_scheduler_metadata"], a["num_splits"]
    with pytest.raises(ValueError, match="k_cache"):  # an FP8 cache without is_fp8_kvcache
        compat.flash_mla_with_kvcache(a["q"], a["kv_cache"], a["block_table"], a["cache_seqlens"], 512, meta, splits,
                                      descale_k=a["descale_k"])
    with pytest.raises(ValueError, match="descale_k"):
        compat.flash_mla_with_kvcache(a["q"], a["kv_cache"], a["block_table"], a["cache_seqlens"], 512, meta, splits,
                                      is_fp8_kvcache=True)
