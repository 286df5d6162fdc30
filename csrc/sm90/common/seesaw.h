// Softmax and P-handling helpers of the SM90 "seesaw" attention kernels (two math warpgroups, each
// owning half of the 64 x 512 output, sharing the running row max through shared memory): P fragments
// in the m64k16 A layout, P tiles in 128B-swizzled 64x64 shared-memory tiles, the slack-max update and
// the exp/rescale steps. Used by the dense decode and the sparse prefill kernels; the MHA prefill kernel
// uses the max update and the exp/rescale steps.
#pragma once
#include <cstdint>
#include <math.h>

#include "sm90/common/sm90_ptx.h"

namespace flashmla {
namespace sm90 {

// Byte offset, inside a swizzled 64x64 tile, of the 4 bytes that register `reg` of k-step kk holds in
// the m64k16 A-fragment layout (also the layout of two adjacent accumulator columns): registers 0/2
// hold row0, 1/3 hold row0 + 8; registers 2/3 are 8 columns to the right of 0/1.
__device__ __forceinline__ uint32_t frag_offset(int row0, int quad, int kk, int reg) {
  return swz(row0 + (reg & 1) * 8, 2 * kk + (reg >> 1)) + quad * 4;
}

// valid(col, row_half) of the exp steps: whether this thread's score in column col of the tile (16 kk +
// 8 (reg >> 1) + e in fragment terms, e in {0, 1}; the thread's quad offset not included) of row row0
// (row_half 0) or row0 + 8 (1) counts; a score that does not gives P = 0, whatever its value (NaN
// included).
struct AllValid {
  __device__ __forceinline__ bool operator()(int, int) const { return true; }
};

// S (m64n(16 KK) accumulators) -> bf16/fp16 A fragments of the PV product (kResidue: what the first
// rounding left, the second term of P = hi + lo).
template <typename T, bool kResidue, int KK, int NS>
__device__ __forceinline__ void pack_p(uint32_t (&pa)[KK][4], const float (&s)[NS]) {
  static_assert(NS == 8 * KK, "one k-step of P is 8 accumulators of S per thread");
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) {
#pragma unroll
    for (int reg = 0; reg < 4; ++reg) {
      const float x = s[8 * kk + 2 * reg], y = s[8 * kk + 2 * reg + 1];
      pa[kk][reg] = kResidue ? TypeOps<T>::pack_residue(x, y) : TypeOps<T>::pack(x, y);
    }
  }
}

// Returns x, hidden from the optimizer, so that addresses derived from it are recomputed at each use
// instead of being hoisted out of the chunk loop into 16 live registers.
__device__ __forceinline__ uint32_t opaque(uint32_t x) {
  asm volatile("" : "+r"(x));
  return x;
}

// P fragments -> a swizzled 64x64 tile: frag_offset(row0, quad, kk, reg) split into a per-thread row part
// and a column part (row0 + 8 has the swizzle phase of row0), with the row part hidden from the
// optimizer so that the 16 addresses are not hoisted into live registers.
__device__ __forceinline__ void store_p(uint32_t tile, const uint32_t (&pa)[4][4], int row0, int quad) {
  const uint32_t row_part = opaque(tile + row0 * 128 + quad * 4);
  const uint32_t phase = (row0 & 7) << 4;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int reg = 0; reg < 4; ++reg) {
      const uint32_t addr = row_part + (reg & 1) * 1024 + ((((2 * kk + (reg >> 1)) << 4)) ^ phase);
      asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(pa[kk][reg]) : "memory");
    }
}

// O += P V[:, half] with P from registers (A fragments). Committed, not waited for.
template <typename T>
__device__ __forceinline__ void pv_regs(float (&o)[128], const uint32_t (&pa)[4][4], uint32_t v_half) {
  const uint64_t desc_v = desc_sw128(v_half, 64 * 128, 1024);
  fence_all(o);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) TypeOps<T>::pv_r(o, pa[kk], desc_add(desc_v, kk * 16 * 128), 1);
  wgmma_commit();
}

// Output stores from the accumulator layout. In an m64nN accumulator, the 4 lanes of a quad hold 8
// adjacent columns of a row, 2 per lane: as bf16, a 4-byte piece each, so a warp's store instruction
// touches 8 rows with 16 bytes (half a sector) per row. Exchanging the pieces inside the quad first gives
// each lane 16 contiguous bytes: 4x fewer store instructions, full 32-byte sectors.

// 4x4 transpose of 32-bit words across the lanes of a quad: afterwards word k of lane q is what word q
// of lane k was. With w[k] = lane q's bf16 pair of column block j0 + k, lane q then holds the 16 bytes
// (8 columns) of block j0 + q in column order.
__device__ __forceinline__ void quad_transpose(uint32_t (&w)[4], int quad) {
  const bool hi = quad & 2, odd = quad & 1;
  // Over lane bit 1: a lane replaces its words whose index bit 1 differs from its lane bit 1 by the
  // partner's words of index ^ 2; then the same over bit 0.
  uint32_t x = __shfl_xor_sync(0xffffffffu, hi ? w[0] : w[2], 2);
  uint32_t y = __shfl_xor_sync(0xffffffffu, hi ? w[1] : w[3], 2);
  if (hi) {
    w[0] = x, w[1] = y;
  } else {
    w[2] = x, w[3] = y;
  }
  x = __shfl_xor_sync(0xffffffffu, odd ? w[0] : w[1], 1);
  y = __shfl_xor_sync(0xffffffffu, odd ? w[2] : w[3], 1);
  if (odd) {
    w[0] = x, w[2] = y;
  } else {
    w[1] = x, w[3] = y;
  }
}

// This thread's two rows of an m64nN accumulator o (N = 2 * len(o) columns; quad = lane % 4), scaled by
// scale0 / scale1, as 16-bit values (TypeOps<T>::pack) into rows dst0 / dst1 (the accumulator's first
// column; 16-byte aligned), after quad_transpose: 16-byte stores, one per 8 columns of a row. A row whose ok
// flag is false is not written (the exchange still runs in every lane).
template <typename T, typename OutT, int NO>
__device__ __forceinline__ void store_rows_16bit(OutT* dst0, OutT* dst1, const float (&o)[NO], float scale0,
                                                 float scale1, bool ok0, bool ok1, int quad) {
  static_assert(NO % 16 == 0, "whole groups of 4 column blocks");
  uint4* row0 = reinterpret_cast<uint4*>(dst0 + quad * 8);
  uint4* row1 = reinterpret_cast<uint4*>(dst1 + quad * 8);
#pragma unroll
  for (int g4 = 0; g4 < NO / 16; ++g4) {  // column blocks 4 g4 .. 4 g4 + 3 (8 columns each)
    uint32_t w0[4], w1[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int j = 4 * g4 + k;
      w0[k] = TypeOps<T>::pack(o[j * 4] * scale0, o[j * 4 + 1] * scale0);
      w1[k] = TypeOps<T>::pack(o[j * 4 + 2] * scale1, o[j * 4 + 3] * scale1);
    }
    quad_transpose(w0, quad);
    quad_transpose(w1, quad);
    if (ok0) row0[g4 * 4] = make_uint4(w0[0], w0[1], w0[2], w0[3]);  // columns 32 g4 + 8 quad .. + 7
    if (ok1) row1[g4 * 4] = make_uint4(w1[0], w1[1], w1[2], w1[3]);
  }
}

// The same rows as fp32 (split partials): a quad's 8-byte pieces already fill a 32-byte sector per row,
// so they are stored as they are (an exchange there spilled in the sparse decode kernel).
__device__ __forceinline__ void store_rows_f32(float* dst0, float* dst1, const float (&o)[128], float scale0,
                                               float scale1, bool ok0, bool ok1, int quad) {
  dst0 += quad * 2;
  dst1 += quad * 2;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    if (ok0) *reinterpret_cast<float2*>(dst0 + j * 8) = make_float2(o[j * 4] * scale0, o[j * 4 + 1] * scale0);
    if (ok1) *reinterpret_cast<float2*>(dst1 + j * 8) = make_float2(o[j * 4 + 2] * scale1, o[j * 4 + 3] * scale1);
  }
}

// Keeps register A operands alive and unchanged up to this point: call after the wgmma_wait that
// retires the products reading them (the compiler does not know wgmma reads them asynchronously).
template <int KK>
__device__ __forceinline__ void fence_frags(uint32_t (&a)[KK][4]) {
#pragma unroll
  for (int kk = 0; kk < KK; ++kk)
#pragma unroll
    for (int reg = 0; reg < 4; ++reg) asm volatile("" : "+r"(a[kk][reg])::"memory");
}

// Running max of this thread's two rows after a chunk with row maxima mx0 / mx1 (log2 domain): the
// new max, the exp2 base (0 for rows with no token yet, so that -inf - -inf never occurs) and the
// factor that brings sums and O from the old max to the new one.
//
// The running max only moves when a chunk exceeds it by more than kMaxSlack (log2 units): P then stays
// <= 2^kMaxSlack = 256 (exact in bf16/fp16, with the same relative rounding as P <= 1), sums and O stay
// far from fp32 overflow, and the factor is exactly 1 in almost every chunk after the first, so that
// rescale_rows skips its 128 multiplies per thread (a warp-uniform test) and the warpgroups reach their
// next product sooner. Outputs and lse are normalised by the same max, so they do not change.
constexpr float kMaxSlack = 8.f;
struct MaxUpdate {
  float max0, max1, base0, base1, scale0, scale1;
};
__device__ __forceinline__ MaxUpdate update_max(float old0, float old1, float mx0, float mx1) {
  MaxUpdate u;
  u.max0 = mx0 > old0 + kMaxSlack ? mx0 : old0;  // old = -inf: any finite mx moves it
  u.max1 = mx1 > old1 + kMaxSlack ? mx1 : old1;
  u.base0 = u.max0 == -INFINITY ? 0.f : u.max0;
  u.base1 = u.max1 == -INFINITY ? 0.f : u.max1;
  u.scale0 = exp2f(old0 - u.base0);
  u.scale1 = exp2f(old1 - u.base1);
  return u;
}

// The seesaw warpgroups share the running max through shared memory: each quad reads its two rows,
// then lane 0 of the quad writes the new max and the factor for the other warpgroup.
__device__ __forceinline__ MaxUpdate update_shared_max(float* s_max, float* s_scale, int row0, int row1, int quad,
                                                       float mx0, float mx1) {
  const MaxUpdate u = update_max(s_max[row0], s_max[row1], mx0, mx1);
  __syncwarp();  // the quad's reads of s_max are done
  if (quad == 0) {
    s_max[row0] = u.max0;
    s_max[row1] = u.max1;
    s_scale[row0] = u.scale0;
    s_scale[row1] = u.scale1;
  }
  return u;
}

// P = exp2(S * scale_log2 - base) in place (base 0 for rows with no token yet); returns the row sums
// of this thread.
template <int NS, typename Valid = AllValid>
__device__ __forceinline__ void exp_rows(float (&s)[NS], float scale_log2, float base0, float base1, float& sum0,
                                         float& sum1, Valid valid = {}) {
  sum0 = 0.f;
  sum1 = 0.f;
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    const bool top = (i % 4) < 2;
    s[i] = valid((i / 4) * 8 + i % 2, top ? 0 : 1) ? exp2f(fmaf(s[i], scale_log2, -(top ? base0 : base1))) : 0.f;
    if (top) sum0 += s[i]; else sum1 += s[i];
  }
}

// P = exp2(S * scale_log2 - base) straight into the A fragments of the PV product, with this thread's
// row sums; S is only read. Used while a product into O is in flight: writing S (an accumulator of the
// QK products) there would make ptxas serialize every wgmma of the kernel.
// KK k-steps of 16 columns: S m64n(16 KK), s[8 KK] per thread (64-key chunks: KK = 4; 128-key blocks: 8).
template <typename T, int KK, int NS, typename Valid = AllValid>
__device__ __forceinline__ void exp_pack(uint32_t (&pa)[KK][4], const float (&s)[NS], float scale_log2, float base0,
                                         float base1, float& sum0, float& sum1, Valid valid = {}) {
  static_assert(NS == 8 * KK, "one k-step of P is 8 accumulators of S per thread");
  sum0 = 0.f;
  sum1 = 0.f;
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) {
#pragma unroll
    for (int reg = 0; reg < 4; ++reg) {
      const float base = reg & 1 ? base1 : base0;
      const int col = 16 * kk + 8 * (reg >> 1);
      const float x = valid(col, reg & 1) ? exp2f(fmaf(s[8 * kk + 2 * reg], scale_log2, -base)) : 0.f;
      const float y = valid(col + 1, reg & 1) ? exp2f(fmaf(s[8 * kk + 2 * reg + 1], scale_log2, -base)) : 0.f;
      if (reg & 1) sum1 += x + y; else sum0 += x + y;
      pa[kk][reg] = TypeOps<T>::pack(x, y);
    }
  }
}

// O and this thread's row sums brought to a new max by the factors f0 / f1.
template <int N>
__device__ __forceinline__ void rescale_acc(float (&o)[N], float& l0, float& l1, float f0, float f1) {
  rescale_rows(o, f0, f1);
  l0 *= f0;
  l1 *= f1;
}

// The same after a chunk of this warpgroup's own, whose row sums (relative to the new max) are added.
template <int N>
__device__ __forceinline__ void rescale_add(float (&o)[N], float& l0, float& l1, const MaxUpdate& u, float sum0,
                                            float sum1) {
  l0 = l0 * u.scale0 + sum0;
  l1 = l1 * u.scale1 + sum1;
  rescale_rows(o, u.scale0, u.scale1);
}

// The softmax step of a warpgroup that owns its chunk: P = exp2(S - base), row sums and O brought to
// the new max.
__device__ __forceinline__ void exp_rescale(float (&s)[32], float (&o)[128], float& l0, float& l1, float scale_log2,
                                            const MaxUpdate& u) {
  float sum0, sum1;
  exp_rows(s, scale_log2, u.base0, u.base1, sum0, sum1);
  rescale_add(o, l0, l1, u, sum0, sum1);
}

}  // namespace sm90
}  // namespace flashmla
