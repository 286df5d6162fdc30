// KV-cache kernels: paged-cache writes (bf16/fp16 rows, FP8 "V3.2" records, per-tensor e4m3 rows or
// DeepSeek V4 FP8 pages)
// and whole-tensor FP8 quantize/dequantize, bit-exact with torch_flashmla/kv_cache.py (whose results do not depend on the device).
//
// One warp per token. Lane l owns latent values 16l..16l+15 (two 16-byte loads, one 16-byte store of
// fp8 values), so the 8 lanes of a 128-value tile reduce their amax with 3 xor-shuffles; lanes 0..7
// move the 64 RoPE values (8 x 16 bytes); lane 0 stores the 4 scales (16 bytes).
//
// Bit-exactness notes (the build uses --use_fast_math, so every step whose rounding matters is PTX):
//  * scale: exact, from the exponent and mantissa bits of amax (see tile_scale), as the reference
//    computes it with frexp on every device.
//  * amax is an integer max over the bf16 bit patterns with the sign cleared, so NaN (> inf) wins,
//    like PyTorch's NaN-propagating amax.
//  * finite tile: x / scale is exact (power of two), |x / scale| <= 448 * (1 + 2^-17) < 464, so the
//    hardware cvt.rn.satfinite.e4m3x2 rounds like c10's software conversion (RNE; saturating or not
//    makes no difference below 464); the sign bit of x is OR-ed in as c10 does (-tiny -> 0x80).
//  * tile with inf (no NaN): scale = +inf; x / inf = +-0 for finite x, inf / inf = NaN -> 0x7F.
//  * tile with NaN: scale = NaN (0x7FFFFFFF, the GPU's canonical NaN); every value -> 0x7F.
//  * dequantize: fp8 -> fp32 is exact (hardware cvt, NaN bytes patched to c10's bit pattern),
//    product in mul.rn.f32 without flush-to-zero, cvt.rn.bf16x2.f32 like c10::BFloat16(float).
#include "kv_cache/kv_cache.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace flashmla {
namespace kv_cache {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kMinScaleExp = -13;  // 2^ceil(log2(1e-4))

template <bool kStream>
__device__ __forceinline__ uint4 load16(const void* p) {
  if constexpr (kStream) {
    return __ldcs(reinterpret_cast<const uint4*>(p));
  } else {
    return *reinterpret_cast<const uint4*>(p);
  }
}

template <bool kStream>
__device__ __forceinline__ void store16(void* p, uint4 v) {
  if constexpr (kStream) {
    __stcs(reinterpret_cast<uint4*>(p), v);
  } else {
    *reinterpret_cast<uint4*>(p) = v;
  }
}

// Scale of a tile from the bf16 bit pattern of its |x| maximum: the smallest power of two 2^k with
// amax <= 448 * 2^k, at least 2^-13 (the clamp of amax / 448 at 1e-4), evaluated exactly on the bits.
// amax = (1 + M / 128) * 2^(E - 127) and 448 = 1.75 * 2^8, so k = E - 135 + (M > 96).
__device__ __forceinline__ float tile_scale(uint32_t amax16) {
  if (amax16 > 0x7F80u) return __uint_as_float(0x7FFFFFFFu);   // NaN in the tile
  if (amax16 == 0x7F80u) return __uint_as_float(0x7F800000u);  // inf in the tile
  const int biased = static_cast<int>(amax16 >> 7);             // 0 for zero and subnormals
  const int mantissa = static_cast<int>(amax16 & 0x7Fu);
  int k = biased == 0 ? kMinScaleExp : biased - 135 + (mantissa > 96 ? 1 : 0);
  k = k < kMinScaleExp ? kMinScaleExp : k;                       // k in [-13, 120]
  return __uint_as_float(static_cast<uint32_t>(k + 127) << 23);
}

__device__ __forceinline__ uint32_t cvt_e4m3x2(float lo, float hi) {
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}

// 4 fp8 bytes of elements packed in bf16x2 words w0 (elements 0,1) and w1 (elements 2,3).
__device__ __forceinline__ uint32_t quant4(uint32_t w0, uint32_t w1, float rs) {
  const uint32_t a = cvt_e4m3x2(__uint_as_float(w0 << 16) * rs, __uint_as_float(w0 & 0xFFFF0000u) * rs);
  const uint32_t b = cvt_e4m3x2(__uint_as_float(w1 << 16) * rs, __uint_as_float(w1 & 0xFFFF0000u) * rs);
  const uint32_t signs = __byte_perm(w0, w1, 0x7531) & 0x80808080u;
  return (a | (b << 16)) | signs;
}

// Tile with inf and no NaN: scale = inf, x / inf = +-0, +-inf / inf = NaN (0x7F).
__device__ __forceinline__ uint32_t quant4_inf_tile(uint32_t w0, uint32_t w1) {
  uint32_t out = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint32_t w = k < 2 ? w0 : w1;
    const uint32_t h = (k & 1) ? (w >> 16) : (w & 0xFFFFu);
    const uint32_t byte = (h & 0x7FFFu) == 0x7F80u ? 0x7Fu : ((h >> 8) & 0x80u);
    out |= byte << (8 * k);
  }
  return out;
}

// Eight bf16 values (bf16x2 words w) of a tile whose largest magnitude has the bf16 bits m -> eight e4m3
// bytes. A finite tile is multiplied by recip_scale() (called only then: it may also record the tile's
// scale); a tile with inf and no NaN keeps quant4_inf_tile's meaning; a tile with NaN is all NaN (0x7F).
template <typename RecipScale>
__device__ __forceinline__ uint4 quant8(const uint32_t (&w)[8], uint32_t m, RecipScale recip_scale) {
  uint4 q;
  if (m < 0x7F80u) {
    const float rs = recip_scale();
    q.x = quant4(w[0], w[1], rs);
    q.y = quant4(w[2], w[3], rs);
    q.z = quant4(w[4], w[5], rs);
    q.w = quant4(w[6], w[7], rs);
  } else if (m == 0x7F80u) {
    q.x = quant4_inf_tile(w[0], w[1]);
    q.y = quant4_inf_tile(w[2], w[3]);
    q.z = quant4_inf_tile(w[4], w[5]);
    q.w = quant4_inf_tile(w[6], w[7]);
  } else {
    q = make_uint4(0x7F7F7F7Fu, 0x7F7F7F7Fu, 0x7F7F7F7Fu, 0x7F7F7F7Fu);
  }
  return q;
}

// Quantizes one row (512 latent + 64 rope bf16 values) into a 656-byte record; whole warp calls it.
// dest() gives the record's address, or nullptr to skip the row (warp-uniform); it is called after the
// row's loads are issued, so that a write's slot lookup and its input loads are in flight together.
template <bool kStream, typename Dest>
__device__ __forceinline__ void quantize_row(const __nv_bfloat16* latent, const __nv_bfloat16* rope, Dest dest,
                                             int lane) {
  const uint4* src = reinterpret_cast<const uint4*>(latent) + 2 * lane;
  const uint4 a = load16<kStream>(src);
  const uint4 b = load16<kStream>(src + 1);
  uint4 r = make_uint4(0, 0, 0, 0);
  if (lane < 8) r = load16<kStream>(reinterpret_cast<const uint4*>(rope) + lane);
  uint8_t* const out = dest();
  if (out == nullptr) return;

  const uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) m = __vmaxu2(m, w[i] & 0x7FFF7FFFu);
  m = max(m & 0xFFFFu, m >> 16);
  m = max(m, __shfl_xor_sync(kFull, m, 1));
  m = max(m, __shfl_xor_sync(kFull, m, 2));
  m = max(m, __shfl_xor_sync(kFull, m, 4));
  const float scale = tile_scale(m);

  // 1 / 2^c exactly: exponent field 254 - (c + 127).
  const uint4 q = quant8(w, m, [&] { return __uint_as_float((254u << 23) - __float_as_uint(scale)); });
  const uint32_t sb = __float_as_uint(scale);
  const uint32_t s0 = __shfl_sync(kFull, sb, 0);
  const uint32_t s1 = __shfl_sync(kFull, sb, 8);
  const uint32_t s2 = __shfl_sync(kFull, sb, 16);
  const uint32_t s3 = __shfl_sync(kFull, sb, 24);

  store16<kStream>(out + 16 * lane, q);
  if (lane == 0) store16<kStream>(out + kLatent, make_uint4(s0, s1, s2, s3));
  if (lane < 8) store16<kStream>(out + kLatent + 16 + 16 * lane, r);
}

// c10's fp32 bit pattern of an fp8 NaN byte (0x7F / 0xFF).
__device__ __forceinline__ float c10_fp8_nan(uint32_t byte) {
  return __uint_as_float(((byte & 0x80u) << 24) | 0x7FF00000u);
}

__device__ __forceinline__ float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// 4 fp8 bytes -> 4 bf16 (two bf16x2 words) with scale s.
__device__ __forceinline__ uint2 dequant4(uint32_t w, float s, bool has_nan) {
  float f[4];
  uint32_t h01, h23;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h01) : "h"(static_cast<unsigned short>(w & 0xFFFFu)));
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h23) : "h"(static_cast<unsigned short>(w >> 16)));
  f[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(h01 & 0xFFFFu)));
  f[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(h01 >> 16)));
  f[2] = __half2float(__ushort_as_half(static_cast<unsigned short>(h23 & 0xFFFFu)));
  f[3] = __half2float(__ushort_as_half(static_cast<unsigned short>(h23 >> 16)));
  if (has_nan) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t byte = (w >> (8 * k)) & 0xFFu;
      if ((byte & 0x7Fu) == 0x7Fu) f[k] = c10_fp8_nan(byte);
    }
  }
  return make_uint2(pack_bf16x2(mul_rn(f[0], s), mul_rn(f[1], s)), pack_bf16x2(mul_rn(f[2], s), mul_rn(f[3], s)));
}

__device__ __forceinline__ bool has_fp8_nan(uint32_t w) {
  return (((w & 0x7F7F7F7Fu) + 0x01010101u) & 0x80808080u) != 0;
}

// Dequantizes one 656-byte record into 576 bf16 values; whole warp calls it.
template <bool kStream>
__device__ __forceinline__ void dequantize_row(const uint8_t* in, __nv_bfloat16* out, int lane) {
  const uint4 v = load16<kStream>(in + 16 * lane);
  const float s = *reinterpret_cast<const float*>(in + kLatent + 4 * (lane >> 3));
  uint4 r = make_uint4(0, 0, 0, 0);
  if (lane < 8) r = load16<kStream>(in + kLatent + 16 + 16 * lane);

  const bool nan = has_fp8_nan(v.x) || has_fp8_nan(v.y) || has_fp8_nan(v.z) || has_fp8_nan(v.w);
  uint2 o0, o1, o2, o3;
  if (!nan) {
    o0 = dequant4(v.x, s, false);
    o1 = dequant4(v.y, s, false);
    o2 = dequant4(v.z, s, false);
    o3 = dequant4(v.w, s, false);
  } else {
    o0 = dequant4(v.x, s, true);
    o1 = dequant4(v.y, s, true);
    o2 = dequant4(v.z, s, true);
    o3 = dequant4(v.w, s, true);
  }
  uint8_t* o = reinterpret_cast<uint8_t*>(out);
  store16<kStream>(o + 32 * lane, make_uint4(o0.x, o0.y, o1.x, o1.y));
  store16<kStream>(o + 32 * lane + 16, make_uint4(o2.x, o2.y, o3.x, o3.y));
  if (lane < 8) store16<kStream>(o + 2 * kLatent + 16 * lane, r);
}

// Destination of a token, or nullptr when its slot is skipped (warp-uniform). The write kernels call it
// after issuing the token's input loads: the slot load then overlaps them instead of preceding them.
// Page and position in the page of a token's slot (block < 0: the slot is skipped; warp-uniform).
struct SlotPosition {
  int64_t block, off;
};
__device__ __forceinline__ SlotPosition slot_position(const CacheWriteArgs& a, int64_t token) {
  const int64_t slot = a.slot_mapping[token];
  if (slot < 0 || slot >= a.num_slots) return {-1, 0};
  const int64_t block = slot / a.page_size;
  return {block, slot - block * a.page_size};
}

__device__ __forceinline__ uint8_t* slot_address(const CacheWriteArgs& a, int64_t token) {
  const SlotPosition s = slot_position(a, token);
  if (s.block < 0) return nullptr;
  return static_cast<uint8_t*>(a.cache) + s.block * a.block_stride + s.off * a.page_stride;
}

__global__ void __launch_bounds__(kThreads) concat_auto_kernel(const CacheWriteArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (token >= a.num_tokens) return;
  const uint8_t* c = static_cast<const uint8_t*>(a.kv_c) + token * a.kv_c_stride * 2;
  const uint8_t* p = static_cast<const uint8_t*>(a.k_pe) + token * a.k_pe_stride * 2;
  // 72 chunks of 16 bytes: 64 latent, 8 rope.
  const uint4 x0 = load16<false>(c + 16 * lane);
  const uint4 x1 = load16<false>(c + 16 * (lane + 32));
  uint4 x2 = make_uint4(0, 0, 0, 0);
  if (lane < 8) x2 = load16<false>(p + 16 * lane);
  uint8_t* dst = slot_address(a, token);
  if (dst == nullptr) return;
  store16<false>(dst + 16 * lane, x0);
  store16<false>(dst + 16 * (lane + 32), x1);
  if (lane < 8) store16<false>(dst + 2 * kLatent + 16 * lane, x2);
}

__global__ void __launch_bounds__(kThreads) concat_fp8_kernel(const CacheWriteArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (token >= a.num_tokens) return;
  const auto* c = static_cast<const __nv_bfloat16*>(a.kv_c) + token * a.kv_c_stride;
  const auto* p = static_cast<const __nv_bfloat16*>(a.k_pe) + token * a.k_pe_stride;
  quantize_row<false>(c, p, [&] { return slot_address(a, token); }, lane);
}

// ---------------------------------------------------------------- per-tensor e4m3 ("fp8")
//
// One warp per token. Lane l owns latent values 16l..16l+15 (two 16-byte loads, one 16-byte store at
// byte 16l of the row); lanes 0..3 also own RoPE values 16l..16l+15 (stored at byte 512 + 16l). Every
// thread reads the scale from device memory, so a captured graph uses the value at replay.
// Bit-exactness with quantize_per_tensor_e4m3 (torch_flashmla/kv_cache.py):
//  * 16-bit -> fp32 is exact (bf16: a shift; fp16: cvt.f32.f16, exact for every input);
//  * the quotient is div.rn.f32 (IEEE, no flush-to-zero), as torch's fp32 division on CPU and GPU;
//  * NaN quotients -> 0x7F; others clamped to +-448 by their magnitude bits (no fminf: it would drop
//    NaN and, under --use_fast_math, flush denormals), then cvt.rn.satfinite.e4m3x2 (RNE, the same as
//    c10's conversion for |q| <= 448); the quotient's sign bit is OR-ed in as c10 does (-tiny -> 0x80).

__device__ __forceinline__ float div_rn(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float clamp448(float q) {
  const uint32_t bits = __float_as_uint(q);
  return (bits & 0x7FFFFFFFu) > 0x43E00000u ? __uint_as_float((bits & 0x80000000u) | 0x43E00000u) : q;
}

__device__ __forceinline__ bool is_nan_bits(uint32_t bits) { return (bits & 0x7FFFFFFFu) > 0x7F800000u; }

// Two quotients -> two e4m3 bytes (lo in bits 0-7, hi in bits 8-15).
__device__ __forceinline__ uint32_t e4m3x2_sat(float lo, float hi) {
  const uint32_t bl = __float_as_uint(lo), bh = __float_as_uint(hi);
  uint32_t r = cvt_e4m3x2(clamp448(lo), clamp448(hi)) & 0xFFFFu;
  r |= ((bl >> 24) & 0x80u) | ((bh >> 16) & 0x8000u);
  if (is_nan_bits(bl)) r = (r & 0xFF00u) | 0x7Fu;
  if (is_nan_bits(bh)) r = (r & 0x00FFu) | 0x7F00u;
  return r;
}

template <bool kHalf>
__device__ __forceinline__ float lo16_to_float(uint32_t w) {
  if constexpr (kHalf) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xFFFFu)));
  } else {
    return __uint_as_float(w << 16);
  }
}

template <bool kHalf>
__device__ __forceinline__ float hi16_to_float(uint32_t w) {
  if constexpr (kHalf) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  } else {
    return __uint_as_float(w & 0xFFFF0000u);
  }
}

// 16 values in two 16-byte words -> 16 e4m3 bytes.
template <bool kHalf>
__device__ __forceinline__ uint4 quant16_scaled(uint4 a, uint4 b, float s) {
  const uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
  uint32_t o[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t p0 = e4m3x2_sat(div_rn(lo16_to_float<kHalf>(w[2 * i]), s), div_rn(hi16_to_float<kHalf>(w[2 * i]), s));
    const uint32_t p1 =
        e4m3x2_sat(div_rn(lo16_to_float<kHalf>(w[2 * i + 1]), s), div_rn(hi16_to_float<kHalf>(w[2 * i + 1]), s));
    o[i] = p0 | (p1 << 16);
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

template <bool kHalf>
__global__ void __launch_bounds__(kThreads) concat_fp8_scaled_kernel(const CacheWriteArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (token >= a.num_tokens) return;
  const float s = *a.scale;
  const uint8_t* c = static_cast<const uint8_t*>(a.kv_c) + token * a.kv_c_stride * 2;
  const uint8_t* p = static_cast<const uint8_t*>(a.k_pe) + token * a.k_pe_stride * 2;
  const uint4 x0 = load16<false>(c + 32 * lane);
  const uint4 x1 = load16<false>(c + 32 * lane + 16);
  uint4 r0 = make_uint4(0, 0, 0, 0), r1 = r0;
  if (lane < kRope / 16) {
    r0 = load16<false>(p + 32 * lane);
    r1 = load16<false>(p + 32 * lane + 16);
  }
  uint8_t* dst = slot_address(a, token);
  if (dst == nullptr) return;
  store16<false>(dst + 16 * lane, quant16_scaled<kHalf>(x0, x1, s));
  if (lane < kRope / 16) store16<false>(dst + kLatent + 16 * lane, quant16_scaled<kHalf>(r0, r1, s));
}

__global__ void __launch_bounds__(kThreads)
    quantize_kernel(const __nv_bfloat16* __restrict__ in, int64_t in_stride, uint8_t* __restrict__ out,
                    int64_t num_rows) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= num_rows) return;
  const __nv_bfloat16* x = in + row * in_stride;
  quantize_row<true>(x, x + kLatent, [&] { return out + row * kRecord; }, lane);
}

__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(const uint8_t* __restrict__ in, int64_t in_stride, __nv_bfloat16* __restrict__ out,
                      int64_t num_rows) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= num_rows) return;
  dequantize_row<true>(in + row * in_stride, out + row * kRow, lane);
}

// ---------------------------------------------------------------- DeepSeek V4 ("MODEL1") pages
//
// One warp per token. Lanes 0..27 own latent values 16l..16l+15 (tile l/4 of 64 values: 4 lanes reduce
// their amax with 2 xor-shuffles) and write 16 fp8 bytes at 576*t + 16l; lanes 28..31 move the rope
// (32 bytes each, 576*t + 448 + 32*(l-28)); lane 0 writes the 8 scale bytes at 576*P + 8*t. The cache
// side is only 8-byte aligned in general (page strides are multiples of 8), so 16-byte accesses there
// check the (warp-uniform) alignment and fall back to two 8-byte ones.
// Scale byte: the exponent k of tile_scale's rule (smallest 2^k >= amax / 448, k >= -13) + 127;
// 0xFF (UE8M0 NaN) for a tile with NaN or inf. Values as in the V3.2 record.
// Dequantize: fp8 (exact, hardware cvt) * 2^(byte - 127) in mul.rn.f32 (no flush-to-zero), RNE to bf16;
// every NaN result becomes 0x7FFF, the reference's one NaN encoding.

constexpr int kV4Lanes = kV4Nope / 16;  // 28 lanes hold latent values

__device__ __forceinline__ uint2 load8(const uint8_t* p) { return *reinterpret_cast<const uint2*>(p); }

template <bool kStream>
__device__ __forceinline__ uint4 load16_any(const uint8_t* p) {
  if ((reinterpret_cast<uintptr_t>(p) & 15u) == 0) return load16<kStream>(p);
  const uint2 a = load8(p), b = load8(p + 8);
  return make_uint4(a.x, a.y, b.x, b.y);
}

template <bool kStream>
__device__ __forceinline__ void store16_any(uint8_t* p, uint4 v) {
  if ((reinterpret_cast<uintptr_t>(p) & 15u) == 0) {
    store16<kStream>(p, v);
  } else {
    *reinterpret_cast<uint2*>(p) = make_uint2(v.x, v.y);
    *reinterpret_cast<uint2*>(p + 8) = make_uint2(v.z, v.w);
  }
}

// Exponent k of the tile scale 2^k from the bf16 bits of amax (finite): see tile_scale.
__device__ __forceinline__ int tile_scale_exp(uint32_t amax16) {
  const int biased = static_cast<int>(amax16 >> 7);
  const int mantissa = static_cast<int>(amax16 & 0x7Fu);
  const int k = biased == 0 ? kMinScaleExp : biased - 135 + (mantissa > 96 ? 1 : 0);
  return k < kMinScaleExp ? kMinScaleExp : k;                     // k in [-13, 120]
}

// Where a V4 token goes: its 576 data bytes and its 8 scale bytes (data == nullptr: skipped).
struct V4Dest {
  uint8_t* data;
  uint8_t* scales;
};

// Token `off` of the page at `page` (page_size tokens).
__device__ __forceinline__ V4Dest v4_dest(uint8_t* page, int64_t page_size, int64_t off) {
  return {page + off * kV4Data, page + page_size * kV4Data + off * kV4Scales};
}

// One token: latent [448] and rope [64] bf16 (16-byte aligned) -> 576 bytes at dest().data, 8 at
// dest().scales. dest() is called after the loads are issued (see quantize_row).
template <bool kStream, typename Dest>
__device__ __forceinline__ void quantize_token_v4(const __nv_bfloat16* latent, const __nv_bfloat16* rope, Dest dest,
                                                  int lane) {
  const uint4* src = lane < kV4Lanes ? reinterpret_cast<const uint4*>(latent) + 2 * lane
                                     : reinterpret_cast<const uint4*>(rope) + 2 * (lane - kV4Lanes);
  const uint4 a = load16<kStream>(src);
  const uint4 b = load16<kStream>(src + 1);
  const V4Dest d = dest();
  if (d.data == nullptr) return;
  uint8_t* const data = d.data;
  uint8_t* const scales = d.scales;
  const uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
  uint32_t m = 0;
  if (lane < kV4Lanes) {
#pragma unroll
    for (int i = 0; i < 8; ++i) m = __vmaxu2(m, w[i] & 0x7FFF7FFFu);
    m = max(m & 0xFFFFu, m >> 16);
  }
  m = max(m, __shfl_xor_sync(kFull, m, 1));
  m = max(m, __shfl_xor_sync(kFull, m, 2));

  uint32_t scale_byte = 0xFFu;  // a non-finite tile keeps 0xFF
  const uint4 q = quant8(w, m, [&] {
    const int k = tile_scale_exp(m);
    scale_byte = static_cast<uint32_t>(k + 127);
    return __uint_as_float(static_cast<uint32_t>(127 - k) << 23);  // 2^-k exactly
  });
  uint32_t lo = 0, hi = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) lo |= __shfl_sync(kFull, scale_byte, 4 * j) << (8 * j);
#pragma unroll
  for (int j = 4; j < 7; ++j) hi |= __shfl_sync(kFull, scale_byte, 4 * j) << (8 * (j - 4));

  if (lane < kV4Lanes) {
    store16_any<kStream>(data + 16 * lane, q);
  } else {
    uint8_t* dst = data + kV4Nope + 32 * (lane - kV4Lanes);
    store16_any<kStream>(dst, a);
    store16_any<kStream>(dst + 16, b);
  }
  if (lane == 0) *reinterpret_cast<uint2*>(scales) = make_uint2(lo, hi);
}

__device__ __forceinline__ uint32_t canonical_nan_bf16x2(uint32_t w) {
  uint32_t lo = w & 0xFFFFu, hi = w >> 16;
  if ((lo & 0x7FFFu) > 0x7F80u) lo = 0x7FFFu;
  if ((hi & 0x7FFFu) > 0x7F80u) hi = 0x7FFFu;
  return lo | (hi << 16);
}

// One token: 576 bytes at data, 8 at scales -> out [512] bf16 (16-byte aligned).
template <bool kStream>
__device__ __forceinline__ void dequantize_token_v4(const uint8_t* data, const uint8_t* scales, __nv_bfloat16* out,
                                                    int lane) {
  uint8_t* o = reinterpret_cast<uint8_t*>(out);
  if (lane < kV4Lanes) {
    const uint4 v = load16_any<kStream>(data + 16 * lane);
    const uint32_t sb = scales[lane >> 2];
    const float s = sb == 0xFFu ? __uint_as_float(0x7FFFFFFFu)
                                : __uint_as_float(sb == 0 ? 0x00400000u : (sb << 23));  // 2^(sb - 127)
    uint2 o0 = dequant4(v.x, s, false);
    uint2 o1 = dequant4(v.y, s, false);
    uint2 o2 = dequant4(v.z, s, false);
    uint2 o3 = dequant4(v.w, s, false);
    if (sb == 0xFFu || has_fp8_nan(v.x) || has_fp8_nan(v.y) || has_fp8_nan(v.z) || has_fp8_nan(v.w)) {
      o0 = make_uint2(canonical_nan_bf16x2(o0.x), canonical_nan_bf16x2(o0.y));
      o1 = make_uint2(canonical_nan_bf16x2(o1.x), canonical_nan_bf16x2(o1.y));
      o2 = make_uint2(canonical_nan_bf16x2(o2.x), canonical_nan_bf16x2(o2.y));
      o3 = make_uint2(canonical_nan_bf16x2(o3.x), canonical_nan_bf16x2(o3.y));
    }
    store16<kStream>(o + 32 * lane, make_uint4(o0.x, o0.y, o1.x, o1.y));
    store16<kStream>(o + 32 * lane + 16, make_uint4(o2.x, o2.y, o3.x, o3.y));
  } else {
    const uint8_t* src = data + kV4Nope + 32 * (lane - kV4Lanes);
    const uint4 a = load16_any<kStream>(src);
    const uint4 b = load16_any<kStream>(src + 16);
    store16<kStream>(o + 2 * kV4Nope + 32 * (lane - kV4Lanes), a);
    store16<kStream>(o + 2 * kV4Nope + 32 * (lane - kV4Lanes) + 16, b);
  }
}

__global__ void __launch_bounds__(kThreads) concat_fp8_v4_kernel(const CacheWriteArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (token >= a.num_tokens) return;
  const auto* c = static_cast<const __nv_bfloat16*>(a.kv_c) + token * a.kv_c_stride;
  const auto* p = static_cast<const __nv_bfloat16*>(a.k_pe) + token * a.k_pe_stride;
  quantize_token_v4<false>(c, p, [&] {
    const SlotPosition s = slot_position(a, token);
    if (s.block < 0) return V4Dest{nullptr, nullptr};
    return v4_dest(static_cast<uint8_t*>(a.cache) + s.block * a.block_stride, a.page_size, s.off);
  }, lane);
}

__global__ void __launch_bounds__(kThreads)
    quantize_v4_kernel(const __nv_bfloat16* __restrict__ in, int64_t in_stride, uint8_t* __restrict__ cache,
                       int64_t num_blocks, int64_t page_size, int64_t page_stride) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= num_blocks * page_size) return;
  const int64_t block = row / page_size;
  const int64_t off = row - block * page_size;
  uint8_t* page = cache + block * page_stride;
  const __nv_bfloat16* x = in + row * in_stride;
  quantize_token_v4<true>(x, x + kV4Nope, [&] { return v4_dest(page, page_size, off); }, lane);
  if (off == page_size - 1 && block + 1 < num_blocks) {  // zero the padding up to the next page
    for (int64_t i = page_size * kV4Token + 8 * lane; i < page_stride; i += 8 * 32) {
      *reinterpret_cast<uint2*>(page + i) = make_uint2(0, 0);
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    dequantize_v4_kernel(const uint8_t* __restrict__ cache, int64_t num_blocks, int64_t page_size, int64_t page_stride,
                         __nv_bfloat16* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= num_blocks * page_size) return;
  const int64_t block = row / page_size;
  const int64_t off = row - block * page_size;
  const uint8_t* page = cache + block * page_stride;
  const V4Dest src = v4_dest(const_cast<uint8_t*>(page), page_size, off);
  dequantize_token_v4<true>(src.data, src.scales, out + row * kV4Qk, lane);
}

inline unsigned grid_for(int64_t rows) {
  return static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

}  // namespace

void launch_concat_and_cache_auto(const CacheWriteArgs& args, cudaStream_t stream) {
  if (args.num_tokens <= 0) return;
  concat_auto_kernel<<<grid_for(args.num_tokens), kThreads, 0, stream>>>(args);
}

void launch_concat_and_cache_fp8(const CacheWriteArgs& args, cudaStream_t stream) {
  if (args.num_tokens <= 0) return;
  concat_fp8_kernel<<<grid_for(args.num_tokens), kThreads, 0, stream>>>(args);
}

void launch_concat_and_cache_fp8_scaled(const CacheWriteArgs& args, bool is_half, cudaStream_t stream) {
  if (args.num_tokens <= 0) return;
  if (is_half) {
    concat_fp8_scaled_kernel<true><<<grid_for(args.num_tokens), kThreads, 0, stream>>>(args);
  } else {
    concat_fp8_scaled_kernel<false><<<grid_for(args.num_tokens), kThreads, 0, stream>>>(args);
  }
}

void launch_quantize_kv_fp8(const void* in, int64_t in_stride, void* out, int64_t num_rows, cudaStream_t stream) {
  if (num_rows <= 0) return;
  quantize_kernel<<<grid_for(num_rows), kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(in), in_stride,
                                                               static_cast<uint8_t*>(out), num_rows);
}

void launch_dequantize_kv_fp8(const void* in, int64_t in_stride, void* out, int64_t num_rows, cudaStream_t stream) {
  if (num_rows <= 0) return;
  dequantize_kernel<<<grid_for(num_rows), kThreads, 0, stream>>>(static_cast<const uint8_t*>(in), in_stride,
                                                                 static_cast<__nv_bfloat16*>(out), num_rows);
}

void launch_concat_and_cache_fp8_v4(const CacheWriteArgs& args, cudaStream_t stream) {
  if (args.num_tokens <= 0) return;
  concat_fp8_v4_kernel<<<grid_for(args.num_tokens), kThreads, 0, stream>>>(args);
}

void launch_quantize_kv_fp8_v4(const void* in, int64_t in_stride, void* cache, int64_t num_blocks,
                               int64_t page_size, int64_t page_stride, cudaStream_t stream) {
  if (num_blocks * page_size <= 0) return;
  quantize_v4_kernel<<<grid_for(num_blocks * page_size), kThreads, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(in), in_stride, static_cast<uint8_t*>(cache), num_blocks, page_size,
      page_stride);
}

void launch_dequantize_kv_fp8_v4(const void* cache, int64_t num_blocks, int64_t page_size, int64_t page_stride,
                                 void* out, cudaStream_t stream) {
  if (num_blocks * page_size <= 0) return;
  dequantize_v4_kernel<<<grid_for(num_blocks * page_size), kThreads, 0, stream>>>(
      static_cast<const uint8_t*>(cache), num_blocks, page_size, page_stride, static_cast<__nv_bfloat16*>(out));
}

}  // namespace kv_cache
}  // namespace flashmla
