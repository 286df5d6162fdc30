// Token-sparse MLA prefill on SM90: parameters and launcher (kernel in sparse_prefill_kernel.cu).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace flashmla {
namespace sm90 {

struct SparsePrefillParams {
  const void* q;                 // [s_q, h_q, d_qk] bf16, last dim contiguous, 16-byte aligned rows
  int64_t q_seq_stride, q_head_stride;  // elements
  const void* kv;                // [s_kv, 1, d_qk] bf16, last dim contiguous, 16-byte aligned rows
  int64_t kv_row_stride;         // elements
  const int* indices;            // [s_q, 1, topk] int32, last dim contiguous; -1 or >= s_kv = skip
  int64_t indices_seq_stride;    // elements
  const int* topk_length;        // [s_q] or nullptr: only the first topk_length[t] indices count
  const float* attn_sink;        // [h_q] or nullptr
  void* out;                     // [s_q, h_q, 512] bf16 contiguous
  float* max_logits;             // [s_q, h_q] fp32 contiguous
  float* lse;                    // [s_q, h_q] fp32 contiguous
  int s_q, s_kv, h_q, topk, d_qk, num_m_tiles;
  float scale;                   // softmax_scale
  float scale_log2;              // softmax_scale * log2(e)
};

// Grid s_q * ceil(h_q / 64) CTAs (the head tiles of one query token adjacent), 384 threads, on
// `stream`. Needs s_q >= 1, s_kv >= 1, topk >= 1, 1 <= h_q <= 128, d_qk 576 or 512.
void launch_sparse_prefill(const SparsePrefillParams& p, cudaStream_t stream);

}  // namespace sm90
}  // namespace flashmla
