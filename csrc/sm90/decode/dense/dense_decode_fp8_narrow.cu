// Dense MLA decode over a per-tensor e4m3 cache for SM90 (sm_90a), at most 32 query rows per kv head
// (s_q * h_q / h_kv <= 32: tensor-parallel head counts such as 16 heads per GPU): both products transposed,
// S^T = K Q^T and O^T = V^T P^T, so that the chunk's 64 tokens are the products' M and the 32 query rows
// their N (m64n32k32 e4m3). The 64-row kernel (dense_decode_fp8.cu) would pad these rows to 64: twice the
// tensor and exp work per chunk.
//
// Same plan, cache loads, Q fill and error model as the 64-row kernel (dense_decode_fp8.cuh; docs/design.md
// §5.1, "FP8 cache"); V^T is not written to shared memory: it is A of the PV product, and A may come from
// registers, so WG1 reads its fragments straight from the cache tile (ldmatrix .trans and byte permutes,
// v_fragments in dense_decode_fp8.cuh). Without the V^T buffers the shared memory holds kNarrowStages = 4 cache stages.
// Three warpgroups:
//   WG0: S^T (Q's rows 0..31 are B), masked online softmax down the columns (one column per query row:
//        column maxima over the chunk's 64 tokens by shuffles and through shared memory), P^T rounded to
//        e4m3 into shared memory (B of the PV product) with the rescale factors for WG1.
//   WG1: all of O^T (512 x 32, 128 fp32 per thread) += V^T P^T, eight m64 tiles of V^T's rows as A from
//        registers; the epilogue of every request; its warp 0 refills a stage once the PV product that last
//        reads it is done, and prefetches the next request's Q rows into L2.
//   WG2: the Q rows of every request (quantized) and part of the first loads.
//
// P^T's token order is V^T's fragments' (dense_decode_fp8.cu, top): position 16G + 4q + c holds token
// 16G + 8(c >> 1) + 2q + (c & 1). In the S^T accumulator a thread holds tokens t0 = 16w + i and t0 + 8
// (w = warp, i = lane / 4) of its 8 columns, i.e. positions 16w + 4(i >> 1) + (i & 1) + {0, 2}: the lanes
// i and i ^ 1 together hold four adjacent positions, so one exchange gives each lane a 4-byte word per
// column (lane i even: column 8j + 2q, odd: 8j + 2q + 1).
#include "sm90/common/transposed.h"
#include "sm90/decode/dense/dense_decode_fp8.cuh"

namespace flashmla {
namespace sm90 {
namespace dense_fp8 {

constexpr uint32_t kBarColumns = 2;              // named barrier of WG0's column reductions
// P^T (32 rows of 64 bytes) takes the first half of the P tile; the column reductions' buffers the second.
constexpr int kOffColMax = kOffP + kNarrowRows * 64;  // float[2][4][32]: per-warp column maxima, by chunk parity
constexpr int kOffColSum = kOffColMax + 2 * 4 * kNarrowRows * 4;  // float[4][32]: per-warp column sums
static_assert(kOffColSum + 4 * kNarrowRows * 4 <= kOffP + kPBytes, "column buffers inside the P tile");

// attends(k, t, in0, in1) and scale(k) of mask_scale_columns: the rows' limits (compared only in chunks that reach the
// smallest) and their scales (scale_log2 x descale_k x the Q row's dequantization factor).
struct RowLimits {
  bool tail;
  int chunk;
  const int (&lim)[kNarrowRowsPerThread];
  __device__ __forceinline__ void operator()(int k, int t, bool& in0, bool& in1) const {
    in0 = !(tail && chunk + t >= lim[k]);
    in1 = !(tail && chunk + t + 8 >= lim[k]);
  }
};
struct RowScales {
  const float (&scale)[kNarrowRowsPerThread];
  __device__ __forceinline__ float operator()(int k) const { return scale[k]; }
};

// WG0: S^T, the softmax down the columns and P^T of every chunk of the partition; at a request's end its
// column sums and maxima go to shared memory for WG1's epilogue.
template <bool kSmallPages>
__device__ __forceinline__ void narrow_softmax_warpgroup(const DenseDecodeParams& p, const Partition& pt, uint8_t* smem,
                                                         int tid_wg) {
  constexpr int kH = kNarrowRowsPerThread;
  const uint32_t sbase = smem_addr(smem);
  const RowArrays arrays(smem);
  float* s_colmax = reinterpret_cast<float*>(smem + kOffColMax);
  float* s_colsum = reinterpret_cast<float*>(smem + kOffColSum);
  const int warp = tid_wg / 32, lane = tid_wg % 32, quad = lane % 4;
  const int tok0 = warp * 16 + lane / 4;  // this thread's tokens of a chunk: tok0, tok0 + 8
  const bool odd = (lane / 4) & 1;        // which column of each pair this lane writes to P^T
  const uint32_t pt_word = static_cast<uint32_t>(warp * 16 + 4 * (lane / 8));  // its P^T byte position
  const float descale_k = *p.descale_k;

  uint32_t g = 0, qi = 0;
  for (int r = pt.begin_req; r <= pt.end_req; ++r) {
    int start, end;
    request_range(p, pt, r, start, end);
    if (start >= end) continue;
    const int len = request_len(p, r);
    mbar_wait(bar_addr(sbase, kQFull), qi & 1);
    int lim[kH];  // tokens from lim on are not attended by the row (the request's end, causal limit)
    float sl[kH];  // scale_log2 x the row's dequantization factors
    int lim_min = end;
#pragma unroll
    for (int k = 0; k < kH; ++k) {
      const int n = narrow_row(k, quad);
      const int t = row_query_pos(p, n);
      lim[k] = min(end, p.causal ? len - p.s_q + t + 1 : len);
      lim_min = min(lim_min, lim[k]);
      sl[k] = p.scale_log2 * descale_k * arrays.qscale[n];
    }
    float run_max[kH], run_sum[kH];
#pragma unroll
    for (int k = 0; k < kH; ++k) run_max[k] = -INFINITY, run_sum[k] = 0.f;

#pragma unroll 1
    for (int c = start; c < end; c += kBlockN, ++g) {
      const int stage = g % kNarrowStages;
      float s[16];
      qk_fp8<kNarrowRows>(s, sbase, stage, (g / kNarrowStages) & 1);
      wgmma_wait<0>();
      fence_all(s);
      if (c + kBlockN >= end) mbar_arrive_per_warp(bar_addr(sbase, kQEmpty));  // the request's last read of Q
      // scores in the log2 domain; -inf past a row's limit and for tokens whose page is outside the cache
      const uint64_t page_ok = arrays.page_ok[stage];
      const bool in0 = (page_ok >> tok0) & 1, in1 = (page_ok >> (tok0 + 8)) & 1;
      float mx[kH];
      mask_scale_columns<kNarrowRows>(s, in0, in1, tok0, RowLimits{c + kBlockN > lim_min, c, lim}, RowScales{sl}, mx);
      // by chunk parity: a warp writes chunk g + 2's maxima only after every warp has passed chunk g + 1's barrier
      reduce_over_tokens<kNarrowRows>(mx, s_colmax + (g & 1) * 4 * kNarrowRows, warp, lane, kBarColumns, MaxOp{});
      float base[kH], alpha[kH];
      update_column_maxima(run_max, mx, base, alpha);
      // P^T = exp2(S^T - base), sums of the unrounded values, e4m3 bytes (column e, token half h at byte 2e + h)
      uint32_t words[kH / 2];
#pragma unroll
      for (int j = 0; j < kH / 2; ++j) {
        const float p00 = exp2f(s[4 * j] - base[2 * j]), p01 = exp2f(s[4 * j + 2] - base[2 * j]);
        const float p10 = exp2f(s[4 * j + 1] - base[2 * j + 1]), p11 = exp2f(s[4 * j + 3] - base[2 * j + 1]);
        run_sum[2 * j] = run_sum[2 * j] * alpha[2 * j] + (p00 + p01);
        run_sum[2 * j + 1] = run_sum[2 * j + 1] * alpha[2 * j + 1] + (p10 + p11);
        const uint32_t mine = f32x4_to_e4m3x4(p00, p01, p10, p11);
        const uint32_t other = __shfl_xor_sync(0xffffffffu, mine, 4);  // lane i ^ 1: the neighbouring positions
        // word of positions pt_word..pt_word + 3 = {even h0, odd h0, even h1, odd h1} of one column
        words[j] = odd ? __byte_perm(other, mine, 0x7362) : __byte_perm(mine, other, 0x5140);
      }
      mbar_wait(bar_addr(sbase, kPEmpty), (g & 1) ^ 1);  // WG1's product with the previous P^T is done
#pragma unroll
      for (int j = 0; j < kH / 2; ++j) {
        const int n = 8 * j + 2 * quad + (odd ? 1 : 0);
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sbase + kOffP + swz64(n, pt_word)), "r"(words[j]) : "memory");
      }
      if (warp == 0 && lane < 4) {
#pragma unroll
        for (int j = 0; j < kH / 2; ++j)
          *reinterpret_cast<float2*>(arrays.alpha + 8 * j + 2 * quad) = make_float2(alpha[2 * j], alpha[2 * j + 1]);
      }
      fence_proxy_async();
      mbar_arrive_per_warp(bar_addr(sbase, kPFull));
    }
    // column sums over the request's tokens; WG1 takes them and the maxima from shared memory
    reduce_over_tokens<kNarrowRows>(run_sum, s_colsum, warp, lane, kBarColumns, AddOp{});
    if (warp == 0 && lane < 4) {
      const int b = (qi & 1) * 64;
#pragma unroll
      for (int k = 0; k < kH; ++k) {
        arrays.rowsum[b + narrow_row(k, quad)] = run_sum[k];
        arrays.rowmax[b + narrow_row(k, quad)] = run_max[k];
      }
    }
    // Arrive only once WG1's product with this request's last P^T is done: WG1 passes its epilogue barrier of
    // the previous request before that product, so this warpgroup can never be two arrivals ahead on the named
    // barrier (which counts arrivals, not requests), however long WG1 spends between its products.
    mbar_wait(bar_addr(sbase, kPEmpty), (g & 1) ^ 1);
    named_bar_arrive(kBarEpilogue, 256);
    ++qi;
  }
}

// WG2: the Q rows of each request of the partition (kNarrowRows / 4 rows per warp, quantized, their factors in
// s_qscale) and the first loads WG1 leaves to it. The next request's rows are prefetched into L2 by WG1's loading
// warp when its walk enters that request (kNarrowStages chunks ahead of the QK), or here right after the fill when
// the request is that short.
template <bool kSmallPages>
__device__ __forceinline__ void narrow_q_warpgroup(const CUtensorMap* tmap, const DenseDecodeParams& p, const Partition& pt,
                                                   uint32_t sbase, float* s_qscale, int mtile, int kvh, int tid_wg) {
  constexpr int kRowsPerWarp = kNarrowRows / 4;
  constexpr int kQFillRows = Budget<kSmallPages, true>::kQFillRows;
  const int warp = tid_wg / 32, lane = tid_wg % 32;
  prefetch_q_rows(p, pt.begin_req, mtile, kvh, tid_wg);
  const float descale_q = p.q_fp8 ? *p.descale_q : 1.f;
  uint32_t qi = 0;
  for (int r = pt.begin_req; r <= pt.end_req; ++r) {
    int start, end;
    request_range(p, pt, r, start, end);
    if (start >= end) continue;
    mbar_wait(bar_addr(sbase, kQEmpty), (qi & 1) ^ 1);
#pragma unroll 1
    for (int row = warp * kRowsPerWarp; row < warp * kRowsPerWarp + kRowsPerWarp; row += kQFillRows)
      fill_q_rows<kQFillRows>(p, sbase, s_qscale, r, row, mtile, kvh, lane, descale_q);
    fence_proxy_async();
    mbar_arrive_per_warp(bar_addr(sbase, kQFull));
    if (qi == 0 && warp == 0 && !kSmallPages) deferred_first_loads<kSmallPages, kNarrowStages>(tmap, p, pt, sbase, kvh);
    if (end - start <= kNarrowStages * kBlockN && r < pt.end_req) prefetch_q_rows(p, r + 1, mtile, kvh, tid_wg);
    ++qi;
  }
}

template <bool kSmallPages>
__global__ void __launch_bounds__(kThreads, 1)
    dense_decode_fp8_narrow_kernel(const __grid_constant__ CUtensorMap tmap, const DenseDecodeParams p) {
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
  const int kvh = blockIdx.y;
  const int mtile = blockIdx.x;  // 0: at most 32 rows

  const Partition pt = read_partition(p);
  if (pt.empty()) return;

  if (tid == 0) init_barriers<kNarrowStages>(sbase, 4, &tmap);  // (the V^T buffers' barriers are not used)
  __syncthreads();
  allow_dependent_launch();

  if (wg == 2) {
    // ======================= WG2: Q (rows 0..31) =======================
    set_warpgroup_registers<Budget<kSmallPages, true>::kRegsWG2>();
    narrow_q_warpgroup<kSmallPages>(&tmap, p, pt, sbase, arrays.qscale, mtile, kvh, tid_wg);
    return;
  }
  if (wg == 0) {
    // ======================= WG0: S^T, softmax, P^T =======================
    set_warpgroup_registers<Budget<kSmallPages, true>::kRegsWG0>();
    narrow_softmax_warpgroup<kSmallPages>(p, pt, smem, tid_wg);
    return;
  }
  // ======================= WG1: O^T += V^T P^T, epilogue; warp 0 issues the loads =======================
  set_warpgroup_registers<Budget<kSmallPages, true>::kRegsWG1>();
  const float descale_k = *p.descale_k;
  // Block-table entries read a chunk ahead of their loads (ChunkWalk in dense_decode_fp8.cuh says why).
  constexpr bool kPageAhead = !kSmallPages;
  ChunkWalk lw = first_loads<kSmallPages, kPageAhead, kNarrowStages>(&tmap, p, pt, sbase, kvh, warp);
  uint32_t g = 0, qi = 0;
  for (int r = pt.begin_req; r <= pt.end_req; ++r) {
    int start, end;
    request_range(p, pt, r, start, end);
    const int n_splits = p.num_splits[r + 1] - p.num_splits[r];  // read now: at the end it is a round trip more
    float o[8][16];  // O^T tile m (rows 64 m..): element 4 j + 2 h + e = (dim 64 m + 16 warp + 2 (lane / 4) + h, row 8 j + 2 quad + e): v_fragments
#pragma unroll
    for (int m = 0; m < 8; ++m)
#pragma unroll
      for (int k = 0; k < 16; ++k) o[m][k] = 0.f;
    float l[kNarrowRowsPerThread], mx[kNarrowRowsPerThread];
#pragma unroll
    for (int k = 0; k < kNarrowRowsPerThread; ++k) l[k] = 0.f, mx[k] = -INFINITY;
    if (start < end) {
#pragma unroll 1
      for (int c = start; c < end; c += kBlockN, ++g) {
        const int stage = g % kNarrowStages;
        // V^T's fragments as soon as the chunk has landed, while WG0 computes its P^T
        mbar_wait(bar_addr(sbase, kKvFull + stage), (g / kNarrowStages) & 1);
        uint32_t a[8][2][4];
        v_fragments<8>(a, sbase + kOffKV + stage * kStageBytes, end - c, warp, lane, 0);
        mbar_wait(bar_addr(sbase, kPFull), g & 1);
        rescale_columns<kNarrowRows>(o, arrays.alpha, quad);
        const uint64_t desc_pt = desc_sw64(sbase + kOffP);
        fence_all(o);
        wgmma_fence();
#pragma unroll
        for (int m = 0; m < 8; ++m)
#pragma unroll
          for (int kk = 0; kk < 2; ++kk) wgmma_m64n32k32_e4m3_rk(o[m], a[m][kk], desc_add(desc_pt, kk * 32), 1);
        wgmma_commit();
        wgmma_wait<0>();
        fence_all(o);
        mbar_arrive_per_warp(bar_addr(sbase, kPEmpty));
        // The stage of chunk g is free: WG0's QK read it before P^T was written, and this product, which consumed
        // every warp's fragments (so their shared-memory reads are done), is complete.
        if (warp == 0 && lw.r <= pt.end_req) {
          load_chunk<kSmallPages, kPageAhead>(&tmap, p, sbase, lw, kvh, stage);
          const int walk_req = lw.r;
          walk_next<kPageAhead>(p, pt, lw);
          if (lw.r != walk_req && lw.r <= pt.end_req) prefetch_q_rows(p, lw.r, mtile, kvh, lane);
        }
      }
      named_bar_sync(kBarEpilogue, 256);
      const int b = (qi & 1) * 64;
#pragma unroll
      for (int k = 0; k < kNarrowRowsPerThread; ++k) {
        l[k] = arrays.rowsum[b + narrow_row(k, quad)];
        mx[k] = arrays.rowmax[b + narrow_row(k, quad)];
      }
      ++qi;
    }
    // Split partials in bf16 (split_partials_bf16, dense_decode.h).
    store_outputs_transposed<__nv_bfloat16, true, 8, kNarrowRowsPerThread, Partials::k16PackedFirst>(
        p, o, r, kvh, 0, l, mx, n_splits, r == pt.begin_req ? pt.begin_split : 0, descale_k, warp, lane);
  }
}

void launch_dense_decode_fp8_narrow(const DenseDecodeParams& p, const CUtensorMap& tmap, cudaStream_t stream) {
  launch_on_plan_grid(dense_decode_fp8_narrow_kernel<true>, dense_decode_fp8_narrow_kernel<false>, kThreads, kSmemBytes,
                      p, tmap, stream);
}

}  // namespace dense_fp8
}  // namespace sm90
}  // namespace flashmla
