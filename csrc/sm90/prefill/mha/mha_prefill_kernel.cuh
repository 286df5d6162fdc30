// Dense MHA-mode prefill for SM90 (sm_90a): torch.ops.flashmla_cuda.mha_prefill.
//
// Persistent: one CTA per SM works through tiles = (128 query rows of one sequence, one query head),
// taken in order from a counter (tile_coords: the m blocks of one head are consecutive, so CTAs at
// work together read the same keys from L2; the longest first when causal). The next tile's Q and
// first key blocks load while the math warpgroups finish the previous one (its last PV product and
// its output stores). 384 threads, three warpgroups (setmaxnreg moves registers to the two math
// warpgroups):
//   WG2 (producer): one thread fetches tiles and issues TMA loads: Q (d_qk / 64 swizzled tiles of 128
//       rows) once the previous tile's last QK product has retired, and for every 128-key block K
//       (d_qk / 64 tiles) and V (2 tiles) into a two-stage ring, each with its own full / empty
//       mbarriers. Rows outside [0, total) land as zeros (TMA bounds).
//   WG0 / WG1: 64 query rows each. Key blocks are walked from the last to the first, so the blocks
//       that need masks (sequence end, causal diagonal) come first. Within a warpgroup the softmax of
//       block i overlaps the tensor cores: S_i = Q K_i^T and O += P_{i-1} V_{i-1} are issued together,
//       the softmax of S_i runs while the PV product is in flight, and O is rescaled after it retires.
//       The running max moves only by more than kMaxSlack (sm90/common/seesaw.h), so the rescale is
//       skipped in almost every block. A warpgroup whose rows attend at most kPreciseMaxKeys keys
//       walks the blocks one at a time with P = hi + lo instead (see kPreciseMaxKeys).
// Masking: key t of a sequence is attended by its query row j iff k_lo <= t < k_hi and, when causal,
// t < n_k - n_q + j + 1 (bottom-right aligned), where [k_lo, k_hi) is the part of [0, n_k) whose rows
// lie inside the k / v tensors. Masked scores are set to -inf in place where no product is in flight
// (the first block walked, the precise path) and selected away in the softmax elsewhere; either way
// they leave the max and give P = 0, so NaN in masked keys never reaches a result. V rows past k_hi
// in the last block are zeroed in shared memory before the PV product (0 * NaN would be NaN). Rows owned by no sequence are written by a small fill kernel first.
// Outputs: out = O / l, lse = (max + log2 l) ln 2 (+inf when nothing is attended).
// Semantics: torch_flashmla/reference.py (mha_prefill). Design: docs/design.md.
#pragma once
#include <math.h>

#include "sm90/common/seesaw.h"
#include "sm90/common/sm90_ptx.h"
#include "sm90/prefill/mha/mha_prefill.h"

namespace flashmla {
namespace sm90 {
namespace mha_prefill {

constexpr int kThreads = 384;
constexpr int kTileBytes = kBlockN * 128;  // 128 rows x 64 elements, 128B swizzle
static_assert(kBlockM == kBlockN, "Q, K and V tiles share one row count");
constexpr int kKSteps = kBlockN / 16;      // k-steps of the PV product

// Warpgroups whose rows attend at most this many keys take the precise path (P = hi + lo, two bf16/fp16
// terms, in both PV products): with P rounded once (relative error up to 2^-8 in bf16) the output of a
// row that averages few keys is off by up to ~2^-8 |v| (0.0029 seen at 2-key rows of a causal 4096
// prompt, against the 8e-4 tolerance); over n keys the error falls as 1 / sqrt(n). Measured on the
// H200 (benchmarks/NOTES_mha_prefill.md): with no precise path 742 / 1040 elements of two test cases
// missed the tolerance, with a 256-key bound 4, with 384 and 512 none; each step of the bound costs
// about 2% at s 4096 (the precise blocks run unpipelined).
constexpr int kPreciseMaxKeys = 384;

template <int kDQK>
struct Layout {
  static constexpr int kTilesQK = kDQK / 64;
  static constexpr int kTilesV = kDV / 64;
  static constexpr int kOffQ = 0;
  static constexpr int kOffK = kOffQ + kTilesQK * kTileBytes;       // 2 stages
  static constexpr int kOffV = kOffK + 2 * kTilesQK * kTileBytes;   // 2 stages
  // mbarriers: q_full, q_empty, k_full[2], v_full[2], k_empty[2], v_empty[2], tile_full[2], tile_empty[2]
  static constexpr int kOffBar = kOffV + 2 * kTilesV * kTileBytes;
  static constexpr int kOffTile = kOffBar + 14 * 8;  // int [2]: the tile ids handed from the producer
  static constexpr int kSmemUsed = kOffTile + 2 * 4;
  static constexpr int kSmemBytes = kSmemUsed + 1023;  // + slack for the 1024-byte alignment
  static_assert(kSmemBytes <= 232448, "shared memory per block");
};

__device__ __forceinline__ uint32_t bar_q_full(uint32_t b) { return b; }
__device__ __forceinline__ uint32_t bar_q_empty(uint32_t b) { return b + 8; }
__device__ __forceinline__ uint32_t bar_k_full(uint32_t b, int s) { return b + 16 + s * 8; }
__device__ __forceinline__ uint32_t bar_v_full(uint32_t b, int s) { return b + 32 + s * 8; }
__device__ __forceinline__ uint32_t bar_k_empty(uint32_t b, int s) { return b + 48 + s * 8; }
__device__ __forceinline__ uint32_t bar_v_empty(uint32_t b, int s) { return b + 64 + s * 8; }
__device__ __forceinline__ uint32_t bar_tile_full(uint32_t b, int s) { return b + 80 + s * 8; }
__device__ __forceinline__ uint32_t bar_tile_empty(uint32_t b, int s) { return b + 96 + s * 8; }

// setmaxnreg budgets: they must sum to the launch allotment, 3 x 168 per thread slot.
constexpr int kRegsMath = 232, kRegsProducer = 40;
static_assert(2 * kRegsMath + kRegsProducer == 3 * 168, "setmaxnreg budgets must fit the launch allotment");

// Named barriers (0 is __syncthreads): 1 + w = warpgroup w alone (zero_v_rows).

// One arrival per warp on an empty barrier (count 8: every math warp once per block).
__device__ __forceinline__ void release(uint32_t bar) { mbar_arrive_per_warp(bar); }

// What a CTA computes: its sequence's rows and the key blocks [n_begin, n_end) its rows attend to.
struct Work {
  int64_t start_q, start_k;  // first row of the sequence in q and in k / v (may lie outside them)
  int n_q, n_k;              // clamped lengths
  int k_lo, k_hi;            // keys whose rows lie inside k / v: [k_lo, k_hi)
  int m0;                    // first query position of the CTA
  int n_begin, n_end;
};

__device__ __forceinline__ bool plan_work(const MhaPrefillParams& p, int seq, int mblk, Work& w) {
  const int64_t sq = p.cu_seqlens_q[seq], sk = p.cu_seqlens_k[seq];
  const int64_t nq = min(max((int64_t)p.cu_seqlens_q[seq + 1] - sq, (int64_t)0), (int64_t)p.max_seqlen_q);
  const int64_t nk = min(max((int64_t)p.cu_seqlens_k[seq + 1] - sk, (int64_t)0), (int64_t)p.max_seqlen_k);
  w.m0 = mblk * kBlockM;
  if (w.m0 >= nq) return false;
  w.start_q = sq;
  w.start_k = sk;
  w.n_q = static_cast<int>(nq);
  w.n_k = static_cast<int>(nk);
  w.k_lo = static_cast<int>(min(max(-sk, (int64_t)0), nk));
  w.k_hi = static_cast<int>(max(min(nk, (int64_t)p.total_k - sk), (int64_t)w.k_lo));
  int64_t end = w.k_hi;
  if (p.causal) {
    const int64_t last_row = min((int64_t)w.m0 + kBlockM - 1, nq - 1);
    end = min(end, nk - nq + last_row + 1);
  }
  w.n_begin = w.k_lo / kBlockN;
  w.n_end = end > w.k_lo ? static_cast<int>((end + kBlockN - 1) / kBlockN) : w.n_begin;
  return true;
}

// Tile `tile` of the launch: (sequence, head, m block). The m blocks of one head are consecutive, so
// CTAs working at the same time share keys in L2; when causal the longest (last) m block comes first.
__device__ __forceinline__ void tile_coords(const MhaPrefillParams& p, int tile, int& seq, int& head, int& mblk) {
  const int m_idx = tile % p.num_m_blocks, hs = tile / p.num_m_blocks;
  head = hs % p.h_q;
  seq = hs / p.h_q;
  mblk = p.causal ? p.num_m_blocks - 1 - m_idx : m_idx;
}

// S = Q K^T over one key block (Q: this warpgroup's 64 rows). Committed, not waited for.
template <typename T, int kDQK>
__device__ __forceinline__ void qk_block(float (&s)[64], uint32_t q_rows, uint32_t k_stage) {
  const uint64_t desc_q = desc_sw128(q_rows, 16, 1024), desc_k = desc_sw128(k_stage, 16, 1024);
  fence_all(s);
  wgmma_fence();
#pragma unroll
  for (int t = 0; t < kDQK / 64; ++t)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t off = t * kTileBytes + kk * 32;
      TypeOps<T>::qk128(s, desc_add(desc_q, off), desc_add(desc_k, off), t > 0 || kk > 0);
    }
  wgmma_commit();
}

// O += P V over one key block, P from registers, V (128 keys x 128 columns, two tiles) MN-major.
template <typename T>
__device__ __forceinline__ void pv_block(float (&o)[64], const uint32_t (&pa)[kKSteps][4], uint32_t v_stage) {
  const uint64_t desc_v = desc_sw128(v_stage, kTileBytes, 1024);
  fence_all(o);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) TypeOps<T>::pv128_r(o, pa[kk], desc_add(desc_v, kk * 16 * 128), 1);
  wgmma_commit();
}

// Which keys of a block this thread's rows attend, relative to its first column (key0 = block start +
// 2 quad): column col of row row0 (row_half 0) or row0 + 8 (1) is attended iff lo <= col < hi0 / hi1.
struct KeyRange {
  int lo, hi0, hi1;
  __device__ __forceinline__ bool operator()(int col, int row_half) const {
    return col >= lo && col < (row_half ? hi1 : hi0);
  }
};

// Scores of keys the row does not attend -> -inf, in place (only while no product that writes S is in
// flight), so that one softmax instantiation (AllValid) serves every block: -inf is left out of the max
// and gives P = exp2(-inf) = 0, and a NaN in a masked key never reaches a result.
__device__ __forceinline__ void mask_in_place(float (&s)[64], KeyRange valid) {
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    if (!valid((i / 4) * 8 + i % 2, (i % 4) < 2 ? 0 : 1)) s[i] = -INFINITY;
  }
}

// Raw row maxima of this thread's two rows over its quad, of the scores `valid` keeps. S is only read:
// it is the accumulator of a finished product while the PV product is in flight, and writing it there
// would make ptxas serialize every wgmma of the kernel.
template <typename Valid>
__device__ __forceinline__ void row_max(const float (&s)[64], Valid valid, float& mx0, float& mx1) {
  mx0 = -INFINITY;
  mx1 = -INFINITY;
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk)
#pragma unroll
    for (int reg = 0; reg < 4; ++reg)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float x = valid(16 * kk + 8 * (reg >> 1) + e, reg & 1) ? s[8 * kk + 2 * reg + e] : -INFINITY;
        if (reg & 1) mx1 = fmaxf(mx1, x); else mx0 = fmaxf(mx0, x);
      }
#pragma unroll
  for (int o_ = 1; o_ <= 2; o_ *= 2) {
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o_));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o_));
  }
}

// The softmax step of one block: row maxima, the running-max update, P (A fragments) and its row sums.
template <typename T, typename Valid>
__device__ __forceinline__ MaxUpdate softmax_block(const float (&s)[64], Valid valid, float scale_log2, float& run0,
                                                   float& run1, uint32_t (&pa)[kKSteps][4], float& sum0, float& sum1) {
  float mx0, mx1;
  row_max(s, valid, mx0, mx1);
  const MaxUpdate u = update_max(run0, run1, mx0 * scale_log2, mx1 * scale_log2);
  run0 = u.max0;
  run1 = u.max1;
  exp_pack<T>(pa, s, scale_log2, u.base0, u.base1, sum0, sum1, valid);
  return u;
}

// The same step for the precise path: P = exp2(S - base) in place (nothing is in flight then).
template <typename Valid>
__device__ __forceinline__ MaxUpdate softmax_block_in_place(float (&s)[64], Valid valid, float scale_log2, float& run0,
                                                            float& run1, float& sum0, float& sum1) {
  float mx0, mx1;
  row_max(s, valid, mx0, mx1);
  const MaxUpdate u = update_max(run0, run1, mx0 * scale_log2, mx1 * scale_log2);
  run0 = u.max0;
  run1 = u.max1;
  exp_rows(s, scale_log2, u.base0, u.base1, sum0, sum1, valid);
  return u;
}

// V rows [first_row, 128) of a stage -> 0 (rows past the keys inside k / v: TMA loaded whatever the
// next sequence or the padding holds there). Each math warpgroup zeroes before its own product; both
// write the same zeros, so neither can read a stale row after its own barrier.
__device__ __forceinline__ void zero_v_rows(uint32_t v_stage, int first_row, int wg) {
  const int wtid = threadIdx.x % 128;
  const int chunks = (kBlockN - first_row) * 8;  // 16-byte pieces per tile
  for (int c = wtid; c < chunks * (kDV / 64); c += 128) {
    const int tile = c / chunks, r = first_row + (c % chunks) / 8, piece = c % 8;
    const uint32_t a = v_stage + tile * kTileBytes + r * 128 + piece * 16;
    asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};\n" ::"r"(a), "r"(0) : "memory");
  }
  fence_proxy_async();  // generic stores -> the wgmma (async proxy) reads
  named_bar_sync(1 + wg, 128);
}

// One tile of a math warpgroup. kblk: ring position of the tile's first key block (stage kblk & 1, phase
// (kblk >> 1) & 1); q_load: how many Q tiles this CTA loaded before this one (the parity of q_full).
template <typename T, int kDQK, int kWG>
__device__ __forceinline__ void math_tile(const MhaPrefillParams& p, uint8_t* smem, const Work& w, int head, int kblk,
                                          int q_load) {
  using L = Layout<kDQK>;
  const uint32_t sbase = smem_addr(smem);
  const uint32_t bars = sbase + L::kOffBar;
  const int wtid = threadIdx.x % 128;
  const int warp = wtid / 32, lane = wtid % 32, quad = lane % 4;
  const int row0 = warp * 16 + lane / 4;
  const int j0 = w.m0 + kWG * 64 + row0, j1 = j0 + 8;  // query positions within the sequence
  // Keys attended by rows j0 / j1: [k_lo, hi).
  int hi0 = w.k_hi, hi1 = w.k_hi;
  if (p.causal) {
    hi0 = min(hi0, w.n_k - w.n_q + j0 + 1);
    hi1 = min(hi1, w.n_k - w.n_q + j1 + 1);
  }
  // Blocks whose keys every row of this CTA attends need no mask.
  const int causal_free_end = p.causal ? w.n_k - w.n_q + w.m0 + 1 : w.k_hi;  // keys < this: attended by row m0

  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.f;
  float l0 = 0.f, l1 = 0.f;
  float run0 = -INFINITY, run1 = -INFINITY;  // running maxima (log2 domain)
  const int nb = w.n_end - w.n_begin;

  if (nb > 0) {
    const uint32_t q_rows = sbase + L::kOffQ + kWG * 64 * 128;
    auto k_stage = [&](int st) { return sbase + L::kOffK + st * (L::kTilesQK * kTileBytes); };
    auto v_stage = [&](int st) { return sbase + L::kOffV + st * (L::kTilesV * kTileBytes); };
    auto key_range = [&](int n) {
      const int key0 = n * kBlockN + quad * 2;
      return KeyRange{w.k_lo - key0, hi0 - key0, hi1 - key0};
    };
    auto needs_mask = [&](int n) {
      return n * kBlockN < w.k_lo || (n + 1) * kBlockN > min(w.k_hi, causal_free_end);
    };
    // The first block walked (the last one) may reach past k_hi: its V rows from there on are zeroed.
    const int zero_from = w.k_hi - (w.n_end - 1) * kBlockN;

    // The most keys a row of this warpgroup attends (rows past the sequence do not count).
    const int j_last = min(w.m0 + kWG * 64 + 63, w.n_q - 1);
    const int max_keys = (p.causal ? min(w.k_hi, w.n_k - w.n_q + j_last + 1) : w.k_hi) - w.k_lo;
    // Q is free for the next tile's load once the last QK product of this one has retired.
    auto release_q = [&](int i) {
      if (i == nb - 1) release(bar_q_empty(bars));
    };

    // S of the i-th block walked (ring stage st, phase ph), computed alone and retired: its K stage (and
    // Q, after the last block) is released. Used where nothing else is in flight.
    auto qk_retired = [&](float(&s)[64], int i, int st, int ph) {
      mbar_wait_loop(bar_k_full(bars, st), ph);
      qk_block<T, kDQK>(s, q_rows, k_stage(st));
      wgmma_wait<0>();
      fence_all(s);
      release(bar_k_empty(bars, st));
      release_q(i);
    };

    mbar_wait_loop(bar_q_full(bars), q_load & 1);
    if (max_keys <= kPreciseMaxKeys) {
      // ---- precise path: one block at a time, P = hi + lo ----
      for (int i = 0; i < nb; ++i) {
        const int n = w.n_end - 1 - i;
        const int st = (kblk + i) & 1, ph = ((kblk + i) >> 1) & 1;
        float s[64];
        qk_retired(s, i, st, ph);
        float sum0, sum1;
        if (needs_mask(n)) mask_in_place(s, key_range(n));
        const MaxUpdate u = softmax_block_in_place(s, AllValid{}, p.scale_log2, run0, run1, sum0, sum1);
        rescale_add(o, l0, l1, u, sum0, sum1);
        uint32_t p_hi[kKSteps][4], p_lo[kKSteps][4];
        pack_p<T, false>(p_hi, s);
        pack_p<T, true>(p_lo, s);
        mbar_wait_loop(bar_v_full(bars, st), ph);
        if (i == 0 && zero_from < kBlockN) zero_v_rows(v_stage(st), zero_from, kWG);
        pv_block<T>(o, p_hi, v_stage(st));
        pv_block<T>(o, p_lo, v_stage(st));
        wgmma_wait<0>();
        fence_all(o);
        fence_frags(p_hi);
        fence_frags(p_lo);
        release(bar_v_empty(bars, st));
      }
    } else {
      uint32_t pa[kKSteps][4];
      {
        const int n = w.n_end - 1;
        const int st = kblk & 1, ph = (kblk >> 1) & 1;
        float s[64];
        qk_retired(s, 0, st, ph);
        float sum0, sum1;
        if (needs_mask(n)) mask_in_place(s, key_range(n));
        softmax_block<T>(s, AllValid{}, p.scale_log2, run0, run1, pa, sum0, sum1);
        l0 = sum0;
        l1 = sum1;
      }
      // Block i: S_i = Q K_i^T and O += P_{i-1} V_{i-1} in flight together; P_i goes to p_out. P alternates
      // between two register sets (a copy between them would make ptxas serialize the wgmmas). S is only
      // read here (a product is in flight), so a block that needs a mask (the second diagonal block when
      // s_k - s_q is not a multiple of 128, or the block holding k_lo) selects in the softmax instead of
      // masking in place. (Waiting for both products and masking in place made ptxas spill 72 bytes.)
      auto step = [&](int i, uint32_t (&p_in)[kKSteps][4], uint32_t (&p_out)[kKSteps][4]) {
        const int n = w.n_end - 1 - i;
        const int g = kblk + i;
        const int st = g & 1, ph = (g >> 1) & 1;
        const int pst = st ^ 1, pph = ((g - 1) >> 1) & 1;
        const bool masked = needs_mask(n);
        float s[64];
        mbar_wait_loop(bar_k_full(bars, st), ph);
        qk_block<T, kDQK>(s, q_rows, k_stage(st));
        mbar_wait_loop(bar_v_full(bars, pst), pph);
        if (i == 1 && zero_from < kBlockN) zero_v_rows(v_stage(pst), zero_from, kWG);
        pv_block<T>(o, p_in, v_stage(pst));
        wgmma_wait<1>();  // S of this block
        fence_all(s);
        release(bar_k_empty(bars, st));
        release_q(i);
        float sum0, sum1;
        const MaxUpdate u = masked ? softmax_block<T>(s, key_range(n), p.scale_log2, run0, run1, p_out, sum0, sum1)
                                   : softmax_block<T>(s, AllValid{}, p.scale_log2, run0, run1, p_out, sum0, sum1);
        wgmma_wait<0>();  // O += P V of the previous block
        fence_all(o);
        fence_frags(p_in);
        release(bar_v_empty(bars, pst));
        rescale_add(o, l0, l1, u, sum0, sum1);
      };
      // The last product: O += P V of the last block walked.
      auto finish = [&](uint32_t (&p_last)[kKSteps][4]) {
        const int g = kblk + nb - 1;
        const int st = g & 1, ph = (g >> 1) & 1;
        mbar_wait_loop(bar_v_full(bars, st), ph);
        if (nb == 1 && zero_from < kBlockN) zero_v_rows(v_stage(st), zero_from, kWG);
        pv_block<T>(o, p_last, v_stage(st));
        wgmma_wait<0>();
        fence_all(o);
        fence_frags(p_last);
        release(bar_v_empty(bars, st));
      };
      uint32_t pb[kKSteps][4];
      int i = 1;
      for (; i + 1 < nb; i += 2) {
        step(i, pa, pb);
        step(i + 1, pb, pa);
      }
      if (i < nb) {
        step(i, pa, pb);
        finish(pb);
      } else {
        finish(pa);
      }
    }
  }

  // ---- epilogue: out = O / l, lse = (max + log2 l) ln 2 ----
#pragma unroll
  for (int o_ = 1; o_ <= 2; o_ *= 2) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, o_);
    l1 += __shfl_xor_sync(0xffffffffu, l1, o_);
  }
  constexpr float kLn2 = 0.6931471805599453f;
  const float base0 = run0 == -INFINITY ? 0.f : run0, base1 = run1 == -INFINITY ? 0.f : run1;
  const float sc0 = l0 > 0.f ? 1.f / l0 : 0.f, sc1 = l1 > 0.f ? 1.f / l1 : 0.f;
  // Rows of the sequence that exist in q.
  const bool ok0 = j0 < w.n_q && w.start_q + j0 >= 0 && w.start_q + j0 < p.total_q;
  const bool ok1 = j1 < w.n_q && w.start_q + j1 >= 0 && w.start_q + j1 < p.total_q;
  const int64_t r0 = (w.start_q + j0) * p.h_q + head, r1 = (w.start_q + j1) * p.h_q + head;
  if (quad == 0) {
    if (ok0) p.lse[r0] = l0 > 0.f ? (base0 + log2f(l0)) * kLn2 : INFINITY;
    if (ok1) p.lse[r1] = l1 > 0.f ? (base1 + log2f(l1)) * kLn2 : INFINITY;
  }
  T* out = reinterpret_cast<T*>(p.out);
  store_rows_16bit<T>(out + r0 * kDV, out + r1 * kDV, o, sc0, sc1, ok0, ok1, quad);
}

// The producer: one thread fetches tiles (the first is blockIdx.x, the next ones from the launch's
// counter), hands each id to the math warpgroups through a two-slot mailbox, and loads the tile's Q
// (once the previous tile's last QK product has retired) and its key blocks into the ring.
template <int kDQK>
__device__ __forceinline__ void producer(const MhaPrefillParams& p, uint8_t* smem, const CUtensorMap* tq,
                                         const CUtensorMap* tk, const CUtensorMap* tv) {
  using L = Layout<kDQK>;
  if (threadIdx.x != 256) return;
  const uint32_t sbase = smem_addr(smem);
  const uint32_t bars = sbase + L::kOffBar;
  int* s_tile = reinterpret_cast<int*>(smem + L::kOffTile);
  int kblk = 0, q_load = 0;
  for (int t = 0;; ++t) {
    const int tile = t == 0 ? static_cast<int>(blockIdx.x) : static_cast<int>(gridDim.x) + atomicAdd(p.tile_counter, 1);
    const int slot = t & 1;
    mbar_wait(bar_tile_empty(bars, slot), ((t >> 1) & 1) ^ 1);
    s_tile[slot] = tile;
    mbar_arrive(bar_tile_full(bars, slot));  // release: the id is visible to the waiting warps
    if (tile >= p.num_tiles) break;
    int seq, head, mblk;
    tile_coords(p, tile, seq, head, mblk);
    Work w;
    if (!plan_work(p, seq, mblk, w) || w.n_end <= w.n_begin) continue;
    const int kv_head = head / p.group;
    mbar_wait(bar_q_empty(bars), (q_load & 1) ^ 1);
    ++q_load;
    mbar_expect_tx(bar_q_full(bars), L::kTilesQK * kTileBytes);
#pragma unroll
    for (int c = 0; c < L::kTilesQK; ++c) {
      tma_load_3d(sbase + L::kOffQ + c * kTileBytes, tq, bar_q_full(bars), c * 64, head,
                  static_cast<int>(w.start_q + w.m0));
    }
    const int nb = w.n_end - w.n_begin;
    for (int i = 0; i < nb; ++i) {
      const int n = w.n_end - 1 - i;
      const int g = kblk + i;
      const int st = g & 1;
      const uint32_t empty_phase = ((g >> 1) & 1) ^ 1;
      const int row = static_cast<int>(w.start_k + (int64_t)n * kBlockN);
      mbar_wait(bar_k_empty(bars, st), empty_phase);
      mbar_expect_tx(bar_k_full(bars, st), L::kTilesQK * kTileBytes);
#pragma unroll
      for (int c = 0; c < L::kTilesQK; ++c) {
        tma_load_3d(sbase + L::kOffK + st * (L::kTilesQK * kTileBytes) + c * kTileBytes, tk, bar_k_full(bars, st),
                    c * 64, kv_head, row);
      }
      mbar_wait(bar_v_empty(bars, st), empty_phase);
      mbar_expect_tx(bar_v_full(bars, st), L::kTilesV * kTileBytes);
#pragma unroll
      for (int c = 0; c < L::kTilesV; ++c) {
        tma_load_3d(sbase + L::kOffV + st * (L::kTilesV * kTileBytes) + c * kTileBytes, tv, bar_v_full(bars, st),
                    c * 64, kv_head, row);
      }
    }
    kblk += nb;
  }
}

// A math warpgroup's tiles, in the order the producer hands them out.
template <typename T, int kDQK, int kWG>
__device__ __forceinline__ void math_warpgroup(const MhaPrefillParams& p, uint8_t* smem) {
  using L = Layout<kDQK>;
  const uint32_t bars = smem_addr(smem) + L::kOffBar;
  const volatile int* s_tile = reinterpret_cast<const volatile int*>(smem + L::kOffTile);
  int kblk = 0, q_load = 0;
  for (int t = 0;; ++t) {
    const int slot = t & 1;
    mbar_wait_loop(bar_tile_full(bars, slot), (t >> 1) & 1);
    const int tile = s_tile[slot];
    release(bar_tile_empty(bars, slot));
    if (tile >= p.num_tiles) break;
    int seq, head, mblk;
    tile_coords(p, tile, seq, head, mblk);
    Work w;
    if (!plan_work(p, seq, mblk, w)) continue;
    math_tile<T, kDQK, kWG>(p, smem, w, head, kblk, q_load);
    const int nb = w.n_end - w.n_begin;
    kblk += nb;
    q_load += nb > 0 ? 1 : 0;
  }
}

template <typename T, int kDQK>
__global__ void __launch_bounds__(kThreads, 1)
    mha_prefill_kernel(const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tk,
                       const __grid_constant__ CUtensorMap tv, const __grid_constant__ MhaPrefillParams p) {
  using L = Layout<kDQK>;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  const uint32_t bars = smem_addr(smem) + L::kOffBar;
  if (threadIdx.x == 0) {
    mbar_init(bar_q_full(bars), 1);
    mbar_init(bar_q_empty(bars), 8);  // every math warp
    for (int s = 0; s < 2; ++s) {
      mbar_init(bar_k_full(bars, s), 1);
      mbar_init(bar_v_full(bars, s), 1);
      mbar_init(bar_k_empty(bars, s), 8);
      mbar_init(bar_v_empty(bars, s), 8);
      mbar_init(bar_tile_full(bars, s), 1);
      mbar_init(bar_tile_empty(bars, s), 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  if (wg == 2) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegsProducer));
    producer<kDQK>(p, smem, &tq, &tk, &tv);
  } else if (wg == 0) {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegsMath));
    math_warpgroup<T, kDQK, 0>(p, smem);
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegsMath));
    math_warpgroup<T, kDQK, 1>(p, smem);
  }
}

// out = 0 and lse = +inf for rows that no sequence owns (before cu_seqlens_q[0], after
// cu_seqlens_q[b], or past a sequence's max_seqlen_q cut). Runs before the attention kernel on the same
// stream, so a row it fills by mistake (possible only for decreasing cu_seqlens_q, where the binary
// search can miss the owner) is overwritten by its owner: ownership is verified, never assumed.
template <typename T>
__global__ void fill_unowned_rows_kernel(const MhaPrefillParams p) {
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r == 0) *p.tile_counter = 0;  // the attention kernel's tile counter, read after this kernel
  if (r >= p.total_q) return;
  int lo = 0, hi = p.b;  // candidate: the last sequence whose start is <= r
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (p.cu_seqlens_q[mid] <= r) lo = mid + 1; else hi = mid;
  }
  bool owned = false;
  if (lo > 0) {
    const int64_t start = p.cu_seqlens_q[lo - 1];
    const int64_t len = min(max((int64_t)p.cu_seqlens_q[lo] - start, (int64_t)0), (int64_t)p.max_seqlen_q);
    owned = r - start < len;
  }
  if (owned) return;
  uint4* dst = reinterpret_cast<uint4*>(reinterpret_cast<T*>(p.out) + r * p.h_q * kDV);
  for (int i = 0; i < p.h_q * kDV * (int)sizeof(T) / 16; ++i) dst[i] = make_uint4(0, 0, 0, 0);
  for (int h = 0; h < p.h_q; ++h) p.lse[r * p.h_q + h] = INFINITY;
}

template <typename T, int kDQK>
void launch(const MhaPrefillParams& p, const CUtensorMap& tq, const CUtensorMap& tk, const CUtensorMap& tv,
            cudaStream_t stream) {
  if (p.total_q > 0) {
    fill_unowned_rows_kernel<T><<<(p.total_q + 255) / 256, 256, 0, stream>>>(p);
  }
  if (p.b == 0 || p.num_m_blocks == 0) return;
  auto kernel = mha_prefill_kernel<T, kDQK>;
  constexpr int smem = Layout<kDQK>::kSmemBytes;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  const int grid = p.num_tiles < p.num_sms ? p.num_tiles : p.num_sms;  // persistent: one CTA per SM
  kernel<<<dim3(grid), dim3(kThreads), smem, stream>>>(tq, tk, tv, p);
}

template <typename T>
void launch_dtype(const MhaPrefillParams& p, int d_qk, const CUtensorMap& tq, const CUtensorMap& tk,
                  const CUtensorMap& tv, cudaStream_t stream) {
  if (d_qk == 192) {
    launch<T, 192>(p, tq, tk, tv, stream);
  } else {
    launch<T, 128>(p, tq, tk, tv, stream);
  }
}

}  // namespace mha_prefill
}  // namespace sm90
}  // namespace flashmla
