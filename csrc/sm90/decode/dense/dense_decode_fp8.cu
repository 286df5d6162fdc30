// Dense MLA decode over a per-tensor e4m3 cache for SM90 (sm_90a): both products on FP8 tensor cores.
//
// One CTA = (SM partition of the plan, kv head, 64-row query tile), as in the 16-bit kernel
// (dense_decode_kernel.cuh), with the same plan, split scratch and epilogue (dense_decode_common.cuh).
// Two kernels (setmaxnreg moves registers to the math warpgroups):
//
// dense_decode_fp8_large_pages_kernel (pages of 64 tokens and more; below the other one), four warpgroups:
//   WG0: Q (its own fill at each request's start but the CTA's first), S = Q K^T, the row softmax, P and its factors
//        into shared memory.
//   WG1 / WG2: the CTA's first Q; 256 dims of O^T = V^T P^T each, V^T's fragments read from the cache tile
//        (v_fragments).
//   WG3: one warp issues the cache loads (24 registers).
//
// dense_decode_fp8_small_pages_kernel (pages smaller than 64: page-slice loads, whose registers WG1 needs), three
// warpgroups:
//   WG0: S = Q K^T (m64n64k32 e4m3, Q and K both K-major in shared memory: the TMA'd cache tile is used
//        as it lands), masked online softmax, P rounded to e4m3 into the A fragments of its PV steps and
//        into shared memory for WG1, O[:, 0:256] += P V.
//   WG1: O[:, 256:512] += P V with P from shared memory, rescaled by WG0's factors; its warp 0 issues
//        the cache loads (TMA, one 64-token chunk per stage, kStages stages).
//   WG2: writes Q (quantized, below) and transposes V of each chunk into V^T: an FP8 wgmma reads B
//        K-major only, so V (tokens x 512) must be 512 rows of 64 tokens in shared memory.
// The token order of V^T's rows is the order of P's register fragments: the m64k32 A fragment of an
// 8-bit type holds, per thread, columns 4q..4q+3 and 16+4q..16+4q+3 of its rows (q = lane % 4), while
// the QK accumulator holds columns 8j+2q, 8j+2q+1. Position 16G + 4q + c of a V^T row (c = 0..3) holds
// token 16G + 8(c >> 1) + 2q + (c & 1), so the accumulator registers become the A fragment without any
// exchange between threads (the contraction over tokens does not depend on their order).
//
// Quantization and error model (docs/design.md §5.1, "FP8 cache"):
//   - an e4m3 q is used as given (descale_q); a bf16 q is quantized per query row with a power-of-two
//     factor f (|q| * f <= 448, as large as possible): the row's scores are exact products of the
//     quantized q and the cache, times 1 / f;
//   - P = exp2(S - running max) <= 2^8 is rounded to e4m3 (relative error <= 2^-4, absolute <= 2^-10 in
//     the subnormal range); the row sums are taken from the unrounded values;
//   - descale_q * descale_k (or descale_k / f) enter the softmax scale, descale_k the output factor;
//     outputs are bf16, lse fp32.
#include "sm90/common/transposed.h"
#include "sm90/decode/dense/dense_decode_fp8.cuh"

namespace flashmla {
namespace sm90 {
namespace dense_fp8 {

// P = exp2(S * sl - base) per row, rounded to e4m3 straight into the A fragments of the two m64k32 PV
// steps (V^T's token order: see the top of the file), and this thread's row sums of the unrounded values.
// pa[kb][0] / [1]: rows row0 / row1, positions 4q..4q+3 of k-block kb (tokens 32kb + 2q + {0, 1, 8, 9});
// pa[kb][2] / [3]: positions 16 + 4q.. (tokens 32kb + 16 + 2q + {0, 1, 8, 9}).
__device__ __forceinline__ void exp_pack_e4m3(uint32_t (&pa)[2][4], float (&s)[32], float sl0, float sl1, float base0,
                                              float base1, float& sum0, float& sum1) {
  sum0 = 0.f;
  sum1 = 0.f;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const bool top = (i % 4) < 2;
    s[i] = exp2f(fmaf(s[i], top ? sl0 : sl1, -(top ? base0 : base1)));
    if (top) sum0 += s[i]; else sum1 += s[i];
  }
#pragma unroll
  for (int kb = 0; kb < 2; ++kb) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // accumulator column groups j = 4kb + 2h, 4kb + 2h + 1
      const int j = 4 * kb + 2 * h;
      pa[kb][2 * h] = f32x4_to_e4m3x4(s[4 * j], s[4 * j + 1], s[4 * j + 4], s[4 * j + 5]);
      pa[kb][2 * h + 1] = f32x4_to_e4m3x4(s[4 * j + 2], s[4 * j + 3], s[4 * j + 6], s[4 * j + 7]);
    }
  }
}

// WG0 of both 64-row kernels, one chunk's softmax step: scores masked past each row's limit and for tokens whose page
// is outside the cache, the running maxima (log2 domain, sl = the rows' scales) updated, P = exp2(S sl - base)
// rounded to e4m3 into pa (V^T's token order) and this thread's row sums of the unrounded values.
__device__ __forceinline__ MaxUpdate softmax_chunk(float (&s)[32], int chunk_tok, int lim0, int lim1, int quad_col,
                                                   const uint64_t& page_ok, float sl0, float sl1, float& max0,
                                                   float& max1, uint32_t (&pa)[2][4], float& sum0, float& sum1) {
  float mx0, mx1;
  mask_tail(s, chunk_tok, lim0, lim1, quad_col);
  mask_pages(s, page_ok, quad_col);
  row_max(s, 1.f, mx0, mx1);
  const MaxUpdate u = update_max(max0, max1, mx0 * sl0, mx1 * sl1);
  max0 = u.max0;
  max1 = u.max1;
  exp_pack_e4m3(pa, s, sl0, sl1, u.base0, u.base1, sum0, sum1);
  return u;
}

// WG0 of both 64-row kernels: P of the chunk (e4m3 A fragments pa, V^T's token order) and the rescale factors into
// shared memory for the product warpgroups.
__device__ __forceinline__ void store_p_and_factors(uint32_t sbase, float* s_alpha, const uint32_t (&pa)[2][4],
                                                    int row0, int row1, int quad, const MaxUpdate& u) {
#pragma unroll
  for (int kb = 0; kb < 2; ++kb) {
#pragma unroll
    for (int reg = 0; reg < 4; ++reg) {
      const int row = reg & 1 ? row1 : row0;
      const uint32_t dst = sbase + kOffP + swz64(row, 32 * kb + 16 * (reg >> 1) + 4 * quad);
      asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(dst), "r"(pa[kb][reg]) : "memory");
    }
  }
  if (quad == 0) {
    s_alpha[row0] = u.scale0;
    s_alpha[row1] = u.scale1;
  }
}

// WG0 of both 64-row kernels at a request's end: row sums over the quad, then the sums and maxima to shared memory
// (by request parity qi) for the warpgroups that store the outputs.
__device__ __forceinline__ void store_row_stats(float* s_rowsum, float* s_rowmax, float& l0, float& l1, float max0,
                                                float max1, int row0, int row1, int quad, uint32_t qi) {
#pragma unroll
  for (int o_ = 1; o_ <= 2; o_ *= 2) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, o_);
    l1 += __shfl_xor_sync(0xffffffffu, l1, o_);
  }
  if (quad == 0) {
    const int b = (qi & 1) * 64;
    s_rowsum[b + row0] = l0;
    s_rowsum[b + row1] = l1;
    s_rowmax[b + row0] = max0;
    s_rowmax[b + row1] = max1;
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    dense_decode_fp8_small_pages_kernel(const __grid_constant__ CUtensorMap tmap, const DenseDecodeParams p) {
  constexpr bool kSmallPages = true;  // the page kind of the helpers it shares with the 32-row kernel
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  const uint32_t sbase = smem_addr(smem);
  const RowArrays arrays(smem);

  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int tid_wg = tid % 128;
  const int warp = tid_wg / 32;
  const int lane = tid % 32;
  const int quad = lane % 4;
  const int quad_col = quad * 2;
  const int kvh = blockIdx.y;
  const int mtile = blockIdx.x;

  const Partition pt = read_partition(p);
  if (pt.empty()) return;

  if (tid == 0) init_barriers(sbase, 8, &tmap);  // V^T is read by WG0 and WG1
  __syncthreads();
  allow_dependent_launch();

  if (wg == 2) {
    // ======================= WG2: Q and the V transposes =======================
    set_warpgroup_registers<Budget<kSmallPages>::kRegsWG2>();
    q_and_transpose_warpgroup<kSmallPages, 16>(p, pt, sbase, arrays.qscale, mtile, kvh, tid_wg);
    return;
  }

  // Rows owned by this thread in the wgmma accumulator layout.
  const int row0 = warp * 16 + lane / 4;
  const int row1 = row0 + 8;
  const int m0 = mtile * kBlockM + row0;
  const int m1 = mtile * kBlockM + row1;
  const int t0 = row_query_pos(p, m0);
  const int t1 = row_query_pos(p, m1);
  const float descale_k = *p.descale_k;

  if (wg == 0) {
    // ======================= WG0: S, softmax, O[:, 0:256] =======================
    set_warpgroup_registers<Budget<kSmallPages>::kRegsWG0>();
    uint32_t g = 0, qi = 0;
    for (int r = pt.begin_req; r <= pt.end_req; ++r) {
      int start, end;
      request_range(p, pt, r, start, end);
      const int len = request_len(p, r);
      const int lim0 = min(end, p.causal ? len - p.s_q + t0 + 1 : len);
      const int lim1 = min(end, p.causal ? len - p.s_q + t1 + 1 : len);
      float o[128];
#pragma unroll
      for (int i = 0; i < 128; ++i) o[i] = 0.f;
      float l0 = 0.f, l1 = 0.f, max0 = -INFINITY, max1 = -INFINITY;
      int n_splits = 1;
      if (start < end) {
        mbar_wait(bar_addr(sbase, kQFull), qi & 1);
        const float sl0 = p.scale_log2 * descale_k * arrays.qscale[row0];
        const float sl1 = p.scale_log2 * descale_k * arrays.qscale[row1];
#pragma unroll 1
        for (int c = start; c < end; c += kBlockN, ++g) {
          const int stage = g % kStages, buf = g % kVtBufs;
          float s[32];
          qk_fp8<64>(s, sbase, stage, (g / kStages) & 1);
          wgmma_wait<0>();
          fence_all(s);
          if (c + kBlockN >= end) mbar_arrive_per_warp(bar_addr(sbase, kQEmpty));  // the request's last read of Q
          uint32_t pa[2][4];
          float sum0, sum1;
          const MaxUpdate u = softmax_chunk(s, c, lim0, lim1, quad_col, arrays.page_ok[stage], sl0, sl1, max0, max1, pa,
                                            sum0, sum1);
          rescale_add(o, l0, l1, u, sum0, sum1);
          mbar_wait(bar_addr(sbase, kVtFull + buf), (g / kVtBufs) & 1);
          const uint64_t desc_vt = desc_sw64(sbase + kOffVt + buf * kVtBytes);
          wgmma_fence();
          wgmma_m64n256k32_e4m3_rk(o, pa[0], desc_vt, 1);
          wgmma_m64n256k32_e4m3_rk(o, pa[1], desc_add(desc_vt, 32), 1);
          wgmma_commit();
          // While the product runs: P and the factors for WG1, once its product with the previous P is done
          // (P's registers are only read here).
          mbar_wait(bar_addr(sbase, kPEmpty), (g & 1) ^ 1);
          store_p_and_factors(sbase, arrays.alpha, pa, row0, row1, quad, u);
          fence_proxy_async();
          mbar_arrive_per_warp(bar_addr(sbase, kPFull));
          wgmma_wait<0>();
          fence_all(o);
          mbar_arrive_per_warp(bar_addr(sbase, kVtEmpty + buf));
        }
        // read before the wait for WG1 below, not after it (no register holds it across the chunks)
        n_splits = p.num_splits[r + 1] - p.num_splits[r];
        // row sums over the quad; WG1 takes them (and the maxima) from shared memory
        store_row_stats(arrays.rowsum, arrays.rowmax, l0, l1, max0, max1, row0, row1, quad, qi);
        // Once WG1's product with this request's last P is done: WG1 passes its epilogue barrier of the previous
        // request before that product, so this warpgroup is never two arrivals ahead on the named barrier.
        mbar_wait(bar_addr(sbase, kPEmpty), (g & 1) ^ 1);
        named_bar_arrive(kBarEpilogue, 256);
        ++qi;
      } else {
        n_splits = p.num_splits[r + 1] - p.num_splits[r];
      }
      store_outputs<__nv_bfloat16>(p, o, r, kvh, 0, m0, m1, t0, t1, l0, l1, max0, max1, n_splits,
                                   r == pt.begin_req ? pt.begin_split : 0, descale_k);
    }
  } else {
    // ======================= WG1: O[:, 256:512]; warp 0 issues the loads =======================
    set_warpgroup_registers<Budget<kSmallPages>::kRegsWG1>();
    // Block-table entries read at their loads: reading them ahead was slower here (ChunkWalk, dense_decode_fp8.cuh).
    constexpr bool kPageAhead = false;
    ChunkWalk lw = first_loads<kSmallPages, kPageAhead>(&tmap, p, pt, sbase, kvh, warp);
    uint32_t g = 0, qi = 0;
    for (int r = pt.begin_req; r <= pt.end_req; ++r) {
      int start, end;
      request_range(p, pt, r, start, end);
      const int n_splits = p.num_splits[r + 1] - p.num_splits[r];  // read now: at the end it is a round trip more
      float o[128];
#pragma unroll
      for (int i = 0; i < 128; ++i) o[i] = 0.f;
      float l0 = 0.f, l1 = 0.f, max0 = -INFINITY, max1 = -INFINITY;
      if (start < end) {
#pragma unroll 1
        for (int c = start; c < end; c += kBlockN, ++g) {
          const int buf = g % kVtBufs;
          mbar_wait(bar_addr(sbase, kPFull), g & 1);
          rescale_rows(o, arrays.alpha[row0], arrays.alpha[row1]);
          mbar_wait(bar_addr(sbase, kVtFull + buf), (g / kVtBufs) & 1);
          // The stage of chunk g is free: its QK is done (P is written) and so is its transpose.
          if (warp == 0 && lw.r <= pt.end_req) {
            load_chunk<kSmallPages, kPageAhead>(&tmap, p, sbase, lw, kvh, g % kStages);
            walk_next<kPageAhead>(p, pt, lw);
          }
          const uint64_t desc_p = desc_sw64(sbase + kOffP);
          const uint64_t desc_vt = desc_sw64(sbase + kOffVt + buf * kVtBytes + 256 * 64);
          fence_all(o);
          wgmma_fence();
          wgmma_m64n256k32_e4m3_kk(o, desc_p, desc_vt, 1);
          wgmma_m64n256k32_e4m3_kk(o, desc_add(desc_p, 32), desc_add(desc_vt, 32), 1);
          wgmma_commit();
          wgmma_wait<0>();
          fence_all(o);
          mbar_arrive_per_warp(bar_addr(sbase, kPEmpty));
          mbar_arrive_per_warp(bar_addr(sbase, kVtEmpty + buf));
        }
        named_bar_sync(kBarEpilogue, 256);
        const int b = (qi & 1) * 64;
        l0 = arrays.rowsum[b + row0];
        l1 = arrays.rowsum[b + row1];
        max0 = arrays.rowmax[b + row0];
        max1 = arrays.rowmax[b + row1];
        ++qi;
      }
      store_outputs<__nv_bfloat16>(p, o, r, kvh, 1, m0, m1, t0, t1, l0, l1, max0, max1, n_splits,
                                   r == pt.begin_req ? pt.begin_split : 0, descale_k);
    }
  }
}


// ---- pages of 64 tokens and more: O^T = V^T P^T with V^T's fragments read from the cache tile ----
// WG0: Q (its own fill at each request's start but the CTA's first, which the products write), S = Q K^T, the row
//      softmax, P (e4m3, V^T's token order) and the factors into shared memory; nothing else, so its QK and softmax
//      alone set the chunk period.
// WG1 / WG2: O^T (dims 256 h.. of 512, h = wg - 1; 64 query rows: four m64n64 accumulators, 128 fp32 per thread)
//      += V^T P^T: A = V^T's fragments from the cache tile (v_fragments, dense_decode_fp8.cuh), B = P as WG0 wrote it
//      (P[row][token] K-major is P^T's B layout); each stores its dims of every request.
// WG3 (24 registers): its warp 0 issues every cache load; a stage is refilled once WG0's QK and both products'
//      V^T fragments of its chunk are done (kStageEmpty, 12 warps), so no math warpgroup issues loads.
// WG0 hands P of chunk g over once its QK of chunk g + 1 is done, so the PV runs beside the softmax
// (benchmarks/NOTES_fp8_decode.md, session 26). The products rescale O^T by the factors of P as soon as WG0 has
// stored them (kAlphaFull, during WG0's next QK), and WG0's proxy fence for P drains during that QK: with the loads
// and the rescale off the hand-over, WG0's own loop is the period (3.5-7% less time on the h_q 128 and the long
// h_q 64 rows, sessions 34-35).
// No V transpose and no V^T buffers: four stages, as in the 32-row kernel.
constexpr uint32_t kBarQFill = 2;  // named barrier: WG0's Q rows written before any of its warps' QK
// setmaxnreg (512 threads: 128 registers each at launch): WG0 holds S (32), P (8) and, at a request's start, the Q
// fill's loads (48); WG1 / WG2 O^T (128) and the chunk's V^T fragments (32); WG3 the walk over the chunks.
constexpr int kLargeThreads = 512, kLargeLaunchRegs = 128;
constexpr int kLargeRegsWG0 = 104, kLargeRegsProduct = 192, kLargeRegsLoader = 24;
static_assert(kLargeRegsWG0 + 2 * kLargeRegsProduct + kLargeRegsLoader == 4 * kLargeLaunchRegs,
              "setmaxnreg budgets must fit the launch allotment");
constexpr int kLargeQFillRows = 4;  // Q rows per warp with their loads in flight at once (48 registers)
constexpr int kFirstQFillRows = 8;  // the same for the products' fill of the CTA's first Q (8 warps x 8 rows)
// The cache stream is loaded evict-first (the combine's partials stay in L2): 1-3% faster on the h_q 64 rows
// (benchmarks/NOTES_fp8_decode.md, session 24; the 32-row FP8 kernel measured 1-2% slower with it and keeps the
// normal policy).
constexpr bool kLargePagesKvEvictFirst = true;

__device__ __forceinline__ void large_pages_softmax_warpgroup(const DenseDecodeParams& p, const Partition& pt,
                                                              uint8_t* smem, int mtile, int kvh, int tid_wg) {
  const uint32_t sbase = smem_addr(smem);
  const RowArrays arrays(smem);
  const int warp = tid_wg / 32, lane = tid_wg % 32, quad = lane % 4, quad_col = 2 * quad;
  const int row0 = warp * 16 + lane / 4, row1 = row0 + 8;
  const int tile_row0 = mtile * kBlockM;
  const int t0 = row_query_pos(p, tile_row0 + row0), t1 = row_query_pos(p, tile_row0 + row1);
  const float descale_k = *p.descale_k;
  const float descale_q = p.q_fp8 ? *p.descale_q : 1.f;
  uint32_t g = 0, qi = 0;
  for (int r = pt.begin_req; r <= pt.end_req; ++r) {
    int start, end;
    request_range(p, pt, r, start, end);
    if (start >= end) continue;
    if (qi == 0) {
      mbar_wait(bar_addr(sbase, kFirstQFull), 0);  // the products wrote the CTA's first Q
    } else {
      // Q of the request: this warpgroup's previous QK is done, so the Q tiles are free.
#pragma unroll 1
      for (int row = warp * 16; row < warp * 16 + 16; row += kLargeQFillRows)
        fill_q_rows<kLargeQFillRows>(p, sbase, arrays.qscale, r, row, mtile, kvh, lane, descale_q);
      fence_proxy_async();
      named_bar_sync(kBarQFill, 128);
    }
    const int len = request_len(p, r);
    const int lim0 = min(end, p.causal ? len - p.s_q + t0 + 1 : len);
    const int lim1 = min(end, p.causal ? len - p.s_q + t1 + 1 : len);
    const float sl0 = p.scale_log2 * descale_k * arrays.qscale[row0];
    const float sl1 = p.scale_log2 * descale_k * arrays.qscale[row1];
    // The next request's Q is prefetched 4 chunks before this one's end (q_and_transpose_warpgroup says why).
    const int prefetch_at = max(start, end - 4 * kBlockN);
    float l0 = 0.f, l1 = 0.f, max0 = -INFINITY, max1 = -INFINITY;
#pragma unroll 1
    for (int c = start; c < end; c += kBlockN, ++g) {
      const int stage = g % kNarrowStages;
      if (c <= prefetch_at && prefetch_at < c + kBlockN && r < pt.end_req)
        prefetch_q_rows(p, r + 1, mtile, kvh, tid_wg);
      float s[32];
      qk_fp8<64>(s, sbase, stage, (g / kNarrowStages) & 1);
      // The previous P's stores made visible to the products' wgmma (async proxy) while this QK runs, before the
      // P is handed over below: the fence's drain off WG0's loop.
      fence_proxy_async();
      wgmma_wait<0>();
      fence_all(s);
      // The chunk's page mask before the stage is released: the loading warp rewrites it with the next chunk.
      const uint64_t page_ok = arrays.page_ok[stage];
      mbar_arrive_per_warp(bar_addr(sbase, kStageEmpty + stage));
      // P of the previous chunk goes to the products only now that this QK is done: their PV then runs beside
      // this chunk's softmax instead of sharing the tensor cores with the QK (and leaving them idle during the
      // softmax).
      if (c != start) mbar_arrive_per_warp(bar_addr(sbase, kPFull));
      uint32_t pa[2][4];
      float sum0, sum1;
      const MaxUpdate u = softmax_chunk(s, c, lim0, lim1, quad_col, page_ok, sl0, sl1, max0, max1, pa,
                                        sum0, sum1);
      l0 = l0 * u.scale0 + sum0;
      l1 = l1 * u.scale1 + sum1;
      mbar_wait(bar_addr(sbase, kPEmpty), (g & 1) ^ 1);  // both products with the previous P are done
      store_p_and_factors(sbase, arrays.alpha, pa, row0, row1, quad, u);
      mbar_arrive_per_warp(bar_addr(sbase, kAlphaFull));  // the products rescale O^T during the next QK
    }
    fence_proxy_async();
    mbar_arrive_per_warp(bar_addr(sbase, kPFull));  // the request's last P
    store_row_stats(arrays.rowsum, arrays.rowmax, l0, l1, max0, max1, row0, row1, quad, qi);
    // Once both products with the request's last P are done (the epilogue barrier's arrivals then never run two
    // requests ahead of WG1 / WG2, as in the kernels above).
    mbar_wait(bar_addr(sbase, kPEmpty), (g & 1) ^ 1);
    named_bar_arrive(kBarEpilogue, 384);
    ++qi;
  }
}

__device__ __forceinline__ void large_pages_product_warpgroup(const DenseDecodeParams& p, const Partition& pt,
                                                              uint8_t* smem, int mtile, int kvh, int half, int tid_wg) {
  constexpr int kRows = 16;  // query rows (O^T columns) per thread
  const uint32_t sbase = smem_addr(smem);
  const RowArrays arrays(smem);
  const int warp = tid_wg / 32, lane = tid_wg % 32, quad = lane % 4;
  const float descale_k = *p.descale_k;
  {
    // The CTA's first Q, 8 rows per warp with all their loads in flight at once: one global-memory round trip at
    // the CTA's start, while WG0 (whose fill takes four, 4 rows at a time in its 104 registers) waits.
    ChunkWalk first{pt.begin_req, 0, 0, 0};
    walk_skip_empty<false>(p, pt, first);  // the CTA's first non-empty request, as WG0 and the loading warp find it
    if (first.r <= pt.end_req) {
      const float descale_q = p.q_fp8 ? *p.descale_q : 1.f;
      // Once this warp's loads are issued the loading warp may queue the next chunks behind them (kFirstQLoads).
      fill_q_rows<kFirstQFillRows>(p, sbase, arrays.qscale, first.r, (4 * half + warp) * kFirstQFillRows, mtile, kvh,
                                   lane, descale_q,
                                   [&] { mbar_arrive_per_warp</*kRelaxed=*/true>(bar_addr(sbase, kFirstQLoads)); });
      fence_proxy_async();
      mbar_arrive_per_warp(bar_addr(sbase, kFirstQFull));
    }
  }
  uint32_t g = 0, qi = 0;
  for (int r = pt.begin_req; r <= pt.end_req; ++r) {
    int start, end;
    request_range(p, pt, r, start, end);
    const int n_splits = p.num_splits[r + 1] - p.num_splits[r];
    float o[4][32];  // O^T tile m: dims 256 half + 64 m + 16 warp + 2 (lane / 4) + {0, 1}, rows 8 j + 2 quad + {0, 1}
#pragma unroll
    for (int m = 0; m < 4; ++m)
#pragma unroll
      for (int k = 0; k < 32; ++k) o[m][k] = 0.f;
    float l[kRows], mx[kRows];
#pragma unroll
    for (int k = 0; k < kRows; ++k) l[k] = 0.f, mx[k] = -INFINITY;
    if (start < end) {
#pragma unroll 1
      for (int c = start; c < end; c += kBlockN, ++g) {
        const int stage = g % kNarrowStages;
        mbar_wait(bar_addr(sbase, kKvFull + stage), (g / kNarrowStages) & 1);
        uint32_t a[4][2][4];
        v_fragments<4>(a, sbase + kOffKV + stage * kStageBytes, end - c, warp, lane, 4 * half);
        mbar_arrive_per_warp(bar_addr(sbase, kStageEmpty + stage));  // the fragments are in registers
        // O^T rescaled by the chunk's factors as soon as WG0 has written them (during its next QK), so that only
        // the PV stands between P handed over and the products done with it.
        mbar_wait(bar_addr(sbase, kAlphaFull), g & 1);
        rescale_columns<kBlockM, 4>(o, arrays.alpha, quad);
        mbar_wait(bar_addr(sbase, kPFull), g & 1);
        const uint64_t desc_p = desc_sw64(sbase + kOffP);
        fence_all(o);
        wgmma_fence();
#pragma unroll
        for (int m = 0; m < 4; ++m)
#pragma unroll
          for (int kk = 0; kk < 2; ++kk) wgmma_m64n64k32_e4m3_rk(o[m], a[m][kk], desc_add(desc_p, kk * 32), 1);
        wgmma_commit();
        wgmma_wait<0>();
        fence_all(o);
        mbar_arrive_per_warp(bar_addr(sbase, kPEmpty));
      }
      named_bar_sync(kBarEpilogue, 384);
      const int b = (qi & 1) * 64;
#pragma unroll
      for (int k = 0; k < kRows; ++k) {
        l[k] = arrays.rowsum[b + narrow_row(k, quad)];
        mx[k] = arrays.rowmax[b + narrow_row(k, quad)];
      }
      ++qi;
    }
    // Split partials in bf16 (split_partials_bf16, dense_decode.h).
    store_outputs_transposed<__nv_bfloat16, true, 4, kRows, Partials::k16AtStore>(
        p, o, r, kvh, mtile * kBlockM, l, mx, n_splits, r == pt.begin_req ? pt.begin_split : 0, descale_k, warp, lane,
        256 * half, half == 0);
  }
}

// WG3's warp 0: every cache load of the partition, in the order the math warpgroups consume the chunks (pages read
// ahead by the walk). The first chunk at once; the next ones once the products have issued the loads of the CTA's
// first Q (a Q fill issued behind all stages' loads lands behind their bytes at every CTA's start; issued before
// them, the Q rows are converted while the stages stream); each later one once its stage's chunk has been read.
__device__ __forceinline__ void large_pages_loader_warp(const CUtensorMap* tmap, const DenseDecodeParams& p,
                                                        const Partition& pt, uint32_t sbase, int kvh) {
  ChunkWalk w{pt.begin_req, 0, 0, 0};
  walk_skip_empty<true>(p, pt, w);
#pragma unroll 1
  for (uint32_t g = 0; w.r <= pt.end_req; ++g) {
    const int stage = g % kNarrowStages;
    if (g == 1) mbar_wait(bar_addr(sbase, kFirstQLoads), 0);
    if (g >= kNarrowStages) mbar_wait(bar_addr(sbase, kStageEmpty + stage), ((g / kNarrowStages) - 1) & 1);
    load_chunk<false, true, kLargePagesKvEvictFirst>(tmap, p, sbase, w, kvh, stage);
    walk_next<true>(p, pt, w);
  }
}

__global__ void __launch_bounds__(kLargeThreads, 1)
    dense_decode_fp8_large_pages_kernel(const __grid_constant__ CUtensorMap tmap, const DenseDecodeParams p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  const uint32_t sbase = smem_addr(smem);
  const int tid = threadIdx.x, wg = tid / 128, tid_wg = tid % 128;
  const int kvh = blockIdx.y, mtile = blockIdx.x;
  const Partition pt = read_partition(p);
  if (pt.empty()) return;
  // kStageEmpty: a stage read by WG0's QK and both products' fragments (12 warps); kAlphaFull: the factors of the
  // next P stored (4 WG0 warps); kPEmpty: both products done with P (8 warps); kFirstQFull: the CTA's first Q written
  // (the products' 8 warps).
  if (tid == 0) {
    for (int s = 0; s < kNarrowStages; ++s) mbar_init(bar_addr(sbase, kStageEmpty + s), 12);
    mbar_init(bar_addr(sbase, kAlphaFull), 4);
    mbar_init(bar_addr(sbase, kFirstQFull), 8);
    mbar_init(bar_addr(sbase, kFirstQLoads), 8);
    init_barriers<kNarrowStages>(sbase, 4, &tmap, 8);  // (kVtFull / kVtEmpty are not used here)
  }
  __syncthreads();
  allow_dependent_launch();
  if (wg == 3) {
    set_warpgroup_registers<kLargeRegsLoader, kLargeLaunchRegs>();
    if (tid_wg < 32) large_pages_loader_warp(&tmap, p, pt, sbase, kvh);
    return;
  }
  if (wg == 0) {
    set_warpgroup_registers<kLargeRegsWG0, kLargeLaunchRegs>();
    large_pages_softmax_warpgroup(p, pt, smem, mtile, kvh, tid_wg);
    return;
  }
  set_warpgroup_registers<kLargeRegsProduct, kLargeLaunchRegs>();
  large_pages_product_warpgroup(p, pt, smem, mtile, kvh, wg - 1, tid_wg);
}

}  // namespace dense_fp8

// Per-tensor e4m3 cache, q bf16 or e4m3, bf16 out.
void launch_dense_decode_fp8(const DenseDecodeParams& p, const CUtensorMap& tmap, cudaStream_t stream) {
  using namespace dense_fp8;
  if (p.m_total <= kNarrowRows) {  // at most 32 query rows per kv head: the transposed kernel
    launch_dense_decode_fp8_narrow(p, tmap, stream);
    return;
  }
  launch_on_plan_grid(dense_decode_fp8_small_pages_kernel, dense_decode_fp8_large_pages_kernel, kThreads,
                      kSmemBytes, p, tmap, stream, kLargeThreads);
}

}  // namespace sm90
}  // namespace flashmla
