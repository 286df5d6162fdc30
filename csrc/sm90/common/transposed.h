// Helpers of the SM90 kernels with transposed products (S^T = K Q^T, O^T = V^T P^T): the chunk's tokens
// are the M dimension of the products and the query rows (heads) their N, so that a few query rows do not
// pad a 64-row tile. Used by the few-head sparse decode kernel and the 32-row dense decode kernels (16-bit
// and FP8).
#pragma once
#include <math.h>

#include "sm90/common/seesaw.h"
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

// The online softmax down the columns: a thread holds the scores S^T of tokens tok and tok + 8 for its kN / 4
// columns (accumulator elements 4 j + e and 4 j + 2 + e for column index k = 2 j + e, query row / head
// 8 j + 2 (lane % 4) + e).
//
// Scores -> log2 domain (times scale(k)), -inf for a token that is not valid or that its column does not attend
// (attends(k, t, in0, in1): whether column k attends tokens t and t + 8 of the chunk, i.e. they are before its
// limit); mx[k] = the thread's maximum of column k, before the reduction over the chunk's tokens
// (reduce_over_tokens).
template <int kN, typename Attends, typename Scale>
__device__ __forceinline__ void mask_scale_columns(float (&s)[kN / 2], bool valid0, bool valid1, int tok,
                                                   const Attends& attends, const Scale& scale, float (&mx)[kN / 4]) {
#pragma unroll
  for (int j = 0; j < kN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int k = 2 * j + e;
      float& a = s[4 * j + e];      // token tok
      float& b = s[4 * j + 2 + e];  // token tok + 8
      bool in0, in1;
      attends(k, tok, in0, in1);
      a = valid0 && in0 ? a * scale(k) : -INFINITY;
      b = valid1 && in1 ? b * scale(k) : -INFINITY;
      mx[k] = fmaxf(a, b);
    }
}
// attends of the callers without per-column limits, and their scale(k).
struct AllAttended {
  __device__ __forceinline__ void operator()(int, int, bool& in0, bool& in1) const { in0 = in1 = true; }
};
struct UniformScale {
  float value;
  __device__ __forceinline__ float operator()(int) const { return value; }
};

// The running column maxima after a chunk's maxima mx (update_max, as the 64-row kernels: a maximum moves only
// past the slack), the base each column's exponentials take and the factor alpha its earlier sums and O^T take.
template <int kH>
__device__ __forceinline__ void update_column_maxima(float (&run_max)[kH], const float (&mx)[kH], float (&base)[kH],
                                                     float (&alpha)[kH]) {
#pragma unroll
  for (int j = 0; j < kH / 2; ++j) {
    const MaxUpdate u = update_max(run_max[2 * j], run_max[2 * j + 1], mx[2 * j], mx[2 * j + 1]);
    run_max[2 * j] = u.max0, run_max[2 * j + 1] = u.max1;
    base[2 * j] = u.base0, base[2 * j + 1] = u.base1;
    alpha[2 * j] = u.scale0, alpha[2 * j + 1] = u.scale1;
  }
}

// P^T = exp2(S^T - base) in place, and the column sums: run_sum = run_sum * alpha + the thread's two values.
template <int kN>
__device__ __forceinline__ void exp_columns(float (&s)[kN / 2], const float (&base)[kN / 4], const float (&alpha)[kN / 4],
                                            float (&run_sum)[kN / 4]) {
#pragma unroll
  for (int j = 0; j < kN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int k = 2 * j + e;
      s[4 * j + e] = exp2f(s[4 * j + e] - base[k]);
      s[4 * j + 2 + e] = exp2f(s[4 * j + 2 + e] - base[k]);
      run_sum[k] = run_sum[k] * alpha[k] + (s[4 * j + e] + s[4 * j + 2 + e]);
    }
}

// O^T's columns (kMTiles m64 tiles) times alpha, skipped when no column of the warp changes.
template <int kN, int kMTiles = 8>
__device__ __forceinline__ void rescale_columns(float (&o)[kMTiles][kN / 2], const float (&alpha)[kN / 4],
                                                bool rescale) {
  if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
    for (int i = 0; i < kMTiles; ++i)
#pragma unroll
      for (int j = 0; j < kN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          o[i][4 * j + e] *= alpha[2 * j + e];
          o[i][4 * j + 2 + e] *= alpha[2 * j + e];
        }
  }
}

// The same with the factors another warpgroup wrote to shared memory, s_alpha[n] for query row (column) n: a
// thread's columns are 8 j + 2 quad + {0, 1} (the FP8 dense kernels' product warpgroups).
template <int kN, int kMTiles = 8>
__device__ __forceinline__ void rescale_columns(float (&o)[kMTiles][kN / 2], const float* s_alpha, int quad) {
  float alpha[kN / 4];
  bool rescale = false;
#pragma unroll
  for (int j = 0; j < kN / 8; ++j) {
    const float2 f = *reinterpret_cast<const float2*>(s_alpha + 8 * j + 2 * quad);
    alpha[2 * j] = f.x, alpha[2 * j + 1] = f.y;
    rescale |= f.x != 1.f || f.y != 1.f;
  }
  rescale_columns<kN, kMTiles>(o, alpha, rescale);
}

// O^T += V^T P^T over one 64-token chunk with 16-bit operands, not committed: V^T is the chunk's eight tiles of 64
// dims (8 KB apart, 128B swizzle, read MN-major), P^T K-major at desc_pt; four k16 steps per tile, each through
// pv(d, desc_a, desc_b) (the m64nNk16 MN-major x K-major product of the kernel's type and N).
template <int kN, typename Pv>
__device__ __forceinline__ void pv_transposed_16bit(float (&o)[8][kN / 2], uint64_t desc_v, uint64_t desc_pt, Pv pv) {
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) pv(o[i], desc_add(desc_v, i * 64 * 128 + kk * 16 * 128), desc_add(desc_pt, kk * 32));
}

// Four 8x8 16-bit matrices stored transposed (stmatrix .trans): lane l gives the row address of matrix l / 8.
// The kernels write P^T with it from S^T's accumulator layout (a thread's pair of rows of one token).
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0),
               "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}

// Two of them (lanes 0-15 give the row addresses): a P^T of 8 query rows.
__device__ __forceinline__ void stmatrix_x2_trans(uint32_t addr, uint32_t r0, uint32_t r1) {
  asm volatile("stmatrix.sync.aligned.m8n8.x2.trans.shared.b16 [%0], {%1, %2};\n" ::"r"(addr), "r"(r0), "r"(r1)
               : "memory");
}

}  // namespace sm90
}  // namespace flashmla
