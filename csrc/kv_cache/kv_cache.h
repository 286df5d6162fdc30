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
};

// "auto": copies the 2-byte elements of [kv_c || k_pe] (cache dtype == input dtype).
void launch_concat_and_cache_auto(const CacheWriteArgs& args, cudaStream_t stream);
// "fp8_ds_mla": bf16 inputs -> 656-byte records.
void launch_concat_and_cache_fp8(const CacheWriteArgs& args, cudaStream_t stream);

// Whole-tensor conversions. in rows at in + i*in_stride (elements); out dense.
void launch_quantize_kv_fp8(const void* in, int64_t in_stride, void* out, int64_t num_rows, cudaStream_t stream);
void launch_dequantize_kv_fp8(const void* in, int64_t in_stride, void* out, int64_t num_rows, cudaStream_t stream);

}  // namespace kv_cache
}  // namespace flashmla
