// Shared pieces of the SM90 dense decode kernels over the per-tensor e4m3 cache: the 64-row kernels
// (dense_decode_fp8.cu: S = Q K^T, then O^T = V^T P^T with pages of 64 and more, O = P V with smaller pages) and
// the 32-row kernel for few query rows per kv head (dense_decode_fp8_narrow.cu: S^T = K Q^T, O^T = V^T P^T). All use
// the same shared-memory layout, cache loads and Q fill; the small-page 64-row kernel's WG2 transposes V, the others
// read V^T's fragments from the cache tile (v_fragments) and hold a fourth stage where the V^T buffers are;
// docs/design.md §5.1, "FP8 cache".
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include "sm90/common/seesaw.h"
#include "sm90/common/sm90_ptx.h"
#include "sm90/decode/dense/dense_decode.h"
#include "sm90/decode/dense/dense_decode_common.cuh"

namespace flashmla {
namespace sm90 {
namespace dense_fp8 {

using namespace dense;

constexpr int kThreads = 384;  // three warpgroups
constexpr int kStages = 3;        // cache stages of the small-page 64-row kernel
constexpr int kNarrowStages = 4;  // of the 32-row and large-page kernels: no V^T buffers, the fourth stage is there
constexpr int kMaxStages = 4;     // stage barriers and page masks reserved
constexpr int kVtBufs = 2;  // V^T buffers: the transposer runs up to kVtBufs - 1 chunks ahead (3 with 2 stages: slower)
constexpr int kLatentSlots = 4;                     // columns 0..511: four 128-column slots
constexpr int kStageBytes = 5 * kSlotBytes;         // + columns 512..639 (576.. zero-filled by the TMA)
constexpr int kQRopeBytes = 64 * 64;                // Q columns 512..575: 64 rows x 64 bytes, 64B swizzle
constexpr int kVtBytes = kDV * 64;                  // V^T: 512 rows x 64 tokens, 64B swizzle
constexpr int kPBytes = 64 * 64;                    // P: 64 rows x 64 tokens, 64B swizzle

constexpr int kOffQ = 0;
constexpr int kOffQRope = kOffQ + kLatentSlots * kSlotBytes;
constexpr int kOffKV = kOffQRope + kQRopeBytes;
constexpr int kOffVt = kOffKV + kStages * kStageBytes;
constexpr int kOffP = kOffVt + kVtBufs * kVtBytes;
constexpr int kOffQScale = kOffP + kPBytes;          // float[64]: dequantization factor of each Q row
constexpr int kOffAlpha = kOffQScale + 64 * 4;       // float[64]: WG0's rescale factors of the chunk
constexpr int kOffRowSum = kOffAlpha + 64 * 4;       // float[2][64]: row sums of a request (by request parity)
constexpr int kOffRowMax = kOffRowSum + 2 * 64 * 4;  // float[2][64]: final row maxima (log2 domain)
constexpr int kOffPageOk = kOffRowMax + 2 * 64 * 4;  // uint64[kMaxStages]: bit k = token k's page is in the cache
constexpr int kOffBar = kOffPageOk + kMaxStages * 8;
// mbarriers, by index from kOffBar
constexpr int kKvFull = 0;               // [kMaxStages]: the chunk's bytes landed (TMA transactions)
constexpr int kVtFull = kMaxStages;              // [kVtBufs]: V^T written (4 WG2 warps)
constexpr int kVtEmpty = kVtFull + kVtBufs;      // [kVtBufs]: every PV product of the buffer done (its warps)
constexpr int kPFull = kVtEmpty + kVtBufs;       // P and (but large pages: kAlphaFull) the factors written (4 WG0 warps)
constexpr int kPEmpty = kPFull + 1;              // the product(s) with P done (4 WG1 warps; large pages: WG1 + WG2, 8)
constexpr int kQFull = kPFull + 2;               // Q and its row factors written (4 WG2 warps)
constexpr int kQEmpty = kPFull + 3;              // WG0's last QK of the request done (4 WG0 warps)
constexpr int kStageEmpty = kPFull + 4;          // [kMaxStages]: the large-page kernel's stage read by all (12 warps)
constexpr int kAlphaFull = kStageEmpty + kMaxStages;  // the large-page kernel's factors of the next P (4 WG0 warps)
constexpr int kFirstQFull = kAlphaFull + 1;  // the large-page kernel's first Q, written by the products (8 warps)
constexpr int kFirstQLoads = kFirstQFull + 1;  // the large-page kernel's first Q loads issued (8 product warps)
constexpr int kNumBars = kFirstQLoads + 1;
constexpr int kSmemUsed = kOffBar + kNumBars * 8;
constexpr int kSmemBytes = kSmemUsed + 1024;  // slack for 1024-byte alignment
static_assert(kSmemBytes <= 232448, "shared memory per block");
static_assert(kOffKV + kNarrowStages * kStageBytes <= kOffP && kNarrowStages <= kMaxStages && kStages <= kMaxStages,
              "the 32-row kernel's stages: the 64-row kernel's stages and V^T buffers");
static_assert(kOffKV % 1024 == 0 && kOffVt % 1024 == 0 && kOffQRope % 512 == 0 && kOffP % 512 == 0,
              "swizzle atoms: 1024 bytes (128B swizzle), 512 bytes (64B)");

constexpr uint32_t kBarEpilogue = 1;  // named barrier: WG0's row sums and maxima are in shared memory for WG1

// The per-row arrays every FP8 kernel keeps in shared memory (offsets above), as typed pointers.
struct RowArrays {
  float* qscale;            // dequantization factor of each Q row
  float* alpha;             // WG0's rescale factors of the chunk in P (P^T)
  float* rowsum;            // a request's row sums, by request parity
  float* rowmax;            // its final row maxima (log2 domain)
  const uint64_t* page_ok;  // per stage: bit k = token k's page is in the cache
  __device__ __forceinline__ explicit RowArrays(uint8_t* smem)
      : qscale(reinterpret_cast<float*>(smem + kOffQScale)),
        alpha(reinterpret_cast<float*>(smem + kOffAlpha)),
        rowsum(reinterpret_cast<float*>(smem + kOffRowSum)),
        rowmax(reinterpret_cast<float*>(smem + kOffRowMax)),
        page_ok(reinterpret_cast<const uint64_t*>(smem + kOffPageOk)) {}
};

// setmaxnreg budgets of the small-page 64-row kernel and of the 32-row kernel per page-size instantiation (the
// large-page 64-row kernel has its own, dense_decode_fp8.cu); they must sum to the launch allotment
// (3 x 168). In the 64-row kernel WG0 holds O (128), S (32) and P (8); in the 32-row kernel WG0 holds S^T (16)
// and the per-row softmax state. WG1 holds O (O^T) and, with small pages, the page-slice loads of
// load_tiles_small_pages (below 224 ptxas spills there). WG2's Q fill keeps the loads of kQFillRows rows
// (12 registers each) in flight: with small pages one row (WG1 needs the registers), with large pages (the 32-row
// kernel) four. The 32-row kernel (kNarrow) moves registers from its WG0 to WG1: O^T (128) and V^T's A fragments of
// a chunk (64), with small pages also the page-slice loads (256, the most there is); its WG2 only fills Q.
template <bool kSmallPages, bool kNarrow = false>
struct Budget {
  static_assert(kNarrow || kSmallPages, "the 64-row kernel with large pages has its own budgets");
  static constexpr int kRegsWG0 = kNarrow ? 152 : 200;
  static constexpr int kRegsWG1 = kNarrow ? (kSmallPages ? 256 : 240) : 224;
  static constexpr int kRegsWG2 = kNarrow ? (kSmallPages ? 96 : 112) : 80;
  static constexpr int kQFillRows = kSmallPages ? 1 : 4;
  static_assert(kRegsWG0 + kRegsWG1 + kRegsWG2 == 3 * 168, "setmaxnreg budgets must fit the launch allotment");
};

__device__ __forceinline__ uint32_t bar_addr(uint32_t sbase, int idx) { return sbase + kOffBar + idx * 8; }

// Shared-memory matrix descriptor, 64-byte swizzle, K-major: rows of 64 bytes, SBO = 512 (8-row groups).
__device__ __forceinline__ uint64_t desc_sw64(uint32_t addr) {
  uint64_t d = static_cast<uint64_t>((addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>(1) << 16;
  d |= static_cast<uint64_t>(512 >> 4) << 32;
  d |= 2ull << 62;
  return d;
}
// Byte offset of (row, byte) in a tile of 64-byte rows with the 64B swizzle (16-byte chunk ^= (row >> 1) & 3).
__device__ __forceinline__ uint32_t swz64(int row, int byte) {
  return static_cast<uint32_t>(row * 64 + ((((byte >> 4) ^ (row >> 1)) & 3) << 4) + (byte & 15));
}

// Four floats -> four e4m3 (round to nearest even, saturating), a in the low byte.
__device__ __forceinline__ uint32_t f32x4_to_e4m3x4(float a, float b, float c, float d) {
  uint16_t lo, hi;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(lo) : "f"(b), "f"(a));
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(hi) : "f"(d), "f"(c));
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// The power of two f that brings a row of |values| <= amax to at most 448 (e4m3's largest) with the least
// headroom: amax = 1.m * 2^e gives f = 2^(8 - e) when 1.m <= 1.75, else 2^(7 - e). Rows of zeros (or no
// finite maximum) take 1. Exact integer arithmetic, so that torch_flashmla.reference can repeat it.
__device__ __forceinline__ float e4m3_row_factor(float amax) {
  if (!(amax > 0.f) || !(amax < INFINITY)) return 1.f;
  const uint32_t bits = __float_as_uint(amax);
  const int e = static_cast<int>((bits >> 23) & 0xFF) - 127;
  int k = ((bits & 0x7FFFFFu) <= 0x600000u ? 8 : 7) - e;
  k = max(-126, min(127, k));
  return __uint_as_float(static_cast<uint32_t>(k + 127) << 23);
}

// Query rows row_first..row_first + kRows - 1 of the tile (request r) -> e4m3 in the Q tiles, their
// dequantization factors -> s_qscale. One warp per row at a time: lane l takes the 8-value pieces l, l + 32,
// l + 64 (< 72) of the 576 values. The loads of all kRows rows are issued first, so that the fill costs one
// global-memory round trip per kRows rows (it sits between a request's last QK and the next one's first);
// loads_issued() runs once they are, before any of them is waited for.
struct NoSignal {
  __device__ __forceinline__ void operator()() const {}
};
template <int kRows, typename LoadsIssued = NoSignal>
__device__ __forceinline__ void fill_q_rows(const DenseDecodeParams& p, uint32_t sbase, float* s_qscale, int r,
                                            int row_first, int mtile, int kvh, int lane, float descale_q,
                                            LoadsIssued loads_issued = {}) {
  uint4 raw[kRows][3];  // bf16: 8 values per piece; e4m3: 8 values in .x, .y
  bool in[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int m = mtile * kBlockM + row_first + i;
    in[i] = m < p.m_total;
    const int64_t off = q_offset(p, r, query_row(p, kvh, in[i] ? m : 0));
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      const int c = lane + 32 * k;
      raw[i][k] = make_uint4(0, 0, 0, 0);
      if (in[i] && c < kDQK / 8) {
        if (p.q_fp8) {
          const uint2 v = *reinterpret_cast<const uint2*>(reinterpret_cast<const uint8_t*>(p.q) + off + 8 * c);
          raw[i][k].x = v.x;
          raw[i][k].y = v.y;
        } else {
          raw[i][k] = *reinterpret_cast<const uint4*>(reinterpret_cast<const __nv_bfloat16*>(p.q) + off + 8 * c);
        }
      }
    }
  }
  loads_issued();
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int row = row_first + i;
    uint2 packed[3];
    float dequant = descale_q;
    if (p.q_fp8) {
#pragma unroll
      for (int k = 0; k < 3; ++k) packed[k] = make_uint2(raw[i][k].x, raw[i][k].y);
    } else {
      float amax = 0.f;
#pragma unroll
      for (int k = 0; k < 3; ++k) {
        const uint32_t w[4] = {raw[i][k].x, raw[i][k].y, raw[i][k].z, raw[i][k].w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[e]));
          amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));
        }
      }
#pragma unroll
      for (int o_ = 16; o_ >= 1; o_ /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o_));
      const float f = e4m3_row_factor(amax);
      dequant = 1.f / f;  // a power of two: exact
#pragma unroll
      for (int k = 0; k < 3; ++k) {
        const uint32_t w[4] = {raw[i][k].x, raw[i][k].y, raw[i][k].z, raw[i][k].w};
        float v[8];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 fv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[e]));
          v[2 * e] = fv.x * f;
          v[2 * e + 1] = fv.y * f;
        }
        packed[k].x = f32x4_to_e4m3x4(v[0], v[1], v[2], v[3]);
        packed[k].y = f32x4_to_e4m3x4(v[4], v[5], v[6], v[7]);
      }
    }
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      const int c = lane + 32 * k;
      if (c < kDQK / 8) {
        const int col = 8 * c;
        const uint32_t dst = col < kDV ? sbase + kOffQ + (col >> 7) * kSlotBytes + swz(row, (col & 127) >> 4) + (col & 8)
                                       : sbase + kOffQRope + swz64(row, col - kDV);
        asm volatile("st.shared.v2.b32 [%0], {%1, %2};\n" ::"r"(dst), "r"(packed[k].x), "r"(packed[k].y) : "memory");
      }
    }
    if (lane == 0) s_qscale[row] = in[i] ? dequant : 0.f;
  }
}

// L2 prefetch of the 64 query rows of request r in this tile (one bulk prefetch per row: row tid_wg by the caller's
// thread tid_wg, 0..63 of a warpgroup, or the 32 lanes of the 32-row kernel's loading warp), so that the Q fill reads them from L2: while the cache streams at full bandwidth, a
// round trip to DRAM takes microseconds, and the fill makes four of them in a row.
__device__ __forceinline__ void prefetch_q_rows(const DenseDecodeParams& p, int r, int mtile, int kvh, int tid_wg) {
  const int m = mtile * kBlockM + tid_wg;
  if (tid_wg >= kBlockM || m >= p.m_total) return;
  const int64_t off = q_offset(p, r, query_row(p, kvh, m));
  const uint64_t begin = reinterpret_cast<uint64_t>(p.q) + static_cast<uint64_t>(off) * (p.q_fp8 ? 1 : 2);
  const uint64_t end = begin + kDQK * (p.q_fp8 ? 1 : 2);
  const uint64_t first = begin & ~uint64_t(15);  // the bulk prefetch takes 16-byte multiples
  const uint32_t bytes = static_cast<uint32_t>(((end + 15) & ~uint64_t(15)) - first);
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(first), "r"(bytes) : "memory");
}

// V of a chunk (columns 0..511 of the 64 token rows in `stage`) -> V^T (512 rows of 64 e4m3, 64B swizzle,
// tokens in the P-fragment order above); tokens from `valid` on -> 0 (the cache there may hold NaN, which
// P = 0 must not meet). Warp w transposes columns 128w..128w+127 (latent slot w) in four steps of 32
// columns; lane (q, dp, G) = (lane % 4, lane / 4 % 2, lane / 8) reads tokens 16G + 2q + {0, 1, 8, 9}
// (16 bytes each, columns 32x + 16dp..) and writes the 4-byte groups at position 16G + 4q of its 16 rows.
// Bank conflicts: a 16-byte load serves 8 lanes per pass, and the 8 lanes (q, dp) of a pass read the
// 16-byte groups 2(x ^ q) + (dp ^ (token & 1)) of their rows: 8 distinct ones (were G to vary inside a
// pass, two of its lanes would share a group). At each store step lanes of opposite dp write rows of
// opposite parity, so that the 32 stores hit 32 banks.
// Addresses are a per-lane register plus a constant: the swizzle phase of a load is (16dp / 16 + 2x)
// ^ (token & 7) = 2(x ^ q) + (dp ^ (token & 1)), and that of a V^T row d = 32x + 16dp + 4j + (i ^ dp) is
// (d >> 1) & 3 = (2j + (i >> 1)) & 3, the same for every x and dp: the single warp per SM sub-partition
// that runs this issues little besides the loads, permutes and stores.
__device__ __forceinline__ void transpose_v(uint32_t stage, uint32_t vt, int valid, int warp, int lane) {
  const int q = lane & 3, dp = (lane >> 2) & 1, grp = lane >> 3;
  const int tok = 16 * grp + 2 * q;
  const uint32_t sel_even = dp ? 0x7632u : 0x5410u, sel_odd = dp ? 0x5410u : 0x7632u;
  // loads: token row (+ 0 / + 8), phase bit 0 = dp ^ (token & 1)
  const uint32_t ld_base = stage + warp * kSlotBytes + tok * 128;
  const uint32_t ld_even = ld_base + (dp << 4), ld_odd = ld_base + ((dp ^ 1) << 4) + 128;
  // stores: st[b][c] = row part of parity b ^ dp plus the swizzled 16-byte group of phase c
  const uint32_t st_base = vt + warp * 4 * 2048 + dp * 1024 + 4 * q;
  uint32_t st[2][4];
#pragma unroll
  for (int b = 0; b < 2; ++b)
#pragma unroll
    for (int c = 0; c < 4; ++c) st[b][c] = st_base + 64 * (b ^ dp) + ((grp ^ c) << 4);
#pragma unroll 2  // fully unrolled, WG2's registers do not hold the Q fill's loads as well
  for (int x = 0; x < 4; ++x) {
    const uint32_t xq = static_cast<uint32_t>(x ^ q) << 5;
    uint4 rows[4];  // tokens tok, tok + 1, tok + 8, tok + 9
    const uint32_t addr[4] = {ld_even + xq, ld_odd + xq, ld_even + xq + 1024, ld_odd + xq + 1024};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(rows[k].x), "=r"(rows[k].y), "=r"(rows[k].z), "=r"(rows[k].w)
                   : "r"(addr[k])
                   : "memory");
    }
    if (valid < kBlockN) {
      const int toks[4] = {tok, tok + 1, tok + 8, tok + 9};
#pragma unroll
      for (int k = 0; k < 4; ++k)
        if (toks[k] >= valid) rows[k] = make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t a = (&rows[0].x)[j], b = (&rows[1].x)[j], c = (&rows[2].x)[j], e = (&rows[3].x)[j];
      const uint32_t ab_lo = __byte_perm(a, b, 0x5140), ab_hi = __byte_perm(a, b, 0x7362);  // {a0 b0 a1 b1}, {a2 b2 a3 b3}
      const uint32_t ce_lo = __byte_perm(c, e, 0x5140), ce_hi = __byte_perm(c, e, 0x7362);
      const uint32_t words[4] = {__byte_perm(ab_lo, ce_lo, sel_even), __byte_perm(ab_lo, ce_lo, sel_odd),
                                 __byte_perm(ab_hi, ce_hi, sel_even), __byte_perm(ab_hi, ce_hi, sel_odd)};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        // words[i] holds column d = 32 (4 warp + x) + 16 dp + 4j + (i ^ dp): {a_d, b_d, c_d, e_d}
        const uint32_t dst = st[i & 1][(2 * j + (i >> 1)) & 3] + x * 2048 + j * 256 + (i >> 1) * 128;
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(dst), "r"(words[i]) : "memory");
      }
    }
  }
}

// The partition's chunks in the order every warpgroup consumes them: tokens [tok, min(tok + 64, end)) of
// request r; r > end_req once all are walked. With kPageAhead (pages of 64 and more) `page` is
// the chunk's block-table entry, read when the walk reaches the chunk: the loading warp walks on right after issuing
// a chunk's loads, so the read has a chunk's time to land before those loads need it. Read at the load, it stood
// in front of WG1's next product; reading ahead made the 32-row kernel 1.5-3% faster and the 64-row kernel of that
// time (today's small-page one) 3% slower at h_q 128 (benchmarks/NOTES_fp8_decode.md, session 13). The large-page
// 64-row kernel, whose loading warp (WG3) does nothing else, reads ahead too.
struct ChunkWalk {
  int r, tok, end, page;
};
template <bool kPageAhead>
__device__ __forceinline__ void walk_skip_empty(const DenseDecodeParams& p, const Partition& pt, ChunkWalk& w) {
  for (; w.r <= pt.end_req; ++w.r) {
    int start, end;
    request_range(p, pt, w.r, start, end);
    if (start < end) {
      w.tok = start;
      w.end = end;
      if (kPageAhead) w.page = chunk_page(p, w.r, w.tok);
      return;
    }
  }
}
template <bool kPageAhead>
__device__ __forceinline__ void walk_next(const DenseDecodeParams& p, const Partition& pt, ChunkWalk& w) {
  w.tok += kBlockN;
  if (w.tok >= w.end) {
    ++w.r;
    walk_skip_empty<kPageAhead>(p, pt, w);
  } else if (kPageAhead) {
    w.page = chunk_page(p, w.r, w.tok);
  }
}

// The walk's chunk into `stage` (five loads of 128 e4m3 columns, one mbarrier; called by one whole warp);
// kEvictFirst: loaded with the L2 evict-first policy (tma_load_4d).
template <bool kSmallPages, bool kPageAhead, bool kEvictFirst = false>
__device__ __forceinline__ void load_chunk(const CUtensorMap* tmap, const DenseDecodeParams& p, uint32_t sbase,
                                           const ChunkWalk& w, int kvh, int stage) {
  const uint32_t dst = sbase + kOffKV + stage * kStageBytes;
  if constexpr (!kPageAhead) {
    load_chunk_one_barrier<5, 128, kSmallPages, kEvictFirst>(tmap, p, w.r, w.tok, w.end, kvh, dst,
                                                             bar_addr(sbase, kKvFull + stage),
                                                             sbase + kOffPageOk + stage * 8);
  } else {
    load_chunk_from_page<5, 128, kEvictFirst>(tmap, p, w.page, w.tok, kvh, dst, bar_addr(sbase, kKvFull + stage),
                                              sbase + kOffPageOk + stage * 8);
  }
}

// S = Q K^T (kN = 64, the 64-row kernel: Q is A, the cache tile B) or S^T = K Q^T (kN = 32, the 32-row kernel:
// the cache tile is A, Q's rows 0..31 B) of the chunk in `stage` once it has landed: 16 steps over the latent
// slots, 2 over the RoPE columns. Committed as one wgmma group, not waited for.
template <int kN>
__device__ __forceinline__ void qk_step(float* s, uint64_t desc_q, uint64_t desc_k, int accumulate);
template <>
__device__ __forceinline__ void qk_step<64>(float* s, uint64_t desc_q, uint64_t desc_k, int accumulate) {
  wgmma_m64n64k32_e4m3_kk(s, desc_q, desc_k, accumulate);
}
template <>
__device__ __forceinline__ void qk_step<32>(float* s, uint64_t desc_q, uint64_t desc_k, int accumulate) {
  wgmma_m64n32k32_e4m3_kk(s, desc_k, desc_q, accumulate);
}
template <int kN>
__device__ __forceinline__ void qk_fp8(float (&s)[kN / 2], uint32_t sbase, int stage, uint32_t phase) {
  const uint32_t kv = sbase + kOffKV + stage * kStageBytes;
  const uint64_t desc_q = desc_sw128(sbase + kOffQ, 16, 1024);
  const uint64_t desc_k = desc_sw128(kv, 16, 1024);
  const uint64_t desc_q_rope = desc_sw64(sbase + kOffQRope);
  mbar_wait_loop(bar_addr(sbase, kKvFull + stage), phase);
  fence_all(s);
  wgmma_fence();
#pragma unroll
  for (int slot = 0; slot < kLatentSlots; ++slot) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      qk_step<kN>(s, desc_add(desc_q, slot * kSlotBytes + kk * 32), desc_add(desc_k, slot * kSlotBytes + kk * 32),
                  slot > 0 || kk > 0);
    }
  }
#pragma unroll
  for (int kk = 0; kk < 2; ++kk)
    qk_step<kN>(s, desc_add(desc_q_rope, kk * 32), desc_add(desc_k, kLatentSlots * kSlotBytes + kk * 32), 1);
  wgmma_commit();
}

// Chunks the loading warp (warp 0 of WG1, in the small-page 64-row kernel and the 32-row kernel) loads at the start:
// with pages of 64 and more (the 32-row kernel), only the first; WG2 loads the next kNumStages - 1 once it has
// written the first Q (narrow_q_warpgroup).
// Every SM starts at once, and a Q fill issued behind all stages' cache loads lands behind their bytes
// (microseconds at the start of every CTA, NOTES_fp8_decode.md); the first QK needs Q and the first chunk
// only. (With small pages WG2 has no registers for the page-slice loads, and WG1 loads all stages.)
template <bool kSmallPages, int kNumStages>
constexpr int kFirstLoads = kSmallPages ? kNumStages : 1;

// The loads of the partition's first kFirstLoads chunks, by warp 0; returns the walk at chunk kNumStages (the next
// chunk WG1 loads), in warp 0.
template <bool kSmallPages, bool kPageAhead, int kNumStages = kStages, bool kEvictFirst = false>
__device__ __forceinline__ ChunkWalk first_loads(const CUtensorMap* tmap, const DenseDecodeParams& p, const Partition& pt,
                                                 uint32_t sbase, int kvh, int warp) {
  ChunkWalk lw{pt.begin_req, 0, 0, 0};
  walk_skip_empty<kPageAhead>(p, pt, lw);
  if (warp == 0) {
#pragma unroll 1
    for (int s = 0; s < kNumStages && lw.r <= pt.end_req; ++s) {
      if (s < kFirstLoads<kSmallPages, kNumStages>)
        load_chunk<kSmallPages, kPageAhead, kEvictFirst>(tmap, p, sbase, lw, kvh, s);
      walk_next<kPageAhead>(p, pt, lw);
    }
  }
  return lw;
}

// WG2's part of the first loads (the 32-row kernel with pages of 64 and more): chunks kFirstLoads..kNumStages - 1 of
// the partition, by one warp, on its own walk.
template <bool kSmallPages, int kNumStages = kStages, bool kEvictFirst = false>
__device__ __forceinline__ void deferred_first_loads(const CUtensorMap* tmap, const DenseDecodeParams& p,
                                                     const Partition& pt, uint32_t sbase, int kvh) {
  ChunkWalk lw{pt.begin_req, 0, 0, 0};
  walk_skip_empty<!kSmallPages>(p, pt, lw);
#pragma unroll 1
  for (int s = 0; s < kNumStages && lw.r <= pt.end_req; ++s) {
    if (s >= kFirstLoads<kSmallPages, kNumStages>)
      load_chunk<kSmallPages, !kSmallPages, kEvictFirst>(tmap, p, sbase, lw, kvh, s);
    walk_next<!kSmallPages>(p, pt, lw);
  }
}

// WG2 of the small-page 64-row kernel: the Q rows of each request (kRowsPerWarp rows per warp, quantized, with their
// factors in s_qscale), the first loads WG1 leaves to it, and the V transposes of every chunk of the
// partition, in order.
template <bool kSmallPages, int kRowsPerWarp>
__device__ __forceinline__ void q_and_transpose_warpgroup(const DenseDecodeParams& p, const Partition& pt,
                                                          uint32_t sbase, float* s_qscale, int mtile, int kvh,
                                                          int tid_wg) {
  const int warp = tid_wg / 32, lane = tid_wg % 32;
  prefetch_q_rows(p, pt.begin_req, mtile, kvh, tid_wg);
  const float descale_q = p.q_fp8 ? *p.descale_q : 1.f;
  uint32_t g = 0, qi = 0;
  for (int r = pt.begin_req; r <= pt.end_req; ++r) {
    int start, end;
    request_range(p, pt, r, start, end);
    if (start >= end) continue;
    // The next request's Q is prefetched 4 chunks before this one's end: early enough to land before
    // its fill, late enough not to be evicted by the cache stream meanwhile.
    const int prefetch_at = max(start, end - 4 * kBlockN);
    mbar_wait(bar_addr(sbase, kQEmpty), (qi & 1) ^ 1);
    constexpr int kQFillRows = Budget<kSmallPages>::kQFillRows;
#pragma unroll 1
    for (int row = warp * kRowsPerWarp; row < warp * kRowsPerWarp + kRowsPerWarp; row += kQFillRows)
      fill_q_rows<kQFillRows>(p, sbase, s_qscale, r, row, mtile, kvh, lane, descale_q);
    fence_proxy_async();
    mbar_arrive_per_warp(bar_addr(sbase, kQFull));
    ++qi;
#pragma unroll 1
    for (int c = start; c < end; c += kBlockN, ++g) {
      const int stage = g % kStages, buf = g % kVtBufs;
      if (c <= prefetch_at && prefetch_at < c + kBlockN && r < pt.end_req) prefetch_q_rows(p, r + 1, mtile, kvh, tid_wg);
      mbar_wait(bar_addr(sbase, kKvFull + stage), (g / kStages) & 1);
      mbar_wait(bar_addr(sbase, kVtEmpty + buf), ((g / kVtBufs) & 1) ^ 1);
      transpose_v(sbase + kOffKV + stage * kStageBytes, sbase + kOffVt + buf * kVtBytes, end - c, warp, lane);
      fence_proxy_async();
      mbar_arrive_per_warp(bar_addr(sbase, kVtFull + buf));
    }
  }
}

// ldmatrix .x4 .trans of 8x8 16-bit matrices: lane l gives the address of row l % 8 of matrix l / 8; register j
// holds, for lane (i = l / 4, q = l % 4), the 16-bit column i of rows 2q and 2q + 1 of matrix j (row 2q low).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// A fragments of V^T for one chunk (the O^T = V^T P^T products of dense_decode_fp8_narrow.cu and
// dense_decode_fp8.cu): a[m][kk] = the m64k32 fragment of dims 64 (m_first + m).. and tokens 32 kk.. of the cache
// tile at `tile` (latent slots of 64 token rows x 128 bytes, 128B swizzle). Warp w takes dims D = 64 (m_first + m) +
// 16 w..D + 15 (one 16-byte column of the tile); matrix j of the ldmatrix is tokens 32 kk + 8 j..+7 of it, so lane
// (i, q) receives, per matrix, the bytes (token 2q: dims D + 2i, D + 2i + 1; token 2q + 1: the same). Bytes 0 and 2
// of matrices 0 and 1 are dim D + 2i at tokens {2q, 2q + 1, 8 + 2q, 9 + 2q}: positions 4q..4q + 3 of fragment row i
// in P^T's token order; bytes 1 and 3, dim D + 2i + 1 (row i + 8); matrices 2 and 3 the same 16 tokens on. So O^T's
// accumulator rows i and i + 8 of warp w are dims D + 2i, D + 2i + 1 (store_outputs_transposed with kDimPairs).
// Tokens from `valid` on are zeroed: the cache there may hold NaN, which P^T = 0 must not meet. Bank conflicts: the
// 8 rows of a matrix are 8 tokens whose 16-byte column sits at 8 different swizzle phases.
template <int kMTiles>
__device__ __forceinline__ void v_fragments(uint32_t (&a)[kMTiles][2][4], uint32_t tile, int valid, int warp, int lane,
                                            int m_first) {
  // row lane (token 8 (lane / 8) + lane % 8 of a 32-token block), 16-byte column 4 (m & 1) + warp of slot m / 2
  const uint32_t base = tile + lane * 128 + (static_cast<uint32_t>(warp ^ (lane & 7)) << 4);
#pragma unroll
  for (int m = 0; m < kMTiles; ++m)
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const int dm = m_first + m;
      uint32_t r[4];
      ldmatrix_x4_trans(((dm & 1) ? base ^ 64u : base) + (dm >> 1) * kSlotBytes + kk * 32 * 128, r);
      a[m][kk][0] = __byte_perm(r[0], r[1], 0x6420);
      a[m][kk][1] = __byte_perm(r[0], r[1], 0x7531);
      a[m][kk][2] = __byte_perm(r[2], r[3], 0x6420);
      a[m][kk][3] = __byte_perm(r[2], r[3], 0x7531);
    }
  if (valid < kBlockN) {
    const int q = lane & 3;
#pragma unroll
    for (int kk = 0; kk < 2; ++kk)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int t = 32 * kk + 16 * h + 2 * q;  // the fragment's tokens t, t + 1, t + 8, t + 9
        const uint32_t keep = (t < valid ? 0xFFu : 0u) | (t + 1 < valid ? 0xFF00u : 0u) |
                              (t + 8 < valid ? 0xFF0000u : 0u) | (t + 9 < valid ? 0xFF000000u : 0u);
#pragma unroll
        for (int m = 0; m < kMTiles; ++m) {
          a[m][kk][2 * h] &= keep;
          a[m][kk][2 * h + 1] &= keep;
        }
      }
  }
}

// The barriers of both FP8 kernels; v_readers: the warps that read a V^T buffer (its kVtEmpty count).
template <int kNumStages = kStages>
__device__ __forceinline__ void init_barriers(uint32_t sbase, uint32_t v_readers, const CUtensorMap* tmap,
                                              uint32_t p_readers = 4) {
  for (int s = 0; s < kNumStages; ++s) mbar_init(bar_addr(sbase, kKvFull + s), 1);
  for (int b = 0; b < kVtBufs; ++b) {
    mbar_init(bar_addr(sbase, kVtFull + b), 4);
    mbar_init(bar_addr(sbase, kVtEmpty + b), v_readers);
  }
  mbar_init(bar_addr(sbase, kPFull), 4);
  mbar_init(bar_addr(sbase, kPEmpty), p_readers);
  mbar_init(bar_addr(sbase, kQFull), 4);
  mbar_init(bar_addr(sbase, kQEmpty), 4);
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(tmap)) : "memory");
}

// The 32-row kernel (dense_decode_fp8_narrow.cu), launched by launch_dense_decode_fp8 when m_total <= 32.
void launch_dense_decode_fp8_narrow(const DenseDecodeParams& p, const CUtensorMap& tmap, cudaStream_t stream);

}  // namespace dense_fp8
}  // namespace sm90
}  // namespace flashmla
