// Dense MLA decode kernel for SM90 (sm_90a): wgmma from shared memory, TMA page loads on mbarriers.
//
// Two schedules (template flag kSolo, runtime switch FLASHMLA_DENSE_VARIANT, default 1 = kSolo):
// see the comment above dense_decode_kernel.
//
// One CTA = (SM partition of the plan, kv head, 64-row query tile). Query rows are the
// s_q * h_q / h_kv (token, head) pairs sharing one kv head (row m -> token m / group, head
// kvh * group + m % group); tiles are padded with zero rows. 256 threads = two warpgroups.
//
// Per 64-token chunk of the KV cache (one TMA box per 64 columns, 9 boxes, 128B-swizzled):
//   S_w = Q K[32w : 32w+32]^T       warpgroup w, m64n32k16 x 36 (K = 576)
//   online softmax; the row max is exchanged through shared memory, so both halves share it
//   P (64x64, bf16/fp16) -> shared memory (K-major, 128B swizzle)
//   O_w += P V[:, 256w : 256w+256]  warpgroup w, m64n256k16 x 4 (V read MN-major from the same tile)
// Two KV stages: thread 0 issues the TMA loads of chunk g+1 (possibly the next request's first
// chunk) while chunk g is computed. Rows of a partial last chunk past the sequence end are zeroed
// in shared memory before the PV product (the cache there may hold NaN), and masked in S.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include "sm90/decode/dense/dense_decode.h"
#include "sm90/common/sm90_ptx.h"

namespace flashmla {
namespace sm90 {
namespace dense {

constexpr int kThreads = 256;
constexpr int kPreciseMaxLen = 1024;
static_assert(kBlockM * (kDQK / 8) % kThreads == 0, "Q tile load");
constexpr int kTileBytes = 64 * 128;            // 64 rows x 64 columns x 2 bytes
constexpr int kNumColTiles = kDQK / 64;          // 9
constexpr int kStageBytes = kNumColTiles * kTileBytes;  // 73728
constexpr int kOffQ = 0;
constexpr int kOffKV = kOffQ + kStageBytes;
constexpr int kOffP = kOffKV + 2 * kStageBytes;
constexpr int kOffMax = kOffP + kTileBytes;      // float [2][64]
constexpr int kOffSum = kOffMax + 2 * 64 * 4;    // float [2][64]
constexpr int kOffBar = kOffSum + 2 * 64 * 4;    // uint64 [2]
constexpr int kSmemUsed = kOffBar + 2 * 8;
constexpr int kSmemBytes = kSmemUsed + 1024;     // slack for 1024-byte alignment

// Token range [start, end) of request r inside partition (begin_req..end_req).
__device__ __forceinline__ void request_range(const DenseDecodeParams& p, int r, int begin_req, int begin_tok,
                                              int end_req, int end_tok, int& start, int& end) {
  const int len = max(p.seqlens[r], 0);
  start = r == begin_req ? begin_tok : 0;
  end = r == end_req ? end_tok : len;
  end = min(end, len);
  start = max(start, 0);
}

// Epilogue of one request: O / l to `out` (unsplit) or to the split scratch, and the log-sum-exp.
// l0 / l1: full row sums of this thread's rows; max0 / max1: their final maxima (log2 domain).
template <typename T>
__device__ __forceinline__ void store_outputs(const DenseDecodeParams& p, const float (&o)[128], int r, int kvh, int wg,
                                              int m0, int m1, int t0, int t1, int quad_col, float l0, float l1,
                                              float max0, float max1, int n_splits, int split_idx) {
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f;
  const float inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
  constexpr float kLn2 = 0.6931471805599453f;
  const float empty_lse = n_splits == 1 ? INFINITY : -INFINITY;
  const float lse0 = l0 > 0.f ? (max0 + log2f(l0)) * kLn2 : empty_lse;
  const float lse1 = l1 > 0.f ? (max1 + log2f(l1)) * kLn2 : empty_lse;

  const bool ok0 = m0 < p.m_total, ok1 = m1 < p.m_total;
  const int head0 = kvh * p.group + min(m0, p.m_total - 1) % p.group;
  const int head1 = kvh * p.group + min(m1, p.m_total - 1) % p.group;
  const int lane4 = threadIdx.x % 4;
  if (n_splits == 1) {
    T* out = reinterpret_cast<T*>(p.out);
    T* dst0 = out + (((int64_t)r * p.s_q + t0) * p.h_q + head0) * kDV + wg * 256 + quad_col;
    T* dst1 = out + (((int64_t)r * p.s_q + t1) * p.h_q + head1) * kDV + wg * 256 + quad_col;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      if (ok0) *reinterpret_cast<uint32_t*>(dst0 + j * 8) = TypeOps<T>::pack(o[j * 4] * inv0, o[j * 4 + 1] * inv0);
      if (ok1) *reinterpret_cast<uint32_t*>(dst1 + j * 8) = TypeOps<T>::pack(o[j * 4 + 2] * inv1, o[j * 4 + 3] * inv1);
    }
    if (wg == 0 && lane4 == 0) {
      if (ok0) p.lse[((int64_t)r * p.h_q + head0) * p.s_q + t0] = lse0;
      if (ok1) p.lse[((int64_t)r * p.h_q + head1) * p.s_q + t1] = lse1;
    }
  } else {
    int row = 2 * (p.num_splits[r] - r) + split_idx;
    row = max(0, min(row, p.acc_rows - 1));
    const int64_t base = ((int64_t)row * p.h_kv + kvh) * p.m_total;
    float* acc0 = p.oacc + (base + m0) * kDV + wg * 256 + quad_col;
    float* acc1 = p.oacc + (base + m1) * kDV + wg * 256 + quad_col;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      if (ok0) *reinterpret_cast<float2*>(acc0 + j * 8) = make_float2(o[j * 4] * inv0, o[j * 4 + 1] * inv0);
      if (ok1) *reinterpret_cast<float2*>(acc1 + j * 8) = make_float2(o[j * 4 + 2] * inv1, o[j * 4 + 3] * inv1);
    }
    if (wg == 0 && lane4 == 0) {
      if (ok0) p.lseacc[base + m0] = lse0;
      if (ok1) p.lseacc[base + m1] = lse1;
    }
  }
}

// kSolo = false: each warpgroup computes S for 32 of the 64 tokens (m64n32), the row max is
//                exchanged through shared memory.
// kSolo = true:  warpgroup 0 computes S for all 64 tokens (m64n64: a third less shared-memory
//                traffic for the QK product) and the softmax; it publishes P and the rescale
//                factors; warpgroup 1 only runs its half of the PV product.
template <typename T, bool kSolo>
__global__ void __launch_bounds__(kThreads, 1)
    dense_decode_kernel(const __grid_constant__ CUtensorMap tmap, const DenseDecodeParams p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t sbase = smem_addr(smem);
  float* s_max = reinterpret_cast<float*>(smem + kOffMax);
  float* s_sum = reinterpret_cast<float*>(smem + kOffSum);
  const uint32_t bar_full0 = sbase + kOffBar;

  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int warp = (tid % 128) / 32;
  const int lane = tid % 32;
  const int part = blockIdx.x;
  const int kvh = blockIdx.y;
  const int mtile = blockIdx.z;

  const int* meta = p.metadata + part * 8;
  const int begin_req = meta[0], begin_tok = meta[1], end_req = min(meta[2], p.b - 1), end_tok = meta[3];
  const int begin_split = meta[4];
  if (begin_req > end_req || begin_req < 0) return;

  if (tid == 0) {
    mbar_init(bar_full0, 1);
    mbar_init(bar_full0 + 8, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tmap)) : "memory");
  }
  __syncthreads();

  // Issuer state (thread 0 only): the next chunk to load.
  int ld_r = begin_req, ld_c = 0, ld_end = 0;
  auto ld_seek = [&]() {  // advance (ld_r, ld_c) to a chunk inside a non-empty range, or past end_req
    while (ld_r <= end_req && ld_c >= ld_end) {
      ++ld_r;
      if (ld_r > end_req) break;
      request_range(p, ld_r, begin_req, begin_tok, end_req, end_tok, ld_c, ld_end);
    }
  };
  auto ld_issue = [&](int stage) {
    if (ld_r > end_req) return;
    const int page = p.block_table[(int64_t)ld_r * p.block_table_stride + ld_c / p.page_size];
    const int tok = ld_c % p.page_size;
    const uint32_t bar = bar_full0 + stage * 8;
    mbar_expect_tx(bar, kStageBytes);
    const uint32_t dst = sbase + kOffKV + stage * kStageBytes;
#pragma unroll
    for (int i = 0; i < kNumColTiles; ++i) tma_load_4d(dst + i * kTileBytes, &tmap, bar, i * 64, kvh, tok, page);
    ld_c += kBlockN;
    ld_seek();
  };
  if (tid == 0) {
    request_range(p, ld_r, begin_req, begin_tok, end_req, end_tok, ld_c, ld_end);
    ld_seek();
    ld_issue(0);
  }

  // Rows owned by this thread in the wgmma accumulator layout.
  const int row0 = warp * 16 + lane / 4;
  const int row1 = row0 + 8;
  const int m0 = mtile * kBlockM + row0;
  const int m1 = mtile * kBlockM + row1;
  const int t0 = min(m0, p.m_total - 1) / p.group;
  const int t1 = min(m1, p.m_total - 1) / p.group;
  const int quad_col = (lane % 4) * 2;

  const T* qbase = reinterpret_cast<const T*>(p.q);
  uint32_t g = 0;  // chunks consumed so far (stage = g & 1, phase = (g >> 1) & 1)

  for (int r = begin_req; r <= end_req; ++r) {
    int start, end;
    request_range(p, r, begin_req, begin_tok, end_req, end_tok, start, end);
    const int len = max(p.seqlens[r], 0);
    const int n_splits = p.num_splits[r + 1] - p.num_splits[r];
    const int split_idx = r == begin_req ? begin_split : 0;
    // Short requests: P = hi + lo (two bf16/fp16 terms) so that P's rounding does not show in
    // outputs that average only a few tokens. Long requests use one term (errors average out).
    const bool precise = len <= kPreciseMaxLen;

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float run_max0 = -INFINITY, run_max1 = -INFINITY;
    float run_sum0 = 0.f, run_sum1 = 0.f;

    if (start < end) {
      // Q tile of request r -> shared memory (zero rows past m_total).
      named_bar_sync(1, 256);
      // 16-byte cp.async (asynchronous: all 18 per thread in flight at once, no register staging);
      // rows past m_total are zero-filled.
#pragma unroll 1
      for (int it = 0; it < kBlockM * (kDQK / 8) / kThreads; ++it) {
        const int idx = tid + it * kThreads;
        const int row = idx / (kDQK / 8);
        const int ch = idx % (kDQK / 8);
        const int m = mtile * kBlockM + row;
        const bool in = m < p.m_total;
        const int mm = in ? m : 0;
        const int t = mm / p.group;
        const int head = kvh * p.group + mm % p.group;
        const T* src = qbase + (int64_t)r * p.q_batch_stride + (int64_t)t * p.q_seq_stride +
                       (int64_t)head * p.q_head_stride + ch * 8;
        const uint32_t dst = sbase + kOffQ + (ch / 8) * kTileBytes + swz(row, ch % 8);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(in ? 16 : 0)
                     : "memory");
      }
      asm volatile("cp.async.commit_group;\n" ::: "memory");
      asm volatile("cp.async.wait_group 0;\n" ::: "memory");
      fence_proxy_async();
      named_bar_sync(1, 256);
    }
    const int lim_causal0 = p.causal ? len - p.s_q + t0 + 1 : len;
    const int lim_causal1 = p.causal ? len - p.s_q + t1 + 1 : len;

    for (int c = start; c < end; c += kBlockN, ++g) {
      const int stage = g & 1;
      // Everyone finished chunk g-1 (its PV read the other stage): refill that stage.
      named_bar_sync(1, 256);
      if (tid == 0) ld_issue(stage ^ 1);
      mbar_wait(bar_full0 + stage * 8, (g >> 1) & 1);
      const uint32_t kv = sbase + kOffKV + stage * kStageBytes;
      const int valid = min(end - c, kBlockN);
      if (valid < kBlockN) {  // rows past the sequence end: zero (they may hold NaN)
        uint8_t* kvp = smem + kOffKV + stage * kStageBytes;
        for (int idx = tid; idx < (kBlockN - valid) * (kDQK / 8); idx += kThreads) {
          const int row = valid + idx / (kDQK / 8);
          const int ch = idx % (kDQK / 8);
          *reinterpret_cast<uint4*>(kvp + (ch / 8) * kTileBytes + swz(row, ch % 8)) = make_uint4(0, 0, 0, 0);
        }
        fence_proxy_async();
        named_bar_sync(1, 256);
      }

      if constexpr (!kSolo) {
      // ---- S = Q K^T (this warpgroup's 32 tokens) ----
      float s[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) s[i] = 0.f;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kDQK / 16; ++kk) {
        const uint32_t off = (kk / 4) * kTileBytes + (kk % 4) * 32;
        TypeOps<T>::qk(s, desc_sw128(sbase + kOffQ + off, 16, 1024), desc_sw128(kv + off + wg * 32 * 128, 16, 1024),
                       kk > 0 ? 1 : 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < 16; ++i) fence_operand(s[i]);

      // ---- online softmax (log2 domain) ----
      const int lim0 = min(end, lim_causal0);
      const int lim1 = min(end, lim_causal1);
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int tok = c + wg * 32 + j * 8 + quad_col + e;
          s[j * 4 + e] = tok < lim0 ? s[j * 4 + e] * p.scale_log2 : -INFINITY;
          s[j * 4 + 2 + e] = tok < lim1 ? s[j * 4 + 2 + e] * p.scale_log2 : -INFINITY;
          mx0 = fmaxf(mx0, s[j * 4 + e]);
          mx1 = fmaxf(mx1, s[j * 4 + 2 + e]);
        }
      }
#pragma unroll
      for (int o_ = 1; o_ <= 2; o_ *= 2) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o_));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o_));
      }
      if (lane % 4 == 0) {
        s_max[wg * 64 + row0] = mx0;
        s_max[wg * 64 + row1] = mx1;
      }
      named_bar_sync(1, 256);
      mx0 = fmaxf(mx0, s_max[(wg ^ 1) * 64 + row0]);
      mx1 = fmaxf(mx1, s_max[(wg ^ 1) * 64 + row1]);
      const float new_max0 = fmaxf(run_max0, mx0);
      const float new_max1 = fmaxf(run_max1, mx1);
      const float base0 = new_max0 == -INFINITY ? 0.f : new_max0;
      const float base1 = new_max1 == -INFINITY ? 0.f : new_max1;
      const float alpha0 = exp2f(run_max0 - base0);
      const float alpha1 = exp2f(run_max1 - base1);
      run_max0 = new_max0;
      run_max1 = new_max1;
      float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const bool top = (i % 4) < 2;
        s[i] = exp2f(s[i] - (top ? base0 : base1));
        if (top) sum0 += s[i]; else sum1 += s[i];
      }
      run_sum0 = run_sum0 * alpha0 + sum0;
      run_sum1 = run_sum1 * alpha1 + sum1;
      rescale_rows(o, alpha0, alpha1);
      // P -> shared memory (A operand of PV, K-major over the 64 tokens)
      uint8_t* sp = smem + kOffP;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int chunk = wg * 4 + j;
        *reinterpret_cast<uint32_t*>(sp + swz(row0, chunk) + quad_col * 2) = TypeOps<T>::pack(s[j * 4], s[j * 4 + 1]);
        *reinterpret_cast<uint32_t*>(sp + swz(row1, chunk) + quad_col * 2) = TypeOps<T>::pack(s[j * 4 + 2], s[j * 4 + 3]);
      }
      fence_proxy_async();
      named_bar_sync(1, 256);

      // ---- O += P V (this warpgroup's 256 columns) ----
#pragma unroll
      for (int i = 0; i < 128; ++i) fence_operand(o[i]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        TypeOps<T>::pv(o, desc_sw128(sbase + kOffP + kk * 32, 16, 1024),
                       desc_sw128(kv + wg * 4 * kTileBytes + kk * 16 * 128, kTileBytes, 1024), 1);
      }
      wgmma_commit();
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < 128; ++i) fence_operand(o[i]);
      if (precise) {  // second term: the rounding residue of P
        named_bar_sync(1, 256);  // both warpgroups are done reading the first term
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int chunk = wg * 4 + j;
          *reinterpret_cast<uint32_t*>(sp + swz(row0, chunk) + quad_col * 2) =
              TypeOps<T>::pack_residue(s[j * 4], s[j * 4 + 1]);
          *reinterpret_cast<uint32_t*>(sp + swz(row1, chunk) + quad_col * 2) =
              TypeOps<T>::pack_residue(s[j * 4 + 2], s[j * 4 + 3]);
        }
        fence_proxy_async();
        named_bar_sync(1, 256);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          TypeOps<T>::pv(o, desc_sw128(sbase + kOffP + kk * 32, 16, 1024),
                         desc_sw128(kv + wg * 4 * kTileBytes + kk * 16 * 128, kTileBytes, 1024), 1);
        }
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < 128; ++i) fence_operand(o[i]);
      }
      } else {
      // ---- S = Q K^T over all 64 tokens (warpgroup 0) ----
      float s[32];
      float alpha0 = 1.f, alpha1 = 1.f;
      uint8_t* sp = smem + kOffP;
      if (wg == 0) {
#pragma unroll
        for (int i = 0; i < 32; ++i) s[i] = 0.f;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kDQK / 16; ++kk) {
          const uint32_t off = (kk / 4) * kTileBytes + (kk % 4) * 32;
          TypeOps<T>::qk64(s, desc_sw128(sbase + kOffQ + off, 16, 1024), desc_sw128(kv + off, 16, 1024), kk > 0 ? 1 : 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < 32; ++i) fence_operand(s[i]);
        const int lim0 = min(end, lim_causal0);
        const int lim1 = min(end, lim_causal1);
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int tok = c + j * 8 + quad_col + e;
            s[j * 4 + e] = tok < lim0 ? s[j * 4 + e] * p.scale_log2 : -INFINITY;
            s[j * 4 + 2 + e] = tok < lim1 ? s[j * 4 + 2 + e] * p.scale_log2 : -INFINITY;
            mx0 = fmaxf(mx0, s[j * 4 + e]);
            mx1 = fmaxf(mx1, s[j * 4 + 2 + e]);
          }
        }
#pragma unroll
        for (int o_ = 1; o_ <= 2; o_ *= 2) {
          mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o_));
          mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o_));
        }
        const float new_max0 = fmaxf(run_max0, mx0);
        const float new_max1 = fmaxf(run_max1, mx1);
        const float base0 = new_max0 == -INFINITY ? 0.f : new_max0;
        const float base1 = new_max1 == -INFINITY ? 0.f : new_max1;
        alpha0 = exp2f(run_max0 - base0);
        alpha1 = exp2f(run_max1 - base1);
        run_max0 = new_max0;
        run_max1 = new_max1;
        float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
        for (int i = 0; i < 32; ++i) {
          const bool top = (i % 4) < 2;
          s[i] = exp2f(s[i] - (top ? base0 : base1));
          if (top) sum0 += s[i]; else sum1 += s[i];
        }
        run_sum0 = run_sum0 * alpha0 + sum0;
        run_sum1 = run_sum1 * alpha1 + sum1;
        if (lane % 4 == 0) {
          s_max[row0] = alpha0;
          s_max[row1] = alpha1;
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          *reinterpret_cast<uint32_t*>(sp + swz(row0, j) + quad_col * 2) = TypeOps<T>::pack(s[j * 4], s[j * 4 + 1]);
          *reinterpret_cast<uint32_t*>(sp + swz(row1, j) + quad_col * 2) = TypeOps<T>::pack(s[j * 4 + 2], s[j * 4 + 3]);
        }
        fence_proxy_async();
      }
      named_bar_sync(1, 256);  // P and the rescale factors are ready
      if (wg == 1) {
        alpha0 = s_max[row0];
        alpha1 = s_max[row1];
      }
      rescale_rows(o, alpha0, alpha1);
#pragma unroll
      for (int i = 0; i < 128; ++i) fence_operand(o[i]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        TypeOps<T>::pv(o, desc_sw128(sbase + kOffP + kk * 32, 16, 1024),
                       desc_sw128(kv + wg * 4 * kTileBytes + kk * 16 * 128, kTileBytes, 1024), 1);
      }
      wgmma_commit();
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < 128; ++i) fence_operand(o[i]);
      if (precise) {  // second term: the rounding residue of P
        named_bar_sync(1, 256);  // both warpgroups are done reading the first term
        if (wg == 0) {
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            *reinterpret_cast<uint32_t*>(sp + swz(row0, j) + quad_col * 2) = TypeOps<T>::pack_residue(s[j * 4], s[j * 4 + 1]);
            *reinterpret_cast<uint32_t*>(sp + swz(row1, j) + quad_col * 2) =
                TypeOps<T>::pack_residue(s[j * 4 + 2], s[j * 4 + 3]);
          }
          fence_proxy_async();
        }
        named_bar_sync(1, 256);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          TypeOps<T>::pv(o, desc_sw128(sbase + kOffP + kk * 32, 16, 1024),
                         desc_sw128(kv + wg * 4 * kTileBytes + kk * 16 * 128, kTileBytes, 1024), 1);
        }
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < 128; ++i) fence_operand(o[i]);
      }
      }
    }

    // ---- epilogue: finish the row sums across the quad and both warpgroups ----
#pragma unroll
    for (int o_ = 1; o_ <= 2; o_ *= 2) {
      run_sum0 += __shfl_xor_sync(0xffffffffu, run_sum0, o_);
      run_sum1 += __shfl_xor_sync(0xffffffffu, run_sum1, o_);
    }
    named_bar_sync(1, 256);  // s_sum free (previous request's readers are done)
    if (lane % 4 == 0) {
      s_sum[wg * 64 + row0] = run_sum0;
      s_sum[wg * 64 + row1] = run_sum1;
    }
    named_bar_sync(1, 256);
    store_outputs<T>(p, o, r, kvh, wg, m0, m1, t0, t1, quad_col, s_sum[row0] + s_sum[64 + row0],
                     s_sum[row1] + s_sum[64 + row1], run_max0, run_max1, n_splits, split_idx);
  }
}

}  // namespace dense
}  // namespace sm90
}  // namespace flashmla

#include "sm90/decode/dense/dense_decode_seesaw.cuh"

namespace flashmla {
namespace sm90 {
namespace dense {

template <typename T>
void launch(const DenseDecodeParams& p, const CUtensorMap& tmap, cudaStream_t stream) {
  if (p.variant >= 2) return seesaw::launch<T>(p, tmap, stream);
  auto kernel = p.variant == 1 ? dense_decode_kernel<T, true> : dense_decode_kernel<T, false>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  dim3 grid(p.num_sm_parts, p.h_kv, p.num_m_tiles);
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(tmap, p);
}

}  // namespace dense
}  // namespace sm90
}  // namespace flashmla
