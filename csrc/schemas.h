// The schema of every flashmla op, written once. csrc/ops.cpp defines the public ops (torch.ops.flashmla.*)
// with these strings; each SM90 entry point under csrc/api/ defines its internal op (torch.ops.flashmla_cuda.*)
// with the same one, so that the CUDA registrations (torch_flashmla/_registration.py) pass their arguments on
// unchanged. Semantics: torch_flashmla/reference.py; shapes and dtypes: the Python wrappers.
#pragma once

namespace flashmla {
namespace schema {

constexpr const char* kGetMlaMetadata =
    "get_mla_metadata(Tensor seqlens, int num_q_tokens_per_head_k, int num_heads_k, int? num_heads_q, "
    "bool is_fp8_kvcache, int? topk, int num_sm_parts) -> (Tensor tile_scheduler_metadata, Tensor num_splits)";

// descale_q / descale_k: per-tensor fp32 descales ([] or [1], read on the device) of a float8_e4m3fn q and
// of the per-tensor e4m3 cache (kv_cache_dtype "fp8"); given exactly when q / kv_cache are FP8.
constexpr const char* kMlaDecode =
    "mla_decode(Tensor q, Tensor kv_cache, Tensor block_table, Tensor cache_seqlens, int head_dim_v, "
    "float softmax_scale, bool causal, Tensor tile_scheduler_metadata, Tensor num_splits, Tensor? descale_q=None, "
    "Tensor? descale_k=None) -> (Tensor out, Tensor lse)";

constexpr const char* kSparseMlaDecode =
    "sparse_mla_decode(Tensor q, Tensor kv_cache, Tensor indices, Tensor? topk_length, Tensor? attn_sink, "
    "Tensor? extra_kv_cache, Tensor? extra_indices, Tensor? extra_topk_length, int head_dim_v, "
    "float softmax_scale, Tensor tile_scheduler_metadata, Tensor num_splits) -> (Tensor out, Tensor lse)";

constexpr const char* kSparseMlaPrefill =
    "sparse_mla_prefill(Tensor q, Tensor kv, Tensor indices, float softmax_scale, int head_dim_v, "
    "Tensor? attn_sink, Tensor? topk_length) -> (Tensor out, Tensor max_logits, Tensor lse)";

// scale: the per-tensor fp32 scale of kv_cache_dtype "fp8" ([] or [1], read on the device); the other
// cache types compute their own scales and ignore it (torch_flashmla/kv_cache.py).
constexpr const char* kConcatAndCacheMla =
    "concat_and_cache_mla(Tensor kv_c, Tensor k_pe, Tensor(a!) kv_cache, Tensor slot_mapping, "
    "str kv_cache_dtype, Tensor? scale=None) -> ()";
constexpr const char* kQuantizeKvFp8 = "quantize_kv_fp8(Tensor kv) -> Tensor";
constexpr const char* kDequantizeKvFp8 = "dequantize_kv_fp8(Tensor kv_fp8) -> Tensor";

// DeepSeek V4 ("MODEL1") FP8 paged cache: [num_blocks, page_size, 1, 512] bf16 <-> [num_blocks,
// page_size, 1, 584] bytes with a padded page stride (torch_flashmla/kv_cache.py).
constexpr const char* kQuantizeKvFp8V4 = "quantize_kv_fp8_v4(Tensor kv) -> Tensor";
constexpr const char* kDequantizeKvFp8V4 = "dequantize_kv_fp8_v4(Tensor kv_fp8) -> Tensor";

// Dense MHA-mode prefill over packed varlen sequences (DeepSeek prefills in MHA form: d_qk 192,
// d_v 128, then decodes in MLA form). Semantics in torch_flashmla/reference.py (mha_prefill).
constexpr const char* kMhaPrefill =
    "mha_prefill(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
    "int max_seqlen_k, float softmax_scale, bool causal) -> (Tensor out, Tensor lse)";

// Every op: csrc/ops.cpp defines each and puts the autograd guard on each.
constexpr const char* kAll[] = {kGetMlaMetadata,    kMlaDecode,         kSparseMlaDecode, kSparseMlaPrefill,
                                kConcatAndCacheMla, kQuantizeKvFp8,     kDequantizeKvFp8, kQuantizeKvFp8V4,
                                kDequantizeKvFp8V4, kMhaPrefill};

}  // namespace schema
}  // namespace flashmla
