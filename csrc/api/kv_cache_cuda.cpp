// CUDA entry points of the KV-cache ops: torch.ops.flashmla_cuda.{concat_and_cache_mla (every cache type,
// the per-tensor e4m3 "fp8" included), quantize_kv_fp8, dequantize_kv_fp8, quantize_kv_fp8_v4, dequantize_kv_fp8_v4}. The Python layer validates inputs first; the checks here are
// the cheap ones the kernels rely on. No host synchronization, current stream, caching allocator
// only: every op can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kv_cache/kv_cache.h"
#include "schemas.h"

namespace {

namespace kvc = flashmla::kv_cache;

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// [rows, width] view of `t` whose rows start 16-byte aligned with unit inner stride (copies if not).
at::Tensor rows_16b(const at::Tensor& t, int64_t width) {
  at::Tensor x = t.reshape({-1, width});
  if (x.size(0) > 1 && x.stride(0) * x.element_size() % 16 != 0) x = x.contiguous();
  if (x.stride(1) != 1 && width > 1) x = x.contiguous();
  if (!aligned16(x.data_ptr())) x = x.clone(at::MemoryFormat::Contiguous);
  return x;
}

// A cache write's kernel arguments. kv_c ([T, latent_width]) and k_pe ([T, 64]) as the kernels read them
// (rows_16b: copies where needed) and slot_mapping, all kept alive here until the launch; the cache's
// block and page strides in bytes.
struct CacheWrite {
  at::Tensor kv_c, k_pe, slots;
  kvc::CacheWriteArgs args;
};
CacheWrite cache_write(const at::Tensor& kv_c, int64_t latent_width, const at::Tensor& k_pe, at::Tensor& kv_cache,
                       const at::Tensor& slot_mapping, int64_t block_stride, int64_t page_stride) {
  CacheWrite w{rows_16b(kv_c, latent_width), rows_16b(k_pe, kvc::kRope), slot_mapping.contiguous(), {}};
  w.args.kv_c = w.kv_c.data_ptr();
  w.args.kv_c_stride = w.kv_c.stride(0);
  w.args.k_pe = w.k_pe.data_ptr();
  w.args.k_pe_stride = w.k_pe.stride(0);
  w.args.cache = kv_cache.data_ptr();
  w.args.block_stride = block_stride;
  w.args.page_stride = page_stride;
  w.args.slot_mapping = w.slots.data_ptr<int64_t>();
  w.args.num_tokens = kv_c.size(0);
  w.args.page_size = kv_cache.size(1);
  w.args.num_slots = kv_cache.size(0) * kv_cache.size(1);
  return w;
}

// Rows of a [num_blocks, page_size, 1, D] cache (byte strides given) start at 16-byte boundaries.
void check_cache_rows_16b(const char* op, const at::Tensor& kv_cache, int64_t block_stride, int64_t page_stride) {
  TORCH_CHECK(aligned16(kv_cache.data_ptr()) && (kv_cache.size(0) == 1 || block_stride % 16 == 0) &&
                  (kv_cache.size(1) == 1 || page_stride % 16 == 0),
              op, ": kv_cache rows must start at 16-byte boundaries");
}

bool aligned8(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 7u) == 0; }

// The V4 cache facts the kernels rely on (torch_flashmla/checks.py::check_fp8_v4_cache says the same).
void check_v4_cache(const at::Tensor& cache, const char* op, const char* arg) {
  TORCH_CHECK(cache.is_cuda(), op, ": ", arg, " must be a CUDA tensor");
  TORCH_CHECK(cache.scalar_type() == at::kByte || cache.scalar_type() == at::kFloat8_e4m3fn, op, ": ", arg,
              " must be uint8 or float8_e4m3fn");
  TORCH_CHECK(cache.dim() == 4 && cache.size(2) == 1 && cache.size(3) == kvc::kV4Token && cache.stride(3) == 1,
              op, ": ", arg, " must be a V4 cache [num_blocks, page_size, 1, 584]");
  TORCH_CHECK(cache.size(1) <= 1 || cache.stride(1) == kvc::kV4Token, op, ": ", arg, " must have stride(1) == 584");
  TORCH_CHECK(cache.size(0) <= 1 || (cache.stride(0) % 8 == 0 && cache.stride(0) >= cache.size(1) * kvc::kV4Token),
              op, ": ", arg, " must have a page stride that is a multiple of 8 and at least 584 * page_size");
}

void concat_and_cache_fp8_v4_cuda(const at::Tensor& kv_c, const at::Tensor& k_pe, at::Tensor& kv_cache,
                                  const at::Tensor& slot_mapping) {
  const char* op = "concat_and_cache_mla";
  TORCH_CHECK(kv_c.is_cuda() && k_pe.is_cuda() && slot_mapping.is_cuda(), op, ": all tensors must be CUDA tensors");
  TORCH_CHECK(kv_c.dim() == 2 && kv_c.size(1) == kvc::kV4Nope && kv_c.scalar_type() == at::kBFloat16, op,
              ": kv_c must be bfloat16 [T, 448] for fp8_ds_mla_v4");
  TORCH_CHECK(k_pe.dim() == 2 && k_pe.size(1) == kvc::kRope && k_pe.size(0) == kv_c.size(0) &&
                  k_pe.scalar_type() == at::kBFloat16,
              op, ": k_pe must be bfloat16 [T, 64]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == kv_c.size(0),
              op, ": slot_mapping must be int64 [T]");
  check_v4_cache(kv_cache, op, "kv_cache");
  const int64_t num_tokens = kv_c.size(0);
  if (num_tokens == 0 || kv_cache.numel() == 0) return;
  TORCH_CHECK(aligned8(kv_cache.data_ptr()), op, ": kv_cache must start at an 8-byte boundary");
  c10::cuda::CUDAGuard guard(kv_cache.device());
  const CacheWrite w = cache_write(kv_c, kvc::kV4Nope, k_pe, kv_cache, slot_mapping, kv_cache.stride(0), kvc::kV4Token);
  kvc::launch_concat_and_cache_fp8_v4(w.args, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// "fp8" / "fp8_e4m3": per-tensor e4m3 cache [num_blocks, page_size, 1, 576] written with a 1-element fp32
// scale read on the device.
void concat_and_cache_fp8_scaled_cuda(const at::Tensor& kv_c, const at::Tensor& k_pe, at::Tensor& kv_cache,
                                      const at::Tensor& slot_mapping, const std::optional<at::Tensor>& scale) {
  const char* op = "concat_and_cache_mla";
  TORCH_CHECK(kv_c.is_cuda() && k_pe.is_cuda() && kv_cache.is_cuda() && slot_mapping.is_cuda(), op,
              ": all tensors must be CUDA tensors");
  TORCH_CHECK(scale.has_value() && scale->defined(), op, ": kv_cache_dtype 'fp8' needs a scale tensor");
  const at::Tensor& s = *scale;
  TORCH_CHECK(s.is_cuda() && s.device() == kv_cache.device() && s.scalar_type() == at::kFloat && s.numel() == 1 &&
                  s.dim() <= 1,
              op, ": scale must be a float32 tensor of one element on the cache's device");
  TORCH_CHECK(kv_c.dim() == 2 && kv_c.size(1) == kvc::kLatent, op, ": kv_c must be [T, 512]");
  TORCH_CHECK(kv_c.scalar_type() == at::kBFloat16 || kv_c.scalar_type() == at::kHalf, op,
              ": kv_c must be bfloat16 or float16");
  TORCH_CHECK(k_pe.dim() == 2 && k_pe.size(1) == kvc::kRope && k_pe.size(0) == kv_c.size(0) &&
                  k_pe.scalar_type() == kv_c.scalar_type(),
              op, ": k_pe must be [T, 64] of kv_c's dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == kv_c.size(0),
              op, ": slot_mapping must be int64 [T]");
  TORCH_CHECK(kv_cache.scalar_type() == at::kByte || kv_cache.scalar_type() == at::kFloat8_e4m3fn, op,
              ": the fp8 cache must be uint8 or float8_e4m3fn");
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.size(2) == 1 && kv_cache.size(3) == kvc::kRow && kv_cache.stride(3) == 1,
              op, ": the fp8 cache must be [num_blocks, page_size, 1, 576] with unit inner stride");
  const int64_t num_tokens = kv_c.size(0);
  if (num_tokens == 0 || kv_cache.numel() == 0) return;
  c10::cuda::CUDAGuard guard(kv_cache.device());
  const int64_t block_stride = kv_cache.stride(0);  // one byte per element
  const int64_t page_stride = kv_cache.stride(1);
  check_cache_rows_16b(op, kv_cache, block_stride, page_stride);
  CacheWrite w = cache_write(kv_c, kvc::kLatent, k_pe, kv_cache, slot_mapping, block_stride, page_stride);
  w.args.scale = s.data_ptr<float>();
  kvc::launch_concat_and_cache_fp8_scaled(w.args, kv_c.scalar_type() == at::kHalf, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void concat_and_cache_mla_cuda(const at::Tensor& kv_c, const at::Tensor& k_pe, at::Tensor& kv_cache,
                               const at::Tensor& slot_mapping, c10::string_view kv_cache_dtype,
                               const std::optional<at::Tensor>& scale) {
  // The other cache types compute their own scales: a scale passed with them is ignored.
  if (kv_cache_dtype == "fp8" || kv_cache_dtype == "fp8_e4m3") {
    concat_and_cache_fp8_scaled_cuda(kv_c, k_pe, kv_cache, slot_mapping, scale);
    return;
  }
  if (kv_cache_dtype == "fp8_ds_mla_v4") {
    concat_and_cache_fp8_v4_cuda(kv_c, k_pe, kv_cache, slot_mapping);
    return;
  }
  TORCH_CHECK(kv_c.is_cuda() && k_pe.is_cuda() && kv_cache.is_cuda() && slot_mapping.is_cuda(),
              "concat_and_cache_mla: all tensors must be CUDA tensors");
  TORCH_CHECK(kv_c.dim() == 2 && kv_c.size(1) == kvc::kLatent, "concat_and_cache_mla: kv_c must be [T, 512]");
  TORCH_CHECK(k_pe.dim() == 2 && k_pe.size(1) == kvc::kRope && k_pe.size(0) == kv_c.size(0),
              "concat_and_cache_mla: k_pe must be [T, 64]");
  TORCH_CHECK(k_pe.scalar_type() == kv_c.scalar_type(), "concat_and_cache_mla: k_pe must have kv_c's dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == kv_c.size(0),
              "concat_and_cache_mla: slot_mapping must be int64 [T]");
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.size(2) == 1 && kv_cache.stride(3) == 1,
              "concat_and_cache_mla: kv_cache must be [num_blocks, page_size, 1, D] with unit inner stride");
  const bool fp8 = kv_cache_dtype == "fp8_ds_mla";
  TORCH_CHECK(fp8 || kv_cache_dtype == "auto",
              "concat_and_cache_mla: kv_cache_dtype must be 'auto', 'fp8_ds_mla', 'fp8_ds_mla_v4', 'fp8' or 'fp8_e4m3'");
  if (fp8) {
    TORCH_CHECK(kv_cache.scalar_type() == at::kByte || kv_cache.scalar_type() == at::kFloat8_e4m3fn,
                "concat_and_cache_mla: fp8_ds_mla cache must be uint8 or float8_e4m3fn");
    TORCH_CHECK(kv_cache.size(3) == kvc::kRecord, "concat_and_cache_mla: fp8_ds_mla cache rows must be 656 bytes");
    TORCH_CHECK(kv_c.scalar_type() == at::kBFloat16, "concat_and_cache_mla: fp8_ds_mla needs bfloat16 kv_c");
  } else {
    TORCH_CHECK(kv_c.scalar_type() == at::kBFloat16 || kv_c.scalar_type() == at::kHalf,
                "concat_and_cache_mla: kv_c must be bfloat16 or float16");
    TORCH_CHECK(kv_cache.scalar_type() == kv_c.scalar_type(), "concat_and_cache_mla: 'auto' cache must have kv_c's dtype");
    TORCH_CHECK(kv_cache.size(3) == kvc::kRow, "concat_and_cache_mla: 'auto' cache rows must be 576 values");
  }
  const int64_t num_tokens = kv_c.size(0);
  if (num_tokens == 0 || kv_cache.numel() == 0) return;

  c10::cuda::CUDAGuard guard(kv_cache.device());
  const int64_t esize = kv_cache.element_size();
  const int64_t block_stride = kv_cache.stride(0) * esize;
  const int64_t page_stride = kv_cache.stride(1) * esize;
  check_cache_rows_16b("concat_and_cache_mla", kv_cache, block_stride, page_stride);
  const CacheWrite w = cache_write(kv_c, kvc::kLatent, k_pe, kv_cache, slot_mapping, block_stride, page_stride);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (fp8) {
    kvc::launch_concat_and_cache_fp8(w.args, stream);
  } else {
    kvc::launch_concat_and_cache_auto(w.args, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor quantize_kv_fp8_cuda(const at::Tensor& kv) {
  TORCH_CHECK(kv.is_cuda(), "quantize_kv_fp8: kv must be a CUDA tensor");
  TORCH_CHECK(kv.scalar_type() == at::kBFloat16, "quantize_kv_fp8: kv must be bfloat16");
  TORCH_CHECK(kv.dim() >= 1 && kv.size(-1) == kvc::kRow, "quantize_kv_fp8: kv must be [..., 576]");
  c10::cuda::CUDAGuard guard(kv.device());
  std::vector<int64_t> sizes = kv.sizes().vec();
  sizes.back() = kvc::kRecord;
  at::Tensor out = at::empty(sizes, kv.options().dtype(at::kByte));
  if (out.numel() == 0) return out;
  const at::Tensor x = rows_16b(kv, kvc::kRow);
  kvc::launch_quantize_kv_fp8(x.data_ptr(), x.stride(0), out.data_ptr(), x.size(0),
                              c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor dequantize_kv_fp8_cuda(const at::Tensor& kv_fp8) {
  TORCH_CHECK(kv_fp8.is_cuda(), "dequantize_kv_fp8: kv_fp8 must be a CUDA tensor");
  TORCH_CHECK(kv_fp8.scalar_type() == at::kByte || kv_fp8.scalar_type() == at::kFloat8_e4m3fn,
              "dequantize_kv_fp8: kv_fp8 must be uint8 or float8_e4m3fn");
  TORCH_CHECK(kv_fp8.dim() >= 1 && kv_fp8.size(-1) == kvc::kRecord, "dequantize_kv_fp8: kv_fp8 must be [..., 656]");
  c10::cuda::CUDAGuard guard(kv_fp8.device());
  std::vector<int64_t> sizes = kv_fp8.sizes().vec();
  sizes.back() = kvc::kRow;
  at::Tensor out = at::empty(sizes, kv_fp8.options().dtype(at::kBFloat16));
  if (out.numel() == 0) return out;
  const at::Tensor x = rows_16b(kv_fp8, kvc::kRecord);
  kvc::launch_dequantize_kv_fp8(x.data_ptr(), x.stride(0), out.data_ptr(), x.size(0),
                                c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// [num_blocks, page_size, 1, 512] bf16 -> V4 cache with FlashMLA's page stride (ceil(584 P / 576) * 576).
at::Tensor quantize_kv_fp8_v4_cuda(const at::Tensor& kv) {
  TORCH_CHECK(kv.is_cuda(), "quantize_kv_fp8_v4: kv must be a CUDA tensor");
  TORCH_CHECK(kv.scalar_type() == at::kBFloat16, "quantize_kv_fp8_v4: kv must be bfloat16");
  TORCH_CHECK(kv.dim() == 4 && kv.size(2) == 1 && kv.size(3) == kvc::kV4Qk,
              "quantize_kv_fp8_v4: kv must be [num_blocks, page_size, 1, 512]");
  c10::cuda::CUDAGuard guard(kv.device());
  const int64_t num_blocks = kv.size(0), page_size = kv.size(1);
  const int64_t page_stride = (page_size * kvc::kV4Token + kvc::kV4Data - 1) / kvc::kV4Data * kvc::kV4Data;
  at::Tensor out = at::empty_strided({num_blocks, page_size, 1, kvc::kV4Token},
                                     {page_stride, kvc::kV4Token, kvc::kV4Token, 1}, kv.options().dtype(at::kByte));
  if (num_blocks * page_size == 0) return out;
  const at::Tensor x = rows_16b(kv, kvc::kV4Qk);
  kvc::launch_quantize_kv_fp8_v4(x.data_ptr(), x.stride(0), out.data_ptr(), num_blocks, page_size, page_stride,
                                 c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// V4 cache -> [num_blocks, page_size, 1, 512] bf16.
at::Tensor dequantize_kv_fp8_v4_cuda(const at::Tensor& kv_fp8) {
  check_v4_cache(kv_fp8, "dequantize_kv_fp8_v4", "kv_fp8");
  c10::cuda::CUDAGuard guard(kv_fp8.device());
  const int64_t num_blocks = kv_fp8.size(0), page_size = kv_fp8.size(1);
  at::Tensor out = at::empty({num_blocks, page_size, 1, kvc::kV4Qk}, kv_fp8.options().dtype(at::kBFloat16));
  if (out.numel() == 0) return out;
  at::Tensor x = kv_fp8;
  // An odd base address (a cache sliced at a byte offset): its pages, copied back to back.
  if (!aligned8(x.data_ptr())) x = x.clone(at::MemoryFormat::Contiguous);
  const int64_t page_stride = num_blocks > 1 ? x.stride(0) : page_size * kvc::kV4Token;
  kvc::launch_dequantize_kv_fp8_v4(x.data_ptr(), num_blocks, page_size, page_stride, out.data_ptr(),
                                   c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flashmla_cuda, m) {
  m.def(flashmla::schema::kConcatAndCacheMla);
  m.def(flashmla::schema::kQuantizeKvFp8);
  m.def(flashmla::schema::kDequantizeKvFp8);
  m.def(flashmla::schema::kQuantizeKvFp8V4);
  m.def(flashmla::schema::kDequantizeKvFp8V4);
}

TORCH_LIBRARY_IMPL(flashmla_cuda, CUDA, m) {
  m.impl("concat_and_cache_mla", &concat_and_cache_mla_cuda);
  m.impl("quantize_kv_fp8", &quantize_kv_fp8_cuda);
  m.impl("dequantize_kv_fp8", &dequantize_kv_fp8_cuda);
  m.impl("quantize_kv_fp8_v4", &quantize_kv_fp8_v4_cuda);
  m.impl("dequantize_kv_fp8_v4", &dequantize_kv_fp8_v4_cuda);
}
