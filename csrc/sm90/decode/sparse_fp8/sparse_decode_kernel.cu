// Token-sparse MLA decode over the FP8 KV cache for SM90 (sm_90a).
//
// One CTA = (SM partition of the plan, query token t, 64-head tile). Every request of the
// partition is walked in 64-token chunks of its index list: first the main cache's indices
// (topk_length of them, padded up to a chunk), then the extra cache's, in one softmax.
// With h_q > 64 the two head tiles of a token form a cluster of two CTAs that share the gather:
// each CTA's producer handles 32 rows of every chunk and writes them into both CTAs.
//
// Three warpgroups, specialised (setmaxnreg moves registers to the math warpgroups):
//   WG2 (producer): per chunk, gathers the 656-byte records with 16-byte loads (indices read two
//       chunks ahead, records prefetched into L2 ahead of the loads (not in the V3.2 few-head
//       kernel), the loads of one row in flight while another is converted: see the producer
//       loop), dequantizes e4m3 * scale to bf16
//       and writes the 64 x 576 tile into shared memory in the 128B-swizzled K-major layout that
//       wgmma reads (rows of skipped indices are zero, so masked probabilities never meet NaN),
//       with one valid flag per row: st.shared + proxy fence + arrive. In a cluster, one thread then
//       copies the CTA's 32 finished rows into the peer's stage with bulk shared::cluster copies,
//       counted as transaction bytes on the peer's full barrier (per-thread st.async of the same
//       rows took 15% longer overall: benchmarks/NOTES_sparse_decode.md). Two stages, on
//       full/empty mbarriers (a stage is empty when the math warps of both CTAs are done with it).
//   WG0: S = Q K^T (m64n64k16 x 36; Q by TMA, one request ahead), masked online softmax, P (bf16) ->
//       shared memory for WG1, and its half of O += P V (columns 0..255) with P from its registers.
//   WG1: the other half of O += P V (columns 256..511) from the P tile, rescaled by WG0's factors.
// P is handed from WG0 to WG1 through one shared-memory tile on the p_full / p_empty mbarriers,
// so WG0 computes S of chunk g+1 while WG1 still multiplies chunk g. Requests attending to at most
// kPreciseMaxLen tokens add a second PV term with P's rounding residue (as the dense kernel does).
// Two cache layouts, one kernel (template parameter kV4, Layout<kV4> below): V3.2 656-byte records
// (d_qk 576: 8 latent tiles with 4 fp32 scales + 1 RoPE tile) and DeepSeek V4 pages (d_qk 512: 7
// latent tiles of 64 values with one UE8M0 scale each + 1 RoPE tile; a token's 576 latent + RoPE
// bytes at 576 t of its page, its 8 scale bytes at 576 P + 8 t, so two loads per row of a chunk:
// 7 + 2 16-byte loads of the data part and one 8-byte load of the scales). Only the producer's
// gather/dequantization, the QK column count (36 or 32 k-steps) and the stage size differ; V is the
// first 512 columns in both, so the PV products, softmax, epilogue, split/combine and plan are shared.
// The main and extra cache of a call share the layout and may differ in page size.
// Measured history and the open bottleneck: benchmarks/NOTES_sparse_decode.md.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <math.h>

#include <type_traits>

#include "common/decode_common.h"
#include "sm90/common/seesaw.h"
#include "sm90/common/sm90_ptx.h"
#include "sm90/common/transposed.h"
#include "sm90/decode/sparse_fp8/sparse_decode.h"

namespace flashmla {
namespace sm90 {
namespace sparse {

namespace {

using T = __nv_bfloat16;
constexpr int kDV = 512;
constexpr int kBlockM = 64;  // heads per CTA
constexpr int kBlockN = 64;  // tokens per chunk
constexpr int kThreads = 384;
// Requests attending to at most this many tokens multiply P = hi + lo (see the top of the file). 512, not
// the dense kernel's 1024: above it the single bf16 rounding of P passes the decode tolerances (its
// error averages over the attended rows), and the second PV term made DeepSeek V4's 128 + 512-token
// requests 16-25% slower (benchmarks/NOTES_sparse_decode.md).
constexpr int kPreciseMaxLen = 512;
constexpr int kTileBytes = 64 * 128;  // 64 rows x 64 bf16

// What depends on the cache layout (kV4: DeepSeek V4 pages, else V3.2 records). Only the producer's
// gather/dequantization and the number of QK column tiles differ; V is the first 512 columns (8
// tiles) in both, so the PV products, softmax, epilogue and split handling are shared.
template <bool kV4>
struct Layout {
  static constexpr int kDQK = kV4 ? 512 : 576;
  static constexpr int kNumColTiles = kDQK / 64;       // 8 or 9: 7 or 8 latent tiles + 1 RoPE tile
  static constexpr int kLatentGroups = kNumColTiles - 1;  // 64-value latent groups of a token (one scale each in V4)
  static constexpr int kRopeOffset = kV4 ? kV4RopeOffset : kFp8RopeOffset;  // bytes from the token's record
  static constexpr int kPrefetchBytes = kV4 ? kV4DataBytes : kFp8RecordBytes;
  static constexpr int kStageBytes = kNumColTiles * kTileBytes;
  static constexpr int kStageRowBytes = kDQK * 2 + 4;  // bytes written per row of a stage: bf16 values + flag
  static constexpr int kOffQ = 0;
  static constexpr int kOffKV = kOffQ + kStageBytes;
  static constexpr int kOffP = kOffKV + 2 * kStageBytes;
  static constexpr int kOffValid = kOffP + kTileBytes;        // uint32 [2][64]: row flags of each stage
  static constexpr int kOffAlpha = kOffValid + 2 * 64 * 4;    // float [64]: WG0's rescale factors of the chunk
  static constexpr int kOffOutScale = kOffAlpha + 64 * 4;     // float [64]: 1 / row sum (x sink factor) of the request
  static constexpr int kOffBar = kOffOutScale + 64 * 4;       // uint64: full[2], empty[2], p_full, p_empty, q_full
  static constexpr int kSmemBytes = kOffBar + 7 * 8 + 1024;   // + slack for 1024-byte alignment
};

// Named barriers (0 is __syncthreads).
constexpr uint32_t kBarQ = 1;         // WG0 only (128): every WG0 read of the Q tile is complete before its reload
constexpr uint32_t kBarEpilogue = 2;  // WG0 + WG1 (256): per-row output scales
// Producer (128), one per stage: its rows are in shared memory before the copy to the peer. One
// barrier per stage, because warps 1-3 only arrive and may reach the next chunk before warp 0 syncs;
// they cannot reach the next chunk of the same stage before warp 0 (its full-barrier arrival comes first).
constexpr uint32_t kBarProducer = 3;  // + stage

// Register split: setmaxnreg only moves registers inside the CTA's launch allotment (3 x 168 per
// thread slot), so the three budgets must sum to 504. WG0 holds O (128) and S (32).
constexpr int kRegsWG0 = 216, kRegsWG1 = 160, kRegsWG2 = 128;
static_assert(kRegsWG0 + kRegsWG1 + kRegsWG2 == 3 * 168, "setmaxnreg budgets must fit the launch allotment");

// 16-byte record loads, cached in L1: the 64-byte column groups of a record start at 16-byte
// alignment (656-byte records), so neighbouring loads share 32-byte sectors that L1 then serves
// (L1::no_allocate measured 11% slower overall).
__device__ __forceinline__ uint4 ld_nc_v4(const void* ptr) {
  uint4 v;
  asm volatile("ld.global.nc.L1::evict_last.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}
// The 8 scale bytes of a V4 token (8-byte aligned).
__device__ __forceinline__ uint2 ld_nc_v2(const void* ptr) {
  uint2 v;
  asm volatile("ld.global.nc.L1::evict_last.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(ptr));
  return v;
}

// A UE8M0 scale byte s (2^(s - 127)) as two bf16 with exponent field s: exact for s = 1..254 (the
// quantizer writes 114..254). s = 255 (UE8M0 NaN: a tile that held NaN or inf) reads as +inf, so that
// tile dequantizes to inf / NaN, non-finite as in the reference (whose values are NaN); s = 0 (2^-127,
// never written) reads as 0. Special-casing both cost the cluster producer spills (ptxas).
__device__ __forceinline__ __nv_bfloat162 ue8m0_scale2(uint32_t s) {
  const uint32_t pair = (s << 7) | (s << 23);
  return *reinterpret_cast<const __nv_bfloat162*>(&pair);
}

// 4 e4m3 values (one 32-bit word) * scale -> 4 bf16 (two 32-bit words), without conversion
// instructions (they issue at a quarter rate and would bound the producer): the e4m3 bits
// s.eeee.mmm are moved into a bf16's fields (sign bit 15, exponent bits 7-10, mantissa bits 4-6),
// which reads as value * 2^-120 (subnormals included); two exact bf16 multiplies by 2^120 and by the
// scale follow. The product is exact for the power-of-two scales of both formats (then equal to
// torch_flashmla.kv_cache.dequantize_kv_fp8 / dequantize_kv_fp8_v4); another scale is rounded to bf16 first. e4m3 NaN
// (0x7F) reads as 480; a NaN tile still gives NaN through its NaN scale.
__device__ __forceinline__ uint2 dequant4(uint32_t fp8x4, __nv_bfloat162 scale2) {
  const __nv_bfloat162 two120 = __floats2bfloat162_rn(0x1p120f, 0x1p120f);
  uint2 r;
  const uint32_t lo = __byte_perm(fp8x4, 0, 0x1404);  // byte 0 -> bits 8-15, byte 1 -> bits 24-31
  const uint32_t hi = __byte_perm(fp8x4, 0, 0x3424);  // bytes 2, 3 likewise
  const uint32_t blo = (lo & 0x80008000u) | ((lo >> 4) & 0x07F007F0u);
  const uint32_t bhi = (hi & 0x80008000u) | ((hi >> 4) & 0x07F007F0u);
  __nv_bfloat162 vlo = __hmul2(__hmul2(*reinterpret_cast<const __nv_bfloat162*>(&blo), two120), scale2);
  __nv_bfloat162 vhi = __hmul2(__hmul2(*reinterpret_cast<const __nv_bfloat162*>(&bhi), two120), scale2);
  r.x = *reinterpret_cast<uint32_t*>(&vlo);
  r.y = *reinterpret_cast<uint32_t*>(&vhi);
  return r;
}

// What a request's schedule reads from global memory: its attended lengths (topk_length or topk of
// each cache) and its split range num_splits[r], num_splits[r + 1]. The math warpgroups load them one
// request ahead, so that the loads' latency is not on their path at a request boundary.
struct RequestLoads {
  int len_main, len_extra, split_lo, split_hi;
};

__device__ __forceinline__ RequestLoads request_loads(const SparseDecodeParams& p, int r) {
  RequestLoads l;
  l.len_main = p.main.topk_length != nullptr ? p.main.topk_length[r] : p.main.topk;
  l.len_extra = p.extra.topk > 0 && p.extra.topk_length != nullptr ? p.extra.topk_length[r] : p.extra.topk;
  l.split_lo = p.num_splits[r];
  l.split_hi = p.num_splits[r + 1];
  return l;
}

// The attended token ranges of one request: main indices [0, n_main), padded to a chunk, then the
// extra indices [0, n_extra). total = virtual length walked in chunks.
struct RequestWork {
  int n_main, main_pad, n_extra, total;
};

__device__ __forceinline__ RequestWork request_work(const SparseDecodeParams& p, const RequestLoads& l) {
  RequestWork w;
  w.n_main = min(max(l.len_main, 0), p.main.topk);
  w.main_pad = (w.n_main + kBlockN - 1) / kBlockN * kBlockN;
  w.n_extra = p.extra.topk > 0 ? min(max(l.len_extra, 0), p.extra.topk) : 0;
  w.total = w.main_pad + w.n_extra;
  return w;
}

// This partition's piece [start, end) of request r. The last piece of a request runs to the
// request's real end, so a plan made from other lengths still covers every token (it only
// balances worse).
struct Piece {
  int start, end, split_idx, n_splits;
};

__device__ __forceinline__ Piece request_piece(const RequestLoads& l, int r, int begin_req, int begin_tok, int end_req,
                                               int end_tok, int begin_split, int total) {
  Piece pc;
  pc.n_splits = l.split_hi - l.split_lo;
  pc.split_idx = r == begin_req ? begin_split : 0;
  const bool last = pc.split_idx >= pc.n_splits - 1;
  pc.start = r == begin_req ? max(begin_tok, 0) : 0;
  pc.end = (r == end_req && !last) ? min(end_tok, total) : total;
  pc.start = min(pc.start, pc.end);
  return pc;
}

// What the math warpgroups know of request r of their partition.
struct RequestStep {
  RequestLoads loads;
  RequestWork work;
  Piece piece;
  bool precise;  // P = hi + lo (two PV terms): at most kPreciseMaxLen attended tokens
};

__device__ __forceinline__ RequestStep request_step(const SparseDecodeParams& p, const RequestLoads& loads, int r,
                                                    int begin_req, int begin_tok, int end_req, int end_tok,
                                                    int begin_split) {
  RequestStep st;
  st.loads = loads;
  st.work = request_work(p, loads);
  st.piece = request_piece(loads, r, begin_req, begin_tok, end_req, end_tok, begin_split, st.work.total);
  st.precise = st.work.n_main + st.work.n_extra <= kPreciseMaxLen;
  return st;
}

// The Q tile of a request: kTiles boxes of 64 columns x kHeads heads (the CTA's head tile blockIdx.z, query
// token blockIdx.y; heads past h_q as zeros) at `dst`, loaded by TMA by thread 0 on the q_full mbarrier `bar`
// (a 128-thread cp.async loop issued 32-36 loads per thread on the math warpgroup's path). The coordinates
// come from blockIdx at each load: no registers held across the request loop. The load of request r + 1 is
// issued when the math is done with request r's chunks, so that it lands while that request's epilogue
// runs. issued: the request whose load was issued last; pending: not yet waited for.
template <int kTiles, int kHeads>
struct QTileLoads {
  const CUtensorMap* map;
  uint32_t dst;
  uint32_t bar;
  int issued = -1;
  bool pending = false;
  uint32_t phase = 0;

  __device__ __forceinline__ void load(int r) {
    if (threadIdx.x == 0) {
      mbar_expect_tx(bar, kTiles * kHeads * 128);
#pragma unroll 1
      for (int i = 0; i < kTiles; ++i)
        tma_load_4d(dst + i * kHeads * 128, map, bar, i * 64, blockIdx.z * kHeads, blockIdx.y, r);
    }
    issued = r;
    pending = true;
  }
  __device__ __forceinline__ void wait() {
    mbar_wait(bar, phase);
    phase ^= 1;
    pending = false;
  }
  // Before request r's first chunk: r's tile is in shared memory. named_bar (128 threads): every thread of
  // the warpgroup has seen the previous phase of bar complete before the tile is reloaded.
  __device__ __forceinline__ void ready(int r, uint32_t named_bar) {
    if (issued != r) {  // first request, or the load issued went to a request with nothing to attend
      if (pending) wait();  // that load lands before this one is issued
      named_bar_sync(named_bar, 128);
      load(r);
    }
    wait();
  }
  // After request r's last product that reads Q: the next request's load.
  __device__ __forceinline__ void next(int r, uint32_t named_bar) {
    named_bar_sync(named_bar, 128);  // every wgmma of this request (the last reader of Q) is complete
    load(r + 1);
  }
};

// The math warpgroups: kWG = 0 computes S, the softmax and O[:, 0:256]; kWG = 1 computes O[:, 256:512].
// Separate instantiations, so that each is register-allocated under its own setmaxnreg budget.
template <int kWG, int kCluster, bool kV4>
__device__ __forceinline__ void math_warpgroup(const SparseDecodeParams& p, const CUtensorMap* tmap_q, uint8_t* smem,
                                               int tid, int t, int mtile,
                                               int begin_req, int begin_tok, int end_req, int end_tok,
                                               int begin_split) {
  using L = Layout<kV4>;
  constexpr int wg = kWG;
  const uint32_t sbase = smem_addr(smem);
  const uint32_t* s_valid = reinterpret_cast<const uint32_t*>(smem + L::kOffValid);
  float* s_alpha = reinterpret_cast<float*>(smem + L::kOffAlpha);
  float* s_out_scale = reinterpret_cast<float*>(smem + L::kOffOutScale);
  const uint32_t bar_full = sbase + L::kOffBar;
  const uint32_t bar_empty = sbase + L::kOffBar + 16;
  const uint32_t bar_p_full = sbase + L::kOffBar + 32;
  const uint32_t bar_p_empty = sbase + L::kOffBar + 40;
  const uint32_t bar_q = sbase + L::kOffBar + 48;
  // One arrival per warp (its wgmma reads are complete) on the stage's empty barrier of every CTA
  // of the cluster: a producer refills a stage in both CTAs.
  auto release_stage = [&](int stage) {
    __syncwarp();
    if (tid % 32 == 0) {
      mbar_arrive(bar_empty + stage * 8);
      if constexpr (kCluster == 2) mbar_arrive_cluster_relaxed(mapa_shared(bar_empty + stage * 8, cluster_ctarank() ^ 1));
    }
  };
  const int wtid = tid % 128;
  const int warp = wtid / 32;
  const int lane = tid % 32;
  const int row0 = warp * 16 + lane / 4;
  const int row1 = row0 + 8;
  const int head0 = mtile * kBlockM + row0;
  const int head1 = mtile * kBlockM + row1;
  const bool ok0 = head0 < p.h_q, ok1 = head1 < p.h_q;
  const int quad_col = (lane % 4) * 2;

  uint32_t g = 0;   // chunks consumed
  uint32_t pi = 0;  // P tiles handed over (one or two per chunk)

  QTileLoads<L::kNumColTiles, kBlockM> q{tmap_q, sbase + L::kOffQ, bar_q};  // WG0 loads Q

  RequestLoads next_loads = request_loads(p, begin_req);
  for (int r = begin_req; r <= end_req; ++r) {
    const RequestStep step = request_step(p, next_loads, r, begin_req, begin_tok, end_req, end_tok, begin_split);
    if (r < end_req) next_loads = request_loads(p, r + 1);
    const RequestLoads& loads = step.loads;
    const Piece& pc = step.piece;
    const bool precise = step.precise;

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float run_max0 = -INFINITY, run_max1 = -INFINITY;
    float run_sum0 = 0.f, run_sum1 = 0.f;

    if (wg == 0 && pc.start < pc.end) q.ready(r, kBarQ);

    for (int c = pc.start; c < pc.end; c += kBlockN, ++g) {
      const int stage = g & 1;
      const uint32_t kv = sbase + L::kOffKV + stage * L::kStageBytes;
      mbar_wait(bar_full + stage * 8, (g >> 1) & 1);
      fence_proxy_async();  // generic stores of the producer -> this warpgroup's wgmma reads
      if constexpr (wg == 0) {
        // ---- S = Q K^T over the 64 tokens of the chunk ----
        float s[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) s[i] = 0.f;
        const uint64_t desc_q = desc_sw128(sbase + L::kOffQ, 16, 1024), desc_kv = desc_sw128(kv, 16, 1024);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < L::kDQK / 16; ++kk) {
          const uint32_t off = (kk / 4) * kTileBytes + (kk % 4) * 32;
          TypeOps<T>::qk64(s, desc_add(desc_q, off), desc_add(desc_kv, off), kk > 0 ? 1 : 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_all(s);
        // ---- masked online softmax (log2 domain) ----
        const uint32_t* valid = s_valid + stage * 64;
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const uint2 v2 = *reinterpret_cast<const uint2*>(valid + j * 8 + quad_col);
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const bool v = (e == 0 ? v2.x : v2.y) != 0;
            s[j * 4 + e] = v ? s[j * 4 + e] * p.scale_log2 : -INFINITY;
            s[j * 4 + 2 + e] = v ? s[j * 4 + 2 + e] * p.scale_log2 : -INFINITY;
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
        const float alpha0 = exp2f(run_max0 - base0);
        const float alpha1 = exp2f(run_max1 - base1);
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
        rescale_rows(o, alpha0, alpha1);
        // ---- hand P (and the rescale factors) to WG1, then O[:, 0:256] += P V with P from registers ----
        // WG0's own product reads P from its registers (not from the tile), so it waits for nobody:
        // only WG1 waits for the tile.
        for (int term = 0; term < (precise ? 2 : 1); ++term) {
          uint32_t pa[4][4];  // P (term 0) or its rounding residue (term 1) as A fragments
          if (term == 0) {
            pack_p<T, false>(pa, s);
          } else {
            pack_p<T, true>(pa, s);
          }
          mbar_wait(bar_p_empty, (pi & 1) ^ 1);  // WG1 is done with the previous P tile
          if (term == 0 && lane % 4 == 0) {
            s_alpha[row0] = alpha0;
            s_alpha[row1] = alpha1;
          }
          store_p(sbase + L::kOffP, pa, row0, lane % 4);
          fence_proxy_async();
          mbar_arrive(bar_p_full);
          pv_regs<T>(o, pa, kv);
          wgmma_wait<0>();
          fence_all(o);
          fence_frags(pa);
          ++pi;
        }
      } else {
        // ---- WG1: O[:, 256:512] += P V with WG0's P ----
        for (int term = 0; term < (precise ? 2 : 1); ++term) {
          mbar_wait(bar_p_full, pi & 1);
          if (term == 0) {
            const float alpha0 = s_alpha[row0], alpha1 = s_alpha[row1];
            rescale_rows(o, alpha0, alpha1);
          }
          pv_smem<T>(o, sbase + L::kOffP, kv + 4 * kTileBytes);
          wgmma_wait<0>();
          fence_all(o);
          mbar_arrive(bar_p_empty);
          ++pi;
        }
      }
      release_stage(stage);  // this warpgroup no longer reads the stage
    }
    if (wg == 0 && pc.start < pc.end && r < end_req) q.next(r, kBarQ);

    // ---- epilogue: WG0 owns the row statistics and publishes the output scale ----
    constexpr float kLn2 = 0.6931471805599453f;
    const bool split = pc.n_splits > 1;
    float lse0 = 0.f, lse1 = 0.f;
    if (wg == 0) {
#pragma unroll
      for (int o_ = 1; o_ <= 2; o_ *= 2) {
        run_sum0 += __shfl_xor_sync(0xffffffffu, run_sum0, o_);
        run_sum1 += __shfl_xor_sync(0xffffffffu, run_sum1, o_);
      }
      // A row with nothing attended: out 0; lse +inf when final, -inf as a partial (weight 0).
      const float empty_lse = split ? -INFINITY : INFINITY;
      lse0 = run_sum0 > 0.f ? (run_max0 + log2f(run_sum0)) * kLn2 : empty_lse;
      lse1 = run_sum1 > 0.f ? (run_max1 + log2f(run_sum1)) * kLn2 : empty_lse;
      float scale0 = run_sum0 > 0.f ? 1.f / run_sum0 : 0.f;
      float scale1 = run_sum1 > 0.f ? 1.f / run_sum1 : 0.f;
      if (!split && p.attn_sink != nullptr) {  // split requests get the sink in the combine
        if (run_sum0 > 0.f && ok0) scale0 /= 1.f + __expf(p.attn_sink[head0] - lse0);
        if (run_sum1 > 0.f && ok1) scale1 /= 1.f + __expf(p.attn_sink[head1] - lse1);
      }
      if (lane % 4 == 0) {
        s_out_scale[row0] = scale0;
        s_out_scale[row1] = scale1;
      }
    }
    named_bar_sync(kBarEpilogue, 256);
    const float scale0 = s_out_scale[row0], scale1 = s_out_scale[row1];
    named_bar_sync(kBarEpilogue, 256);  // s_out_scale may be rewritten for the next request after this
    // Rows of 16 contiguous bytes per lane (seesaw.h): the 4-byte stores straight from the accumulator
    // layout half-filled their sectors and took 4x the instructions.
    const int quad = lane % 4;
    if (!split) {
      T* out = reinterpret_cast<T*>(p.out) + wg * 256;
      store_rows_16bit<T>(out + (((int64_t)r * p.s_q + t) * p.h_q + head0) * kDV,
                          out + (((int64_t)r * p.s_q + t) * p.h_q + head1) * kDV, o, scale0, scale1, ok0, ok1, quad);
      if (wg == 0 && lane % 4 == 0) {
        if (ok0) p.lse[((int64_t)r * p.h_q + head0) * p.s_q + t] = lse0;
        if (ok1) p.lse[((int64_t)r * p.h_q + head1) * p.s_q + t] = lse1;
      }
    } else {
      // Scratch row of this piece: see mla_decode_cuda (rows never overlap between requests).
      int row = 2 * (loads.split_lo - r) + pc.split_idx;
      row = max(0, min(row, p.acc_rows - 1));
      const int64_t m_total = (int64_t)p.s_q * p.h_q;
      const int64_t m0 = (int64_t)t * p.h_q + head0, m1 = (int64_t)t * p.h_q + head1;
      float* acc = p.oacc + (int64_t)row * m_total * kDV + wg * 256;
      store_rows_f32(acc + m0 * kDV, acc + m1 * kDV, o, scale0, scale1, ok0, ok1, quad);
      if (wg == 0 && lane % 4 == 0) {
        if (ok0) p.lseacc[(int64_t)row * m_total + m0] = lse0;
        if (ok1) p.lseacc[(int64_t)row * m_total + m1] = lse1;
      }
    }
  }
  // A Q load issued for a request whose piece turned out empty (the partition's last requests attend to
  // nothing) is still landing: no load outlives the warpgroup.
  if (wg == 0 && q.pending) q.wait();
}

// The producer warpgroup(s): kProducers x 128 threads (ptid 0 .. 128 kProducers - 1) gather, dequantize and
// store the rows of every chunk of the partition into the stages of layout L (see the top of the file).
// One producer of a single CTA: 2 rows per thread; one producer per CTA of a cluster, or two producers
// of one CTA (few heads): 1 row per thread.
template <class L, int kCluster, int kProducers, bool kV4>
__device__ __forceinline__ void producer_warpgroups(const SparseDecodeParams& p, uint8_t* smem, int ptid, int t,
                                                    int begin_req, int begin_tok, int end_req, int end_tok,
                                                    int begin_split) {
  const uint32_t sbase = smem_addr(smem);
  const uint32_t bar_full = sbase + L::kOffBar;        // [2]
  const uint32_t bar_empty = sbase + L::kOffBar + 16;  // [2]
  static_assert(kCluster == 1 || kProducers == 1, "a cluster CTA has one producer warpgroup");
  constexpr int kRows = kCluster == 1 && kProducers == 1 ? 2 : 1;  // rows of each chunk per thread
  const int lane = ptid % 32;
  const int piece = lane / 8;          // 16-byte piece of every 64-byte column group
  const uint32_t rank = kCluster == 2 ? cluster_ctarank() : 0;
  // Rows of this thread: row_base + 32 k (one producer of one CTA), or row_base + 32 * half (the CTA's rank
  // in a cluster, or the producer's index among two).
  const int half = kCluster == 2 ? static_cast<int>(rank) : kProducers == 2 ? ptid / 128 : 0;
  const int row_base = (ptid % 128 / 32) * 8 + lane % 8 + 32 * half;
  // One CTA: the loads of two rows (76 or 88 registers) are in flight while a chunk is converted,
  // in 128 registers. There, values the conversion can recompute are hidden from the optimizer:
  // hoisted out of the chunk loop, they made ptxas spill. (The cluster kernel fits as it is.)
  auto lean = [](uint32_t x) { return kRows == 2 ? opaque(x) : x; };

  // Cursor over the chunks of the partition (see the pipeline below).
  int cr = begin_req, cc = 0;
  RequestWork cw{};
  Piece cpc{};
  auto enter = [&](int r) {
    const RequestLoads l = request_loads(p, r);
    cw = request_work(p, l);
    cpc = request_piece(l, r, begin_req, begin_tok, end_req, end_tok, begin_split, cw.total);
    cc = cpc.start;
  };
  auto seek = [&]() {  // move to a chunk inside a non-empty piece, or past end_req
    while (cr <= end_req && cc >= cpc.end) {
      ++cr;
      if (cr > end_req) break;
      enter(cr);
    }
  };
  // The raw indices of this thread's rows of the cursor's chunk (loads left in flight: the
  // values are first used a chunk later); then the cursor moves on.
  struct ChunkSlots {
    int raw[kRows];  // -1 past topk_length (the index there is not read)
    bool extra;
  };
  auto take_slots = [&]() {
    ChunkSlots cs;
    cs.extra = cc >= cw.main_pad;
    const SparseKVSource& src = cs.extra ? p.extra : p.main;
    const int j0 = (cs.extra ? cc - cw.main_pad : cc) + row_base;
    const int n = cs.extra ? cw.n_extra : cw.n_main;
    const int* ind = src.indices + (int64_t)cr * src.indices_batch_stride + (int64_t)t * src.indices_seq_stride;
#pragma unroll
    for (int k = 0; k < kRows; ++k) cs.raw[k] = j0 + 32 * k < n ? __ldg(ind + j0 + 32 * k) : -1;
    cc += kBlockN;
    seek();
    return cs;
  };
  // Record addresses of the rows (nullptr: skipped row). V3.2: the 656-byte record (scales at
  // +512). V4: the token's 576 latent + RoPE bytes, and its 8 scale bytes in the page's scale area.
  auto records_of = [&](const ChunkSlots& cs, const uint8_t* (&rec)[kRows], const uint8_t* (&scl)[kRows]) {
    const SparseKVSource& src = cs.extra ? p.extra : p.main;
#pragma unroll
    for (int k = 0; k < kRows; ++k) {
      const int idx = cs.raw[k];
      const bool ok = idx >= 0 && idx < src.num_slots;
      // idx / page_size by the launch's multiplier, (idx * mul) >> shift with shift >= 31, in 32-bit
      // operations: (2 idx * mul) >> 32 >> (shift - 31) (exact for 0 <= idx < 2^31; an integer division
      // here cost about 20 instructions per row, twice per chunk)
      // (for a skipped row, blk and tok are garbage and unused: rec is nullptr)
      const int blk = static_cast<int>(__umulhi(static_cast<uint32_t>(idx) << 1, src.page_div_mul) >>
                                       (src.page_div_shift - 31));
      const int tok = idx - blk * src.page_size;
      if constexpr (kV4) {
        rec[k] = ok ? src.records + (int64_t)blk * src.block_stride + tok * kV4DataBytes : nullptr;
        scl[k] = rec[k] + (src.scale_offset + tok * (kV4ScaleBytes - kV4DataBytes));  // page + scale_offset + 8 tok
      } else {
        const uint8_t* page = src.records + (int64_t)blk * src.block_stride;
        rec[k] = ok ? page + (int64_t)tok * src.token_stride : nullptr;
        scl[k] = rec[k] + kFp8ScaleOffset;
      }
    }
  };
  auto prefetch_l2 = [&](const ChunkSlots& cs) {
    // Not in the V3.2 few-head kernel (two producers): it measured 1-2% faster without (NOTES_sparse_decode.md,
    // sessions 41 and 43). The V4 few-head producers keep it: without it, ptxas spilled there.
    if constexpr (kProducers == 2 && !kV4) return;
    const uint8_t* rec[kRows];
    const uint8_t* scl[kRows];
    records_of(cs, rec, scl);
#pragma unroll
    for (int k = 0; k < kRows; ++k) {
      if (piece == 0 && rec[k] != nullptr) {
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(rec[k]), "n"(L::kPrefetchBytes) : "memory");
        if constexpr (kV4) asm volatile("prefetch.global.L2 [%0];\n" ::"l"(scl[k]) : "memory");
      }
    }
  };
  // A 16-byte store into this CTA's stage (the peer gets the finished rows by bulk copy).
  const uint32_t peer_offset = kCluster == 2 ? mapa_shared(sbase, rank ^ 1) - sbase : 0;
  uint32_t full_bar = 0;  // full barrier of the stage being written (this CTA's shared address)
  auto store16 = [&](uint32_t addr, const uint4& v) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
  };

  // Registers of one row's record: V3.2 4 fp32 scales (one per 128 values); V4 7 UE8M0 bytes + pad
  // (one per 64 values).
  using ScaleWords = typename std::conditional<kV4, uint2, uint4>::type;
  struct RowLoads {
    uint4 lat[L::kLatentGroups];
    ScaleWords scl;
    uint4 rope[2];
    bool valid;
  };
  // Issues the loads of row k (of this thread's rows) of a chunk; the values are first used at its conversion.
  auto issue_row = [&](const ChunkSlots& cs, int k, RowLoads& ld) {
    const uint8_t* rec[kRows];
    const uint8_t* scl[kRows];
    records_of(cs, rec, scl);
    // A flag: compared at the flag store instead, it kept both 64-bit pointers live (one CTA).
    ld.valid = lean(rec[k] != nullptr) != 0;
    if (rec[k] != nullptr) {
#pragma unroll
      for (int i = 0; i < L::kLatentGroups; ++i) ld.lat[i] = ld_nc_v4(rec[k] + i * 64 + piece * 16);
      if constexpr (kV4) {
        ld.scl = ld_nc_v2(scl[k]);
      } else {
        ld.scl = ld_nc_v4(scl[k]);
      }
      // V3.2: the RoPE part as two contiguous 64-byte spans of the warp's 8 rows (16-byte chunks piece and
      // piece + 4): a 64-byte span touches fewer 128-byte lines than 112 bytes at a 32-byte pitch. (V4 keeps
      // the 32-byte pitch: the other form made ptxas spill in its 64-head producer.)
      ld.rope[0] = ld_nc_v4(rec[k] + L::kRopeOffset + (kV4 ? piece * 32 : piece * 16));
      ld.rope[1] = ld_nc_v4(rec[k] + L::kRopeOffset + (kV4 ? piece * 32 + 16 : 64 + piece * 16));
    } else {
#pragma unroll
      for (int i = 0; i < L::kLatentGroups; ++i) ld.lat[i] = make_uint4(0, 0, 0, 0);
      ld.scl = ScaleWords{};
      ld.rope[0] = ld.rope[1] = make_uint4(0, 0, 0, 0);
    }
  };
  // Waits until the stage of chunk g is free (in both CTAs of a cluster).
  auto acquire_stage = [&](uint32_t g) {
    const int stage = g & 1;
    mbar_wait(bar_empty + stage * 8, ((g >> 1) & 1) ^ 1);
    full_bar = bar_full + stage * 8;
  };
  // Dequantizes row k of chunk g into its stage (rows of skipped indices are zero) and sets its flag.
  auto write_row = [&](uint32_t g, int k, const RowLoads& ld) {
    const int stage = g & 1;
    const uint32_t kv = sbase + L::kOffKV + stage * L::kStageBytes;
    const int row = static_cast<int>(lean(row_base)) + 32 * k;  // the store offsets are recomputed per row
#pragma unroll
    for (int i = 0; i < L::kLatentGroups; ++i) {
      __nv_bfloat162 scale;
      if constexpr (kV4) {
        scale = ue8m0_scale2(__byte_perm(i < 4 ? ld.scl.x : ld.scl.y, 0, 0x4440 + (i % 4)));
      } else {
        const float scale_f = __uint_as_float(i < 2 ? ld.scl.x : i < 4 ? ld.scl.y : i < 6 ? ld.scl.z : ld.scl.w);
        scale = __floats2bfloat162_rn(scale_f, scale_f);
      }
      const uint2 a = dequant4(ld.lat[i].x, scale), b = dequant4(ld.lat[i].y, scale);
      const uint2 c = dequant4(ld.lat[i].z, scale), d = dequant4(ld.lat[i].w, scale);
      store16(kv + i * kTileBytes + swz(row, 2 * piece), make_uint4(a.x, a.y, b.x, b.y));
      store16(kv + i * kTileBytes + swz(row, 2 * piece + 1), make_uint4(c.x, c.y, d.x, d.y));
    }
    store16(kv + L::kLatentGroups * kTileBytes + swz(row, kV4 ? 2 * piece : piece), ld.rope[0]);
    store16(kv + L::kLatentGroups * kTileBytes + swz(row, kV4 ? 2 * piece + 1 : piece + 4), ld.rope[1]);
    if (piece == 0) {
      const uint32_t flag = ld.valid ? 1 : 0;
      const uint32_t vaddr = sbase + L::kOffValid + (stage * 64 + row) * 4;
      asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(vaddr), "r"(flag) : "memory");
    }
  };
  // Chunk g's rows are written: signal its stage full (in a cluster, after copying this CTA's rows to the peer).
  auto finish_chunk = [&](uint32_t g) {
    const int stage = g & 1;
    const uint32_t kv = sbase + L::kOffKV + stage * L::kStageBytes;
    // Local rows: generic stores. The math warpgroups order them before their wgmma reads with a proxy
    // fence after the full-barrier wait (docs/design.md §5.2, proxy fences): a fence here would also
    // wait for the next chunk's loads, in flight in this thread's registers. The peer's rows land as
    // transaction bytes of its bulk copies, announced by thread 0.
    if constexpr (kCluster == 2) {
      // This CTA's 32 rows (4 KB of every column tile, and their flags) go to the same place in the
      // peer's stage as bulk copies, counted as transaction bytes on the peer's full barrier. The
      // source is free again when this stage's empty barrier completes: the peer's math warps
      // arrive on it only after their full barrier, i.e. after the copy. The copies read the rows
      // through the async proxy: warp 0 fences once the barrier has ordered every producer's stores
      // before it.
      if (ptid < 32) {
        named_bar_sync(kBarProducer + stage, 128);
        fence_proxy_async();
      } else {
        named_bar_arrive(kBarProducer + stage, 128);
      }
      if (ptid == 0) {
        const uint32_t rows = 32 * rank * 128;
#pragma unroll 1
        for (int i = 0; i < L::kNumColTiles; ++i) {
          const uint32_t src = kv + i * kTileBytes + rows;
          bulk_copy_to_peer(src + peer_offset, src, 32 * 128, full_bar + peer_offset);
        }
        const uint32_t flags = sbase + L::kOffValid + (stage * 64 + 32 * rank) * 4;
        bulk_copy_to_peer(flags + peer_offset, flags, 32 * 4, full_bar + peer_offset);
      }
    }
    if (kCluster == 2 && ptid == 0) {
      mbar_expect_tx(full_bar, (kBlockN / 2) * L::kStageRowBytes);
    } else {
      mbar_arrive(full_bar);
    }
  };

  // Indices are read two chunks ahead of the register loads; records are prefetched into L2 one
  // chunk ahead of them (one row per thread), or two chunks ahead of the chunk being written (two
  // rows per thread: about 1% faster on the V3.2 64-head rows, while the one-row loop measured 1-3%
  // slower with its prefetch moved ahead, benchmarks/NOTES_sparse_decode.md). The registers hold the
  // loads of two rows: while one row is converted, the loads of the next one (the peer's half of the
  // next chunk in a cluster: one row per thread; the second row of the chunk, or the first of the next
  // chunk, in one CTA) are in flight.
  enter(cr);
  seek();
  ChunkSlots q0{}, q1{}, q2{};
  bool has0 = cr <= end_req;
  if (has0) q0 = take_slots();
  bool has1 = cr <= end_req;
  if (has1) q1 = take_slots();
  bool has2 = cr <= end_req;
  if (has2) q2 = take_slots();
  if (has0) prefetch_l2(q0);
  uint32_t g = 0;
  RowLoads cur;
  if (has0 && (kRows == 1 || !kV4)) issue_row(q0, 0, cur);
  if (has1) prefetch_l2(q1);
  if constexpr (kRows == 1) {
    while (has0) {
      RowLoads nxt;
      if (has1) issue_row(q1, 0, nxt);
      if (has2) prefetch_l2(q2);
      ChunkSlots q3{};
      const bool has3 = cr <= end_req;
      if (has3) q3 = take_slots();
      acquire_stage(g);
      write_row(g, 0, cur);
      finish_chunk(g);
      ++g;
      cur = nxt;
      q0 = q1, q1 = q2, q2 = q3;
      has0 = has1, has1 = has2, has2 = has3;
    }
  } else {
    while (has0) {
      RowLoads second;
      if (kV4) issue_row(q0, 0, cur);
      issue_row(q0, 1, second);
      if (has2) prefetch_l2(q2);
      ChunkSlots q3{};
      const bool has3 = cr <= end_req;
      if (has3) q3 = take_slots();
      acquire_stage(g);
      write_row(g, 0, cur);
      // V3.2: the next chunk's first row lands while this one's second is converted (5-8% faster at h_q 64).
      // V4: that order measured neutral to 1% slower and spilled 16 B here (ptxas): both rows of a chunk are
      // loaded at its start instead.
      if (!kV4 && has1) issue_row(q1, 0, cur);
      write_row(g, 1, second);
      finish_chunk(g);
      ++g;
      q0 = q1, q1 = q2, q2 = q3;
      has0 = has1, has1 = has2, has2 = has3;
    }
  }
}

// kCluster = 2 (h_q > 64): the two head tiles of one query token form a cluster; each CTA's
// producer gathers half of every chunk (32 rows) and writes it into both CTAs' shared memory, so
// every record is loaded and converted once.
// kV4: DeepSeek V4 pages (d_qk 512), else V3.2 records (d_qk 576); both caches of a call share it.
template <int kCluster, bool kV4>
__global__ void __launch_bounds__(kThreads, 1)
    sparse_decode_kernel(const __grid_constant__ CUtensorMap tmap_q, const SparseDecodeParams p) {
  using L = Layout<kV4>;
  extern __shared__ uint8_t smem_raw[];
  // 1024-byte alignment by an offset into the __shared__ array (not by integer casts), so that the compiler
  // still knows every pointer below is shared memory and emits LDS/STS with 32-bit addresses (after the
  // integer-cast form, the cluster kernel's P tile, row flags and factors went through generic accesses).
  uint8_t* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  const uint32_t sbase = smem_addr(smem);
  const uint32_t bar_full = sbase + L::kOffBar;        // [2]
  const uint32_t bar_empty = sbase + L::kOffBar + 16;  // [2]
  const uint32_t bar_p_full = sbase + L::kOffBar + 32;
  const uint32_t bar_p_empty = sbase + L::kOffBar + 40;

  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int part = blockIdx.x;
  const int t = blockIdx.y;       // query token
  const int mtile = blockIdx.z;   // heads [64 * mtile, 64 * mtile + 64)

  const int* meta = p.metadata + part * 8;
  const int begin_req = meta[0], begin_tok = meta[1], end_req = min(meta[2], p.b - 1), end_tok = meta[3];
  const int begin_split = meta[4];
  if (begin_req > end_req || begin_req < 0) return;  // the same for both CTAs of a cluster

  if (tid == 0) {
    mbar_init(bar_full, 128);   // this CTA's producer threads (+ the peer's rows as bulk-copy bytes)
    mbar_init(bar_full + 8, 128);
    mbar_init(bar_empty, 8 * kCluster);    // every math warp of the cluster
    mbar_init(bar_empty + 8, 8 * kCluster);
    mbar_init(bar_p_full, 128);
    mbar_init(bar_p_empty, 128);
    mbar_init(sbase + L::kOffBar + 48, 1);  // q_full: WG0's thread 0 arrives with the tile's bytes
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if constexpr (kCluster == 2) {
    cluster_sync();  // the peer's barriers are initialised before anyone arrives on them
  } else {
    __syncthreads();
  }

  if (wg == 2) {
    // ================================ producer ================================
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegsWG2));
    producer_warpgroups<L, kCluster, 1, kV4>(p, smem, tid - 256, t, begin_req, begin_tok, end_req, end_tok, begin_split);
  } else if (wg == 0) {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegsWG0));
    math_warpgroup<0, kCluster, kV4>(p, &tmap_q, smem, tid, t, mtile, begin_req, begin_tok, end_req, end_tok, begin_split);
  } else {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegsWG1));
    math_warpgroup<1, kCluster, kV4>(p, &tmap_q, smem, tid, t, mtile, begin_req, begin_tok, end_req, end_tok, begin_split);
  }
  // The peer may still store into this CTA's shared memory or arrive on its barriers until it is done.
  if constexpr (kCluster == 2) cluster_sync();
}

// ---------------------------------------------------------------------------------------------
// Few heads (h_q <= 16, as tensor parallelism leaves them): transposed products
// ---------------------------------------------------------------------------------------------
// With h_q <= 16 a 64-row head tile is mostly padding, and the kernel above is bound by its one
// producer warpgroup, which does the same work per index whatever h_q is. Here the chunk's tokens are
// the M side of the products and the heads the N side (kN = 8 columns for h_q <= 8, else 16):
//   S^T = K Q^T    (m64 tokens x kN heads, k over d_qk; A = the stage, K-major; B = Q, K-major)
//   O^T += V^T P^T (8 products of m64 latent columns x kN heads, k over the 64 tokens; A = the stage
//                   read MN-major; B = P^T, a [kN heads][64 tokens] tile written by stmatrix.trans)
// so that one math warpgroup holds O^T (8 x kN / 2 accumulators per thread) and the other two
// warpgroups both gather (one row per thread each, the cluster producer's loop): twice the gather
// throughput per SM. The softmax runs down the accumulator's columns: each thread's heads are
// 8 j + 2 (lane % 4) + e, its tokens warp * 16 + lane / 4 (+ 8); the chunk maximum of a head is
// reduced over the quads of a warp by shuffles and over the 4 warps through shared memory.
// The code is written for kN = 8 and any multiple of 16; kN = 8 and 16 are built. At kN = 8 the products'
// B operand (Q^T, P^T) is half of kN = 16's in the shared-memory reads that bound the call: h_q 8 measured
// 5-6% faster than at kN = 16. At kN = 32 (h_q 17..32) the math warpgroup's chain per chunk grows by a third
// and the call was no faster than the 64-head kernel (benchmarks/NOTES_sparse_decode.md, few heads), so
// those head counts use the kernel above.
template <int kN, bool kV4>
struct NarrowLayout {
  using Base = Layout<kV4>;
  static constexpr int kDQK = Base::kDQK;
  static constexpr int kNumColTiles = Base::kNumColTiles;
  static constexpr int kLatentGroups = Base::kLatentGroups;
  static constexpr int kRopeOffset = Base::kRopeOffset;
  static constexpr int kPrefetchBytes = Base::kPrefetchBytes;
  static constexpr int kStageBytes = Base::kStageBytes;
  static constexpr int kStageRowBytes = Base::kStageRowBytes;
  static constexpr int kHeadTileBytes = kN * 128;             // kN rows x 64 bf16, 128B-swizzled
  static constexpr int kEpiRow = 20;                          // floats per head row of the epilogue buffer (16 + 4: no bank conflicts)
  static constexpr int kOffQ = 0;                             // Q: kNumColTiles head tiles
  static constexpr int kOffKV = (kNumColTiles * kHeadTileBytes + 1023) / 1024 * 1024;
  static constexpr int kOffP = kOffKV + 2 * kStageBytes;      // P^T and its rounding residue: 2 head tiles
  static constexpr int kOffValid = kOffP + 2 * kHeadTileBytes;  // uint32 [2][64]: row flags of each stage
  static constexpr int kOffMax = kOffValid + 2 * 64 * 4;      // float [2][4][kN]: each warp's chunk maxima (by chunk parity)
  static constexpr int kOffSum = kOffMax + 2 * 4 * kN * 4;    // float [4][kN]: each warp's row sums at a request's end
  static constexpr int kOffEpi = kOffSum + 4 * kN * 4;        // float [4][kN][kEpiRow]: each warp's output staging
  static constexpr int kOffBar = kOffEpi + 4 * kN * kEpiRow * 4;  // uint64: full[2], empty[2], q_full
  static constexpr int kSmemBytes = kOffBar + 5 * 8 + 1024;   // + slack for 1024-byte alignment
  static_assert(kOffBar % 8 == 0, "mbarriers are 8-byte aligned");
};

// Named barriers of the few-head kernel's math warpgroup (128 threads).
constexpr uint32_t kBarNarrowQ = 1;     // every read of the Q tile is complete before its reload
constexpr uint32_t kBarNarrowMax = 2;   // the warps' chunk maxima / row sums are in shared memory
constexpr uint32_t kBarNarrowP = 3;     // P^T is in shared memory before the PV products read it
// Registers: the math warpgroup holds O^T (up to 128), S^T (up to 16) and 2 x 8 head statistics.
constexpr int kRegsNarrowMath = 248, kRegsNarrowProducer = 128;
static_assert(kRegsNarrowMath + 2 * kRegsNarrowProducer == 3 * 168, "setmaxnreg budgets must fit the launch allotment");

template <int kN>
struct NarrowOps;
template <>
struct NarrowOps<16> {
  static __device__ __forceinline__ void qk(float* d, uint64_t a, uint64_t b, int s) { wgmma_m64n16k16_bf16_kk(d, a, b, s); }
  static __device__ __forceinline__ void pv(float* d, uint64_t a, uint64_t b) { wgmma_m64n16k16_bf16_mnk(d, a, b, 1); }
};
template <>
struct NarrowOps<8> {
  static __device__ __forceinline__ void qk(float* d, uint64_t a, uint64_t b, int s) { wgmma_m64n8k16_bf16_kk(d, a, b, s); }
  static __device__ __forceinline__ void pv(float* d, uint64_t a, uint64_t b) { wgmma_m64n8k16_bf16_mnk(d, a, b, 1); }
};

// The few-head math warpgroup (WG0): S^T, the softmax, O^T and the epilogue of every request of the
// partition. Accumulator element 4 j + 2 half + e of a thread is (row warp * 16 + lane / 4 + 8 half,
// head 8 j + 2 (lane % 4) + e); the per-head statistics are indexed 2 j + e.
template <int kN, bool kV4>
__device__ __forceinline__ void narrow_math_warpgroup(const SparseDecodeParams& p, const CUtensorMap* tmap_q,
                                                      uint8_t* smem, int tid, int t, int begin_req, int begin_tok,
                                                      int end_req, int end_tok, int begin_split) {
  using L = NarrowLayout<kN, kV4>;
  static_assert(kN == 8 || kN % 16 == 0, "P^T leaves in pairs of 8-head blocks (stmatrix x4), or one (x2)");
  constexpr int kJ = kN / 8;    // 8-head column blocks
  constexpr int kH = kN / 4;    // heads of one thread
  constexpr int kAcc = kN / 2;  // accumulators of one thread per m64 product
  const uint32_t sbase = smem_addr(smem);
  const uint32_t* s_valid = reinterpret_cast<const uint32_t*>(smem + L::kOffValid);
  float* s_max = reinterpret_cast<float*>(smem + L::kOffMax);
  float* s_sum = reinterpret_cast<float*>(smem + L::kOffSum);
  const uint32_t bar_full = sbase + L::kOffBar;
  const uint32_t bar_empty = sbase + L::kOffBar + 16;
  const uint32_t bar_q = sbase + L::kOffBar + 32;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int quad = lane % 4;
  const int tok0 = warp * 16 + lane / 4;  // this thread's tokens of a chunk: tok0, tok0 + 8
  auto head_of = [&](int k) { return 8 * (k / 2) + 2 * quad + k % 2; };  // k = 2 j + e
  float* epi = reinterpret_cast<float*>(smem + L::kOffEpi) + warp * kN * L::kEpiRow;

  // stmatrix .trans row addresses of this lane in the P^T tile: matrices (token block 2 warp + m % 2,
  // head block j0 + m / 2) for m = lane / 8, row lane % 8 = the head inside its block.
  const int st_m = lane / 8, st_c = lane % 8;
  auto pt_addr = [&](uint32_t tile, int j0) {
    return tile + swz(8 * (j0 + st_m / 2) + st_c, 2 * warp + st_m % 2);
  };

  uint32_t g = 0;  // chunks consumed
  QTileLoads<L::kNumColTiles, kN> q{tmap_q, sbase + L::kOffQ, bar_q};  // grid z is 1: heads 0..kN-1

  RequestLoads next_loads = request_loads(p, begin_req);
  for (int r = begin_req; r <= end_req; ++r) {
    const RequestStep step = request_step(p, next_loads, r, begin_req, begin_tok, end_req, end_tok, begin_split);
    if (r < end_req) next_loads = request_loads(p, r + 1);
    const RequestLoads& loads = step.loads;
    const Piece& pc = step.piece;
    const bool precise = step.precise;

    float o[8][kAcc];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int k = 0; k < kAcc; ++k) o[i][k] = 0.f;
    float run_max[kH], run_sum[kH];
#pragma unroll
    for (int k = 0; k < kH; ++k) run_max[k] = -INFINITY, run_sum[k] = 0.f;

    if (pc.start < pc.end) q.ready(r, kBarNarrowQ);

    for (int c = pc.start; c < pc.end; c += kBlockN, ++g) {
      const int stage = g & 1;
      const uint32_t kv = sbase + L::kOffKV + stage * L::kStageBytes;
      mbar_wait(bar_full + stage * 8, (g >> 1) & 1);
      fence_proxy_async();  // generic stores of the producers -> wgmma reads (the producers do not fence)
      // ---- S^T = K Q^T ----
      float s[kAcc];
#pragma unroll
      for (int k = 0; k < kAcc; ++k) s[k] = 0.f;
      // (the Q and P^T descriptors are rebuilt per chunk from hidden bases: hoisted, their 40 per-k-step
      // values took registers the accumulators need)
      const uint64_t desc_kv = desc_sw128(kv, 16, 1024), desc_q = desc_sw128(opaque(sbase + L::kOffQ), 16, 1024);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < L::kDQK / 16; ++kk) {
        NarrowOps<kN>::qk(s, desc_add(desc_kv, (kk / 4) * kTileBytes + (kk % 4) * 32),
                          desc_add(desc_q, (kk / 4) * L::kHeadTileBytes + (kk % 4) * 32), kk > 0 ? 1 : 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_all(s);
      // ---- masked online softmax down the columns (log2 domain) ----
      const bool v0 = s_valid[stage * 64 + tok0] != 0, v1 = s_valid[stage * 64 + tok0 + 8] != 0;
      float mx[kH];
      mask_scale_columns<kN>(s, v0, v1, tok0, AllAttended{}, UniformScale{p.scale_log2}, mx);
      // by chunk parity: a warp writes chunk g + 2's maxima only after every warp has passed chunk g + 1's barrier
      reduce_over_tokens<kN>(mx, s_max + (g & 1) * 4 * kN, warp, lane, kBarNarrowMax, MaxOp{});
      float base[kH], alpha[kH];
      bool rescale = false;
#pragma unroll
      for (int k = 0; k < kH; ++k) {
        const float new_max = fmaxf(run_max[k], mx[k]);
        base[k] = new_max == -INFINITY ? 0.f : new_max;
        alpha[k] = exp2f(run_max[k] - base[k]);
        rescale |= alpha[k] != 1.f;
        run_max[k] = new_max;
      }
      exp_columns<kN>(s, base, alpha, run_sum);
      rescale_columns<kN>(o, alpha, rescale);
      // ---- P^T (and its rounding residue) -> shared memory, then O^T += V^T P^T ----
      const int terms = precise ? 2 : 1;
      for (int term = 0; term < terms; ++term) {
        const uint32_t tile = sbase + L::kOffP + term * L::kHeadTileBytes;
#pragma unroll
        for (int j0 = 0; j0 < kJ; j0 += 2) {
          constexpr int kMatrices = kJ == 1 ? 2 : 4;
          uint32_t rg[4];
#pragma unroll
          for (int m = 0; m < kMatrices; ++m) {  // matrix m: token block 2 warp + m % 2, head block j0 + m / 2
            const int base_idx = 4 * (j0 + m / 2) + 2 * (m % 2);
            rg[m] = term == 0 ? TypeOps<T>::pack(s[base_idx], s[base_idx + 1])
                              : TypeOps<T>::pack_residue(s[base_idx], s[base_idx + 1]);
          }
          if constexpr (kMatrices == 2) {
            stmatrix_x2_trans(pt_addr(tile, j0), rg[0], rg[1]);
          } else {
            stmatrix_x4_trans(pt_addr(tile, j0), rg[0], rg[1], rg[2], rg[3]);
          }
        }
      }
      fence_proxy_async();
      named_bar_sync(kBarNarrowP, 128);
      fence_all(o);
      wgmma_fence();
      auto pv_term = [&](int term) {
        const uint64_t desc_pt = desc_sw128(opaque(sbase + L::kOffP + term * L::kHeadTileBytes), 16, 1024);
        const uint64_t desc_v = desc_sw128(kv, kTileBytes, 1024);
        pv_transposed_16bit<kN>(o, desc_v, desc_pt, NarrowOps<kN>::pv);
        wgmma_commit();
      };
      // The residue term is its own batch after a wait: a branch between products into the same
      // accumulators in flight made ptxas insert warpgroup waits (C7519) and spill.
      pv_term(0);
      wgmma_wait<0>();
      fence_all(o);
      if (precise) {
        wgmma_fence();
        pv_term(1);
        wgmma_wait<0>();
        fence_all(o);
      }
      // this warp no longer reads the stage (nor P^T: the next chunk rewrites it after its barriers)
      __syncwarp();
      if (lane == 0) mbar_arrive(bar_empty + stage * 8);
    }
    if (pc.start < pc.end && r < end_req) q.next(r, kBarNarrowQ);

    // ---- epilogue: row sums over the 64 token rows, then O^T scaled and stored as rows of heads ----
    constexpr float kLn2 = 0.6931471805599453f;
    const bool split = pc.n_splits > 1;
    reduce_over_tokens<kN>(run_sum, s_sum, warp, lane, kBarNarrowMax, AddOp{});
    float scale[kH], lse[kH];
    named_bar_sync(kBarNarrowMax, 128);  // s_sum may be rewritten for the next request after this
    const float empty_lse = split ? -INFINITY : INFINITY;  // nothing attended: out 0, lse +inf (final) / -inf (partial)
#pragma unroll
    for (int k = 0; k < kH; ++k) {
      const int head = head_of(k);
      lse[k] = run_sum[k] > 0.f ? (run_max[k] + log2f(run_sum[k])) * kLn2 : empty_lse;
      scale[k] = run_sum[k] > 0.f ? 1.f / run_sum[k] : 0.f;
      if (!split && p.attn_sink != nullptr && run_sum[k] > 0.f && head < p.h_q)
        scale[k] /= 1.f + __expf(p.attn_sink[head] - lse[k]);
    }
    int acc_row = 0;
    if (split) {  // scratch row of this piece: see mla_decode_cuda (rows never overlap between requests)
      acc_row = 2 * (loads.split_lo - r) + pc.split_idx;
      acc_row = max(0, min(acc_row, p.acc_rows - 1));
    }
    const int64_t m_total = (int64_t)p.s_q * p.h_q;
    if (warp == 0 && lane < 4) {
#pragma unroll
      for (int k = 0; k < kH; ++k) {
        const int head = head_of(k);
        if (head >= p.h_q) continue;
        if (split) {
          p.lseacc[(int64_t)acc_row * m_total + (int64_t)t * p.h_q + head] = lse[k];
        } else {
          p.lse[((int64_t)r * p.h_q + head) * p.s_q + t] = lse[k];
        }
      }
    }
    // Per m64 product: this warp's 16 latent columns x kN heads go through its staging rows (one row of
    // 16 floats per head), then leave as 16-byte pieces of head rows (full 32-byte sectors).
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      __syncwarp();
#pragma unroll
      for (int j = 0; j < kJ; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float* row = epi + (8 * j + 2 * quad + e) * L::kEpiRow + lane / 4;
          row[0] = o[i][4 * j + e] * scale[2 * j + e];
          row[8] = o[i][4 * j + 2 + e] * scale[2 * j + e];
        }
      __syncwarp();
      // first latent column of this warp's rows; hidden from the optimizer, so that the 64-bit addresses
      // below are formed here and not hoisted out of the request loop (hoisted, they spilled 448 B at kN = 32)
      const int col = static_cast<int>(opaque(i * 64 + warp * 16));
      if (!split) {
#pragma unroll
        for (int piece = lane; piece < kN * 2; piece += 32) {  // 8 columns of one head
          const int head = piece / 2, half = piece % 2;
          if (head >= p.h_q) continue;
          const float4 a = *reinterpret_cast<const float4*>(epi + head * L::kEpiRow + half * 8);
          const float4 b = *reinterpret_cast<const float4*>(epi + head * L::kEpiRow + half * 8 + 4);
          const uint4 v = make_uint4(TypeOps<T>::pack(a.x, a.y), TypeOps<T>::pack(a.z, a.w), TypeOps<T>::pack(b.x, b.y),
                                     TypeOps<T>::pack(b.z, b.w));
          T* out = reinterpret_cast<T*>(p.out) + (((int64_t)r * p.s_q + t) * p.h_q + head) * kDV + col + half * 8;
          *reinterpret_cast<uint4*>(out) = v;
        }
      } else {
        float* acc = p.oacc + (int64_t)acc_row * m_total * kDV;
#pragma unroll
        for (int piece = lane; piece < kN * 4; piece += 32) {  // 4 columns of one head
          const int head = piece / 4, part = piece % 4;
          if (head >= p.h_q) continue;
          const float4 a = *reinterpret_cast<const float4*>(epi + head * L::kEpiRow + part * 4);
          *reinterpret_cast<float4*>(acc + ((int64_t)t * p.h_q + head) * kDV + col + part * 4) = a;
        }
      }
    }
  }
  if (q.pending) q.wait();  // no Q load outlives the warpgroup (see math_warpgroup)
}

// Grid (num_sm_parts, s_q, 1): WG0 the math above, WG1 and WG2 producers of rows 0-31 and 32-63.
template <int kN, bool kV4>
__global__ void __launch_bounds__(kThreads, 1)
    sparse_decode_narrow_kernel(const __grid_constant__ CUtensorMap tmap_q, const SparseDecodeParams p) {
  using L = NarrowLayout<kN, kV4>;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);  // see sparse_decode_kernel
  const uint32_t sbase = smem_addr(smem);
  const int tid = threadIdx.x;
  const int t = blockIdx.y;
  const int* meta = p.metadata + blockIdx.x * 8;
  const int begin_req = meta[0], begin_tok = meta[1], end_req = min(meta[2], p.b - 1), end_tok = meta[3];
  const int begin_split = meta[4];
  if (begin_req > end_req || begin_req < 0) return;
  if (tid == 0) {
    mbar_init(sbase + L::kOffBar, 256);      // full: both producers' threads
    mbar_init(sbase + L::kOffBar + 8, 256);
    mbar_init(sbase + L::kOffBar + 16, 4);   // empty: the 4 math warps
    mbar_init(sbase + L::kOffBar + 24, 4);
    mbar_init(sbase + L::kOffBar + 32, 1);   // q_full
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (tid < 128) {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegsNarrowMath));
    narrow_math_warpgroup<kN, kV4>(p, &tmap_q, smem, tid, t, begin_req, begin_tok, end_req, end_tok, begin_split);
  } else {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegsNarrowProducer));
    producer_warpgroups<L, 1, 2, kV4>(p, smem, tid - 128, t, begin_req, begin_tok, end_req, end_tok, begin_split);
  }
}

}  // namespace

}  // namespace sparse

namespace {
template <int kCluster, bool kV4>
void launch_kernel(const SparseDecodeParams& p, const CUtensorMap& tmap_q, cudaStream_t stream) {
  auto kernel = sparse::sparse_decode_kernel<kCluster, kV4>;
  constexpr int kSmemBytes = sparse::Layout<kV4>::kSmemBytes;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(p.num_sm_parts, p.s_q, p.num_m_tiles);
  config.blockDim = dim3(sparse::kThreads, 1, 1);
  config.dynamicSmemBytes = kSmemBytes;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = kCluster;
  config.attrs = attr;
  config.numAttrs = 1;
  cudaLaunchKernelEx(&config, kernel, tmap_q, p);
}
template <int kN, bool kV4>
void launch_narrow(const SparseDecodeParams& p, const CUtensorMap& tmap_q, cudaStream_t stream) {
  auto kernel = sparse::sparse_decode_narrow_kernel<kN, kV4>;
  constexpr int kSmemBytes = sparse::NarrowLayout<kN, kV4>::kSmemBytes;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  kernel<<<dim3(p.num_sm_parts, p.s_q, 1), sparse::kThreads, kSmemBytes, stream>>>(tmap_q, p);
}
}  // namespace

void launch_sparse_decode(const SparseDecodeParams& p, const CUtensorMap& tmap_q, cudaStream_t stream) {
  const int box_heads = sparse_decode_q_box_heads(p.h_q);
  if (box_heads == kNarrowHeadsSmall) {
    p.v4 ? launch_narrow<kNarrowHeadsSmall, true>(p, tmap_q, stream)
         : launch_narrow<kNarrowHeadsSmall, false>(p, tmap_q, stream);
  } else if (box_heads == kNarrowHeads) {
    p.v4 ? launch_narrow<kNarrowHeads, true>(p, tmap_q, stream) : launch_narrow<kNarrowHeads, false>(p, tmap_q, stream);
  } else if (p.num_m_tiles == 2) {
    p.v4 ? launch_kernel<2, true>(p, tmap_q, stream) : launch_kernel<2, false>(p, tmap_q, stream);
  } else {
    p.v4 ? launch_kernel<1, true>(p, tmap_q, stream) : launch_kernel<1, false>(p, tmap_q, stream);
  }
}

}  // namespace sm90
}  // namespace flashmla
