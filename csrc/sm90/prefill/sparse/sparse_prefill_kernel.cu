// Token-sparse MLA prefill for SM90 (sm_90a): torch.ops.flashmla_cuda.sparse_mla_prefill.
//
// One CTA = (query token t, 64-head tile); the head tiles of a token are adjacent in the grid, so
// they run together and the second one finds the gathered KV rows in L2. The token's topk indices
// are walked in 64-token chunks, taken in pairs (a, b) = (2k, 2k + 1); a pair past the valid
// length holds only masked rows. 384 threads, three warpgroups (setmaxnreg moves registers to the
// two math warpgroups):
//   WG2 (producer): gathers each chunk's 64 bf16 rows (1152 or 1024 bytes) with 16-byte cp.async
//       straight into the 128B-swizzled K-major stage that wgmma reads (8 threads per row, every
//       tile a 128-byte coalesced segment, L2 evict_last); skipped rows (-1, >= s_kv, past
//       topk_length or topk) are zero-filled without a read. Chunk a goes to stage 0, b to stage 1.
//       Each stage is two halves (tiles 0-3 = V[:, :256], tiles 4.. = V[:, 256:] + rope) with
//       their own full / empty mbarriers, so a half is refilled as soon as its last reader is done.
//       Completion: cp.async.mbarrier.arrive + a release arrive after the row flags are stored.
//   WG0 / WG1 ("seesaw", the dense decode kernel's scheme): WG0 owns O[:, 0:256] and chunk a,
//       WG1 owns O[:, 256:512] and chunk b. WG0: S_a = Q K_a^T, softmax against the running max
//       (shared memory), P_a -> shared memory for WG1, O0 += P_a V_a (P from registers), then with
//       WG1's scale: O0 += P_b V_b (P_b from shared memory). WG1: S_b = Q K_b^T while WG0 works on
//       a, then with WG0's max: O1 += P_a V_a (shared), its softmax of b meanwhile, P_b -> shared
//       memory, O1 += P_b V_b (registers). The running max moves only by more than kMaxSlack
//       (sm90/common/seesaw.h), so the rescale is skipped in almost every chunk.
// Tokens with at most kPreciseMaxLen index slots take a second path: both math warpgroups compute S of
// every chunk and multiply P = hi + lo (two bf16 terms) with their half of V, so that P's rounding does
// not show in outputs that average few tokens (the dense decode kernel's short-request path).
// Q tiles 0-7 stay in shared memory; for d_qk 576 the rope tile (8) lives in registers as the A
// operand of the last four QK steps, which frees the shared memory of the second P tile.
// Outputs: out = O / l (x the sink factor), lse = (max + log2 l) ln 2 (+inf when nothing is valid),
// max_logits = the largest raw score x softmax_scale (-inf when nothing is valid).
// Measurements: benchmarks/NOTES_sparse_prefill.md.
#include <cuda_bf16.h>
#include <math.h>

#include "sm90/common/seesaw.h"
#include "sm90/common/sm90_ptx.h"
#include "sm90/prefill/sparse/sparse_prefill.h"

namespace flashmla {
namespace sm90 {
namespace sparse_prefill {

namespace {

using T = __nv_bfloat16;
constexpr int kDV = 512;
constexpr int kBlockM = 64;  // heads per CTA
constexpr int kBlockN = 64;  // tokens per chunk
constexpr int kThreads = 384;
constexpr int kTileBytes = 64 * 128;  // 64 rows x 64 bf16, 128B swizzle

template <int kDQK>
struct Layout {
  static constexpr int kTiles = kDQK / 64;  // 9 or 8 column tiles per KV row block
  static constexpr int kStageBytes = kTiles * kTileBytes;
  static constexpr int kOffQ = 0;                              // Q tiles 0-7
  static constexpr int kOffKV = kOffQ + 8 * kTileBytes;        // 2 stages
  static constexpr int kOffPa = kOffKV + 2 * kStageBytes;      // P_a (then the epilogue's scratch)
  static constexpr int kOffPb = kOffPa + kTileBytes;           // P_b
  static constexpr int kOffValid = kOffPb + kTileBytes;        // uint8 [2][64]: row flags of each stage
  static constexpr int kOffMax = kOffValid + 2 * 64;           // float [64]: running max (log2 domain)
  static constexpr int kOffScaleA = kOffMax + 64 * 4;          // float [64]: WG0's factor of chunk a
  static constexpr int kOffScaleB = kOffScaleA + 64 * 4;       // float [64]: WG1's factor of chunk b
  static constexpr int kOffBar = kOffScaleB + 64 * 4;          // uint64 full_lo[2] full_hi[2] empty_lo[2] empty_hi[2]
  static constexpr int kSmemUsed = kOffBar + 8 * 8;
  static constexpr int kSmemBytes = kSmemUsed + 1023;          // + slack for the 1024-byte alignment
  static_assert(kSmemBytes <= 232448, "shared memory per block");
};

// Named barriers (0 is __syncthreads); each is one arrive (producer side) + one sync (consumer side).
constexpr uint32_t kBarA = 1;       // WG0 -> WG1: P_a, scale_a and the running max are in shared memory
constexpr uint32_t kBarB = 2;       // WG1 -> WG0: P_b, scale_b and the running max are in shared memory
constexpr uint32_t kBarPaFree = 3;  // WG1 -> WG0: WG1's product with P_a is done
constexpr uint32_t kBarPbFree = 4;  // WG0 -> WG1: WG0's product with P_b is done
constexpr uint32_t kBarMath = 5;    // both math warpgroups (Q tile, epilogue)

// Tokens with at most this many index slots take the precise path (P = hi + lo): with P rounded to
// bf16 once (relative error up to 2^-8), outputs of tokens with a few hundred valid rows missed the
// abs 8e-4 tolerance (at 389 and 392 slots, reproduced by a CPU emulation of the rounding:
// benchmarks/NOTES_sparse_prefill.md). The same bound as the decode kernels.
constexpr int kPreciseMaxLen = 1024;

// setmaxnreg budgets: they must sum to the launch allotment, 3 x 168 per thread slot.
constexpr int kRegsMath = 232, kRegsProducer = 40;
static_assert(2 * kRegsMath + kRegsProducer == 3 * 168, "setmaxnreg budgets must fit the launch allotment");

__device__ __forceinline__ uint32_t bar_full_lo(uint32_t b, int s) { return b + s * 8; }
__device__ __forceinline__ uint32_t bar_full_hi(uint32_t b, int s) { return b + 16 + s * 8; }
__device__ __forceinline__ uint32_t bar_empty_lo(uint32_t b, int s) { return b + 32 + s * 8; }
__device__ __forceinline__ uint32_t bar_empty_hi(uint32_t b, int s) { return b + 48 + s * 8; }

// One arrival per warp on an empty barrier (count 8: every math warp once per chunk and half).
__device__ __forceinline__ void release(uint32_t bar) { mbar_arrive_per_warp(bar); }

// The number of attended index slots of query token t: topk_length clamped to [0, topk].
__device__ __forceinline__ int token_len(const SparsePrefillParams& p, int t) {
  return p.topk_length != nullptr ? min(max(p.topk_length[t], 0), p.topk) : p.topk;
}

// S = Q K^T over the chunk in stage `kv` (tiles 0-3 after full_lo, the rest after full_hi). For
// d_qk 576 tile 8 of Q comes from registers. Committed as one group, not waited for.
template <int kDQK>
__device__ __forceinline__ void qk_chunk(float (&s)[32], uint32_t q_addr, uint32_t kv, uint32_t full_lo,
                                         uint32_t full_hi, uint32_t phase, const uint32_t (&q8)[4][4]) {
  const uint64_t desc_q = desc_sw128(q_addr, 16, 1024), desc_k = desc_sw128(kv, 16, 1024);
  fence_all(s);
  mbar_wait_loop(full_lo, phase);
  fence_proxy_async();  // the producer's cp.async writes -> this warpgroup's wgmma reads
  wgmma_fence();
#pragma unroll
  for (int t = 0; t < 4; ++t)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t off = t * kTileBytes + kk * 32;
      TypeOps<T>::qk64(s, desc_add(desc_q, off), desc_add(desc_k, off), t > 0 || kk > 0);
    }
  mbar_wait_loop(full_hi, phase);
  fence_proxy_async();
  wgmma_fence();
#pragma unroll
  for (int t = 4; t < kDQK / 64; ++t)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t off = t * kTileBytes + kk * 32;
      if (t < 8) {
        TypeOps<T>::qk64(s, desc_add(desc_q, off), desc_add(desc_k, off), 1);
      } else {
        TypeOps<T>::qk64_r(s, q8[kk], desc_add(desc_k, off), 1);
      }
    }
  wgmma_commit();
}

// Scores of skipped rows -> -inf; raw row maxima of this thread's two rows over its quad.
__device__ __forceinline__ void mask_and_max(float (&s)[32], const uint8_t* valid, int quad_col, float& mx0,
                                             float& mx1) {
  mx0 = -INFINITY;
  mx1 = -INFINITY;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const uint32_t v2 = *reinterpret_cast<const uint16_t*>(valid + j * 8 + quad_col);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const bool v = ((v2 >> (8 * e)) & 0xffu) != 0;
      s[j * 4 + e] = v ? s[j * 4 + e] : -INFINITY;
      s[j * 4 + 2 + e] = v ? s[j * 4 + 2 + e] : -INFINITY;
      mx0 = fmaxf(mx0, s[j * 4 + e]);
      mx1 = fmaxf(mx1, s[j * 4 + 2 + e]);
    }
  }
#pragma unroll
  for (int o_ = 1; o_ <= 2; o_ *= 2) {
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o_));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o_));
  }
}

template <int kDQK, int kWG>
__device__ __forceinline__ void math_warpgroup(const SparsePrefillParams& p, uint8_t* smem, int t, int mtile,
                                               int len, int n_pairs) {
  using L = Layout<kDQK>;
  const uint32_t sbase = smem_addr(smem);
  const uint32_t bars = sbase + L::kOffBar;
  const uint32_t stage0 = sbase + L::kOffKV, stage1 = stage0 + L::kStageBytes;
  float* s_max = reinterpret_cast<float*>(smem + L::kOffMax);
  float* s_scale_a = reinterpret_cast<float*>(smem + L::kOffScaleA);
  float* s_scale_b = reinterpret_cast<float*>(smem + L::kOffScaleB);
  const uint8_t* s_valid = smem + L::kOffValid;

  const int tid = threadIdx.x;  // 0..255
  const int wtid = tid % 128;
  const int warp = wtid / 32;
  const int lane = tid % 32;
  const int quad = lane % 4;
  const int quad_col = quad * 2;
  const int row0 = warp * 16 + lane / 4, row1 = row0 + 8;
  const int head0 = mtile * kBlockM + row0, head1 = head0 + 8;
  const bool ok0 = head0 < p.h_q, ok1 = head1 < p.h_q;

  // ---- Q: tiles 0-7 -> shared memory (both warpgroups; heads past h_q are zero rows) ----
  const T* q_tok = reinterpret_cast<const T*>(p.q) + (int64_t)t * p.q_seq_stride;
#pragma unroll 4
  for (int it = 0; it < kBlockM * 64 / 256; ++it) {
    const int idx = tid + it * 256;
    const int row = idx / 64, ch = idx % 64;
    const int head = mtile * kBlockM + row;
    const bool in = head < p.h_q;
    const T* src = q_tok + (int64_t)(in ? head : 0) * p.q_head_stride + ch * 8;
    const uint32_t dst = sbase + L::kOffQ + (ch / 8) * kTileBytes + swz(row, ch % 8);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(in ? 16 : 0) : "memory");
  }
  asm volatile("cp.async.commit_group;\n" ::: "memory");
  // Rope tile of Q (d_qk 576) in the m64k16 A-fragment layout.
  uint32_t q8[4][4];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int reg = 0; reg < 4; ++reg) {
      q8[kk][reg] = 0;
      if constexpr (kDQK == 576) {
        const bool ok = reg & 1 ? ok1 : ok0;
        const int head = reg & 1 ? head1 : head0;
        if (ok) {
          q8[kk][reg] = __ldg(reinterpret_cast<const uint32_t*>(q_tok + (int64_t)head * p.q_head_stride + 512 +
                                                                kk * 16 + (reg >> 1) * 8 + quad_col));
        }
      }
    }
  if (wtid < 64 && kWG == 0) s_max[wtid] = -INFINITY;
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  fence_proxy_async();
  named_bar_sync(kBarMath, 256);

  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  float l0 = 0.f, l1 = 0.f;                // row sums of this thread's columns and chunks
  float rmax0 = -INFINITY, rmax1 = -INFINITY;  // raw score maxima of this warpgroup's chunks
  const uint32_t q_addr = sbase + L::kOffQ;

  if (len <= kPreciseMaxLen) {
    // ---- short token: both warpgroups compute S of every chunk; P = hi + lo (two bf16 terms) ----
    float run0 = -INFINITY, run1 = -INFINITY;
    uint32_t ph[4][4], pl[4][4];
    for (int k = 0; k < n_pairs; ++k) {
#pragma unroll 1
      for (int st = 0; st < 2; ++st) {
        const uint32_t stage = st ? stage1 : stage0;
        float s[32];
        qk_chunk<kDQK>(s, q_addr, stage, bar_full_lo(bars, st), bar_full_hi(bars, st), k & 1, q8);
        wgmma_wait<0>();
        fence_all(s);
        fence_frags(q8);
        float mx0, mx1;
        mask_and_max(s, s_valid + st * 64, quad_col, mx0, mx1);
        rmax0 = fmaxf(rmax0, mx0);
        rmax1 = fmaxf(rmax1, mx1);
        const MaxUpdate u = update_max(run0, run1, mx0 * p.scale_log2, mx1 * p.scale_log2);
        run0 = u.max0;
        run1 = u.max1;
        exp_rescale(s, o, l0, l1, p.scale_log2, u);
        pack_p<T, false>(ph, s);
        pack_p<T, true>(pl, s);
        const uint32_t v_half = stage + kWG * 4 * kTileBytes;
        pv_regs<T>(o, ph, v_half);
        pv_regs<T>(o, pl, v_half);
        wgmma_wait<0>();
        fence_all(o);
        fence_frags(ph);
        fence_frags(pl);
        release(bar_empty_lo(bars, st));  // this stage (and its row flags): no more reads by this warp
        release(bar_empty_hi(bars, st));
      }
    }
    // Both warpgroups hold the full row sums: WG0's count. The maxima go where the seesaw path keeps them.
    if (kWG == 1) l0 = l1 = 0.f;
    if (kWG == 0 && quad == 0) {
      s_max[row0] = run0;
      s_max[row1] = run1;
    }
  } else if constexpr (kWG == 0) {
    uint32_t pa[4][4];
    for (int k = 0; k < n_pairs; ++k) {
      const uint32_t ph = k & 1;
      float s[32];
      qk_chunk<kDQK>(s, q_addr, stage0, bar_full_lo(bars, 0), bar_full_hi(bars, 0), ph, q8);
      if (k > 0) {
        wgmma_wait<1>();  // P_b V_b of the previous pair
        fence_all(o);
        named_bar_arrive(kBarPbFree, 256);
        release(bar_empty_lo(bars, 1));
      }
      wgmma_wait<0>();
      fence_all(s);
      release(bar_empty_hi(bars, 0));  // stage 0 tiles 4..: no more reads by this warpgroup
      float mx0, mx1;
      mask_and_max(s, s_valid, quad_col, mx0, mx1);
      rmax0 = fmaxf(rmax0, mx0);
      rmax1 = fmaxf(rmax1, mx1);
      const MaxUpdate u = update_max(s_max[row0], s_max[row1], mx0 * p.scale_log2, mx1 * p.scale_log2);
      float sum0, sum1;
      exp_pack<T>(pa, s, p.scale_log2, u.base0, u.base1, sum0, sum1);
      if (k > 0) named_bar_sync(kBarPaFree, 256);  // WG1 is done with the previous P_a and scale_a
      store_p(sbase + L::kOffPa, pa, row0, quad);
      __syncwarp();
      if (quad == 0) {
        s_max[row0] = u.max0;
        s_max[row1] = u.max1;
        s_scale_a[row0] = u.scale0;
        s_scale_a[row1] = u.scale1;
      }
      fence_proxy_async();  // P_a (generic stores) -> WG1's wgmma
      named_bar_arrive(kBarA, 256);
      rescale_add(o, l0, l1, u, sum0, sum1);
      pv_regs<T>(o, pa, stage0);
      wgmma_wait<0>();
      fence_all(o);
      fence_frags(pa);
      release(bar_empty_lo(bars, 0));
      named_bar_sync(kBarB, 256);
      release(bar_empty_hi(bars, 1));  // this warpgroup never reads stage 1 tiles 4..
      rescale_acc(o, l0, l1, s_scale_b[row0], s_scale_b[row1]);
      pv_smem<T>(o, sbase + L::kOffPb, stage1);
    }
    wgmma_wait<0>();  // unconditional: ptxas then knows no product is in flight past this point
    fence_all(o);
    if (n_pairs > 0) {
      named_bar_arrive(kBarPbFree, 256);
      named_bar_sync(kBarPaFree, 256);
    }
  } else {
    uint32_t pb[4][4];
    for (int k = 0; k < n_pairs; ++k) {
      const uint32_t ph = k & 1;
      float s[32];
      qk_chunk<kDQK>(s, q_addr, stage1, bar_full_lo(bars, 1), bar_full_hi(bars, 1), ph, q8);
      wgmma_wait<0>();
      fence_all(s);
      float mx0, mx1;
      mask_and_max(s, s_valid + 64, quad_col, mx0, mx1);
      release(bar_empty_lo(bars, 1));  // stage 1 tiles 0-3 (and flags): no more reads by this warpgroup
      rmax0 = fmaxf(rmax0, mx0);
      rmax1 = fmaxf(rmax1, mx1);
      named_bar_sync(kBarA, 256);
      release(bar_empty_lo(bars, 0));  // this warpgroup never reads stage 0 tiles 0-3
      const float old0 = s_max[row0], old1 = s_max[row1];
      rescale_acc(o, l0, l1, s_scale_a[row0], s_scale_a[row1]);
      pv_smem<T>(o, sbase + L::kOffPa, stage0 + 4 * kTileBytes);
      const MaxUpdate u = update_max(old0, old1, mx0 * p.scale_log2, mx1 * p.scale_log2);
      float sum0, sum1;
      exp_pack<T>(pb, s, p.scale_log2, u.base0, u.base1, sum0, sum1);
      if (k > 0) named_bar_sync(kBarPbFree, 256);  // WG0 is done with the previous P_b and scale_b
      store_p(sbase + L::kOffPb, pb, row0, quad);
      __syncwarp();
      if (quad == 0) {
        s_max[row0] = u.max0;
        s_max[row1] = u.max1;
        s_scale_b[row0] = u.scale0;
        s_scale_b[row1] = u.scale1;
      }
      fence_proxy_async();  // P_b -> WG0's wgmma
      named_bar_arrive(kBarB, 256);
      wgmma_wait<0>();  // O1 += P_a V_a
      fence_all(o);
      named_bar_arrive(kBarPaFree, 256);
      release(bar_empty_hi(bars, 0));
      rescale_add(o, l0, l1, u, sum0, sum1);
      pv_regs<T>(o, pb, stage1 + 4 * kTileBytes);
      wgmma_wait<0>();
      fence_all(o);
      fence_frags(pb);
      release(bar_empty_hi(bars, 1));
    }
    wgmma_wait<0>();
    fence_all(o);
    if (n_pairs > 0) named_bar_sync(kBarPbFree, 256);
  }

  // ---- epilogue: WG1 hands its row sums and maxima to WG0, which publishes the output scales ----
  float* s_fin = reinterpret_cast<float*>(smem + L::kOffPa);  // [3][64]; P_a is no longer read
#pragma unroll
  for (int o_ = 1; o_ <= 2; o_ *= 2) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, o_);
    l1 += __shfl_xor_sync(0xffffffffu, l1, o_);
  }
  if (kWG == 1 && quad == 0) {
    s_fin[row0] = l0;
    s_fin[row1] = l1;
    s_fin[64 + row0] = rmax0;
    s_fin[64 + row1] = rmax1;
  }
  named_bar_sync(kBarMath, 256);
  if (kWG == 0) {
    constexpr float kLn2 = 0.6931471805599453f;
    const float sum0 = l0 + s_fin[row0], sum1 = l1 + s_fin[row1];
    const float m0 = fmaxf(rmax0, s_fin[64 + row0]), m1 = fmaxf(rmax1, s_fin[64 + row1]);
    const float base0 = s_max[row0] == -INFINITY ? 0.f : s_max[row0];
    const float base1 = s_max[row1] == -INFINITY ? 0.f : s_max[row1];
    const float lse0 = sum0 > 0.f ? (base0 + log2f(sum0)) * kLn2 : INFINITY;
    const float lse1 = sum1 > 0.f ? (base1 + log2f(sum1)) * kLn2 : INFINITY;
    float sc0 = sum0 > 0.f ? 1.f / sum0 : 0.f;
    float sc1 = sum1 > 0.f ? 1.f / sum1 : 0.f;
    if (p.attn_sink != nullptr) {
      if (sum0 > 0.f && ok0) sc0 /= 1.f + __expf(p.attn_sink[head0] - lse0);
      if (sum1 > 0.f && ok1) sc1 /= 1.f + __expf(p.attn_sink[head1] - lse1);
    }
    if (quad == 0) {
      s_fin[128 + row0] = sc0;
      s_fin[128 + row1] = sc1;
      const int64_t r0 = (int64_t)t * p.h_q + head0, r1 = (int64_t)t * p.h_q + head1;
      if (ok0) {
        p.lse[r0] = lse0;
        p.max_logits[r0] = sum0 > 0.f ? m0 * p.scale : -INFINITY;
      }
      if (ok1) {
        p.lse[r1] = lse1;
        p.max_logits[r1] = sum1 > 0.f ? m1 * p.scale : -INFINITY;
      }
    }
  }
  named_bar_sync(kBarMath, 256);
  const float sc0 = s_fin[128 + row0], sc1 = s_fin[128 + row1];
  T* out = reinterpret_cast<T*>(p.out) + kWG * 256;
  store_rows_16bit<T>(out + ((int64_t)t * p.h_q + head0) * kDV, out + ((int64_t)t * p.h_q + head1) * kDV, o, sc0, sc1,
                      ok0, ok1, quad_col / 2);
}

// The producer warpgroup: 16 groups of 8 threads; group g gathers rows g, g + 16, g + 32, g + 48 of
// every chunk, thread i of the group the 16-byte piece i of each 128-byte column tile.
//
// The stage is a template argument (chunks are produced in pairs, stage 0 then stage 1), so that every
// shared address of the gather is one register + an immediate. With the stage offset a run-time value,
// ptxas 13.0 put it (a power of two for d_qk 512) into a uniform register and emitted
// LDGSTS [R + UR + imm] together with the cache-policy descriptor; the H200 rejects that form as an
// illegal instruction (benchmarks/NOTES_sparse_prefill.md). The d_qk 576 build had [R + imm] and ran.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, uint32_t src_bytes, uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint.L2::256B [%0], [%1], 16, %2, %3;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes), "l"(policy)
               : "memory");
}

template <int kDQK, int kStage>
__device__ __forceinline__ void produce_chunk(const SparsePrefillParams& p, uint32_t sbase, uint32_t row_dst,
                                              const uint8_t* kv, int64_t row_bytes, int group, int piece,
                                              const int (&idx)[4], uint32_t empty_phase, uint64_t policy) {
  using L = Layout<kDQK>;
  const uint32_t bars = sbase + L::kOffBar;
  // row_dst = sbase + kOffKV + group * 128 + swizzled column of this thread; the rest are immediates.
  constexpr uint32_t kStageOff = kStage * L::kStageBytes;
  const uint8_t* src[4];
  uint32_t nbytes[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const bool ok = static_cast<unsigned>(idx[j]) < static_cast<unsigned>(p.s_kv);
    src[j] = kv + (ok ? (int64_t)idx[j] * row_bytes : 0);
    nbytes[j] = ok ? 16 : 0;
  }
  // tiles 0-3
  mbar_wait(bar_empty_lo(bars, kStage), empty_phase);
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int tile = 0; tile < 4; ++tile)
      cp_async16(row_dst + kStageOff + tile * kTileBytes + j * 16 * 128, src[j] + tile * 128, nbytes[j], policy);
  if (piece == 0) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t a = sbase + L::kOffValid + kStage * 64 + j * 16 + group;
      asm volatile("st.shared.u8 [%0], %1;\n" ::"r"(a), "r"(nbytes[j] != 0 ? 1u : 0u) : "memory");
    }
  }
  asm volatile("cp.async.mbarrier.arrive.shared::cta.b64 [%0];\n" ::"r"(bar_full_lo(bars, kStage)) : "memory");
  mbar_arrive(bar_full_lo(bars, kStage));
  // tiles 4..
  mbar_wait(bar_empty_hi(bars, kStage), empty_phase);
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int tile = 4; tile < L::kTiles; ++tile)
      cp_async16(row_dst + kStageOff + tile * kTileBytes + j * 16 * 128, src[j] + tile * 128, nbytes[j], policy);
  asm volatile("cp.async.mbarrier.arrive.shared::cta.b64 [%0];\n" ::"r"(bar_full_hi(bars, kStage)) : "memory");
  mbar_arrive(bar_full_hi(bars, kStage));
}

template <int kDQK>
__device__ __forceinline__ void producer(const SparsePrefillParams& p, uint8_t* smem, int t, int len, int n_pairs) {
  using L = Layout<kDQK>;
  const uint32_t sbase = smem_addr(smem);
  const uint32_t bars = sbase + L::kOffBar;
  const int pt = threadIdx.x - 256;
  const int group = pt / 8, piece = pt % 8;
  const int* ind = p.indices + (int64_t)t * p.indices_seq_stride;
  const uint8_t* kv = reinterpret_cast<const uint8_t*>(p.kv) + piece * 16;
  const int64_t row_bytes = p.kv_row_stride * 2;
  // Every row of this thread has row & 7 == group & 7: one swizzled column offset for all of them.
  const uint32_t col = static_cast<uint32_t>((piece ^ (group & 7)) << 4);
  const uint32_t row_dst = sbase + L::kOffKV + group * 128 + col;
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(policy));

  auto load_idx = [&](int c, int (&idx)[4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int pos = c * kBlockN + j * 16 + group;
      idx[j] = pos < len ? __ldg(ind + pos) : -1;
    }
  };
  // Indices are loaded one chunk ahead (8 registers: the producer runs with kRegsProducer).
  int ia[4], ib[4];
  if (n_pairs > 0) load_idx(0, ia);
  for (int k = 0; k < n_pairs; ++k) {
    const uint32_t empty_phase = (k & 1) ^ 1;
    load_idx(2 * k + 1, ib);
    produce_chunk<kDQK, 0>(p, sbase, row_dst, kv, row_bytes, group, piece, ia, empty_phase, policy);
    if (k + 1 < n_pairs) load_idx(2 * k + 2, ia);
    produce_chunk<kDQK, 1>(p, sbase, row_dst, kv, row_bytes, group, piece, ib, empty_phase, policy);
  }
  // A thread must not exit with its cp.async copies (and their mbarrier arrivals) still pending: wait
  // for them, then for the last pair's full barriers, which those arrivals complete.
  asm volatile("cp.async.wait_all;\n" ::: "memory");
  if (n_pairs > 0) {
    const uint32_t last = (n_pairs - 1) & 1;
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      mbar_wait(bar_full_lo(bars, s), last);
      mbar_wait(bar_full_hi(bars, s), last);
    }
  }
}

template <int kDQK>
__global__ void __launch_bounds__(kThreads, 1) sparse_prefill_kernel(const __grid_constant__ SparsePrefillParams p) {
  using L = Layout<kDQK>;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  const uint32_t bars = smem_addr(smem) + L::kOffBar;
  const int t = blockIdx.x / p.num_m_tiles;
  const int mtile = blockIdx.x % p.num_m_tiles;
  const int len = token_len(p, t);
  const int n_pairs = (len + 2 * kBlockN - 1) / (2 * kBlockN);

  if (threadIdx.x == 0) {
    for (int s = 0; s < 2; ++s) {
      mbar_init(bar_full_lo(bars, s), 128);  // producer threads (+ their cp.async completions)
      mbar_init(bar_full_hi(bars, s), 128);
      mbar_init(bar_empty_lo(bars, s), 8);   // every math warp
      mbar_init(bar_empty_hi(bars, s), 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  if (wg == 2) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegsProducer));
    producer<kDQK>(p, smem, t, len, n_pairs);
  } else if (wg == 0) {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegsMath));
    math_warpgroup<kDQK, 0>(p, smem, t, mtile, len, n_pairs);
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegsMath));
    math_warpgroup<kDQK, 1>(p, smem, t, mtile, len, n_pairs);
  }
}

template <int kDQK>
void launch(const SparsePrefillParams& p, cudaStream_t stream) {
  auto kernel = sparse_prefill_kernel<kDQK>;
  constexpr int smem = Layout<kDQK>::kSmemBytes;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  const int64_t grid = (int64_t)p.s_q * p.num_m_tiles;
  kernel<<<dim3(static_cast<unsigned>(grid)), dim3(kThreads), smem, stream>>>(p);
}

}  // namespace
}  // namespace sparse_prefill

void launch_sparse_prefill(const SparsePrefillParams& p, cudaStream_t stream) {
  if (p.d_qk == 576) {
    sparse_prefill::launch<576>(p, stream);
  } else {
    sparse_prefill::launch<512>(p, stream);
  }
}

}  // namespace sm90
}  // namespace flashmla
