// Planner and split-KV combine kernels shared by the decode kernels.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace flashmla {
namespace common {

constexpr int kPlannerBlockN = 64;
constexpr int kPlannerOverhead = 5;
constexpr int kMetadataWidth = 8;
// end_token of a partition whose last piece is its request's last: that piece runs to the request's length at
// decode time, so that a plan made from other lengths still covers every token (docs/design.md §4.1).
constexpr int kPlanOpenEnd = 0x7fffffff;

// seqlens [b] int32 -> metadata [num_sm_parts, 8] int32, num_splits [b + 1] int32 (one CTA).
void launch_planner(const int* seqlens, int b, int num_sm_parts, int* metadata, int* num_splits, cudaStream_t stream);

struct CombineParams {
  const void* oacc;      // [acc_rows, h_kv, m_total, 512] fp32, or bf16 with oacc_bf16
  const float* lseacc;   // [acc_rows, h_kv, m_total]
  const int* num_splits; // [b + 1]
  void* out;             // [b, s_q, h_q, 512] (bf16 or fp16)
  float* lse;            // [b, h_q, s_q]
  const float* attn_sink;  // [h_q] fp32 or nullptr: out *= exp(lse) / (exp(lse) + exp(attn_sink))
  int b, s_q, h_q, h_kv, group, m_total, acc_rows;
  bool oacc_bf16;        // bf16 partials (the FP8 dense path); only with a bf16 out
};

// Merges the partials of every request with more than one split (the others are written by the
// attention kernel and skipped here). is_bf16: out is bf16 (else fp16).
void launch_combine(const CombineParams& p, bool is_bf16, cudaStream_t stream);

}  // namespace common
}  // namespace flashmla
