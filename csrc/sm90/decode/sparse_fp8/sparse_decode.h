// Token-sparse MLA decode over the FP8 KV cache on SM90: parameters and launcher (kernel in
// sparse_decode_kernel.cu).
#pragma once
#include <cstdint>
#include <cuda.h>
#include <cuda_runtime.h>

namespace flashmla {
namespace sm90 {

constexpr int kFp8RecordBytes = 656;  // 512 e4m3 latent values | 4 fp32 scales | 64 bf16 RoPE values
constexpr int kFp8ScaleOffset = 512;
constexpr int kFp8RopeOffset = 528;
// DeepSeek V4 ("MODEL1") pages (torch_flashmla/kv_cache.py, V4 section): token t of a page of P tokens
// keeps 448 e4m3 latent values + 64 bf16 RoPE values at byte 576 t, and 7 UE8M0 scales + 1 pad byte
// at byte 576 P + 8 t.
constexpr int kV4TokenBytes = 584;      // the cache tensor's last dimension
constexpr int kV4DataBytes = 576;       // latent + RoPE bytes of a token
constexpr int kV4ScaleBytes = 8;        // scale bytes of a token
constexpr int kV4RopeOffset = 448;

// One FP8 cache and the token indices of every (request, query token) into it.
struct SparseKVSource {
  const uint8_t* records;      // record of slot i: records + (i / page_size) * block_stride + (i % page_size) * token_stride
  int64_t block_stride;        // bytes (16-byte multiple)
  int64_t token_stride;        // bytes: 656 (V3.2), 576 (V4: the latent + RoPE part)
  int64_t scale_offset;        // V4 only: scales of slot i at page + scale_offset + (i % page_size) * 8
  int page_size;
  uint32_t page_div_mul;       // i / page_size = (i * page_div_mul) >> page_div_shift for 0 <= i < 2^31
  int page_div_shift;
  int64_t num_slots;           // num_blocks * page_size; indices outside [0, num_slots) are skipped
  const int* indices;          // [b, s_q, topk] int32, last dim contiguous; -1 = skip
  int64_t indices_batch_stride, indices_seq_stride;  // elements
  int topk;                    // 0: no such cache
  const int* topk_length;      // [b] or nullptr: only the first topk_length[i] indices count
};

struct SparseDecodeParams {
  bool v4;                     // false: V3.2 records, d_qk 576; true: V4 pages, d_qk 512 (both caches)
  // q [b, s_q, h_q, d_qk] bf16 is read through the tensor map passed to the launcher
  SparseKVSource main, extra;  // extra.topk == 0 when there is no extra cache
  const float* attn_sink;      // [h_q] or nullptr
  // out [b, s_q, h_q, 512] bf16 contiguous; lse [b, h_q, s_q] fp32 contiguous
  void* out;
  float* lse;
  // split partials: oacc [acc_rows, s_q * h_q, 512] fp32, lseacc [acc_rows, s_q * h_q] (row m = t * h_q + head)
  float* oacc;
  float* lseacc;
  int acc_rows;
  const int* metadata;     // [num_sm_parts, 8], planned from the attended token counts per request
  const int* num_splits;   // [b + 1]
  int b, s_q, h_q, num_sm_parts, num_m_tiles;
  float scale_log2;        // softmax_scale * log2(e)
};

// Heads per Q tile load of the kernel that serves h_q: kNarrowHeadsSmall or kNarrowHeads for few heads
// (h_q <= 8 / h_q <= 16: the transposed kernel, whose head tile is the products' N), else 64.
constexpr int kNarrowHeads = 16;
constexpr int kNarrowHeadsSmall = 8;  // h_q <= 8: the same kernel with 8-column products
inline int sparse_decode_q_box_heads(int h_q) {
  return h_q <= kNarrowHeadsSmall ? kNarrowHeadsSmall : h_q <= kNarrowHeads ? kNarrowHeads : 64;
}

// Grid (num_sm_parts, s_q, ceil(h_q / 64)), 384 threads, on `stream`.
// h_q > 64: clusters of the two 64-head tiles of a query token share the gathered chunks.
// h_q <= 16: one math warpgroup with the products transposed (N = 8 heads for h_q <= 8, else 16), two
// producer warpgroups.
// tmap_q: 4-D map over q {d_qk, h_q, s_q, b}, box {64, sparse_decode_q_box_heads(h_q), 1, 1}, 128B swizzle
// (api/tensor_map.h, make_q_heads_map).
void launch_sparse_decode(const SparseDecodeParams& p, const CUtensorMap& tmap_q, cudaStream_t stream);

}  // namespace sm90
}  // namespace flashmla
