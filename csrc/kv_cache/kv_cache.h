// Host launchers of the KV-cache kernels (csrc/kv_cache/kv_cache.cu).
// All pointers are device pointers; every launch goes to `stream` and never synchronizes.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace flashmla {
namespace kv_cache {

constexpr int kLatent = 512;   // quantized "NoPE" part
constexpr int kRope = 64;      // RoPE part, kept in bf16
constexpr int kRow = 576;      // kLatent + kRope
constexpr int kRecord = 656;   // bytes of one FP8 "V3.2" record

// Paged-cache write. kv_c row t at kv_c + t*kv_c_stride (elements, 16-byte aligned rows), same for k_pe.
// Destination of slot s = block*page_size + off: cache + block*block_stride + off*page_stride (bytes,
// multiples of 16). Slots < 0 or >= num_slots are skipped.
struct CacheWriteArgs {
  const void* kv_c;
  int64_t kv_c_stride;
  const void* k_pe;
  int64_t k_pe_stride;
  void* cache;
  int64_t block_stride;
  int64_t page_stride;
  const int64_t* slot_mapping;
  int64_t num_tokens;
  int64_t page_size;
  int64_t num_slots;
  const float* scale = nullptr;  // "fp8" only: the per-tensor scale, one float read on the device
};

// "auto": copies the 2-byte elements of [kv_c || k_pe] (cache dtype == input dtype).
void launch_concat_and_cache_auto(const CacheWriteArgs& args, cudaStream_t stream);
// "fp8_ds_mla": bf16 inputs -> 656-byte records.
void launch_concat_and_cache_fp8(const CacheWriteArgs& args, cudaStream_t stream);
// "fp8" (per-tensor e4m3): bf16 (is_half false) or fp16 inputs -> 576 e4m3 bytes per token,
// byte = e4m3(clamp(x / *args.scale, -448, 448)) (IEEE division, RNE, NaN -> 0x7F).
void launch_concat_and_cache_fp8_scaled(const CacheWriteArgs& args, bool is_half, cudaStream_t stream);

// Whole-tensor conversions. in rows at in + i*in_stride (elements); out dense.
void launch_quantize_kv_fp8(const void* in, int64_t in_stride, void* out, int64_t num_rows, cudaStream_t stream);
void launch_dequantize_kv_fp8(const void* in, int64_t in_stride, void* out, int64_t num_rows, cudaStream_t stream);

// ---- DeepSeek V4 ("MODEL1") FP8 paged cache (torch_flashmla/kv_cache.py, V4 section) ----
// Page of P tokens: token t's 448 fp8 latent values + 64 bf16 rope at byte 576*t, its 7 UE8M0 scales
// + 1 zero pad byte at 576*P + 8*t. Page b starts at cache + b*page_stride (bytes, a multiple of 8);
// the cache pointer is 8-byte aligned.
constexpr int kV4Nope = 448;
constexpr int kV4Qk = 512;            // kV4Nope + kRope
constexpr int kV4Data = 576;          // bytes of latent + rope of one token
constexpr int kV4Scales = 8;          // bytes of scales (+ pad) of one token
constexpr int kV4Token = 584;         // kV4Data + kV4Scales

// "fp8_ds_mla_v4": bf16 kv_c [T, 448] + k_pe [T, 64] -> V4 tokens; args.block_stride = page stride,
// args.page_stride unused.
void launch_concat_and_cache_fp8_v4(const CacheWriteArgs& args, cudaStream_t stream);
// Whole cache: in rows (512 bf16) at in + i*in_stride (elements), row i = token i % page_size of page
// i / page_size; the padding between pages (page_stride - 584*page_size bytes) is zeroed.
void launch_quantize_kv_fp8_v4(const void* in, int64_t in_stride, void* cache, int64_t num_blocks,
                               int64_t page_size, int64_t page_stride, cudaStream_t stream);
// Whole cache -> out [num_blocks * page_size, 512] bf16, dense.
void launch_dequantize_kv_fp8_v4(const void* cache, int64_t num_blocks, int64_t page_size, int64_t page_stride,
                                 void* out, cudaStream_t stream);

}  // namespace kv_cache
}  // namespace flashmla
