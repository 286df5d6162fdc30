// Dense MLA decode on SM90: parameters and launchers (16-bit kernels in dense_decode_kernel.cuh (64 rows) and
// dense_decode_narrow.cuh (up to 32 rows), instantiated per dtype in dense_decode_{bf16,fp16}.cu; FP8 kernels
// in dense_decode_fp8.cu (64 rows) and dense_decode_fp8_narrow.cu (up to 32 rows), shared parts in
// dense_decode_fp8.cuh; helpers of all of them in dense_decode_common.cuh).
#pragma once
#include <cstdint>
#include <cuda.h>
#include <cuda_runtime.h>

namespace flashmla {
namespace sm90 {

constexpr int kDQK = 576;
constexpr int kDV = 512;
constexpr int kBlockM = 64;   // query rows per CTA (rows = s_q * h_q / h_kv of one kv head)
constexpr int kBlockN = 64;   // tokens per pipeline stage (a 64-token slice of one page, or of several small ones)
constexpr int kNarrowRows = 32;  // query rows per kv head up to which the transposed (32-row) kernels run

// Split partials in bf16 instead of fp32: those of the FP8 32-row kernel (an FP8 cache, m_total <= kNarrowRows)
// and of the FP8 large-page kernel (pages of whole 64-token chunks). Their rounding (2^-8 relative) is small beside
// P's e4m3 rounding (2^-4); half the scratch traffic (docs/design.md §4.2).
inline bool split_partials_bf16(bool fp8, int64_t m_total, int64_t page_size) {
  return fp8 && (m_total <= kNarrowRows || page_size % kBlockN == 0);
}

struct DenseDecodeParams {
  // q [b, s_q, h_q, 576]; element strides (last dim contiguous)
  const void* q;
  int64_t q_batch_stride, q_seq_stride, q_head_stride;
  // out [b, s_q, h_q, 512] contiguous; lse [b, h_q, s_q] fp32 contiguous
  void* out;
  float* lse;
  // split partials: oacc [rows, h_kv, m_total, 512] (fp32; bf16 where split_partials_bf16), lseacc [rows, h_kv,
  // m_total] fp32
  void* oacc;
  float* lseacc;
  int acc_rows;
  const int* block_table;
  int64_t block_table_stride;
  const int* seqlens;
  const int* metadata;     // [num_sm_parts, 8]
  const int* num_splits;   // [b + 1]
  int b, s_q, h_q, h_kv, group, m_total, page_size, num_sm_parts, num_m_tiles;
  int num_blocks;          // pages of the cache: ids outside [0, num_blocks) are skipped
  int page_rows_log2;      // log2 gcd(page_size, 64): rows of one TMA load (6: one load per tile)
  // t / page_size = (t * page_div_mul) >> page_div_shift for 0 <= t < 2^31 (no integer division in the kernel)
  uint32_t page_div_mul;
  int page_div_shift;
  int max_tokens;          // block-table capacity (max_blocks * page_size): lengths are clamped to it
  float scale_log2;        // softmax_scale * log2(e)
  int causal;
  // FP8 cache (launch_dense_decode_fp8): per-tensor fp32 descales, read on the device. descale_q is
  // nullptr for a bf16 q; q_fp8 = 1 when q holds e4m3 values.
  const float* descale_q;
  const float* descale_k;
  int q_fp8;
};

// Launches the attention kernel on `stream`. Grid m tiles x h_kv x num_sm_parts: the m-tile CTAs of a
// partition read the same pages, so they launch together.
// tmap: 4-D tensor map over the cache {576, h_kv, page_size, num_blocks}, box {64, 1, g, 1}, 128B swizzle,
// g = gcd(page_size, 64) = 1 << p.page_rows_log2.
// (the 32-row kernel when m_total <= 32, else the 64-row one)
void launch_dense_decode_bf16(const DenseDecodeParams& p, const CUtensorMap& tmap, cudaStream_t stream);
void launch_dense_decode_fp16(const DenseDecodeParams& p, const CUtensorMap& tmap, cudaStream_t stream);
// Per-tensor e4m3 cache, q bf16 or e4m3, bf16 out (the 32-row kernel when m_total <= 32, else the 64-row one).
// tmap: the same 4-D map over the cache bytes (uint8), box {128, 1, g, 1}, 128B swizzle.
void launch_dense_decode_fp8(const DenseDecodeParams& p, const CUtensorMap& tmap, cudaStream_t stream);

}  // namespace sm90
}  // namespace flashmla
