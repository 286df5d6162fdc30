// CUDA entry point of token-sparse MLA decode over the FP8 cache:
// torch.ops.flashmla_cuda.sparse_mla_decode. The Python layer validates inputs first
// (torch_flashmla/checks.py); the checks here are the cheap ones the kernel relies on. The plan comes
// from flashmla_cuda::get_mla_metadata (dense_decode_cuda.cpp) and the split partials are merged by
// the same combine kernel as dense decode. No host synchronization: capturable in CUDA graphs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "api/decode_api.h"
#include "api/tensor_map.h"
#include "common/decode_common.h"
#include "sm90/decode/sparse_fp8/sparse_decode.h"
#include "schemas.h"

namespace {

namespace fs = flashmla::sm90;

constexpr int64_t kDQK = 576, kDQKV4 = 512, kDV = 512, kBlockM = 64;

bool is_fp8_cache_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kByte || t.scalar_type() == at::ScalarType::Float8_e4m3fn;
}

// A DeepSeek V4 cache [num_blocks, page_size, 1, 584] (torch_flashmla/kv_cache.py, V4 section): a byte
// window whose stride(0) is the page stride. Returns the base of page 0 and the page stride the kernel
// uses; pages whose base is not 16-byte aligned (16-byte loads of the 576-byte token parts) are
// copied into a buffer with the page stride rounded up to 16 bytes.
std::pair<at::Tensor, int64_t> v4_pages_for_kernel(const char* name, const at::Tensor& cache) {
  const int64_t num_blocks = cache.size(0), page_size = cache.size(1);
  const int64_t page_bytes = page_size * fs::kV4TokenBytes;
  TORCH_CHECK(cache.stride(3) == 1 && (page_size <= 1 || cache.stride(1) == fs::kV4TokenBytes) &&
                  (num_blocks <= 1 || (cache.stride(0) % 8 == 0 && cache.stride(0) >= page_bytes)),
              "sparse_mla_decode: ", name, " must be a V4 cache with stride(3) == 1, stride(1) == 584 and a page "
              "stride stride(0) that is a multiple of 8 and at least 584 * page_size");
  const int64_t stride = num_blocks > 1 ? cache.stride(0) : (page_bytes + 15) / 16 * 16;
  if (stride % 16 == 0 && reinterpret_cast<uintptr_t>(cache.data_ptr()) % 16 == 0) return {cache, stride};
  const int64_t aligned_stride = (page_bytes + 15) / 16 * 16;
  at::Tensor raw = cache.view(at::kByte);
  at::Tensor pages = raw.as_strided({num_blocks, page_bytes}, {stride, 1}, raw.storage_offset());
  at::Tensor copy = at::empty({num_blocks, aligned_stride}, raw.options());
  copy.narrow(1, 0, page_bytes).copy_(pages);
  return {copy, aligned_stride};
}

// One FP8 cache, V3.2 [num_blocks, page_size, 1, 656] or V4 [num_blocks, page_size, 1, 584], and its
// indices [b, s_q, topk] (+ topk_length [b]). `keep` holds the tensors that had to be copied alive until
// the launch.
fs::SparseKVSource make_source(const char* name, const at::Tensor& cache_in, const at::Tensor& indices_in,
                               const c10::optional<at::Tensor>& topk_length, int64_t b, int64_t s_q, bool v4,
                               std::vector<at::Tensor>& keep) {
  const int64_t token_bytes = v4 ? fs::kV4TokenBytes : fs::kFp8RecordBytes;
  TORCH_CHECK(cache_in.is_cuda() && is_fp8_cache_dtype(cache_in) && cache_in.dim() == 4 &&
                  cache_in.size(2) == 1 && cache_in.size(3) == token_bytes,
              "sparse_mla_decode: ", name, " must be a uint8/float8_e4m3fn CUDA tensor [num_blocks, page_size, 1, ",
              token_bytes, "] (", v4 ? "V4 pages, as q has d_qk 512" : "V3.2 records, as q has d_qk 576", ")");
  fs::SparseKVSource src{};
  at::Tensor cache = cache_in;
  if (v4) {
    int64_t page_stride = 0;
    std::tie(cache, page_stride) = v4_pages_for_kernel(name, cache_in);
    keep.push_back(cache);
    src.block_stride = page_stride;
    src.token_stride = fs::kV4DataBytes;
    src.scale_offset = cache_in.size(1) * int64_t(fs::kV4DataBytes);
  } else {
    auto aligned = [](int64_t bytes) { return bytes % 16 == 0; };
    if (cache.stride(3) != 1 || !aligned(cache.stride(0)) || !aligned(cache.stride(1)) ||
        reinterpret_cast<uintptr_t>(cache.data_ptr()) % 16 != 0) {
      cache = flashmla::api::aligned_copy(cache);  // 16-byte record loads need 16-byte aligned records
      keep.push_back(cache);
    }
    src.block_stride = cache.stride(0);
    src.token_stride = cache.stride(1);
  }
  TORCH_CHECK(indices_in.is_cuda() && indices_in.scalar_type() == at::kInt && indices_in.dim() == 3 &&
                  indices_in.size(0) == b && indices_in.size(1) == s_q,
              "sparse_mla_decode: indices of ", name, " must be int32 [b, s_q, topk]");
  at::Tensor indices = indices_in.stride(2) == 1 ? indices_in : indices_in.contiguous();
  keep.push_back(indices);
  src.records = reinterpret_cast<const uint8_t*>(cache.data_ptr());
  src.page_size = static_cast<int>(cache_in.size(1));  // not cache.size(1): a V4 copy is [num_blocks, page stride]
  if (src.page_size >= 1) {  // a cache of empty pages has no slots: its indices are all skipped
    const flashmla::api::PageDivider div = flashmla::api::page_divider(src.page_size);
    src.page_div_mul = div.mul;
    src.page_div_shift = div.shift;
  }
  src.num_slots = cache_in.size(0) * cache_in.size(1);
  src.indices = indices.data_ptr<int>();
  src.indices_batch_stride = indices.stride(0);
  src.indices_seq_stride = indices.stride(1);
  src.topk = static_cast<int>(indices.size(2));
  src.topk_length = nullptr;
  if (topk_length.has_value()) {
    TORCH_CHECK(topk_length->is_cuda() && topk_length->scalar_type() == at::kInt && topk_length->numel() == b,
                "sparse_mla_decode: the topk_length of ", name, " must be int32 [b]");
    at::Tensor lengths = topk_length->contiguous();
    keep.push_back(lengths);
    src.topk_length = lengths.data_ptr<int>();
  }
  return src;
}

std::tuple<at::Tensor, at::Tensor> sparse_mla_decode_cuda(
    const at::Tensor& q_in, const at::Tensor& kv_cache, const at::Tensor& indices,
    const c10::optional<at::Tensor>& topk_length, const c10::optional<at::Tensor>& attn_sink,
    const c10::optional<at::Tensor>& extra_kv_cache, const c10::optional<at::Tensor>& extra_indices,
    const c10::optional<at::Tensor>& extra_topk_length, int64_t head_dim_v, double softmax_scale,
    const at::Tensor& tile_scheduler_metadata_in, const at::Tensor& num_splits_in) {
  // The layout is told by the main cache's last dimension: 584 = DeepSeek V4 pages (d_qk 512), else
  // V3.2 records (d_qk 576); the extra cache must have the same layout.
  const bool v4 = kv_cache.dim() == 4 && kv_cache.size(3) == fs::kV4TokenBytes;
  const int64_t d_qk = v4 ? kDQKV4 : kDQK;
  TORCH_CHECK(q_in.is_cuda() && q_in.scalar_type() == at::kBFloat16 && q_in.dim() == 4 && q_in.size(3) == d_qk,
              "sparse_mla_decode: q must be a bf16 CUDA tensor [b, s_q, h_q, ", d_qk, "] for this kv_cache");
  TORCH_CHECK(head_dim_v == kDV, "sparse_mla_decode: head_dim_v must be 512");
  const int64_t b = q_in.size(0), s_q = q_in.size(1), h_q = q_in.size(2);
  flashmla::api::check_plan("sparse_mla_decode", tile_scheduler_metadata_in, num_splits_in, b, q_in.device());
  TORCH_CHECK(extra_kv_cache.has_value() == extra_indices.has_value(),
              "sparse_mla_decode: extra_kv_cache and extra_indices come together");

  c10::cuda::CUDAGuard guard(q_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor q = flashmla::api::q_for_kernel(q_in);
  std::vector<at::Tensor> keep;
  fs::SparseDecodeParams p{};
  p.v4 = v4;
  p.main = make_source("kv_cache", kv_cache, indices, topk_length, b, s_q, v4, keep);
  p.extra = fs::SparseKVSource{};
  if (extra_kv_cache.has_value()) {
    p.extra = make_source("extra_kv_cache", *extra_kv_cache, *extra_indices, extra_topk_length, b, s_q, v4, keep);
  }
  at::Tensor sink;
  if (attn_sink.has_value()) {
    TORCH_CHECK(attn_sink->is_cuda() && attn_sink->scalar_type() == at::kFloat && attn_sink->numel() == h_q,
                "sparse_mla_decode: attn_sink must be fp32 [h_q]");
    sink = attn_sink->contiguous();
  }
  at::Tensor metadata = tile_scheduler_metadata_in.contiguous();
  at::Tensor num_splits = num_splits_in.contiguous();
  const int64_t num_sm_parts = metadata.size(0);

  at::Tensor out = at::empty({b, s_q, h_q, kDV}, q.options());
  at::Tensor lse = at::empty({b, h_q, s_q}, q.options().dtype(at::kFloat));
  if (b == 0 || s_q == 0 || h_q == 0) return {out, lse};
  auto attendable = [](const fs::SparseKVSource& src) { return src.num_slots > 0 && src.topk > 0; };
  if (!attendable(p.main) && !(extra_kv_cache.has_value() && attendable(p.extra))) {
    out.zero_();  // no index can select a token (topk 0 or no slots): every query attends to nothing
    lse.fill_(INFINITY);
    return {out, lse};
  }
  const int64_t num_m_tiles = (h_q + kBlockM - 1) / kBlockM;
  TORCH_CHECK(num_sm_parts <= (int64_t(1) << 31) - 1 && s_q <= 65535 && num_m_tiles <= 65535,
              "sparse_mla_decode: problem too large");
  // Scratch rows of split requests, as in mla_decode_cuda: at most 2 * num_sm_parts + 1.
  const int64_t acc_rows = 2 * num_sm_parts + 1;
  const int64_t m_total = s_q * h_q;
  flashmla::api::check_combine_rows("sparse_mla_decode", m_total);
  at::Tensor oacc = at::empty({acc_rows, m_total, kDV}, q.options().dtype(at::kFloat));
  at::Tensor lseacc = at::empty({acc_rows, m_total}, q.options().dtype(at::kFloat));

  p.attn_sink = attn_sink.has_value() ? sink.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.oacc = oacc.data_ptr<float>();
  p.lseacc = lseacc.data_ptr<float>();
  p.acc_rows = static_cast<int>(acc_rows);
  p.metadata = metadata.data_ptr<int>();
  p.num_splits = num_splits.data_ptr<int>();
  p.b = static_cast<int>(b);
  p.s_q = static_cast<int>(s_q);
  p.h_q = static_cast<int>(h_q);
  p.num_sm_parts = static_cast<int>(num_sm_parts);
  p.num_m_tiles = static_cast<int>(num_m_tiles);
  p.scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);
  const CUtensorMap tmap_q = flashmla::api::make_q_heads_map("sparse_mla_decode", q, fs::sparse_decode_q_box_heads(p.h_q));
  fs::launch_sparse_decode(p, tmap_q, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  flashmla::api::combine_splits(oacc, lseacc, num_splits, out, lse, p.attn_sink, /*h_kv=*/1, stream);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flashmla_cuda, m) {
  m.def(flashmla::schema::kSparseMlaDecode);
}

TORCH_LIBRARY_IMPL(flashmla_cuda, CUDA, m) { m.impl("sparse_mla_decode", &sparse_mla_decode_cuda); }
