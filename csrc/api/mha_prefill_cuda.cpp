// CUDA entry point of dense MHA-mode prefill: torch.ops.flashmla_cuda.mha_prefill. The Python layer
// validates inputs first (torch_flashmla/checks.py); the checks here are the cheap ones the kernel
// relies on. Two launches on the current stream (the fill of rows no sequence owns, which also resets the
// persistent kernel's tile counter, then attention),
// outputs from the caching allocator, no host synchronization: capturable in CUDA graphs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "api/decode_api.h"
#include "api/tensor_map.h"
#include "sm90/prefill/mha/mha_prefill.h"
#include "schemas.h"

namespace {

namespace mp = flashmla::sm90::mha_prefill;
using flashmla::api::rows_heads_for_16b_loads;
constexpr const char* kOp = "mha_prefill";

std::tuple<at::Tensor, at::Tensor> mha_prefill_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                    const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
                                                    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                    int64_t max_seqlen_k, double softmax_scale, bool causal) {
  TORCH_CHECK(q_in.is_cuda() && q_in.dim() == 3 &&
                  (q_in.scalar_type() == at::kBFloat16 || q_in.scalar_type() == at::kHalf),
              "mha_prefill: q must be a bf16/fp16 CUDA tensor [total_q, h_q, d_qk]");
  const int64_t total_q = q_in.size(0), h_q = q_in.size(1), d_qk = q_in.size(2);
  TORCH_CHECK(d_qk == 192 || d_qk == 128, "mha_prefill: d_qk must be 192 or 128");
  TORCH_CHECK(k_in.is_cuda() && v_in.is_cuda() && k_in.dim() == 3 && v_in.dim() == 3 &&
                  k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type() &&
                  k_in.size(2) == d_qk && v_in.size(2) == mp::kDV && v_in.size(0) == k_in.size(0) &&
                  v_in.size(1) == k_in.size(1) && k_in.device() == q_in.device() && v_in.device() == q_in.device(),
              "mha_prefill: k must be [total_k, h_k, d_qk] and v [total_k, h_k, 128], q's dtype and device");
  const int64_t total_k = k_in.size(0), h_k = k_in.size(1);
  TORCH_CHECK(h_q >= 1 && h_k >= 1 && h_q % h_k == 0, "mha_prefill: h_q must be a multiple of h_k");
  TORCH_CHECK(cu_seqlens_q.is_cuda() && cu_seqlens_k.is_cuda() && cu_seqlens_q.scalar_type() == at::kInt &&
                  cu_seqlens_k.scalar_type() == at::kInt && cu_seqlens_q.dim() == 1 && cu_seqlens_q.is_contiguous() &&
                  cu_seqlens_k.is_contiguous() && cu_seqlens_k.numel() == cu_seqlens_q.numel() &&
                  cu_seqlens_q.numel() >= 1 && cu_seqlens_q.device() == q_in.device() &&
                  cu_seqlens_k.device() == q_in.device(),
              "mha_prefill: cu_seqlens_q and cu_seqlens_k must be contiguous int32 [b + 1] on q's device");
  const int64_t b = cu_seqlens_q.numel() - 1;
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, "mha_prefill: max_seqlen_q and max_seqlen_k must be >= 0");
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(total_q < kInt32Max && total_k < kInt32Max && max_seqlen_q < kInt32Max - mp::kBlockM &&
                  max_seqlen_k < kInt32Max - mp::kBlockN,
              "mha_prefill: problem too large");
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0, "mha_prefill: softmax_scale must be positive");

  c10::cuda::CUDAGuard guard(q_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty({total_q, h_q, mp::kDV}, q_in.options());
  at::Tensor lse = at::empty({total_q, h_q}, q_in.options().dtype(at::kFloat));
  if (total_q == 0) return {out, lse};
  if (b == 0 || max_seqlen_q == 0) {  // no row belongs to a sequence
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  // With no key rows at all nothing is attended: the kernel needs a map over a non-empty tensor.
  at::Tensor k = rows_heads_for_16b_loads(total_k > 0 ? k_in : at::zeros({1, h_k, d_qk}, k_in.options()));
  at::Tensor v = rows_heads_for_16b_loads(total_k > 0 ? v_in : at::zeros({1, h_k, mp::kDV}, v_in.options()));
  at::Tensor q = rows_heads_for_16b_loads(q_in);

  const CUtensorMap tq = flashmla::api::make_rows_heads_map(kOp, "q", q, mp::kBlockM);
  const CUtensorMap tk = flashmla::api::make_rows_heads_map(kOp, "k", k, mp::kBlockN);
  const CUtensorMap tv = flashmla::api::make_rows_heads_map(kOp, "v", v, mp::kBlockN);

  mp::MhaPrefillParams p{};
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int>();
  p.b = static_cast<int>(b);
  p.h_q = static_cast<int>(h_q);
  p.h_k = static_cast<int>(h_k);
  p.group = static_cast<int>(h_q / h_k);
  p.total_q = static_cast<int>(total_q);
  p.total_k = static_cast<int>(total_k);  // 0: every key row lies outside k
  p.max_seqlen_q = static_cast<int>(max_seqlen_q);
  p.max_seqlen_k = static_cast<int>(max_seqlen_k);
  const int64_t num_m_blocks = (max_seqlen_q + mp::kBlockM - 1) / mp::kBlockM;
  const int64_t num_tiles = num_m_blocks * h_q * b;
  TORCH_CHECK(num_tiles < kInt32Max - 65536, "mha_prefill: problem too large (ceil(max_seqlen_q / 128) * h_q * b = ",
              num_tiles, " tiles)");
  p.num_m_blocks = static_cast<int>(num_m_blocks);
  p.num_tiles = static_cast<int>(num_tiles);
  int device_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&device_sms, cudaDevAttrMultiProcessorCount, q.get_device()));
  p.num_sms = device_sms;
  at::Tensor tile_counter = at::empty({1}, cu_seqlens_q.options());  // reset on the device by the fill kernel
  p.tile_counter = tile_counter.data_ptr<int>();
  p.scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);
  p.causal = causal ? 1 : 0;
  if (q.scalar_type() == at::kBFloat16) {
    mp::launch_mha_prefill_bf16(p, static_cast<int>(d_qk), tq, tk, tv, stream);
  } else {
    mp::launch_mha_prefill_fp16(p, static_cast<int>(d_qk), tq, tk, tv, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flashmla_cuda, m) {
  m.def(flashmla::schema::kMhaPrefill);
}

TORCH_LIBRARY_IMPL(flashmla_cuda, CUDA, m) { m.impl("mha_prefill", &mha_prefill_cuda); }
