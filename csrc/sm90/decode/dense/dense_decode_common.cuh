// Device helpers shared by the dense decode kernels (16-bit: dense_decode_kernel.cuh (64 rows, seesaw) and
// dense_decode_narrow.cuh (32 rows, transposed); FP8: dense_decode_fp8.cu, dense_decode_fp8_narrow.cu): request
// ranges of a partition, the chunk loads, score masks and row maxima, and the output epilogues.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include <type_traits>

#include "sm90/common/seesaw.h"
#include "sm90/common/sm90_ptx.h"
#include "sm90/decode/dense/dense_decode.h"

namespace flashmla {
namespace sm90 {
namespace dense {

constexpr int kSlotBytes = 64 * 128;  // one TMA destination: 64 rows x 128 bytes (64 bf16/fp16 or 128 e4m3 values)
// The 16-bit kernels multiply P = hi + lo (two 16-bit terms) for requests up to this length, so that P's rounding
// does not show in outputs that average only a few tokens.
constexpr int kPreciseMaxLen = 1024;

// Transaction bytes expected by an mbarrier, without an arrival.
__device__ __forceinline__ void mbar_expect_tx_only(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

// Request r's row of the block table (its page ids, one per page_size tokens).
__device__ __forceinline__ const int* block_table_row(const DenseDecodeParams& p, int r) {
  return p.block_table + (int64_t)r * p.block_table_stride;
}
// Page id of the chunk at token `tok` of request r (pages of 64 tokens and more: the chunk lies in one page).
__device__ __forceinline__ int chunk_page(const DenseDecodeParams& p, int r, int tok) {
  return block_table_row(p, r)[tok / p.page_size];
}

// The m_total = s_q x group query rows of a kv head are query position-major: row m is query position
// m / group of head kvh * group + m % group. The kernels map their rows to q, out and lse through these.
struct QueryRow {
  int t, head;
};
__device__ __forceinline__ QueryRow query_row(const DenseDecodeParams& p, int kvh, int m) {
  return {m / p.group, kvh * p.group + m % p.group};
}
// Query position of row m (rows past m_total: the last row's).
__device__ __forceinline__ int row_query_pos(const DenseDecodeParams& p, int m) { return min(m, p.m_total - 1) / p.group; }
// Offsets of a row of request r: its first element in q (element strides) and in out, its lse.
__device__ __forceinline__ int64_t q_offset(const DenseDecodeParams& p, int r, QueryRow row) {
  return (int64_t)r * p.q_batch_stride + (int64_t)row.t * p.q_seq_stride + (int64_t)row.head * p.q_head_stride;
}
__device__ __forceinline__ int64_t out_offset(const DenseDecodeParams& p, int r, QueryRow row) {
  return (((int64_t)r * p.s_q + row.t) * p.h_q + row.head) * kDV;
}
__device__ __forceinline__ int64_t lse_offset(const DenseDecodeParams& p, int r, QueryRow row) {
  return ((int64_t)r * p.h_q + row.head) * p.s_q + row.t;
}

// Length of request r as attended: below 0 counts as 0, past the block table's capacity as the capacity
// (so no block-table entry past the row is ever read); the reference mla_decode defines the same.
__device__ __forceinline__ int request_len(const DenseDecodeParams& p, int r) {
  return min(max(p.seqlens[r], 0), p.max_tokens);
}

// Token range [start, end) of request r inside partition (begin_req..end_req). end_tok is clamped to the length:
// the plan's open end (kPlanOpenEnd) on a request's last piece makes that piece run to the request's real end.
__device__ __forceinline__ void request_range(const DenseDecodeParams& p, int r, int begin_req, int begin_tok,
                                              int end_req, int end_tok, int& start, int& end) {
  const int len = request_len(p, r);
  start = r == begin_req ? begin_tok : 0;
  end = r == end_req ? end_tok : len;
  end = min(end, len);
  start = max(start, 0);
}

// A CTA's SM partition of the plan (row blockIdx.z of tile_scheduler_metadata): requests begin_req..end_req
// (end_req clamped into the batch), from token begin_tok of the first and before token end_tok of the last;
// begin_split is the split index of the first request's piece. Empty: the CTA has nothing to do.
struct Partition {
  int begin_req, begin_tok, end_req, end_tok, begin_split;
  __device__ __forceinline__ bool empty() const { return begin_req > end_req || begin_req < 0; }
};
__device__ __forceinline__ Partition read_partition(const DenseDecodeParams& p) {
  const int* meta = p.metadata + blockIdx.z * 8;
  return {meta[0], meta[1], min(meta[2], p.b - 1), meta[3], meta[4]};
}
// Token range [start, end) of request r inside partition pt.
__device__ __forceinline__ void request_range(const DenseDecodeParams& p, const Partition& pt, int r, int& start,
                                              int& end) {
  request_range(p, r, pt.begin_req, pt.begin_tok, pt.end_req, pt.end_tok, start, end);
}

// A loading warp's walk over two stages: load(r, tok, end, stage, empty_parity) for every 64-token chunk of the
// partition, in the order the math warps consume them (chunk g of the CTA into stage g & 1); empty_parity is the
// parity to wait for on the stage's "empty" mbarrier before refilling it for chunk g (a stage's first fill waits
// for nothing).
template <typename Load>
__device__ __forceinline__ void for_each_chunk_to_load(const DenseDecodeParams& p, const Partition& pt, Load&& load) {
  uint32_t g = 0;
  for (int r = pt.begin_req; r <= pt.end_req; ++r) {
    int start, end;
    request_range(p, pt, r, start, end);
#pragma unroll 1
    for (int tok = start; tok < end; tok += kBlockN, ++g) load(r, tok, end, static_cast<int>(g & 1), ((g >> 1) & 1) ^ 1);
  }
}

// A finished row of the epilogue: the factor its O takes (out_mult / l, 0 for a row with nothing attended) and
// its log-sum-exp (natural log; max in the log2 domain). A row with nothing attended gets lse +inf when the
// request is not split and -inf as a split piece (so that the combine gives it no weight).
struct RowResult {
  float scale, lse;
};
__device__ __forceinline__ RowResult finish_row(float l, float max, float out_mult, int n_splits) {
  constexpr float kLn2 = 0.6931471805599453f;
  const float empty_lse = n_splits == 1 ? INFINITY : -INFINITY;
  return {l > 0.f ? out_mult / l : 0.f, l > 0.f ? (max + log2f(l)) * kLn2 : empty_lse};
}

// First element of request r's split piece split_idx (kv head kvh) in the split scratch: rows of
// m_total x 512 values in oacc, m_total values in lseacc. The row index is clamped into the scratch.
__device__ __forceinline__ int64_t split_scratch_base(const DenseDecodeParams& p, int r, int kvh, int split_idx) {
  int row = 2 * (p.num_splits[r] - r) + split_idx;
  row = max(0, min(row, p.acc_rows - 1));
  return ((int64_t)row * p.h_kv + kvh) * p.m_total;
}

// Epilogue of one request: O / l to `out` (unsplit) or to the split scratch, and the log-sum-exp.
// l0 / l1: full row sums of this thread's rows; max0 / max1: their final maxima (log2 domain).
// out_mult: a factor applied to every output value (descale_k on the FP8 path, else 1).
template <typename T>
__device__ __forceinline__ void store_outputs(const DenseDecodeParams& p, const float (&o)[128], int r, int kvh, int wg,
                                              int m0, int m1, int t0, int t1, float l0, float l1,
                                              float max0, float max1, int n_splits, int split_idx,
                                              float out_mult = 1.f) {
  const RowResult res0 = finish_row(l0, max0, out_mult, n_splits), res1 = finish_row(l1, max1, out_mult, n_splits);
  const float inv0 = res0.scale, inv1 = res1.scale, lse0 = res0.lse, lse1 = res1.lse;

  const bool ok0 = m0 < p.m_total, ok1 = m1 < p.m_total;
  // query_row's head, written out: through query_row nvcc 13.0 compiles the FP8 64-row kernel differently.
  const QueryRow row0{t0, kvh * p.group + min(m0, p.m_total - 1) % p.group};
  const QueryRow row1{t1, kvh * p.group + min(m1, p.m_total - 1) % p.group};
  const int lane4 = threadIdx.x % 4;
  if (n_splits == 1) {
    T* out = reinterpret_cast<T*>(p.out) + wg * 256;
    store_rows_16bit<T>(out + out_offset(p, r, row0), out + out_offset(p, r, row1), o, inv0, inv1, ok0, ok1, lane4);
    if (wg == 0 && lane4 == 0) {
      if (ok0) p.lse[lse_offset(p, r, row0)] = lse0;
      if (ok1) p.lse[lse_offset(p, r, row1)] = lse1;
    }
  } else {
    const int64_t base = split_scratch_base(p, r, kvh, split_idx);
    float* acc = static_cast<float*>(p.oacc) + wg * 256;
    store_rows_f32(acc + (base + m0) * kDV, acc + (base + m1) * kDV, o, inv0, inv1, ok0, ok1, lane4);
    if (wg == 0 && lane4 == 0) {
      if (ok0) p.lseacc[base + m0] = lse0;
      if (ok1) p.lseacc[base + m1] = lse1;
    }
  }
}

// ---- the 32-row (transposed) kernels: O^T (512 dims x 32 query rows) in eight m64n32 accumulators ----
constexpr int kNarrowRowsPerThread = kNarrowRows / 4;  // columns (query rows) of an m64n32 accumulator per thread

// Query row (S^T / O^T column) of a thread's per-row value k = 2 j + e.
__device__ __forceinline__ int narrow_row(int k, int quad) { return 8 * (k / 2) + 2 * quad + k % 2; }

// How the transposed kernels write split partials: fp32, or in out's 16-bit type (the FP8 kernels,
// split_partials_bf16 in dense_decode.h, with kDimPairs), either packed first (O^T scaled and packed into half its
// registers, then one store path whatever the destination: the 32-row kernel) or packed at each store like `out`
// (the large-page kernel, whose product warpgroups have no registers for the packed copy).
enum class Partials { kF32, k16PackedFirst, k16AtStore };

// Epilogue of one request in the transposed kernels: O^T * out_mult / l to `out` (T, unsplit) or to the split
// scratch, and the log-sum-exp (only with store_lse). o: kMTiles m64 accumulators of dims dim0 + 64 m.., N =
// 2 kRows query rows each (the tile's column n is query row tile_row0 + n); l / mx: full column sums and final
// maxima (log2 domain) of the thread's kRows columns.
// A thread holds rows (dims) 64 m + 16 w + i + {0, 8} of its columns (w = warp of the warpgroup, i = lane / 4):
// lanes i and i ^ 1 swap one value each, so that every lane stores two adjacent dims of a row. With kDimPairs the
// accumulator rows i and i + 8 are dims 64 m + 16 w + 2 i + {0, 1} already (the FP8 kernels' V^T fragment order).
// kPartials: how split partials are written (Partials above).
template <typename T, bool kDimPairs = false, int kMTiles = 8, int kRows = kNarrowRowsPerThread,
          Partials kPartials = Partials::kF32>
__device__ __forceinline__ void store_outputs_transposed(const DenseDecodeParams& p, const float (&o)[kMTiles][2 * kRows],
                                                         int r, int kvh, int tile_row0, const float (&l)[kRows],
                                                         const float (&mx)[kRows], int n_splits, int split_idx,
                                                         float out_mult, int warp, int lane, int dim0 = 0,
                                                         bool store_lse = true) {
  static_assert(kPartials == Partials::kF32 || kDimPairs, "16-bit partials: in the FP8 kernels' dim-pair order");
  constexpr bool kPackedFirst = kPartials == Partials::k16PackedFirst;
  using AccT = std::conditional_t<kPartials == Partials::kF32, float, T>;
  const int quad = lane % 4, i = lane / 4;
  const bool odd = i & 1;
  const int64_t acc_base = n_splits > 1 ? split_scratch_base(p, r, kvh, split_idx) : 0;
  // With Partials::k16AtStore m_total is read here through an opaque copy: the rows' flags below are the same for
  // every request and were otherwise computed once before the caller's request loop and held across its chunk loop
  // (the large-page kernel's product warpgroups spilled them, and ptxas rescheduled both of its chunk loops). The
  // other callers' code is left as it was (their flags fit).
  int m_total_at_store = 0;
  if constexpr (kPartials == Partials::k16AtStore)
    asm volatile("mov.b32 %0, %1;\n" : "=r"(m_total_at_store) : "r"(p.m_total));
  // Partials::k16PackedFirst: O^T scaled and packed first (half its registers), then one store path whatever the
  // destination.
  uint32_t packed[kPackedFirst ? kMTiles : 1][kPackedFirst ? kRows : 1];
  float row_lse[kPackedFirst ? kRows : 1];
  if constexpr (kPackedFirst) {
#pragma unroll
    for (int k = 0; k < kRows; ++k) {
      const RowResult res = finish_row(l[k], mx[k], out_mult, n_splits);
      row_lse[k] = res.lse;
      const int j = k / 2, e = k % 2;
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
        packed[m][k] = TypeOps<T>::pack(o[m][4 * j + e] * res.scale, o[m][4 * j + 2 + e] * res.scale);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kRows; ++k) {
    const int n = tile_row0 + narrow_row(k, quad);
    const bool ok = n < (kPartials == Partials::k16AtStore ? m_total_at_store : p.m_total);
    const int nn = ok ? n : 0;
    const QueryRow row = query_row(p, kvh, nn);
    RowResult res{0.f, 0.f};
    if constexpr (kPackedFirst) {
      res.lse = row_lse[k];
    } else {
      res = finish_row(l[k], mx[k], out_mult, n_splits);
    }
    const float inv = res.scale, lse = res.lse;
    T* out_row = reinterpret_cast<T*>(p.out) + out_offset(p, r, row);
    AccT* acc_row = static_cast<AccT*>(p.oacc) + (acc_base + nn) * kDV;
    if (ok && store_lse && warp == 0 && i == 0) {
      if (n_splits == 1) {
        p.lse[lse_offset(p, r, row)] = lse;
      } else {
        p.lseacc[acc_base + n] = lse;
      }
    }
    if constexpr (kPackedFirst) {
      T* dst = n_splits == 1 ? out_row : reinterpret_cast<T*>(acc_row);
#pragma unroll
      for (int m = 0; m < kMTiles; ++m)
        if (ok) *reinterpret_cast<uint32_t*>(dst + dim0 + 64 * m + 16 * warp + 2 * i) = packed[m][k];
    } else {
      const int j = k / 2, e = k % 2;
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
        const float v0 = o[m][4 * j + e] * inv, v1 = o[m][4 * j + 2 + e] * inv;  // dims d, d + 8 (kDimPairs: d, d + 1)
        const float other = kDimPairs ? 0.f : __shfl_xor_sync(0xffffffffu, odd ? v0 : v1, 4);
        // even lane: dims d, d + 1 (its d and the odd lane's); odd lane: dims d + 7, d + 8 (the even lane's d + 8,
        // its own)
        const float2 pair = kDimPairs ? make_float2(v0, v1) : odd ? make_float2(other, v1) : make_float2(v0, other);
        const int dim = dim0 + 64 * m + 16 * warp + (kDimPairs ? 2 * i : odd ? i - 1 + 8 : i);
        if (!ok) continue;
        if (n_splits == 1) {
          *reinterpret_cast<uint32_t*>(out_row + dim) = TypeOps<T>::pack(pair.x, pair.y);
        } else if constexpr (kPartials == Partials::k16AtStore) {
          *reinterpret_cast<uint32_t*>(acc_row + dim) = TypeOps<T>::pack(pair.x, pair.y);
        } else {
          *reinterpret_cast<float2*>(acc_row + dim) = pair;
        }
      }
    }
    // One row's stores at a time: without the exchange above nothing orders the rows, and ptxas, holding every
    // row's addresses at once next to O^T, spilled.
    if constexpr (kDimPairs) __syncwarp();
  }
}

// Pages smaller than a chunk (page_size not a multiple of 64): the tensor map's box has g = gcd(page_size, 64)
// rows, and load t of the chunk (columns t * kColsPerLoad.., into the 8 KB slot t of the stage; its own mbarrier
// at bar_base + 8 t when kBarPerLoad, else one mbarrier for the whole chunk) is 64 / g loads, sub-chunk j (tokens tok + j g .. tok + j g + g - 1, inside one
// page since tok is a multiple of 64) into rows j g.. of the tile, each with its own block-table entry. The
// 128B swizzle of a TMA write is a function of the shared-memory address, so g-row writes at 128-byte
// steps rebuild the whole tile's layout. Called by a whole warp: lane l looks up sub-chunks l and l + 32
// (one global-load latency for the chunk instead of one per sub-chunk) and issues their loads. Sub-chunks
// from `end` on are not loaded (their rows are masked and zeroed like any tail) and not expected by the
// mbarriers. Loops not unrolled and no integer division (a multiply by page_div_mul): the warp's registers
// are full (as a called function ptxas spilled more).
template <int kColsPerLoad, bool kBarPerLoad, bool kEvictFirst = false>
static __device__ __forceinline__ void load_tiles_small_pages(const CUtensorMap* tmap, const int* bt_row, uint32_t div_mul,
                                                              int div_shift, int page_size, int rows_log2, int num_blocks,
                                                              int tok, int end, int kvh,
                                                              uint32_t stage_base, uint32_t bar_base, uint32_t mask_addr,
                                                              int t_begin, int t_end) {
  constexpr int kBarStride = kBarPerLoad ? 8 : 0;
  const int lane = threadIdx.x % 32;
  const int nload = min(kBlockN >> rows_log2, (end - tok + (1 << rows_log2) - 1) >> rows_log2);
  // The transaction bytes are expected first and the arrival comes after the page mask is stored, so that
  // the mask is released with the arrival whatever order the loads complete in.
  if (lane == 0) {
    const uint32_t bytes = static_cast<uint32_t>(nload) << (rows_log2 + 7);  // 128-byte rows (both cache dtypes)
#pragma unroll 1
    for (int t = t_begin; t < t_end; ++t) mbar_expect_tx_only(bar_base + t * kBarStride, bytes);
  }
  uint64_t sub = 0;  // bit j: sub-chunk j's page is in the cache
#pragma unroll 1
  for (int h = 0; h * 32 < nload; ++h) {
    const int j = lane + 32 * h;
    const int t0 = tok + (j << rows_log2);
    int page = -1;
    if (j < nload) {
      const int col = static_cast<int>((static_cast<uint64_t>(t0) * div_mul) >> div_shift);  // t0 / page_size
      page = bt_row[col];
      const int in_page = t0 - col * page_size;
      const uint32_t dst = stage_base + (j << (rows_log2 + 7));
#pragma unroll 1
      for (int t = t_begin; t < t_end; ++t)
        tma_load_4d<kEvictFirst>(dst + t * kSlotBytes, tmap, bar_base + t * kBarStride, t * kColsPerLoad, kvh, in_page,
                                 page);
    }
    sub |= uint64_t(__ballot_sync(0xffffffffu, static_cast<unsigned>(page) < static_cast<unsigned>(num_blocks))) << (32 * h);
  }
  if (t_begin == 0) {  // token k's bit is its sub-chunk's (k >> rows_log2)
    const uint32_t lo = __ballot_sync(0xffffffffu, (sub >> (lane >> rows_log2)) & 1);
    const uint32_t hi = __ballot_sync(0xffffffffu, (sub >> ((lane + 32) >> rows_log2)) & 1);
    if (lane == 0) asm volatile("st.shared.v2.u32 [%0], {%1, %2};\n" ::"r"(mask_addr), "r"(lo), "r"(hi) : "memory");
  }
  if (lane == 0) {
    if (kBarPerLoad) {
#pragma unroll 1
      for (int t = t_begin; t < t_end; ++t) mbar_arrive(bar_base + t * kBarStride);
    } else {
      mbar_arrive(bar_base);
    }
  }
}

// Pages of 64 tokens and more: the chunk at `tok` of the page `page` (its block-table entry, read by the caller,
// in the FP8 32-row kernel one chunk ahead) as kLoads TMA loads of 64 rows x 128 bytes (columns u * kColsPerLoad..,
// 128B swizzle) into consecutive 8 KB slots at dst on the one mbarrier `bar`; its page mask (all ones, or zeros
// for a page id outside the cache) to mask_addr. Called by one whole warp; lane 0 issues.
template <int kLoads, int kColsPerLoad, bool kEvictFirst = false>
__device__ __forceinline__ void load_chunk_from_page(const CUtensorMap* tmap, const DenseDecodeParams& p, int page,
                                                     int tok, int kvh, uint32_t dst, uint32_t bar, uint32_t mask_addr) {
  if (threadIdx.x % 32 != 0) return;
  const int in_page = tok % p.page_size;
  const uint32_t in_cache = static_cast<unsigned>(page) < static_cast<unsigned>(p.num_blocks) ? 0xffffffffu : 0u;
  asm volatile("st.shared.v2.u32 [%0], {%1, %1};\n" ::"r"(mask_addr), "r"(in_cache) : "memory");
  mbar_expect_tx(bar, kLoads * kSlotBytes);
#pragma unroll
  for (int u = 0; u < kLoads; ++u)
    tma_load_4d<kEvictFirst>(dst + u * kSlotBytes, tmap, bar, u * kColsPerLoad, kvh, in_page, page);
}

// The chunk at `tok` (a multiple of 64, before `end`) of request r: kLoads TMA loads of 64 rows x 128 bytes (columns
// u * kColsPerLoad.., 128B swizzle) into consecutive 8 KB slots at dst, all on the one mbarrier `bar`; the
// chunk's page mask to mask_addr (bit k: token k's page is in the cache). Page ids outside the cache land as
// zeros. Called by one whole warp (the 16-bit 32-row kernel: 9 loads of 64 values; the FP8 kernels: 5 of 128).
template <int kLoads, int kColsPerLoad, bool kSmallPages, bool kEvictFirst = false>
__device__ __forceinline__ void load_chunk_one_barrier(const CUtensorMap* tmap, const DenseDecodeParams& p, int r,
                                                       int tok, int end, int kvh, uint32_t dst, uint32_t bar,
                                                       uint32_t mask_addr) {
  const int* bt_row = block_table_row(p, r);
  if constexpr (kSmallPages) {
    load_tiles_small_pages<kColsPerLoad, false, kEvictFirst>(tmap, bt_row, p.page_div_mul, p.page_div_shift,
                                                             p.page_size, p.page_rows_log2, p.num_blocks, tok, end,
                                                             kvh, dst, bar, mask_addr, 0, kLoads);
  } else {
    if (threadIdx.x % 32 != 0) return;
    // chunk_page, written out on bt_row: through chunk_page nvcc 13.0 schedules the FP8 64-row kernel differently.
    load_chunk_from_page<kLoads, kColsPerLoad, kEvictFirst>(tmap, p, bt_row[tok / p.page_size], tok, kvh, dst, bar,
                                                            mask_addr);
  }
}

// Masks the raw scores of tokens at or past each row's limit (-inf; only chunks that reach a limit pay
// for the compares).
__device__ __forceinline__ void mask_tail(float (&s)[32], int chunk_tok, int lim0, int lim1, int quad_col) {
  if (chunk_tok + kBlockN > min(lim0, lim1)) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int tok = chunk_tok + j * 8 + quad_col + e;
        if (tok >= lim0) s[j * 4 + e] = -INFINITY;
        if (tok >= lim1) s[j * 4 + 2 + e] = -INFINITY;
      }
    }
  }
}

// Masks the scores of the chunk's tokens whose page is outside the cache (bit k of `ok` clear for token k;
// the mask is the same in every thread, so the test is uniform and a chunk of in-cache pages pays one compare).
__device__ __forceinline__ void mask_pages(float (&s)[32], uint64_t ok, int quad_col) {
  if (ok != ~uint64_t(0)) {
    const uint32_t lo = static_cast<uint32_t>(ok) >> quad_col, hi = static_cast<uint32_t>(ok >> 32) >> quad_col;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        // column j * 8 + quad_col + e, as in mask_tail
        if (!(((j < 4 ? lo : hi) >> ((j % 4) * 8 + e)) & 1u)) {
          s[j * 4 + e] = -INFINITY;
          s[j * 4 + 2 + e] = -INFINITY;
        }
      }
    }
  }
}

// Row maxima over the quad of this thread's two rows, in the log2 domain (scale_log2 > 0); S is only read.
__device__ __forceinline__ void row_max(const float (&s)[32], float scale_log2, float& mx0, float& mx1) {
  mx0 = -INFINITY;
  mx1 = -INFINITY;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    mx0 = fmaxf(mx0, fmaxf(s[j * 4], s[j * 4 + 1]));
    mx1 = fmaxf(mx1, fmaxf(s[j * 4 + 2], s[j * 4 + 3]));
  }
#pragma unroll
  for (int o_ = 1; o_ <= 2; o_ *= 2) {
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o_));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o_));
  }
  mx0 *= scale_log2;
  mx1 *= scale_log2;
}


// Host side: launches one of a dense decode kernel's two instantiations (small_pages when page_size is not a
// multiple of 64) on the plan's grid, m tiles x kv heads x partitions (the m-tile CTAs of a partition read the
// same pages, so they launch together). large_pages_threads: the large-page kernel's block size where it differs.
template <typename Kernel>
inline void launch_on_plan_grid(Kernel small_pages, Kernel large_pages, int threads, int smem_bytes,
                                const DenseDecodeParams& p, const CUtensorMap& tmap, cudaStream_t stream,
                                int large_pages_threads = 0) {
  const bool small = p.page_rows_log2 < 6;
  const Kernel kernel = small ? small_pages : large_pages;
  if (!small && large_pages_threads > 0) threads = large_pages_threads;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  const dim3 grid(p.num_m_tiles, p.h_kv, p.num_sm_parts);
  kernel<<<grid, threads, smem_bytes, stream>>>(tmap, p);
}

}  // namespace dense
}  // namespace sm90
}  // namespace flashmla
