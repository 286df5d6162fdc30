// Host-side pieces shared by the decode entry points (dense_decode_cuda.cpp, sparse_decode_cuda.cpp).
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include "common/decode_common.h"

namespace flashmla {
namespace api {

// The plan of a decode call: tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [b + 1].
inline void check_plan(const char* op, const at::Tensor& metadata, const at::Tensor& num_splits, int64_t b,
                       const at::Device& device) {
  TORCH_CHECK(metadata.device() == device && metadata.scalar_type() == at::kInt && metadata.dim() == 2 &&
                  metadata.size(0) >= 1 && metadata.size(1) == common::kMetadataWidth,
              op, ": tile_scheduler_metadata must be int32 [num_sm_parts >= 1, 8] on q's device");
  TORCH_CHECK(num_splits.device() == device && num_splits.scalar_type() == at::kInt && num_splits.numel() == b + 1, op,
              ": num_splits must be int32 [b + 1] on q's device");
}

// A copy of t that is contiguous and 16-byte aligned (the caching allocator's blocks are);
// .contiguous() alone returns a contiguous but misaligned view unchanged.
inline at::Tensor aligned_copy(const at::Tensor& t) { return t.clone(at::MemoryFormat::Contiguous); }

// t [rows, heads, dim] as 16-byte loads (cp.async or TMA) read it: contiguous last dim, row and head
// strides multiples of 16 bytes (where that dim has more than one entry) and a 16-byte aligned base;
// a copy otherwise. Strides are in elements of 2 bytes (bf16/fp16).
inline at::Tensor rows_heads_for_16b_loads(const at::Tensor& t) {
  const bool ok = t.stride(2) == 1 && (t.size(1) == 1 || t.stride(1) % 8 == 0) &&
                  (t.size(0) == 1 || t.stride(0) % 8 == 0) && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : aligned_copy(t);
}

// t / page_size as a multiply for 0 <= t < 2^31 (no integer division in the kernels): t / page_size =
// (t * mul) >> shift. l = ceil(log2 page_size), shift = 31 + l, mul = ceil(2^shift / page_size) (< 2^32);
// mul * page_size - 2^shift < page_size <= 2^l, so the quotient is exact for every such t.
struct PageDivider {
  uint32_t mul;
  int shift;
};
inline PageDivider page_divider(int64_t page_size) {
  TORCH_CHECK(page_size >= 1 && page_size < (int64_t(1) << 31), "page_divider: page_size must be in [1, 2^31), got ",
              page_size);
  int l = 0;
  while ((int64_t(1) << l) < page_size) ++l;
  const int shift = 31 + l;
  const uint64_t num = uint64_t(1) << shift;  // page_size < 2^31: shift <= 62
  return {static_cast<uint32_t>((num + static_cast<uint64_t>(page_size) - 1) / static_cast<uint64_t>(page_size)), shift};
}

// The combine kernel puts 4 query rows per CTA on grid.z.
inline void check_combine_rows(const char* op, int64_t m_total) {
  TORCH_CHECK((m_total + 3) / 4 <= 65535, op, ": s_q * h_q / h_kv must be at most 262140 (got ", m_total, ")");
}

// q [b, s_q, h_q, d] as the kernels load it (16-byte cp.async, or TMA in sparse decode): contiguous last
// dim, every row 16-byte aligned, no broadcast (stride 0) dim (a copy otherwise).
inline at::Tensor q_for_kernel(const at::Tensor& q) {
  bool broadcast = false;
  for (int d = 0; d < 3; ++d) broadcast = broadcast || (q.stride(d) == 0 && q.size(d) > 1);
  if (broadcast || q.stride(3) != 1 || q.stride(0) % 8 != 0 || q.stride(1) % 8 != 0 || q.stride(2) % 8 != 0 ||
      reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 != 0) {
    return aligned_copy(q);
  }
  return q;
}

// Merges the split partials oacc [acc_rows, h_kv, m_total, 512] (fp32, or bf16 with a bf16 out) / lseacc
// [acc_rows, h_kv, m_total] fp32
// into out [b, s_q, h_q, 512] and lse [b, h_q, s_q] (requests with one piece were written by the
// attention kernel). attn_sink [h_q] or nullptr.
inline void combine_splits(const at::Tensor& oacc, const at::Tensor& lseacc, const at::Tensor& num_splits,
                           at::Tensor& out, at::Tensor& lse, const float* attn_sink, int64_t h_kv,
                           cudaStream_t stream) {
  common::CombineParams cp{};
  TORCH_INTERNAL_ASSERT(oacc.scalar_type() == at::kFloat ||
                            (oacc.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16),
                        "combine_splits: oacc must be float32, or bfloat16 with a bfloat16 out");
  cp.oacc = oacc.data_ptr();
  cp.oacc_bf16 = oacc.scalar_type() == at::kBFloat16;
  cp.lseacc = lseacc.data_ptr<float>();
  cp.num_splits = num_splits.data_ptr<int>();
  cp.out = out.data_ptr();
  cp.lse = lse.data_ptr<float>();
  cp.attn_sink = attn_sink;
  cp.b = static_cast<int>(out.size(0));
  cp.s_q = static_cast<int>(out.size(1));
  cp.h_q = static_cast<int>(out.size(2));
  cp.h_kv = static_cast<int>(h_kv);
  cp.group = static_cast<int>(out.size(2) / h_kv);
  cp.m_total = static_cast<int>(out.size(1) * cp.group);
  cp.acc_rows = static_cast<int>(oacc.size(0));
  common::launch_combine(cp, out.scalar_type() == at::kBFloat16, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace api
}  // namespace flashmla
