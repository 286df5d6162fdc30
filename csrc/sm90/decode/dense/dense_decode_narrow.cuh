// Dense MLA decode over a 16-bit cache for SM90 (sm_90a), at most 32 query rows per kv head
// (s_q * h_q / h_kv <= 32: tensor-parallel head counts such as 16 or 32 heads per GPU). Both products are
// transposed, S^T = K Q^T and O^T = V^T P^T (m64n32k16), so that the chunk's 64 tokens are the products' M and
// the 32 query rows their N: the 64-row kernel (dense_decode_kernel.cuh) pads these rows to 64, twice the tensor
// work per byte of cache. V^T is the cache tile itself, read MN-major (16-bit wgmma operands may be), so no
// transposes (unlike the FP8 32-row kernel); docs/design.md §5.1.
//
// One CTA = (SM partition of the plan, kv head), 160 threads:
//   warps 0-3 (the math warpgroup): per chunk S^T (36 steps over the 9 column tiles), the masked online
//     softmax down the columns (one column per query row: maxima over the chunk's tokens by shuffles and
//     through shared memory, transposed.h), P^T to shared memory (stmatrix .trans), O^T += V^T P^T (eight m64
//     tiles of V^T's rows, 128 fp32 per thread); short requests (len <= kPreciseMaxLen, as in the 64-row
//     kernel) add the product with P's rounding residue. The next request's Q loads are issued once the last
//     S^T of a request is done, before that chunk's products.
//   warp 4: the cache loads, one mbarrier per stage (two stages of 9 x 8 KB; the math warpgroup frees a
//     stage after its PV product).
// The tensor work per chunk (~4.5 MFLOP) is about a third of the time the chunk's 72 KB take to arrive at an
// SM's share of DRAM bandwidth, so one warpgroup does all of it in order.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include "sm90/common/seesaw.h"
#include "sm90/common/sm90_ptx.h"
#include "sm90/common/transposed.h"
#include "sm90/decode/dense/dense_decode.h"
#include "sm90/decode/dense/dense_decode_common.cuh"

namespace flashmla {
namespace sm90 {
namespace dense_narrow {

using dense::kNarrowRowsPerThread;
using dense::kPreciseMaxLen;
using dense::kSlotBytes;
using dense::narrow_row;

constexpr int kThreads = 160;                             // the math warpgroup + the loading warp
// The cache stream is loaded evict-first (the combine's partials stay in L2): 1.5-2.5% faster at b64 s8192 h16
// (benchmarks/NOTES.md, session 24).
constexpr bool kKvEvictFirst = true;
constexpr int kTiles = kDQK / 64;                         // 9 column tiles of 64 values (128 bytes)
constexpr int kStageBytes = kTiles * kSlotBytes;          // 64 tokens x 576 values
constexpr int kQTileBytes = kNarrowRows * 128;            // 32 query rows x 128 bytes, 128B swizzle
constexpr int kOffQ = 0;                                  // Q: 9 tiles of 32 rows
constexpr int kOffKV = kOffQ + kTiles * kQTileBytes;      // 2 stages
constexpr int kOffP = kOffKV + 2 * kStageBytes;           // P^T and its rounding residue: 2 x 32 rows x 64 tokens
constexpr int kOffColMax = kOffP + 2 * kQTileBytes;       // float[2][4][32]: per-warp column maxima, by chunk parity
constexpr int kOffColSum = kOffColMax + 2 * 4 * kNarrowRows * 4;  // float[4][32]: per-warp column sums
constexpr int kOffPageOk = kOffColSum + 4 * kNarrowRows * 4;      // uint64[2]: bit k = token k's page is in the cache
constexpr int kOffBar = kOffPageOk + 2 * 8;               // mbarriers: full[2] (the loads), empty[2] (4 math warps)
constexpr int kOffPart = kOffBar + 4 * 8;                 // the CTA's dense::Partition (see the math warpgroup)
constexpr int kSmemUsed = kOffPart + sizeof(dense::Partition);
constexpr int kSmemBytes = kSmemUsed + 1024;              // slack for 1024-byte alignment
static_assert(kSmemBytes <= 232448, "shared memory per block");
static_assert(kOffKV % 1024 == 0 && kOffP % 1024 == 0, "128B swizzle atoms");

constexpr uint32_t kBarColumns = 1;  // named barrier: the column reductions (math warpgroup)
constexpr uint32_t kBarMath = 2;     // named barrier: Q, P^T and zeroed V rows are written (math warpgroup)

// The Q rows of request r (zero rows past m_total) -> the Q tiles, 16-byte cp.async by the 128 math threads;
// committed, not waited for.
template <typename T>
__device__ __forceinline__ void load_q(const DenseDecodeParams& p, uint32_t sbase, int r, int kvh, int tid) {
  constexpr int kPieces = kNarrowRows * (kDQK / 8);  // 16-byte pieces
  static_assert(kPieces % 128 == 0, "Q pieces per thread");
  const T* qbase = reinterpret_cast<const T*>(p.q);
#pragma unroll 1
  for (int it = 0; it < kPieces / 128; ++it) {
    const int idx = tid + it * 128;
    const int row = idx / (kDQK / 8), ch = idx % (kDQK / 8);
    const bool in = row < p.m_total;
    const T* src = qbase + dense::q_offset(p, r, dense::query_row(p, kvh, in ? row : 0)) + ch * 8;
    const uint32_t dst = sbase + kOffQ + (ch / 8) * kQTileBytes + swz(row, ch % 8);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(in ? 16 : 0) : "memory");
  }
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// attends(k, t, in0, in1) of mask_scale_columns: tokens t and t + 8 of the chunk are before the column's limit (the request's end, the
// causal limit of its query token), formed only in chunks that reach the smallest limit.
struct ColumnLimit {
  bool tail;
  int chunk, end, len, causal, causal_shift, m_total, group, quad;
  __device__ __forceinline__ void operator()(int k, int t, bool& in0, bool& in1) const {
    int lim = end;
    if (tail) lim = min(end, causal ? causal_shift + min(narrow_row(k, quad), m_total - 1) / group : len);
    in0 = chunk + t < lim;
    in1 = chunk + t + 8 < lim;
  }
};

// Rows [valid, 64) of V's 8 tiles in a stage -> 0 (the cache there may hold NaN, which P = 0 must not meet).
__device__ __forceinline__ void zero_v_tail(uint8_t* stage, int valid, int tid) {
  for (int idx = tid; idx < (kBlockN - valid) * 8 * 8; idx += 128) {
    const int row = valid + idx / 64, tile = (idx / 8) % 8;
    *reinterpret_cast<uint4*>(stage + tile * kSlotBytes + swz(row, idx % 8)) = make_uint4(0, 0, 0, 0);
  }
}

template <typename T, bool kSmallPages>
__global__ void __launch_bounds__(kThreads, 1)
    dense_decode_narrow_kernel(const __grid_constant__ CUtensorMap tmap, const DenseDecodeParams p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  const uint32_t sbase = smem_addr(smem);
  const uint32_t bar_full = sbase + kOffBar, bar_empty = sbase + kOffBar + 16;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int kvh = blockIdx.y;

  const dense::Partition pt = dense::read_partition(p);
  if (pt.empty()) return;

  dense::Partition* s_part = reinterpret_cast<dense::Partition*>(smem + kOffPart);
  if (tid == 0) {
    *s_part = pt;
    for (int s = 0; s < 2; ++s) {
      mbar_init(bar_full + s * 8, 1);
      mbar_init(bar_empty + s * 8, 4);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tmap)) : "memory");
  }
  __syncthreads();
  allow_dependent_launch();

  if (warp == 4) {
    // ======================= the loading warp: every chunk of the partition, in order =======================
    dense::for_each_chunk_to_load(p, pt, [&](int r, int tok, int end, int stage, uint32_t empty_parity) {
      const uint32_t dst = sbase + kOffKV + stage * kStageBytes;
      if constexpr (kSmallPages) {
        mbar_wait(bar_empty + stage * 8, empty_parity);
        dense::load_chunk_one_barrier<kTiles, 64, true, kKvEvictFirst>(&tmap, p, r, tok, end, kvh, dst,
                                                                       bar_full + stage * 8,
                                                                       sbase + kOffPageOk + stage * 8);
      } else {
        // The chunk's page id is read before the wait: the refill then follows the release with nothing but
        // its TMA issues (the block-table read and the division by page_size overlap the wait).
        const int page = dense::chunk_page(p, r, tok);
        mbar_wait(bar_empty + stage * 8, empty_parity);
        dense::load_chunk_from_page<kTiles, 64, kKvEvictFirst>(&tmap, p, page, tok, kvh, dst, bar_full + stage * 8,
                                                               sbase + kOffPageOk + stage * 8);
      }
    });
    return;
  }

  // ======================= the math warpgroup =======================
  float* s_colmax = reinterpret_cast<float*>(smem + kOffColMax);
  float* s_colsum = reinterpret_cast<float*>(smem + kOffColSum);
  const uint64_t* s_page_ok = reinterpret_cast<const uint64_t*>(smem + kOffPageOk);
  constexpr int kH = kNarrowRowsPerThread;
  const int quad = lane % 4;
  const int tok0 = warp * 16 + lane / 4;  // this thread's tokens of a chunk: tok0, tok0 + 8
  // stmatrix .trans row addresses of this lane in a P^T tile: matrices (token block 2 warp + m % 2, row block
  // j0 + m / 2) for m = lane / 8, row lane % 8 inside its block (as the few-head sparse kernel)
  const int st_m = lane / 8, st_c = lane % 8;

  // The partition's bounds are read from shared memory where needed: held in registers across the chunk loop,
  // they made ptxas spill (O^T takes 128 registers).
  auto range_of = [&](int r, int& start, int& end) { dense::request_range(p, *s_part, r, start, end); };
  uint32_t g = 0;           // chunks consumed
  int q_ready_for = -1;     // the request whose Q loads are already issued
  for (int r = pt.begin_req; r <= s_part->end_req; ++r) {
    int start, end;
    range_of(r, start, end);
    const int len = dense::request_len(p, r);
    const int n_splits = p.num_splits[r + 1] - p.num_splits[r];  // read now: at the end it is a round trip more
    const bool precise = len <= kPreciseMaxLen;
    // Tokens from a row's limit on are not attended by it (the request's end, the causal limit of its query
    // token); the limits are formed only in chunks that reach the smallest (registers: O^T takes 128).
    const int causal_shift = p.causal ? len - p.s_q + 1 : len;  // the limit of query token t: causal_shift + t
    const int lim_min = min(end, p.causal ? causal_shift : len);
    float o[8][16];  // O^T tile m: element 4 j + 2 h + e = (dim 64 m + 16 warp + lane / 4 + 8 h, row 8 j + 2 quad + e)
#pragma unroll
    for (int m = 0; m < 8; ++m)
#pragma unroll
      for (int k = 0; k < 16; ++k) o[m][k] = 0.f;
    float run_max[kH], run_sum[kH];
#pragma unroll
    for (int k = 0; k < kH; ++k) run_max[k] = -INFINITY, run_sum[k] = 0.f;

    if (start < end) {
      if (q_ready_for != r) load_q<T>(p, sbase, r, kvh, tid);
      asm volatile("cp.async.wait_group 0;\n" ::: "memory");
      fence_proxy_async();
      named_bar_sync(kBarMath, 128);
#pragma unroll 1
      for (int c = start; c < end; c += kBlockN, ++g) {
        const int stage = g & 1;
        const uint32_t kv = sbase + kOffKV + stage * kStageBytes;
        mbar_wait(bar_full + stage * 8, (g >> 1) & 1);
        // ---- S^T = K Q^T ----
        float s[16];
        {
          const uint64_t desc_kv = desc_sw128(kv, 16, 1024), desc_q = desc_sw128(opaque(sbase + kOffQ), 16, 1024);
          fence_all(s);
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < kDQK / 16; ++kk)
            TypeOps<T>::qk32(s, desc_add(desc_kv, (kk / 4) * kSlotBytes + (kk % 4) * 32),
                             desc_add(desc_q, (kk / 4) * kQTileBytes + (kk % 4) * 32), kk > 0 ? 1 : 0);
          wgmma_commit();
          wgmma_wait<0>();
          fence_all(s);
        }
        // ---- masked online softmax down the columns (log2 domain) ----
        const uint64_t page_ok = s_page_ok[stage];
        const bool in0 = (page_ok >> tok0) & 1, in1 = (page_ok >> (tok0 + 8)) & 1;
        const ColumnLimit limit{c + kBlockN > lim_min, c, end, len, p.causal, causal_shift, p.m_total, p.group, quad};
        float mx[kH];
        mask_scale_columns<kNarrowRows>(s, in0, in1, tok0, limit, UniformScale{p.scale_log2}, mx);
        // by chunk parity: a warp writes chunk g + 2's maxima only after every warp has passed chunk g + 1's barrier
        reduce_over_tokens<kNarrowRows>(mx, s_colmax + (g & 1) * 4 * kNarrowRows, warp, lane, kBarColumns, MaxOp{});
        float base[kH], alpha[kH];
        update_column_maxima(run_max, mx, base, alpha);
        bool rescale = false;
#pragma unroll
        for (int k = 0; k < kH; ++k) rescale |= alpha[k] != 1.f;
        exp_columns<kNarrowRows>(s, base, alpha, run_sum);
        rescale_columns<kNarrowRows>(o, alpha, rescale);
        // ---- P^T (and its rounding residue) -> shared memory; V rows past the request's end -> 0 ----
#pragma unroll
        for (int term = 0; term < 2; ++term) {
          if (term == 1 && !precise) break;
          const uint32_t tile = sbase + kOffP + term * kQTileBytes;
#pragma unroll
          for (int j0 = 0; j0 < kH / 2; j0 += 2) {
            uint32_t rg[4];
#pragma unroll
            for (int m = 0; m < 4; ++m) {  // matrix m: token block 2 warp + m % 2, row block j0 + m / 2
              const int idx = 4 * (j0 + m / 2) + 2 * (m % 2);
              rg[m] = term == 0 ? TypeOps<T>::pack(s[idx], s[idx + 1]) : TypeOps<T>::pack_residue(s[idx], s[idx + 1]);
            }
            stmatrix_x4_trans(tile + swz(8 * (j0 + st_m / 2) + st_c, 2 * warp + st_m % 2), rg[0], rg[1], rg[2], rg[3]);
          }
        }
        if (end - c < kBlockN) zero_v_tail(smem + kOffKV + stage * kStageBytes, end - c, tid);
        fence_proxy_async();
        named_bar_sync(kBarMath, 128);
        // Every warp's S^T is done: the next request's Q loads go out now, so that they land while this chunk's
        // products and the epilogue run (the search for that request reads lengths: one read in front of them).
        if (c + kBlockN >= end) {
          int next = r + 1, next_start = 0, next_end = 0;
          for (; next <= s_part->end_req; ++next) {  // the next request with tokens to attend
            range_of(next, next_start, next_end);
            if (next_start < next_end) break;
          }
          if (next <= s_part->end_req) {
            load_q<T>(p, sbase, next, kvh, tid);
            q_ready_for = next;
          }
        }
        // ---- O^T += V^T P^T (then the residue term: its own batch, as in the few-head sparse kernel) ----
        const uint64_t desc_v = desc_sw128(kv, kSlotBytes, 1024);
#pragma unroll 1
        for (int term = 0; term < (precise ? 2 : 1); ++term) {
          const uint64_t desc_pt = desc_sw128(opaque(sbase + kOffP + term * kQTileBytes), 16, 1024);
          fence_all(o);
          wgmma_fence();
          pv_transposed_16bit<kNarrowRows>(o, desc_v, desc_pt, TypeOps<T>::pv32);
          wgmma_commit();
          wgmma_wait<0>();
          fence_all(o);
        }
        // this warp no longer reads the stage (nor P^T: the next chunk rewrites it after the barriers above)
        mbar_arrive_per_warp(bar_empty + stage * 8);
      }
    }
    // ---- epilogue: column sums over the request's tokens, then O^T / l as rows ----
    reduce_over_tokens<kNarrowRows>(run_sum, s_colsum, warp, lane, kBarColumns, AddOp{});
    named_bar_sync(kBarColumns, 128);  // s_colsum is rewritten by the next request's epilogue
    const int split_idx = r == s_part->begin_req ? s_part->begin_split : 0;
    dense::store_outputs_transposed<T>(p, o, r, kvh, 0, run_sum, run_max, n_splits, split_idx, 1.f, warp, lane);
  }
}

template <typename T>
void launch(const DenseDecodeParams& p, const CUtensorMap& tmap, cudaStream_t stream) {
  dense::launch_on_plan_grid(dense_decode_narrow_kernel<T, true>, dense_decode_narrow_kernel<T, false>, kThreads,
                             kSmemBytes, p, tmap, stream);
}

}  // namespace dense_narrow
}  // namespace sm90
}  // namespace flashmla
