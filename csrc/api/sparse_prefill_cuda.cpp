// CUDA entry point of token-sparse MLA prefill: torch.ops.flashmla_cuda.sparse_mla_prefill. The
// Python layer validates inputs first (torch_flashmla/checks.py); the checks here are the cheap ones
// the kernel relies on. One launch on the current stream, outputs from the caching allocator, no host
// synchronization: capturable in CUDA graphs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "api/decode_api.h"
#include "sm90/prefill/sparse/sparse_prefill.h"
#include "schemas.h"

namespace {

namespace fs = flashmla::sm90;

constexpr int64_t kDV = 512, kBlockM = 64, kMaxHeads = 128;

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_mla_prefill_cuda(
    const at::Tensor& q_in, const at::Tensor& kv_in, const at::Tensor& indices_in, double softmax_scale,
    int64_t head_dim_v, const c10::optional<at::Tensor>& attn_sink, const c10::optional<at::Tensor>& topk_length) {
  TORCH_CHECK(q_in.is_cuda() && q_in.scalar_type() == at::kBFloat16 && q_in.dim() == 3,
              "sparse_mla_prefill: q must be a bf16 CUDA tensor [s_q, h_q, d_qk]");
  const int64_t s_q = q_in.size(0), h_q = q_in.size(1), d_qk = q_in.size(2);
  TORCH_CHECK(d_qk == 576 || d_qk == 512, "sparse_mla_prefill: d_qk must be 576 or 512");
  TORCH_CHECK(h_q >= 1 && h_q <= kMaxHeads, "sparse_mla_prefill: h_q must be in 1..128");
  TORCH_CHECK(head_dim_v == kDV, "sparse_mla_prefill: head_dim_v must be 512");
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0, "sparse_mla_prefill: softmax_scale must be positive");
  TORCH_CHECK(kv_in.is_cuda() && kv_in.scalar_type() == at::kBFloat16 && kv_in.dim() == 3 && kv_in.size(1) == 1 &&
                  kv_in.size(2) == d_qk && kv_in.device() == q_in.device(),
              "sparse_mla_prefill: kv must be a bf16 tensor [s_kv, 1, d_qk] on q's device");
  TORCH_CHECK(indices_in.is_cuda() && indices_in.scalar_type() == at::kInt && indices_in.dim() == 3 &&
                  indices_in.size(0) == s_q && indices_in.size(1) == 1 && indices_in.device() == q_in.device(),
              "sparse_mla_prefill: indices must be int32 [s_q, 1, topk] on q's device");
  const int64_t s_kv = kv_in.size(0), topk = indices_in.size(2);
  TORCH_CHECK(s_kv < std::numeric_limits<int32_t>::max() && topk < std::numeric_limits<int32_t>::max() &&
                  s_q * ((h_q + kBlockM - 1) / kBlockM) < std::numeric_limits<int32_t>::max(),
              "sparse_mla_prefill: problem too large");

  c10::cuda::CUDAGuard guard(q_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor out = at::empty({s_q, h_q, kDV}, q_in.options());
  at::Tensor max_logits = at::empty({s_q, h_q}, q_in.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({s_q, h_q}, q_in.options().dtype(at::kFloat));
  if (s_q == 0) return {out, max_logits, lse};
  if (s_kv == 0 || topk == 0) {  // nothing to attend to anywhere
    out.zero_();
    max_logits.fill_(-std::numeric_limits<float>::infinity());
    lse.fill_(std::numeric_limits<float>::infinity());
    return {out, max_logits, lse};
  }

  // 16-byte cp.async of q and kv rows (a copy where strides or the base do not allow it).
  const at::Tensor q = flashmla::api::rows_heads_for_16b_loads(q_in);
  const at::Tensor kv = flashmla::api::rows_heads_for_16b_loads(kv_in);
  at::Tensor indices = indices_in.stride(2) == 1 ? indices_in : indices_in.contiguous();
  at::Tensor lengths, sink;
  if (topk_length.has_value()) {
    TORCH_CHECK(topk_length->is_cuda() && topk_length->scalar_type() == at::kInt && topk_length->numel() == s_q &&
                    topk_length->device() == q_in.device(),
                "sparse_mla_prefill: topk_length must be int32 [s_q] on q's device");
    lengths = topk_length->contiguous();
  }
  if (attn_sink.has_value()) {
    TORCH_CHECK(attn_sink->is_cuda() && attn_sink->scalar_type() == at::kFloat && attn_sink->numel() == h_q &&
                    attn_sink->device() == q_in.device(),
                "sparse_mla_prefill: attn_sink must be fp32 [h_q] on q's device");
    sink = attn_sink->contiguous();
  }

  fs::SparsePrefillParams p{};
  p.q = q.data_ptr();
  p.q_seq_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.kv = kv.data_ptr();
  p.kv_row_stride = kv.stride(0);
  p.indices = indices.data_ptr<int>();
  p.indices_seq_stride = indices.stride(0);
  p.topk_length = topk_length.has_value() ? lengths.data_ptr<int>() : nullptr;
  p.attn_sink = attn_sink.has_value() ? sink.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.max_logits = max_logits.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.s_q = static_cast<int>(s_q);
  p.s_kv = static_cast<int>(s_kv);
  p.h_q = static_cast<int>(h_q);
  p.topk = static_cast<int>(topk);
  p.d_qk = static_cast<int>(q.size(2));
  p.num_m_tiles = static_cast<int>((h_q + kBlockM - 1) / kBlockM);
  p.scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);
  fs::launch_sparse_prefill(p, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, max_logits, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flashmla_cuda, m) {
  m.def(flashmla::schema::kSparseMlaPrefill);
}

TORCH_LIBRARY_IMPL(flashmla_cuda, CUDA, m) { m.impl("sparse_mla_prefill", &sparse_mla_prefill_cuda); }
