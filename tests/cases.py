"""Representative argument sets of every op, built by the shared generator (torch_flashmla.testing),
as (op, args) pairs in schema order. Used by the opcheck, fake and GPU tests."""
import torch

from torch_flashmla import testing as T

SCALE = 576 ** -0.5


def _dense(case, device, seed):
    a = T.dense_decode_inputs(case, device=device, seed=seed)
    return (a["q"], a["kv_cache"], a["block_table"], a["cache_seqlens"], 512, SCALE, a["causal"],
            a["tile_scheduler_metadata"], a["num_splits"])


def _sparse(case, device, seed):
    a = T.sparse_decode_inputs(case, device=device, seed=seed)
    return (a["q"], a["kv_cache"], a["indices"], a["topk_length"], a["attn_sink"], a["extra_kv_cache"],
            a["extra_indices"], a["extra_topk_length"], 512, SCALE, a["tile_scheduler_metadata"], a["num_splits"])


def _prefill(case, device, seed):
    a = T.sparse_prefill_inputs(case, device=device, seed=seed)
    return (a["q"], a["kv"], a["indices"], case.d_qk ** -0.5, 512, a["attn_sink"], a["topk_length"])


def _write(device, seed, **kw):
    a = T.cache_write_inputs(device=device, seed=seed, **kw)
    args = (a["kv_c"], a["k_pe"], a["kv_cache"], a["slot_mapping"], a["kv_cache_dtype"])
    return args if a["scale"] is None else args + (a["scale"],)


def _mha(case, device, seed):
    a = T.mha_prefill_inputs(case, device=device, seed=seed)
    return (a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"], a["max_seqlen_k"],
            case.d_qk ** -0.5, a["causal"])


def op_cases(device="cpu"):
    """[(case id, op name, args)] covering each op several ways."""
    ops = torch.ops.flashmla
    kv = torch.randn(3, 5, 576, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(device)
    seqlens = torch.tensor([0, 70, 4000, 1], dtype=torch.int32, device=device)
    kv_v4 = torch.randn(3, 5, 1, 512, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(device)
    return [
        ("plan_dense", ops.get_mla_metadata, (seqlens, 128, 1, 128, False, None, 16)),
        ("plan_gqa", ops.get_mla_metadata, (seqlens, 32, 2, 32, False, None, 5)),
        ("plan_sparse", ops.get_mla_metadata, (seqlens, 256, 1, 128, True, 2048, 132)),
        ("decode_basic", ops.mla_decode, _dense(T.DenseDecodeCase(b=2, h_q=4, seqlen=100), device, 0)),
        ("decode_causal_mtp_hkv2", ops.mla_decode,
         _dense(T.DenseDecodeCase(b=3, s_q=2, h_q=4, h_kv=2, seqlen=130, causal=True, varlen=True,
                                  zero_lengths=True), device, 1)),
        ("decode_fp16", ops.mla_decode, _dense(T.DenseDecodeCase(b=1, h_q=2, seqlen=64, dtype=torch.float16), device, 2)),
        ("sparse_decode_basic", ops.sparse_mla_decode, _sparse(T.SparseDecodeCase(b=2, h_q=4, topk=64), device, 3)),
        ("sparse_decode_all_options", ops.sparse_mla_decode,
         _sparse(T.SparseDecodeCase(b=3, s_q=2, h_q=4, topk=64, with_topk_length=True, with_attn_sink=True,
                                    extra_topk=32, extra_page_size=16), device, 4)),
        ("sparse_decode_v4_basic", ops.sparse_mla_decode,
         _sparse(T.SparseDecodeCase(b=2, h_q=4, topk=64, d_qk=512, page_size=5), device, 12)),
        ("sparse_decode_v4_all_options", ops.sparse_mla_decode,
         _sparse(T.SparseDecodeCase(b=3, s_q=2, h_q=4, topk=64, with_topk_length=True, with_attn_sink=True,
                                    extra_topk=32, extra_page_size=2, d_qk=512), device, 13)),
        ("prefill_basic", ops.sparse_mla_prefill, _prefill(T.SparsePrefillCase(s_q=8, h_q=4), device, 5)),
        ("prefill_all_options", ops.sparse_mla_prefill,
         _prefill(T.SparsePrefillCase(s_q=8, h_q=4, with_attn_sink=True, with_topk_length=True), device, 6)),
        ("write_bf16", ops.concat_and_cache_mla, _write(device, 7)),
        ("write_fp16", ops.concat_and_cache_mla, _write(device, 8, dtype=torch.float16)),
        ("write_fp8", ops.concat_and_cache_mla, _write(device, 9, kv_cache_dtype="fp8_ds_mla")),
        ("write_fp8_per_tensor", ops.concat_and_cache_mla, _write(device, 17, kv_cache_dtype="fp8")),
        ("write_fp8_per_tensor_fp16_page1", ops.concat_and_cache_mla,
         _write(device, 18, num_blocks=12, page_size=1, kv_cache_dtype="fp8_e4m3", dtype=torch.float16)),
        ("write_bf16_ignored_scale", ops.concat_and_cache_mla,
         _write(device, 19) + (torch.tensor(2.0, device=device),)),
        ("quantize", ops.quantize_kv_fp8, (kv,)),
        ("dequantize_uint8", ops.dequantize_kv_fp8, (torch.ops.flashmla.quantize_kv_fp8(kv),)),
        ("write_fp8_v4", ops.concat_and_cache_mla, _write(device, 10, kv_cache_dtype="fp8_ds_mla_v4")),
        ("write_fp8_v4_page3", ops.concat_and_cache_mla,
         _write(device, 11, num_blocks=5, page_size=3, kv_cache_dtype="fp8_ds_mla_v4")),
        ("quantize_v4", ops.quantize_kv_fp8_v4, (kv_v4,)),
        ("quantize_v4_page1", ops.quantize_kv_fp8_v4, (kv_v4.reshape(15, 1, 1, 512),)),
        ("dequantize_v4_uint8", ops.dequantize_kv_fp8_v4, (torch.ops.flashmla.quantize_kv_fp8_v4(kv_v4),)),
        ("mha_prefill_gqa_causal", ops.mha_prefill,
         _mha(T.MHAPrefillCase(b=4, h_q=4, h_k=2, seqlen_q=9, kv_prefix=6, zero_lengths=True), device, 14)),
        ("mha_prefill_d128_fp16", ops.mha_prefill,
         _mha(T.MHAPrefillCase(b=2, h_q=3, h_k=3, d_qk=128, seqlen_q=7, causal=False, dtype=torch.float16),
              device, 15)),
        ("mha_prefill_mqa_short_k", ops.mha_prefill,
         _mha(T.MHAPrefillCase(h_q=2, h_k=1, q_lens=(6, 0, 3), k_lens=(2, 4, 0)), device, 16)),
    ]
