// PTX helpers shared by the SM90 decode kernels: shared-memory addressing, named barriers,
// mbarriers, TMA, wgmma fences and descriptors (128-byte swizzle), and per-dtype wgmma dispatch.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda.h>
#include <cuda_fp16.h>

#include "sm90/common/wgmma_ops.h"

namespace flashmla {
namespace sm90 {
// ---------------------------------------------------------------------------------------------
// PTX helpers
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// Every kernel aligns its dynamic shared memory to 1024 bytes with the same line, written out in each:
// `smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u)`. As an inline helper here, nvcc 13.0 compiled
// every SM90 kernel differently and spilled in the sparse ones (checked with benchmarks/tools/sass_compare.py).
// Named barriers (id 0 is __syncthreads): `count` threads take part, a multiple of 32.
__device__ __forceinline__ void named_bar_sync(uint32_t id, uint32_t count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(uint32_t id, uint32_t count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
// Lets the next kernel in the stream, launched as a programmatic dependent (the split-KV combine), start its
// CTAs once every CTA of this grid has passed here or exited; the dependent waits for this grid's completion
// (griddepcontrol.wait) before it reads anything.
__device__ __forceinline__ void allow_dependent_launch() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }
// setmaxnreg from the launch allotment (kLaunchRegs: 168 registers for 384 threads, 128 for 512) to kRegs: .inc
// above it, .dec below it (an .inc to fewer registers than the warp holds is an illegal instruction).
template <int kRegs, int kLaunchRegs = 168>
__device__ __forceinline__ void set_warpgroup_registers() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg range");
  if constexpr (kRegs > kLaunchRegs) {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
  } else if constexpr (kRegs < kLaunchRegs) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
  }
}

__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// An arrival that orders nothing before it (no release): a signal that instructions were issued, not that their
// results are visible (e.g. that global loads are in flight).
__device__ __forceinline__ void mbar_arrive_relaxed(uint32_t bar) {
  asm volatile("mbarrier.arrive.relaxed.cta.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// One arrival per warp (lane 0, after the warp has converged): consumer barriers counted in warps; kRelaxed: the
// arrival orders nothing before it (mbar_arrive_relaxed).
template <bool kRelaxed = false>
__device__ __forceinline__ void mbar_arrive_per_warp(uint32_t bar) {
  __syncwarp();
  if (threadIdx.x % 32 == 0) {
    if constexpr (kRelaxed) {
      mbar_arrive_relaxed(bar);
    } else {
      mbar_arrive(bar);
    }
  }
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// The same wait with the retry loop inside the asm: no branch in the compiled program between the
// wgmma instructions around it, so the compiler needs no warpgroup re-synchronisation there.
__device__ __forceinline__ void mbar_wait_loop(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// kEvictFirst: the L2 evict-first policy, for data read once (a decode step's KV cache stream in the kernels
// where it measured faster, docs/design.md §4.2), so that it does not push out of L2 what is read again soon:
// the split partials the combine reads back.
template <bool kEvictFirst = false>
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2,
                                            int c3) {
  if constexpr (kEvictFirst) {
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
        " [%0], [%1, {%2, %3, %4, %5}], [%6], %7;\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar), "l"(policy)
        : "memory");
  } else {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
  }
}
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_operand(float& x) { asm volatile("" : "+f"(x)::"memory"); }

// Shared-memory matrix descriptor, 128-byte swizzle. K-major: SBO = 1024 (8-row groups), LBO unused.
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>(lbo_bytes >> 4) << 16;
  d |= static_cast<uint64_t>(sbo_bytes >> 4) << 32;
  d |= 1ull << 62;
  return d;
}

// The descriptor of addr + offset_bytes from the descriptor of addr: one add to the low word instead
// of rebuilding it (the 14-bit address field does not carry: shared-memory addresses are below 2^18).
// wgmma loops over k-steps and tiles issue one such add per operand and instruction.
__device__ __forceinline__ uint64_t desc_add(uint64_t desc, uint32_t offset_bytes) { return desc + (offset_bytes >> 4); }

// Byte offset of (row, 16-byte chunk) inside a 64-row x 128-byte tile with the 128B swizzle.
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return static_cast<uint32_t>(row * 128 + ((chunk ^ (row & 7)) << 4));
}

// O *= alpha per row, O in the wgmma m64nN accumulator layout of one thread (o[4j], o[4j+1] in row
// row0; o[4j+2], o[4j+3] in row0 + 8); skipped when no row of the warp changes (the common case
// once the running maxima settle).
template <int N>
__device__ __forceinline__ void rescale_rows(float (&o)[N], float alpha0, float alpha1) {
  if (__any_sync(0xffffffffu, alpha0 != 1.f || alpha1 != 1.f)) {
#pragma unroll
    for (int j = 0; j < N / 4; ++j) {
      o[j * 4 + 0] *= alpha0;
      o[j * 4 + 1] *= alpha0;
      o[j * 4 + 2] *= alpha1;
      o[j * 4 + 3] *= alpha1;
    }
  }
}

template <typename T>
struct TypeOps;
template <>
struct TypeOps<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ uint32_t pack_residue(float a, float b) {
    return pack(a - __bfloat162float(__float2bfloat16_rn(a)), b - __bfloat162float(__float2bfloat16_rn(b)));
  }
  static __device__ __forceinline__ void qk64(float* d, uint64_t a, uint64_t b, int s) { wgmma_m64n64k16_bf16_kk(d, a, b, s); }
  static __device__ __forceinline__ void pv(float* d, uint64_t a, uint64_t b, int s) { wgmma_m64n256k16_bf16_kmn(d, a, b, s); }
  static __device__ __forceinline__ void qk64_r(float* d, const uint32_t (&a)[4], uint64_t b, int s) {
    wgmma_m64n64k16_bf16_rk(d, a, b, s);
  }
  static __device__ __forceinline__ void pv_r(float* d, const uint32_t (&a)[4], uint64_t b, int s) {
    wgmma_m64n256k16_bf16_rmn(d, a, b, s);
  }
  // MHA prefill: m64n128 products (128-key blocks, d_v 128).
  static __device__ __forceinline__ void qk128(float* d, uint64_t a, uint64_t b, int s) {
    wgmma_m64n128k16_bf16_kk(d, a, b, s);
  }
  static __device__ __forceinline__ void pv128_r(float* d, const uint32_t (&a)[4], uint64_t b, int s) {
    wgmma_m64n128k16_bf16_rmn(d, a, b, s);
  }
  // Dense decode with at most 32 query rows: S^T = K Q^T (both K-major), O^T += V^T P^T (V^T MN-major).
  static __device__ __forceinline__ void qk32(float* d, uint64_t a, uint64_t b, int s) { wgmma_m64n32k16_bf16_kk(d, a, b, s); }
  static __device__ __forceinline__ void pv32(float* d, uint64_t a, uint64_t b) { wgmma_m64n32k16_bf16_mnk(d, a, b, 1); }
};
template <>
struct TypeOps<__half> {
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ uint32_t pack_residue(float a, float b) {
    return pack(a - __half2float(__float2half_rn(a)), b - __half2float(__float2half_rn(b)));
  }
  static __device__ __forceinline__ void qk64(float* d, uint64_t a, uint64_t b, int s) { wgmma_m64n64k16_f16_kk(d, a, b, s); }
  static __device__ __forceinline__ void pv(float* d, uint64_t a, uint64_t b, int s) { wgmma_m64n256k16_f16_kmn(d, a, b, s); }
  static __device__ __forceinline__ void qk64_r(float* d, const uint32_t (&a)[4], uint64_t b, int s) {
    wgmma_m64n64k16_f16_rk(d, a, b, s);
  }
  static __device__ __forceinline__ void pv_r(float* d, const uint32_t (&a)[4], uint64_t b, int s) {
    wgmma_m64n256k16_f16_rmn(d, a, b, s);
  }
  // MHA prefill: m64n128 products (128-key blocks, d_v 128).
  static __device__ __forceinline__ void qk128(float* d, uint64_t a, uint64_t b, int s) {
    wgmma_m64n128k16_f16_kk(d, a, b, s);
  }
  static __device__ __forceinline__ void pv128_r(float* d, const uint32_t (&a)[4], uint64_t b, int s) {
    wgmma_m64n128k16_f16_rmn(d, a, b, s);
  }
  // Dense decode with at most 32 query rows: S^T = K Q^T (both K-major), O^T += V^T P^T (V^T MN-major).
  static __device__ __forceinline__ void qk32(float* d, uint64_t a, uint64_t b, int s) { wgmma_m64n32k16_f16_kk(d, a, b, s); }
  static __device__ __forceinline__ void pv32(float* d, uint64_t a, uint64_t b) { wgmma_m64n32k16_f16_mnk(d, a, b, 1); }
};


// ---- products of the decode kernels (64 query rows, 64-token chunks, 128B-swizzled 64x64 tiles) ----
// Every element of x is treated as read and written here: keeps the compiler from moving accesses of
// wgmma accumulators across an issue or a wait.
template <int N>
__device__ __forceinline__ void fence_all(float (&x)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) fence_operand(x[i]);
}
// The same for accumulators held as M tiles (the transposed kernels' O^T: eight m64 tiles).
template <int M, int N>
__device__ __forceinline__ void fence_all(float (&x)[M][N]) {
#pragma unroll
  for (int m = 0; m < M; ++m) fence_all(x[m]);
}

// O (64 x 256, fp32 accumulators) += P V_half, P a 64x64 tile in shared memory (K-major), V_half four
// consecutive 64x64 tiles (64 tokens x 256 columns, read MN-major). Committed, not waited for.
template <typename T>
__device__ __forceinline__ void pv_smem(float (&o)[128], uint32_t p_tile, uint32_t v_half) {
  constexpr uint32_t kTile = 64 * 128;
  const uint64_t desc_p = desc_sw128(p_tile, 16, 1024), desc_v = desc_sw128(v_half, kTile, 1024);
  fence_all(o);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    TypeOps<T>::pv(o, desc_add(desc_p, kk * 32), desc_add(desc_v, kk * 16 * 128), 1);
  }
  wgmma_commit();
}

// ---- thread-block clusters (distributed shared memory) ----
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
// Every thread of every CTA of the cluster (release / acquire).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// The shared::cluster address of the same shared-memory offset in CTA `rank` of the cluster.
__device__ __forceinline__ uint32_t mapa_shared(uint32_t addr, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}
// Bulk copy of `bytes` (a multiple of 16, 16-byte aligned) from this CTA's shared memory to a cluster
// peer's; completes as transaction bytes on the peer's mbarrier (dst, bar: mapa addresses).
__device__ __forceinline__ void bulk_copy_to_peer(uint32_t dst, uint32_t src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               ::"r"(dst), "r"(src), "r"(bytes), "r"(bar)
               : "memory");
}
// Arrive on a peer CTA's mbarrier without ordering this thread's memory operations (a release at
// cluster scope costs a GPU-wide memory barrier; the arrivals that use this publish no data).
__device__ __forceinline__ void mbar_arrive_cluster_relaxed(uint32_t bar_cluster_addr) {
  asm volatile("mbarrier.arrive.relaxed.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(bar_cluster_addr) : "memory");
}

}  // namespace sm90
}  // namespace flashmla
