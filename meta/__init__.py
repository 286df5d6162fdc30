"""Fake (meta) implementations of the flashmla ops, imported as ``torch_flashmla.meta``.

One fake per op. Output shapes come from input shapes and int arguments only (no device queries,
no tensor values), so they trace under FakeTensorMode, ``torch.compile(dynamic=True)`` and on
fake CUDA tensors without a GPU. Each fake runs the same input checks as the real kernels.
"""
import torch

from torch_flashmla import checks, kv_cache


@torch.library.register_fake("flashmla::get_mla_metadata")
def _get_mla_metadata_fake(seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q, is_fp8_kvcache, topk,
                           num_sm_parts):
    checks.check_get_mla_metadata(seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q, is_fp8_kvcache,
                                  topk, num_sm_parts)
    return (seqlens.new_empty((num_sm_parts, checks.METADATA_WIDTH), dtype=torch.int32),
            seqlens.new_empty((seqlens.shape[0] + 1,), dtype=torch.int32))


@torch.library.register_fake("flashmla::mla_decode")
def _mla_decode_fake(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                     tile_scheduler_metadata, num_splits, descale_q=None, descale_k=None):
    checks.check_mla_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                            tile_scheduler_metadata, num_splits, descale_q, descale_k)
    b, s_q, h_q, _ = q.shape
    out_dtype = torch.bfloat16 if kv_cache.dtype in checks.FP8_CACHE_DTYPES else q.dtype  # FP8 cache: bf16 out
    return q.new_empty((b, s_q, h_q, head_dim_v), dtype=out_dtype), q.new_empty((b, h_q, s_q), dtype=torch.float32)


@torch.library.register_fake("flashmla::sparse_mla_decode")
def _sparse_mla_decode_fake(q, kv_cache, indices, topk_length, attn_sink, extra_kv_cache, extra_indices,
                            extra_topk_length, head_dim_v, softmax_scale, tile_scheduler_metadata, num_splits):
    checks.check_sparse_mla_decode(q, kv_cache, indices, topk_length, attn_sink, extra_kv_cache, extra_indices,
                                   extra_topk_length, head_dim_v, softmax_scale, tile_scheduler_metadata,
                                   num_splits)
    b, s_q, h_q, _ = q.shape
    return q.new_empty((b, s_q, h_q, head_dim_v)), q.new_empty((b, h_q, s_q), dtype=torch.float32)


@torch.library.register_fake("flashmla::sparse_mla_prefill")
def _sparse_mla_prefill_fake(q, kv, indices, softmax_scale, head_dim_v, attn_sink, topk_length):
    checks.check_sparse_mla_prefill(q, kv, indices, softmax_scale, head_dim_v, attn_sink, topk_length)
    s_q, h_q, _ = q.shape
    return (q.new_empty((s_q, h_q, head_dim_v)),
            q.new_empty((s_q, h_q), dtype=torch.float32),
            q.new_empty((s_q, h_q), dtype=torch.float32))


@torch.library.register_fake("flashmla::concat_and_cache_mla")
def _concat_and_cache_mla_fake(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale=None):
    checks.check_concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale)
    return None


@torch.library.register_fake("flashmla::quantize_kv_fp8")
def _quantize_kv_fp8_fake(kv):
    checks.check_quantize_kv_fp8(kv)
    return kv.new_empty((*kv.shape[:-1], checks.FP8_RECORD_BYTES), dtype=torch.uint8)


@torch.library.register_fake("flashmla::dequantize_kv_fp8")
def _dequantize_kv_fp8_fake(kv_fp8):
    checks.check_dequantize_kv_fp8(kv_fp8)
    return kv_fp8.new_empty((*kv_fp8.shape[:-1], checks.D_QK), dtype=torch.bfloat16)


@torch.library.register_fake("flashmla::quantize_kv_fp8_v4")
def _quantize_kv_fp8_v4_fake(kv):
    checks.check_quantize_kv_fp8_v4(kv)
    num_blocks, page_size = kv.shape[0], kv.shape[1]
    return kv.new_empty_strided((num_blocks, page_size, 1, kv_cache.V4_TOKEN_BYTES),
                                kv_cache.fp8_v4_cache_strides(page_size), dtype=torch.uint8)


@torch.library.register_fake("flashmla::dequantize_kv_fp8_v4")
def _dequantize_kv_fp8_v4_fake(kv_fp8):
    checks.check_dequantize_kv_fp8_v4(kv_fp8)
    return kv_fp8.new_empty((kv_fp8.shape[0], kv_fp8.shape[1], 1, kv_cache.V4_D_QK), dtype=torch.bfloat16)


@torch.library.register_fake("flashmla::mha_prefill")
def _mha_prefill_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    checks.check_mha_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal)
    total_q, h_q, _ = q.shape
    return q.new_empty((total_q, h_q, v.shape[2])), q.new_empty((total_q, h_q), dtype=torch.float32)
