// Dense MHA-mode prefill on SM90 (torch.ops.flashmla_cuda.mha_prefill): parameters and launchers.
// Kernel in mha_prefill_kernel.cuh, instantiated per dtype in mha_prefill_{bf16,fp16}.cu.
#pragma once
#include <cstdint>
#include <cuda.h>
#include <cuda_runtime.h>

namespace flashmla {
namespace sm90 {
namespace mha_prefill {

constexpr int kDV = 128;       // value head dim (both supported pairs: (192, 128), (128, 128))
constexpr int kBlockM = 128;   // query rows of one head per CTA (64 per math warpgroup)
constexpr int kBlockN = 128;   // keys per pipeline stage

struct MhaPrefillParams {
  // out [total_q, h_q, 128] contiguous (q's dtype); lse [total_q, h_q] fp32 contiguous
  void* out;
  float* lse;
  const int* cu_seqlens_q;  // [b + 1]
  const int* cu_seqlens_k;  // [b + 1]
  int b, h_q, h_k, group;   // group = h_q / h_k
  int total_q, total_k;
  int max_seqlen_q, max_seqlen_k;
  int num_m_blocks;         // ceil(max_seqlen_q / kBlockM)
  int num_tiles;            // num_m_blocks * h_q * b
  int num_sms;              // CTAs of the persistent launch (at most)
  int* tile_counter;        // [1] int32 scratch: tiles handed out past the first wave (reset by the fill kernel)
  float scale_log2;         // softmax_scale * log2(e)
  int causal;
};

// Tensor maps (3-D, 128B swizzle, box {64, 1, 128}):
//   q {d_qk, h_q, total_q}, k {d_qk, h_k, total_k}, v {128, h_k, total_k}.
// Launches the rows-owned-by-no-sequence fill, then the attention kernel, on `stream`.
void launch_mha_prefill_bf16(const MhaPrefillParams& p, int d_qk, const CUtensorMap& q, const CUtensorMap& k,
                             const CUtensorMap& v, cudaStream_t stream);
void launch_mha_prefill_fp16(const MhaPrefillParams& p, int d_qk, const CUtensorMap& q, const CUtensorMap& k,
                             const CUtensorMap& v, cudaStream_t stream);

}  // namespace mha_prefill
}  // namespace sm90
}  // namespace flashmla
