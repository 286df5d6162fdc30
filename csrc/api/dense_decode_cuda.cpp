// CUDA entry points of dense MLA decode: torch.ops.flashmla_cuda.{get_mla_metadata, mla_decode}.
// The Python layer validates inputs first (torch_flashmla/checks.py); the checks here are the
// cheap ones the kernels rely on. No host synchronization, no host reads of device values, the
// current stream and the caching allocator only: both ops can be captured in CUDA graphs and
// replayed with new sequence lengths / block tables.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <numeric>

#include "api/decode_api.h"
#include "api/tensor_map.h"
#include "common/decode_common.h"
#include "sm90/decode/dense/dense_decode.h"
#include "schemas.h"

namespace {

namespace fs = flashmla::sm90;
namespace fc = flashmla::common;

std::tuple<at::Tensor, at::Tensor> get_mla_metadata_cuda(const at::Tensor& seqlens, int64_t num_q_tokens_per_head_k,
                                                         int64_t num_heads_k, c10::optional<int64_t> num_heads_q,
                                                         bool is_fp8_kvcache,
                                                         c10::optional<int64_t> topk, int64_t num_sm_parts) {
  (void)num_q_tokens_per_head_k;
  (void)num_heads_k;
  (void)num_heads_q;
  (void)is_fp8_kvcache;
  (void)topk;
  TORCH_CHECK(seqlens.is_cuda() && seqlens.scalar_type() == at::kInt && seqlens.dim() == 1,
              "get_mla_metadata: seqlens must be a 1-D int32 CUDA tensor");
  TORCH_CHECK(num_sm_parts >= 1, "get_mla_metadata: num_sm_parts must be >= 1");
  c10::cuda::CUDAGuard guard(seqlens.device());
  const int64_t b = seqlens.size(0);
  auto opts = seqlens.options().dtype(at::kInt);
  at::Tensor metadata = at::empty({num_sm_parts, fc::kMetadataWidth}, opts);
  at::Tensor num_splits = at::empty({b + 1}, opts);
  const at::Tensor lens = seqlens.contiguous();
  fc::launch_planner(lens.data_ptr<int>(), static_cast<int>(b), static_cast<int>(num_sm_parts),
                     metadata.data_ptr<int>(), num_splits.data_ptr<int>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {metadata, num_splits};
}

// 4-D map {576, h_kv, page_size, num_blocks} over the paged cache; box {64, 1, rows, 1}, 128B swizzle.
// fp8 (one byte per value): box {128, 1, rows, 1} (128 e4m3 columns), 128B swizzle: the FP8 kernel's QK reads
// the landed tile directly (docs/design.md §5.1).
// rows = gcd(page_size, 64): 64 for pages of whole chunks, else a chunk's tile is 64 / rows loads.
CUtensorMap make_cache_map(const at::Tensor& kv, bool fp8, int rows) {
  const int64_t es = kv.element_size();
  const int64_t row_bytes = ((fs::kDQK * es + 15) / 16) * 16;
  auto stride_bytes = [&](int dim, int64_t fallback) {
    return kv.size(dim) == 1 ? fallback : kv.stride(dim) * es;
  };
  const int64_t s_head = stride_bytes(2, row_bytes);
  const int64_t s_tok = stride_bytes(1, s_head * kv.size(2));
  const int64_t s_blk = stride_bytes(0, s_tok * kv.size(1));
  for (int64_t s : {s_head, s_tok, s_blk}) {
    TORCH_CHECK(s % 16 == 0 && s > 0 && s < (int64_t(1) << 40),
                "mla_decode: kv_cache strides must be positive multiples of 16 bytes (got ", kv.strides(), ")");
  }
  TORCH_CHECK(reinterpret_cast<uintptr_t>(kv.data_ptr()) % 16 == 0, "mla_decode: kv_cache must be 16-byte aligned");
  cuuint64_t dims[4] = {static_cast<cuuint64_t>(fs::kDQK), static_cast<cuuint64_t>(kv.size(2)),
                        static_cast<cuuint64_t>(kv.size(1)), static_cast<cuuint64_t>(kv.size(0))};
  cuuint64_t strides[3] = {static_cast<cuuint64_t>(s_head), static_cast<cuuint64_t>(s_tok),
                           static_cast<cuuint64_t>(s_blk)};
  cuuint32_t box[4] = {fp8 ? 128u : 64u, 1, static_cast<cuuint32_t>(rows), 1};
  cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  CUtensorMap map;
  const CUtensorMapDataType dt = fp8 ? CU_TENSOR_MAP_DATA_TYPE_UINT8
                                 : kv.scalar_type() == at::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                                     : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  // L2 promotion: a 16-bit tile row is 128 bytes of the 1,152-byte cache row, and promoting it to 256 bytes
  // cost 4% of the streaming rate (benchmarks/NOTES.md, "The cache tensor map's L2 promotion"); the FP8
  // cache's 128-byte boxes keep 256 bytes (that A/B was inconclusive there).
  const CUtensorMapL2promotion l2 = fp8 ? CU_TENSOR_MAP_L2_PROMOTION_L2_256B : CU_TENSOR_MAP_L2_PROMOTION_L2_128B;
  CUresult res = flashmla::api::tensor_map_encoder("mla_decode")(&map, dt, 4, kv.data_ptr(), dims, strides, box, elem_strides,
                             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, l2,
                             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(res == CUDA_SUCCESS, "mla_decode: cuTensorMapEncodeTiled failed (", static_cast<int>(res), ")");
  return map;
}

std::tuple<at::Tensor, at::Tensor> mla_decode_cuda(const at::Tensor& q_in, const at::Tensor& kv_cache,
                                                   const at::Tensor& block_table_in, const at::Tensor& cache_seqlens_in,
                                                   int64_t head_dim_v, double softmax_scale, bool causal,
                                                   const at::Tensor& tile_scheduler_metadata_in,
                                                   const at::Tensor& num_splits_in,
                                                   const c10::optional<at::Tensor>& descale_q,
                                                   const c10::optional<at::Tensor>& descale_k) {
  TORCH_CHECK(q_in.is_cuda() && kv_cache.is_cuda(), "mla_decode: q and kv_cache must be CUDA tensors");
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(3) == fs::kDQK, "mla_decode: q must be [b, s_q, h_q, 576]");
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.size(3) == fs::kDQK, "mla_decode: kv_cache must be [blocks, page, h_kv, 576]");
  TORCH_CHECK(head_dim_v == fs::kDV, "mla_decode: head_dim_v must be 512");
  // The kernel takes row maxima of the raw scores (valid for a positive scale only).
  TORCH_CHECK(softmax_scale > 0, "mla_decode: softmax_scale must be positive, got ", softmax_scale);
  // FP8 path: a per-tensor e4m3 cache (float8_e4m3fn or uint8 bytes) with descale_k; q bf16, or e4m3 with
  // descale_q; bf16 out.
  const bool fp8 = kv_cache.scalar_type() == at::kFloat8_e4m3fn || kv_cache.scalar_type() == at::kByte;
  const bool q_fp8 = q_in.scalar_type() == at::kFloat8_e4m3fn;
  auto check_descale = [&](const c10::optional<at::Tensor>& d, const char* name) {
    TORCH_CHECK(d.has_value() && d->scalar_type() == at::kFloat && d->numel() == 1 && d->device() == q_in.device(),
                "mla_decode: ", name, " must be a float32 tensor of one element on q's device");
  };
  if (fp8) {
    TORCH_CHECK(q_in.scalar_type() == at::kBFloat16 || q_fp8, "mla_decode: with an FP8 cache q must be bf16 or float8_e4m3fn");
    check_descale(descale_k, "descale_k");
    if (q_fp8) check_descale(descale_q, "descale_q");
    TORCH_CHECK(q_fp8 || !descale_q.has_value(), "mla_decode: descale_q is for a float8_e4m3fn q");
  } else {
    TORCH_CHECK(q_in.scalar_type() == at::kBFloat16 || q_in.scalar_type() == at::kHalf, "mla_decode: q must be bf16 or fp16");
    TORCH_CHECK(kv_cache.scalar_type() == q_in.scalar_type(), "mla_decode: kv_cache must have q's dtype");
    TORCH_CHECK(!descale_q.has_value() && !descale_k.has_value(), "mla_decode: descale_q / descale_k need an FP8 cache");
  }
  TORCH_CHECK(kv_cache.stride(3) == 1, "mla_decode: kv_cache must have a contiguous last dim");
  const int64_t b = q_in.size(0), s_q = q_in.size(1), h_q = q_in.size(2);
  const int64_t page_size = kv_cache.size(1), h_kv = kv_cache.size(2);
  TORCH_CHECK(h_kv >= 1 && h_q % h_kv == 0, "mla_decode: h_q must be a multiple of h_kv");
  TORCH_CHECK(page_size >= 1, "mla_decode: page_size must be positive");
  TORCH_CHECK(block_table_in.scalar_type() == at::kInt && block_table_in.dim() == 2 && block_table_in.size(0) == b,
              "mla_decode: block_table must be int32 [b, max_blocks]");
  TORCH_CHECK(cache_seqlens_in.scalar_type() == at::kInt && cache_seqlens_in.numel() == b,
              "mla_decode: cache_seqlens must be int32 [b]");
  flashmla::api::check_plan("mla_decode", tile_scheduler_metadata_in, num_splits_in, b, q_in.device());

  c10::cuda::CUDAGuard guard(q_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor q = flashmla::api::q_for_kernel(q_in);
  at::Tensor block_table = block_table_in.stride(1) == 1 ? block_table_in : block_table_in.contiguous();
  at::Tensor seqlens = cache_seqlens_in.contiguous().view({b});
  at::Tensor metadata = tile_scheduler_metadata_in.contiguous();
  at::Tensor num_splits = num_splits_in.contiguous();
  const int64_t num_sm_parts = metadata.size(0);

  at::Tensor out = at::empty({b, s_q, h_q, fs::kDV}, fp8 ? q.options().dtype(at::kBFloat16) : q.options());
  at::Tensor lse = at::empty({b, h_q, s_q}, q.options().dtype(at::kFloat));
  if (b == 0 || s_q == 0 || h_q == 0) return {out, lse};
  if (kv_cache.size(0) == 0) {  // every page id is out of range: nothing is attended (no tensor map of 0 blocks)
    out.zero_();
    lse.fill_(INFINITY);
    return {out, lse};
  }

  const int64_t group = h_q / h_kv;
  const int64_t m_total = s_q * group;
  const int64_t num_m_tiles = (m_total + fs::kBlockM - 1) / fs::kBlockM;
  // Grid (num_m_tiles, h_kv, num_sm_parts): y and z are limited to 65535.
  TORCH_CHECK(num_sm_parts <= 65535, "mla_decode: tile_scheduler_metadata must have at most 65535 rows (num_sm_parts), got ",
              num_sm_parts);
  TORCH_CHECK(h_kv <= 65535 && num_m_tiles <= 65535, "mla_decode: problem too large");
  flashmla::api::check_combine_rows("mla_decode", m_total);
  // Scratch rows of split requests: request r's split i goes to row 2 * E_r + i, E_r = num_splits[r] - r
  // = the extra pieces of the requests before r. A split request has n >= 2 pieces, n <= 2 (n - 1), so
  // the rows of different requests never overlap, and E <= num_sm_parts (one extra piece per
  // partition at most) bounds every row by 2 * num_sm_parts.
  const int64_t acc_rows = 2 * num_sm_parts + 1;
  const bool bf16_partials = fs::split_partials_bf16(fp8, m_total, page_size);
  at::Tensor oacc = at::empty({acc_rows, h_kv, m_total, fs::kDV}, q.options().dtype(bf16_partials ? at::kBFloat16 : at::kFloat));
  at::Tensor lseacc = at::empty({acc_rows, h_kv, m_total}, q.options().dtype(at::kFloat));

  fs::DenseDecodeParams p{};
  p.q = q.data_ptr();
  p.q_batch_stride = q.stride(0);
  p.q_seq_stride = q.stride(1);
  p.q_head_stride = q.stride(2);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.oacc = oacc.data_ptr();
  p.lseacc = lseacc.data_ptr<float>();
  p.acc_rows = static_cast<int>(acc_rows);
  p.block_table = block_table.data_ptr<int>();
  p.block_table_stride = block_table.stride(0);
  p.seqlens = seqlens.data_ptr<int>();
  p.metadata = metadata.data_ptr<int>();
  p.num_splits = num_splits.data_ptr<int>();
  p.b = static_cast<int>(b);
  p.s_q = static_cast<int>(s_q);
  p.h_q = static_cast<int>(h_q);
  p.h_kv = static_cast<int>(h_kv);
  p.group = static_cast<int>(group);
  p.m_total = static_cast<int>(m_total);
  p.page_size = static_cast<int>(page_size);
  p.num_blocks = static_cast<int>(std::min<int64_t>(kv_cache.size(0), INT32_MAX));
  p.max_tokens = static_cast<int>(std::min<int64_t>(block_table.size(1) * page_size, INT32_MAX));
  // Rows of one TMA load: a 64-token chunk is 64 / rows page slices (one when page_size is a multiple of 64).
  const int page_rows = static_cast<int>(std::gcd<int64_t>(page_size, fs::kBlockN));
  while ((1 << p.page_rows_log2) < page_rows) ++p.page_rows_log2;
  const flashmla::api::PageDivider div = flashmla::api::page_divider(page_size);
  p.page_div_mul = div.mul;
  p.page_div_shift = div.shift;
  p.num_sm_parts = static_cast<int>(num_sm_parts);
  p.num_m_tiles = static_cast<int>(num_m_tiles);
  p.scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);
  p.causal = causal ? 1 : 0;
  // Read on the device (no host sync): capturable, replays with the values the tensors hold then.
  at::Tensor dq, dk;
  if (fp8) {
    dk = descale_k->contiguous();
    p.descale_k = dk.data_ptr<float>();
    if (q_fp8) {
      dq = descale_q->contiguous();
      p.descale_q = dq.data_ptr<float>();
    }
    p.q_fp8 = q_fp8 ? 1 : 0;
  }

  const CUtensorMap tmap = make_cache_map(kv_cache, fp8, page_rows);
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  if (fp8) {
    fs::launch_dense_decode_fp8(p, tmap, stream);
  } else if (bf16) {
    fs::launch_dense_decode_bf16(p, tmap, stream);
  } else {
    fs::launch_dense_decode_fp16(p, tmap, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  flashmla::api::combine_splits(oacc, lseacc, num_splits, out, lse, /*attn_sink=*/nullptr, h_kv, stream);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flashmla_cuda, m) {
  m.def(flashmla::schema::kGetMlaMetadata);
  m.def(flashmla::schema::kMlaDecode);
}

TORCH_LIBRARY_IMPL(flashmla_cuda, CUDA, m) {
  m.impl("get_mla_metadata", &get_mla_metadata_cuda);
  m.impl("mla_decode", &mla_decode_cuda);
}
