// Helpers of the SM90 kernels with transposed products (S^T = K Q^T, O^T = V^T P^T): the chunk's tokens
// are the M dimension of the products and the query rows (heads) their N, so that a few query rows do not
// pad a 64-row tile. Used by the few-head sparse decode kernel and the 32-row dense decode kernels (16-bit
// and FP8).
#pragma once
#include <math.h>

#include "sm90/common/sm90_ptx.h"

namespace flashmla {
namespace sm90 {

// Combines each of a thread's kN / 4 per-row values over the 64 tokens of the chunk with Op (max or +):
// over the quads of the warp by shuffles, then over the 4 warps of the warpgroup through buf ([4][kN]
// floats, written by lanes 0-3; named barrier bar_id of the warpgroup's 128 threads). A thread's values are
// those of rows 8 j + 2 (lane % 4) + e at index 2 j + e (the columns of its m64nN accumulators). Every
// thread ends with the totals of its rows; callers keep reuses of buf apart.
// (A function template, not a generic lambda: cudafe++ of nvcc 13.0 crashes on the lambda in host compilation.)
// Op::start(own) is where the sum over the 4 warps' entries starts (the own value is one of them).
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
  __device__ __forceinline__ float start(float own) const { return own; }
};
struct AddOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
  __device__ __forceinline__ float start(float) const { return 0.f; }
};
template <int kN, typename Op>
__device__ __forceinline__ void reduce_over_tokens(float (&v)[kN / 4], float* buf, int warp, int lane, uint32_t bar_id,
                                                   Op op) {
  constexpr int kJ = kN / 8;
  constexpr int kH = kN / 4;
  const int quad = lane % 4;
#pragma unroll
  for (int sh = 4; sh <= 16; sh *= 2)
#pragma unroll
    for (int k = 0; k < kH; ++k) v[k] = op(v[k], __shfl_xor_sync(0xffffffffu, v[k], sh));
  if (lane < 4) {
#pragma unroll
    for (int j = 0; j < kJ; ++j)
      *reinterpret_cast<float2*>(buf + warp * kN + 8 * j + 2 * quad) = make_float2(v[2 * j], v[2 * j + 1]);
  }
  named_bar_sync(bar_id, 128);
#pragma unroll
  for (int j = 0; j < kJ; ++j) {
    float2 acc = make_float2(op.start(v[2 * j]), op.start(v[2 * j + 1]));
#pragma unroll
    for (int w2 = 0; w2 < 4; ++w2) {
      const float2 x = *reinterpret_cast<const float2*>(buf + w2 * kN + 8 * j + 2 * quad);
      acc.x = op(acc.x, x.x);
      acc.y = op(acc.y, x.y);
    }
    v[2 * j] = acc.x;
    v[2 * j + 1] = acc.y;
  }
}

// Four 8x8 16-bit matrices stored transposed (stmatrix .trans): lane l gives the row address of matrix l / 8.
// The kernels write P^T with it from S^T's accumulator layout (a thread's pair of rows of one token).
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0),
               "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}

}  // namespace sm90
}  // namespace flashmla
