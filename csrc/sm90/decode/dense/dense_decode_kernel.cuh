// Dense MLA decode kernel for SM90 (sm_90a), "seesaw" schedule: the two warpgroups take alternate 64-token
// chunks, so that one warpgroup's softmax runs while the other's matmuls keep the tensor cores busy.
//
// One CTA = (SM partition of the plan, kv head, 64-row query tile), 384 threads = 3 warpgroups: WG0 and WG1
// below, and WG2, whose warp 0 issues every cache load (load_warp) so that no math warp waits on a block-table
// read or a TMA issue between its products.
// Warpgroup 0 keeps O[:, 0:256] in registers, warpgroup 1 keeps O[:, 256:512]. Chunks of a request
// go in pairs (a, b) = (2k, 2k+1); stage of chunk g (counted over the CTA) is g & 1.
//
//   WG0: softmax of S_a against the running max (shared memory) -> publishes scale_a
//        writes P_a (relative to max_a) to shared memory for WG1
//        O0 = O0 * scale_a + P_a V_a[:, :256]            (P_a from registers); releases V_a[:, :256]
//        waits for scale_b: O0 = O0 * scale_b + P_b V_b[:, :256]   (P_b from shared memory)
//        waits for that product, releases V_b[:, :256], then S_{a+2}
//   WG1: waits for scale_a and P_a; issues O1 = O1 * scale_a + P_a V_a[:, 256:] (P_a from shared memory)
//        first, as the last reader of stage a; softmax of S_b against max_a while it runs -> publishes
//        scale_b, writes P_b to shared memory for WG0; releases tiles 4-8 of stage a
//        O1 = O1 * scale_b + P_b V_b[:, 256:]            (P_b from registers); releases tiles 4-8 of stage b
//        S_{b+2}, tiles 0-3 first: WG0 releases them after its P_b V_b[:, :256], which runs before this
//        warpgroup's product, so they land first; issued only once WG0's S_{a+2} is complete, so that
//        S_{a+2} runs alone and S_{b+2} during WG0's softmax of chunk a + 2
// WG0 does its softmax before it issues any product of the pair: issuing a wgmma stalls while the other
// warpgroup's products occupy the tensor cores, and the softmax would wait with it. WG1 takes that
// stall for P_a V_a (it issues while WG0's P_a V_a runs): stage a then refills about a product earlier,
// and the QK of chunk a + 2 no longer waits for its tiles 4-8 (+5-8% over softmax-first, NOTES.md).
// While a product into O is in flight, S is only read (ptxas serializes every wgmma of the kernel when
// an accumulator register is written inside a wgmma pipeline stage).
//
// Every 64-column tile of a KV stage has its own mbarrier, and a tile is refilled for chunk g+2 as soon
// as its last reader is done (V[:, :256] after WG0's two PV products, the rest after WG1's): that reader's
// warps arrive on the stage half's "empty" mbarrier and the loading warp issues the refill, so the next chunk
// streams in while the current pair is still multiplied (and the next request's first chunks during the
// current request's last ones). The 9th tile of Q (rope columns) lives in registers (A operand of the last
// four QK steps), which frees its shared memory for P_b.
//
// Short requests (len <= kPreciseMaxLen) take a second path: each warpgroup computes S of every chunk
// itself and multiplies P = hi + lo (two bf16/fp16 terms) with its half of V, so that P's rounding
// does not show in outputs that average only a few tokens.
//
// Pages of any size (docs/design.md §5.1): with page_size a multiple of 64 a chunk is one TMA load per tile;
// smaller pages (kSmallPages, its own instantiation) load each tile as 64 / gcd(page_size, 64) page slices,
// and a per-token mask marks the tokens whose page id is outside the cache.
//
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include "sm90/decode/dense/dense_decode.h"
#include "sm90/decode/dense/dense_decode_common.cuh"
#include "sm90/decode/dense/dense_decode_narrow.cuh"
#include "sm90/common/seesaw.h"
#include "sm90/common/sm90_ptx.h"

namespace flashmla {
namespace sm90 {
namespace dense {

constexpr int kMathThreads = 256;  // WG0 and WG1
constexpr int kThreads = 384;      // and WG2 (the loading warp and three idle warps)
static_assert(kBlockM * (kDQK / 8) % kMathThreads == 0, "Q tile load");
// setmaxnreg budgets out of the launch allotment of 168 registers per thread: the loading warpgroup keeps 24.
constexpr int kRegsMath = 240, kRegsLoad = 24;
static_assert(2 * kRegsMath + kRegsLoad == 3 * 168, "setmaxnreg budgets must fit the launch allotment");
constexpr int kTileBytes = 64 * 128;            // 64 rows x 64 columns x 2 bytes
constexpr int kNumColTiles = kDQK / 64;          // 9
constexpr int kStageBytes = kNumColTiles * kTileBytes;  // 73728

constexpr int kOffQ = 0;                                // Q tiles 0-7
constexpr int kOffPb = 8 * kTileBytes;                  // Q tile 8 while Q loads, then P_b
constexpr int kOffKV = 9 * kTileBytes;                  // 2 stages x 9 tiles
constexpr int kOffPa = kOffKV + 2 * kStageBytes;        // P_a
constexpr int kOffMax = kOffPa + kTileBytes;            // float[64]: running row max
constexpr int kOffScaleA = kOffMax + 64 * 4;            // float[64]
constexpr int kOffScaleB = kOffScaleA + 64 * 4;         // float[64]
constexpr int kOffSum = kOffScaleB + 64 * 4;            // float[2][64]
constexpr int kOffBar = kOffSum + 2 * 64 * 4;           // uint64[2][9]: one mbarrier per tile and stage
constexpr int kOffEmpty = kOffBar + 2 * kNumColTiles * 8;  // uint64[2][2]: stage s's tiles 0-3 / 4-8 have no reader left
constexpr int kOffPageOk = kOffEmpty + 4 * 8;  // uint64[2]: bit k = token k of the stage's chunk has its page in the cache
constexpr int kSmemUsed = kOffPageOk + 2 * 8;
constexpr int kSmemBytes = kSmemUsed + 1024;            // slack for 1024-byte alignment
static_assert(kSmemBytes <= 232448, "shared memory per block");

// Named barriers (0 is __syncthreads).
constexpr uint32_t kBarAll = 1;      // all 256 threads
constexpr uint32_t kBarScaleA = 2;   // WG0 -> WG1: scale_a and the running max are written
constexpr uint32_t kBarScaleB = 3;   // WG1 -> WG0: scale_b and the running max are written
constexpr uint32_t kBarPa = 4;       // WG0 -> WG1: P_a (relative to max_a) is in shared memory
constexpr uint32_t kBarPb = 5;       // WG1 -> WG0: P_b is in shared memory
constexpr uint32_t kBarPaFree = 6;   // WG1 -> WG0: WG1's product with P_a is done
constexpr uint32_t kBarWg0 = 7;      // one warpgroup (7 + wg)
constexpr uint32_t kBarQkA = 9;      // WG0 -> WG1: S_{a+2} is complete, WG1 may issue S_{b+2}

__device__ __forceinline__ uint32_t tile_bar(uint32_t sbase, int stage, int tile) {
  return sbase + kOffBar + (stage * kNumColTiles + tile) * 8;
}
__device__ __forceinline__ uint32_t stage_addr(uint32_t sbase, int stage) { return sbase + kOffKV + stage * kStageBytes; }
// Arrived on by the four warps of the last reader of tiles 0-3 (half 0: WG0) or 4-8 (half 1: WG1) of a stage.
__device__ __forceinline__ uint32_t empty_bar(uint32_t sbase, int stage, int half) {
  return sbase + kOffEmpty + (stage * 2 + half) * 8;
}

// TMA loads of tiles [t_begin, t_end) of the 64 tokens at offset `in_page` of the page `page` (the chunk's
// block-table entry, read by the caller; pages of 64 tokens and more, so the chunk lies in one page) into
// `stage`, one load per tile; called by lane 0 of the loading warp.
//
// A page id outside [0, num_blocks) is skipped: its loads fall outside the tensor map and land as zeros
// (nothing outside the cache is read, no NaN reaches the PV product), and the stage's page mask, written
// with the first tiles of the chunk, tells the consumers to mask the scores of that page's tokens. The mask
// is stored before the tiles' mbarrier arrive (release) and read after their wait (acquire); it is
// rewritten only by the refill of tiles 0-3, whose readers come after every reader of the mask.
__device__ __forceinline__ void load_tiles_from_page(const CUtensorMap* tmap, const DenseDecodeParams& p, uint32_t sbase,
                                                     int page, int in_page, int kvh, int stage, int t_begin, int t_end) {
  if (t_begin == 0) {
    const uint32_t in_cache = static_cast<unsigned>(page) < static_cast<unsigned>(p.num_blocks) ? 0xffffffffu : 0u;
    asm volatile("st.shared.v2.u32 [%0], {%1, %1};\n" ::"r"(sbase + kOffPageOk + stage * 8), "r"(in_cache) : "memory");
  }
  for (int t = t_begin; t < t_end; ++t) {
    const uint32_t bar = tile_bar(sbase, stage, t);
    mbar_expect_tx(bar, kTileBytes);
    tma_load_4d(stage_addr(sbase, stage) + t * kTileBytes, tmap, bar, t * 64, kvh, in_page, page);
  }
}

// The same for pages smaller than a chunk (page_size not a multiple of 64): tiles [t_begin, t_end) of the 64
// tokens at `tok` (a multiple of 64, before `end`) of request r, by load_tiles_small_pages, which reads the
// block-table entries itself and writes the page mask per token; called by one whole warp.
__device__ __forceinline__ void load_tiles_small(const CUtensorMap* tmap, const DenseDecodeParams& p, uint32_t sbase,
                                                 int r, int tok, int end, int kvh, int stage, int t_begin, int t_end) {
  load_tiles_small_pages<64, true>(tmap, block_table_row(p, r), p.page_div_mul, p.page_div_shift, p.page_size,
                                   p.page_rows_log2, p.num_blocks, tok, end, kvh, stage_addr(sbase, stage),
                                   tile_bar(sbase, stage, 0), sbase + kOffPageOk + stage * 8, t_begin, t_end);
}

// S = Q K^T over the 9 tiles of the chunk in `stage`, starting at tile kFirst, each after its mbarrier.
// Tile 8 of Q comes from registers. Committed as one wgmma group, not waited for.
template <typename T, int kFirst>
__device__ __forceinline__ void qk_chunk(float (&s)[32], uint32_t sbase, int stage, uint32_t phase,
                                         const uint32_t (&q8)[4][4]) {
  const uint64_t desc_kv = desc_sw128(stage_addr(sbase, stage), 16, 1024);
  const uint64_t desc_q = desc_sw128(sbase + kOffQ, 16, 1024);
  fence_all(s);
#pragma unroll
  for (int j = 0; j < kNumColTiles; ++j) {
    const int t = (j + kFirst) % kNumColTiles;
    mbar_wait_loop(tile_bar(sbase, stage, t), phase);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const int accumulate = j > 0 || kk > 0;
      const uint64_t desc_k = desc_add(desc_kv, t * kTileBytes + kk * 32);
      if (t < 8) {
        TypeOps<T>::qk64(s, desc_add(desc_q, t * kTileBytes + kk * 32), desc_k, accumulate);
      } else {
        TypeOps<T>::qk64_r(s, q8[kk], desc_k, accumulate);
      }
    }
  }
  wgmma_commit();
}

// Both, in place.
__device__ __forceinline__ void mask_rowmax(float (&s)[32], int chunk_tok, int lim0, int lim1, float scale_log2,
                                            int quad_col, float& mx0, float& mx1) {
  mask_tail(s, chunk_tok, lim0, lim1, quad_col);
  row_max(s, scale_log2, mx0, mx1);
}

// Rows [valid, 64) of tiles [t_begin, t_begin + 4) of a stage -> 0 (the cache there may hold NaN, and
// P = 0 must not meet it in the PV product); one warpgroup, then visible to its wgmma.
__device__ __forceinline__ void zero_tail_rows(uint8_t* stage, int t_begin, int valid, int tid_wg, int wg) {
  for (int idx = tid_wg; idx < (kBlockN - valid) * 4 * 8; idx += 128) {
    const int row = valid + idx / 32;
    const int tile = t_begin + (idx / 8) % 4;
    *reinterpret_cast<uint4*>(stage + tile * kTileBytes + swz(row, idx % 8)) = make_uint4(0, 0, 0, 0);
  }
  fence_proxy_async();
  named_bar_sync(kBarWg0 + wg, 128);
}

// The same for tiles the other warpgroup's QK waits for: they may still be landing, so wait first.
__device__ __forceinline__ void zero_tail_rows_landed(uint8_t* smem, uint32_t sbase, int stage, uint32_t phase,
                                                      int t_begin, int valid, int tid_wg, int wg) {
  for (int t = t_begin; t < t_begin + 4; ++t) mbar_wait(tile_bar(sbase, stage, t), phase);
  zero_tail_rows(smem + kOffKV + stage * kStageBytes, t_begin, valid, tid_wg, wg);
}

// Query position (0..s_q-1) of row `row` of m-tile `mtile` (rows past m_total: the last row's).
__device__ __forceinline__ int query_pos(const DenseDecodeParams& p, int mtile, int row) {
  return row_query_pos(p, mtile * kBlockM + row);
}

// WG2's warp 0: every cache load of the partition, in the order the math warpgroups consume the chunks: tiles 0-3
// of chunk g once WG0 has released them from chunk g - 2, tiles 4-8 once WG1 has. It runs ahead into the next
// request as far as the stages allow.
template <bool kSmallPages>
__device__ __forceinline__ void load_warp(const CUtensorMap* tmap, const DenseDecodeParams& p, const Partition& pt,
                                          uint32_t sbase, int kvh) {
  for_each_chunk_to_load(p, pt, [&](int r, int tok, int end, int stage, uint32_t empty_parity) {
    if constexpr (kSmallPages) {
      mbar_wait(empty_bar(sbase, stage, 0), empty_parity);
      load_tiles_small(tmap, p, sbase, r, tok, end, kvh, stage, 0, 4);
      mbar_wait(empty_bar(sbase, stage, 1), empty_parity);
      load_tiles_small(tmap, p, sbase, r, tok, end, kvh, stage, 4, kNumColTiles);
    } else {
      // The chunk's page id is read before the waits: a refill then follows its release with nothing but the
      // TMA issues (the block-table read and the division by page_size overlap the wait).
      const int page = chunk_page(p, r, tok);
      const int in_page = tok % p.page_size;
      const bool issuer = threadIdx.x % 32 == 0;
      mbar_wait(empty_bar(sbase, stage, 0), empty_parity);
      if (issuer) load_tiles_from_page(tmap, p, sbase, page, in_page, kvh, stage, 0, 4);
      mbar_wait(empty_bar(sbase, stage, 1), empty_parity);
      if (issuer) load_tiles_from_page(tmap, p, sbase, page, in_page, kvh, stage, 4, kNumColTiles);
    }
  });
}

// T: the 16-bit type of q, the cache and the output; kSmallPages: page_size is not a multiple of 64 (load_tiles_small_pages; a separate instantiation, so that
// the one-load-per-tile kernel keeps its register allocation).
template <typename T, bool kSmallPages>
__global__ void __launch_bounds__(kThreads, 1)
    dense_decode_kernel(const __grid_constant__ CUtensorMap tmap, const DenseDecodeParams p) {
  extern __shared__ uint8_t smem_raw[];
  // 1024-byte alignment by an offset into the __shared__ array (not by integer casts), so that the compiler
  // still knows the pointers below are shared memory and emits LDS/STS with 32-bit addresses.
  uint8_t* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  const uint32_t sbase = smem_addr(smem);
  float* s_max = reinterpret_cast<float*>(smem + kOffMax);
  float* s_scale_a = reinterpret_cast<float*>(smem + kOffScaleA);
  float* s_scale_b = reinterpret_cast<float*>(smem + kOffScaleB);
  float* s_sum = reinterpret_cast<float*>(smem + kOffSum);
  const uint64_t* s_page_ok = reinterpret_cast<const uint64_t*>(smem + kOffPageOk);

  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int tid_wg = tid % 128;
  const int warp = tid_wg / 32;
  const int lane = tid % 32;
  const int quad = lane % 4;
  const int quad_col = quad * 2;
  const int kvh = blockIdx.y;
  const int mtile = blockIdx.x;  // m-tile first: the CTAs reading the same pages launch together

  const Partition pt = read_partition(p);
  if (pt.empty()) return;

  // While thread 0 sets up the barriers, lane 0 of warp 1 pulls the first request's length and first
  // block-table entry into L2: the loading warp's first chunk waits for both, one after the other. (Not in
  // the small-page instantiation, where it made ptxas spill.)
  if (tid == 0) {
    for (int i = 0; i < 2 * kNumColTiles; ++i) mbar_init(sbase + kOffBar + i * 8, 1);
    for (int i = 0; i < 4; ++i) mbar_init(sbase + kOffEmpty + i * 8, 4);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tmap)) : "memory");
  } else if (!kSmallPages && tid == 32 && pt.begin_tok >= 0 && pt.begin_tok < p.max_tokens) {
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p.seqlens + pt.begin_req) : "memory");
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(block_table_row(p, pt.begin_req) + pt.begin_tok / p.page_size)
                 : "memory");
  }
  __syncthreads();
  allow_dependent_launch();
  if (wg == 2) {
    set_warpgroup_registers<kRegsLoad>();
    if (warp == 0) load_warp<kSmallPages>(&tmap, p, pt, sbase, kvh);
    return;
  }
  set_warpgroup_registers<kRegsMath>();

  // Rows owned by this thread in the wgmma accumulator layout.
  const int row0 = warp * 16 + lane / 4;
  const int row1 = row0 + 8;
  uint32_t g = 0;  // chunks consumed so far: chunk g sits in stage g & 1, loaded in phase (g >> 1) & 1

  for (int r = pt.begin_req; r <= pt.end_req; ++r) {
    int start, end;
    request_range(p, pt, r, start, end);
    const int len = request_len(p, r);
    // The rows' query positions are recomputed here and for the stores (not held across the request loop:
    // at 240 registers ptxas spilled them).
    const int lim0 = min(end, p.causal ? len - p.s_q + query_pos(p, mtile, row0) + 1 : len);
    const int lim1 = min(end, p.causal ? len - p.s_q + query_pos(p, mtile, row1) + 1 : len);

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float l0 = 0.f, l1 = 0.f;  // row sums of this thread's columns, relative to s_max

    named_bar_sync(kBarAll, 256);  // the previous request's readers of Q, P and s_max are done
    if (start < end) {
      // Q tile of request r -> shared memory (zero rows past m_total), 16-byte cp.async.
#pragma unroll 1
      for (int it = 0; it < kBlockM * (kDQK / 8) / kMathThreads; ++it) {
        const int idx = tid + it * kMathThreads;
        const int row = idx / (kDQK / 8);
        const int ch = idx % (kDQK / 8);
        const int m = mtile * kBlockM + row;
        const bool in = m < p.m_total;
        const int64_t off = q_offset(p, r, query_row(p, kvh, in ? m : 0)) + ch * 8;
        const uint32_t dst = sbase + kOffQ + (ch / 8) * kTileBytes + swz(row, ch % 8);
        const T* src = reinterpret_cast<const T*>(p.q) + off;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(in ? 16 : 0)
                     : "memory");
      }
      asm volatile("cp.async.commit_group;\n" ::: "memory");
      asm volatile("cp.async.wait_group 0;\n" ::: "memory");
      if (tid < kBlockM) s_max[tid] = -INFINITY;
      fence_proxy_async();
      named_bar_sync(kBarAll, 256);
    }
    // Q tile 8 -> registers (both warpgroups), then its shared memory is free for P_b.
    uint32_t q8[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int reg = 0; reg < 4; ++reg)
        q8[kk][reg] = *reinterpret_cast<const uint32_t*>(smem + kOffPb + frag_offset(row0, quad, kk, reg));
    named_bar_sync(kBarAll, 256);

    float s[32];
    uint32_t pa[4][4];
    if (start < end && len <= kPreciseMaxLen) {
      // ---- short request: every warpgroup computes S of every chunk; P = hi + lo ----
      float run_max0 = -INFINITY, run_max1 = -INFINITY;
      for (int c = start; c < end; c += kBlockN, ++g) {
        const int stage = g & 1;
        qk_chunk<T, 0>(s, sbase, stage, (g >> 1) & 1, q8);
        wgmma_wait<0>();
        fence_all(s);
        fence_frags(q8);
        const uint64_t page_ok = s_page_ok[stage];
        if (page_ok != 0) {  // a chunk whose pages are all outside the cache is skipped whole
          float mx0, mx1;
          mask_tail(s, c, lim0, lim1, quad_col);
          mask_pages(s, page_ok, quad_col);
          row_max(s, p.scale_log2, mx0, mx1);
          const MaxUpdate u = update_max(run_max0, run_max1, mx0, mx1);
          run_max0 = u.max0;
          run_max1 = u.max1;
          exp_rescale(s, o, l0, l1, p.scale_log2, u);
          const uint32_t v_half = stage_addr(sbase, stage) + wg * 4 * kTileBytes;
          if (end - c < kBlockN) zero_tail_rows(smem + kOffKV + stage * kStageBytes, wg * 4, end - c, tid_wg, wg);
          // P's two terms one after the other in the same registers (at 240 registers, both at once spilled)
          pack_p<T, false>(pa, s);
          pv_regs<T>(o, pa, v_half);
          wgmma_wait<0>();
          fence_all(o);
          fence_frags(pa);
          pack_p<T, true>(pa, s);
          pv_regs<T>(o, pa, v_half);
          wgmma_wait<0>();
          fence_all(o);
          fence_frags(pa);
        }
        named_bar_sync(kBarAll, 256);  // both warpgroups are done with this stage
        if (wg == 0) {
          mbar_arrive_per_warp(empty_bar(sbase, stage, 0));
          mbar_arrive_per_warp(empty_bar(sbase, stage, 1));
        }
      }
      // Both warpgroups hold the full row sums: count them once. The maxima go where the seesaw
      // path keeps them.
      if (wg == 1) l0 = l1 = 0.f;
      if (wg == 0 && quad == 0) {
        s_max[row0] = run_max0;
        s_max[row1] = run_max1;
      }
    } else if (start < end) {
      // ---- seesaw: WG0 takes the even chunks a, WG1 the odd chunks b ----
      if (wg == 0) {
        qk_chunk<T, 0>(s, sbase, g & 1, (g >> 1) & 1, q8);
      } else if (start + kBlockN < end) {
        qk_chunk<T, 4>(s, sbase, (g + 1) & 1, ((g + 1) >> 1) & 1, q8);
      }
      wgmma_wait<0>();
      fence_all(s);
      fence_frags(q8);
      // The pair loop counts tokens (ca) and the CTA's chunks (g): no chunk index of its own, no chunk count
      // (at 240 registers ptxas spilled the counters when it kept both).
      for (int ca = start; ca < end; ca += 2 * kBlockN) {
        const uint32_t ga = g, gb = ga + 1;
        const int stage_a = ga & 1, stage_b = gb & 1;
        const int cb = ca + kBlockN;
        const bool has_b = cb < end;
        // Chunks a + 2 and b + 2 exist: the pair after this one runs, and WG1 hands P_a back, only then.
        const bool next_a = ca + 2 * kBlockN < end, next_b = cb + 2 * kBlockN < end;
        if (wg == 0) {
          // softmax of chunk a against the running max; P_a (relative to max_a) to shared memory
          float mx0, mx1;
          mask_tail(s, ca, lim0, lim1, quad_col);
          mask_pages(s, s_page_ok[stage_a], quad_col);
          row_max(s, p.scale_log2, mx0, mx1);
          const MaxUpdate u = update_shared_max(s_max, s_scale_a, row0, row1, quad, mx0, mx1);
          named_bar_arrive(kBarScaleA, 256);
          exp_rescale(s, o, l0, l1, p.scale_log2, u);
          pack_p<T, false>(pa, s);
          if (ca > start) named_bar_sync(kBarPaFree, 256);  // WG1's product with the previous P_a is done
          store_p(sbase + kOffPa, pa, row0, quad);
          fence_proxy_async();
          named_bar_arrive(kBarPa, 256);
          if (end - ca < kBlockN) zero_tail_rows(smem + kOffKV + stage_a * kStageBytes, 0, end - ca, tid_wg, 0);
          pv_regs<T>(o, pa, stage_addr(sbase, stage_a));
          wgmma_wait<0>();
          fence_all(o);
          fence_frags(pa);
          // V_a[:, :256] (tiles 0-3) has no reader left: released for the CTA's next chunk on this stage.
          mbar_arrive_per_warp(empty_bar(sbase, stage_a, 0));
          named_bar_sync(kBarScaleB, 256);
          rescale_acc(o, l0, l1, s_scale_b[row0], s_scale_b[row1]);
          if (has_b) {
            named_bar_sync(kBarPb, 256);
            if (end - cb < kBlockN) zero_tail_rows_landed(smem, sbase, stage_b, (gb >> 1) & 1, 0, end - cb, tid_wg, 0);
            pv_smem<T>(o, sbase + kOffPb, stage_addr(sbase, stage_b));
          }
          // V_b[:, :256] is refilled as soon as its product is done, before S_{a+2} is issued: issuing S_{a+2}
          // first waits for its tiles, which delayed this refill, and with it WG1's S_{b+2} (NOTES.md).
          // S_{a+2} would run after the product anyway (one warpgroup's wgmma groups run in order).
          const uint32_t phase_next_a = ((ga + 2) >> 1) & 1;
          if (has_b) {
            wgmma_wait<0>();
            // V_b[:, :256] has no reader left: released.
            mbar_arrive_per_warp(empty_bar(sbase, stage_b, 0));
          }
          if (next_a) qk_chunk<T, 0>(s, sbase, stage_a, phase_next_a, q8);
          wgmma_wait<0>();
          fence_all(o);
          fence_all(s);
          fence_frags(q8);
          // S_{a+2} ran alone on the tensor cores; WG1's S_{b+2} now runs while this softmax does.
          if (next_b) named_bar_arrive(kBarQkA, 256);
        } else {
          named_bar_sync(kBarScaleA, 256);
          // Read now: WG0 rewrites s_scale_a for the next pair once it has passed kBarPb.
          const float fa0 = s_scale_a[row0], fa1 = s_scale_a[row1];
          // O1 to max_a, then O1 += P_a V_a[:, 256:] first: the last reader of stage a, so that its
          // tiles 4-8 refill with chunk a + 2 while this warpgroup's softmax and products run.
          rescale_acc(o, l0, l1, fa0, fa1);
          // S of chunk b is only read once the product is issued (without a chunk b everything is masked)
          mask_tail(s, cb, lim0, lim1, quad_col);
          if (has_b) mask_pages(s, s_page_ok[stage_b], quad_col);
          named_bar_sync(kBarPa, 256);
          if (end - ca < kBlockN) zero_tail_rows_landed(smem, sbase, stage_a, (ga >> 1) & 1, 4, end - ca, tid_wg, 1);
          pv_smem<T>(o, sbase + kOffPa, stage_addr(sbase, stage_a) + 4 * kTileBytes);
          // softmax of chunk b against max_a (all masked when there is no chunk b) while it runs
          float mx0, mx1;
          row_max(s, p.scale_log2, mx0, mx1);
          const MaxUpdate u = update_shared_max(s_max, s_scale_b, row0, row1, quad, mx0, mx1);
          named_bar_arrive(kBarScaleB, 256);
          float sum0 = 0.f, sum1 = 0.f;
          if (has_b) {
            exp_pack<T>(pa, s, p.scale_log2, u.base0, u.base1, sum0, sum1);
            store_p(sbase + kOffPb, pa, row0, quad);
            fence_proxy_async();
            named_bar_arrive(kBarPb, 256);
          }
          wgmma_wait<0>();
          fence_all(o);
          if (next_a) named_bar_arrive(kBarPaFree, 256);
          // K/V_a tiles 4-8 have no reader left: released.
          mbar_arrive_per_warp(empty_bar(sbase, stage_a, 1));
          // O1 to max_b, then O1 += P_b V_b[:, 256:]
          rescale_add(o, l0, l1, u, sum0, sum1);
          if (has_b) {
            if (end - cb < kBlockN) zero_tail_rows(smem + kOffKV + stage_b * kStageBytes, 4, end - cb, tid_wg, 1);
            pv_regs<T>(o, pa, stage_addr(sbase, stage_b) + 4 * kTileBytes);
            wgmma_wait<0>();
            fence_all(o);
            fence_frags(pa);
            // K/V_b tiles 4-8 have no reader left: released.
            mbar_arrive_per_warp(empty_bar(sbase, stage_b, 1));
          }
          // S_{b+2} from tile 0: tiles 0-3 were refilled after WG0's product with P_b, which ran before
          // this warpgroup's (+1-5% over starting at tile 4, NOTES.md).
          if (next_b) {
            // Issued once WG0's S_{a+2} is done: the two QKs would otherwise share the tensor cores (both
            // operands in shared memory, so together no faster than one after the other) and WG0's softmax of
            // chunk a + 2, which the whole next pair waits for, would start only when both end.
            named_bar_sync(kBarQkA, 256);
            qk_chunk<T, 0>(s, sbase, stage_b, ((gb + 2) >> 1) & 1, q8);
            wgmma_wait<0>();
            fence_all(s);
            fence_frags(q8);
          }
        }
        g += has_b ? 2 : 1;
      }
    }

    // ---- epilogue: row sums over the quad and both warpgroups; the final max is in s_max ----
#pragma unroll
    for (int o_ = 1; o_ <= 2; o_ *= 2) {
      l0 += __shfl_xor_sync(0xffffffffu, l0, o_);
      l1 += __shfl_xor_sync(0xffffffffu, l1, o_);
    }
    if (quad == 0) {
      s_sum[wg * 64 + row0] = l0;
      s_sum[wg * 64 + row1] = l1;
    }
    named_bar_sync(kBarAll, 256);
    const float max0 = start < end ? s_max[row0] : -INFINITY;
    const float max1 = start < end ? s_max[row1] : -INFINITY;
    // Read here, not with the request's range: no register holds them across the chunk loop.
    const int n_splits = p.num_splits[r + 1] - p.num_splits[r];
    const int split_idx = r == pt.begin_req ? pt.begin_split : 0;
    store_outputs<T>(p, o, r, kvh, wg, mtile * kBlockM + row0, mtile * kBlockM + row1, query_pos(p, mtile, row0),
                     query_pos(p, mtile, row1), s_sum[row0] + s_sum[64 + row0],
                     s_sum[row1] + s_sum[64 + row1], max0, max1, n_splits, split_idx);
  }
}

template <typename T>
void launch(const DenseDecodeParams& p, const CUtensorMap& tmap, cudaStream_t stream) {
  if (p.m_total <= kNarrowRows) {  // at most 32 query rows per kv head: the transposed kernel
    dense_narrow::launch<T>(p, tmap, stream);
    return;
  }
  launch_on_plan_grid(dense_decode_kernel<T, true>, dense_decode_kernel<T, false>, kThreads, kSmemBytes, p, tmap, stream);
}

}  // namespace dense
}  // namespace sm90
}  // namespace flashmla
