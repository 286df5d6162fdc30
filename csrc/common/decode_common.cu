// Decode planner (tile scheduler) and split-KV combine kernels.
#include "common/decode_common.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

namespace flashmla {
namespace common {

namespace {

constexpr int kPlannerThreads = 256;
constexpr int kPlannerSmemLens = 12288;  // requests whose block counts are staged in shared memory

// Exactly the greedy algorithm of torch_flashmla/reference.py::get_mla_metadata. The sequential
// part runs in one thread over block counts staged in shared memory.
__global__ void __launch_bounds__(kPlannerThreads) planner_kernel(const int* __restrict__ seqlens, int b,
                                                                  int num_sm_parts, int* __restrict__ metadata,
                                                                  int* __restrict__ num_splits) {
  __shared__ int s_nblk[kPlannerSmemLens];
  __shared__ long long s_partial[kPlannerThreads];
  const bool staged = b <= kPlannerSmemLens;
  long long local = 0;
  for (int i = threadIdx.x; i < b; i += blockDim.x) {
    const int len = max(seqlens[i], 0);
    const int nb = len / kPlannerBlockN + (len % kPlannerBlockN != 0);
    if (staged) s_nblk[i] = nb;
    local += nb;
  }
  s_partial[threadIdx.x] = local;
  __syncthreads();
  if (threadIdx.x != 0) return;
  long long total = 0;
  for (int i = 0; i < kPlannerThreads; ++i) total += s_partial[i];
  total += (long long)b * kPlannerOverhead;
  const long long payload = (total + num_sm_parts - 1) / num_sm_parts + kPlannerOverhead;
  auto nblk = [&](int r) -> long long {
    if (staged) return s_nblk[r];
    const int len = max(seqlens[r], 0);
    return len / kPlannerBlockN + (len % kPlannerBlockN != 0);
  };
  auto length = [&](int r) -> int { return max(seqlens[r], 0); };
  int req = 0, split = 0, cum = 0;
  long long blk = 0;
  num_splits[0] = 0;
  for (int p = 0; p < num_sm_parts; ++p) {
    const int begin_req = req, begin_split = split;
    const long long begin_blk = blk;
    long long remain = payload;
    while (req < b) {
      const long long left = nblk(req) - blk;
      if (remain >= left + kPlannerOverhead) {
        cum += split + 1;
        num_splits[req + 1] = cum;
        remain -= left + kPlannerOverhead;
        ++req;
        blk = 0;
        split = 0;
      } else {
        if (remain - kPlannerOverhead > 0) {
          blk += remain - kPlannerOverhead;
          ++split;
        }
        break;
      }
    }
    int end_req, end_tok;
    if (blk > 0) {
      end_req = req;
      end_tok = (int)min(blk * kPlannerBlockN, (long long)length(req));
    } else {
      end_req = req - 1;  // the partition ends with a request's last piece
      end_tok = kPlanOpenEnd;
    }
    int* row = metadata + (size_t)p * kMetadataWidth;
    row[0] = begin_req;
    row[1] = (int)(begin_blk * kPlannerBlockN);
    row[2] = end_req;
    row[3] = end_tok;
    row[4] = begin_split;
    row[5] = 0;
    row[6] = 0;
    row[7] = 0;
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* dst, const float4& v);
template <>
__device__ __forceinline__ void store4<__nv_bfloat16>(__nv_bfloat16* dst, const float4& v) {
  __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
  uint2 u;
  u.x = *reinterpret_cast<uint32_t*>(&a);
  u.y = *reinterpret_cast<uint32_t*>(&b);
  *reinterpret_cast<uint2*>(dst) = u;
}
template <>
__device__ __forceinline__ void store4<__half>(__half* dst, const float4& v) {
  __half2 a = __floats2half2_rn(v.x, v.y), b = __floats2half2_rn(v.z, v.w);
  uint2 u;
  u.x = *reinterpret_cast<uint32_t*>(&a);
  u.y = *reinterpret_cast<uint32_t*>(&b);
  *reinterpret_cast<uint2*>(dst) = u;
}

constexpr int kCombineWarps = 4;
constexpr int kSplitsInFlight = 2;  // partial rows a lane has in flight at once (16 floats each)

// A lane's 16 of the 512 columns (columns k * 128 + lane * 4 .. + 3) of one partial row.
__device__ __forceinline__ void load_partial(const float* oacc_row, int lane, float4 (&v)[4]) {
  const float4* src = reinterpret_cast<const float4*>(oacc_row);
#pragma unroll
  for (int k = 0; k < 4; ++k) v[k] = src[k * 32 + lane];
}
__device__ __forceinline__ void load_partial(const __nv_bfloat16* oacc_row, int lane, float4 (&v)[4]) {
  const uint2* src = reinterpret_cast<const uint2*>(oacc_row);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint2 u = src[k * 32 + lane];
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
    v[k] = make_float4(a.x, a.y, b.x, b.y);
  }
}

// One warp per (request, kv head, query row); each lane owns 16 of the 512 columns. Latency-bound (a few
// splits per row): the plan is read before the wait for the attention kernel, and after it the split
// statistics and the first kSplitsInFlight partial rows are loaded together, so a row costs about one
// round trip to L2 for every kSplitsInFlight splits. T: out's type; AccT: the partials' (float or bf16).
template <typename T, typename AccT>
__global__ void __launch_bounds__(kCombineWarps * 32) combine_kernel(CombineParams p) {
  const AccT* oacc = static_cast<const AccT*>(p.oacc);
  const int r = blockIdx.x;
  const int kvh = blockIdx.y;
  const int m = blockIdx.z * kCombineWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  // num_splits is the plan, complete before the attention kernel started (that kernel is launched in stream
  // order; this one starts only once all of its CTAs run): it may be read before the wait below.
  const int first = p.num_splits[r];
  // At most acc_rows splits: the plan's values are not checked (host sync), and a garbage num_splits must
  // still read inside the scratch (from the clamped first row below), never past it.
  const int n = min(p.num_splits[r + 1] - first, p.acc_rows);
  // Launched as a programmatic dependent of the attention kernel (launch_combine): its CTAs may start before
  // the attention kernel ends; this waits for it to complete and for its writes to be visible.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  if (m >= p.m_total || n <= 1) return;
  int base = 2 * (first - r);  // scratch row of this request's first split (see the attention kernel)
  base = max(0, min(base, p.acc_rows - n));
  const size_t row_stride = (size_t)p.h_kv * p.m_total;
  const size_t row0 = (size_t)base * row_stride + (size_t)kvh * p.m_total + m;

  float4 partial[kSplitsInFlight][4];
#pragma unroll
  for (int j = 0; j < kSplitsInFlight; ++j)
    if (j < n) load_partial(oacc + (row0 + (size_t)j * row_stride) * 512, lane, partial[j]);
  // Lane i holds split i's lse (splits 32.. are read again where needed: a request over more than 32 partitions).
  const float lane_lse = lane < n ? p.lseacc[row0 + (size_t)lane * row_stride] : -INFINITY;
  float mx = lane_lse;
  for (int i = lane + 32; i < n; i += 32) mx = fmaxf(mx, p.lseacc[row0 + (size_t)i * row_stride]);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  const int t = m / p.group;
  const int head = kvh * p.group + m % p.group;
  T* out = reinterpret_cast<T*>(p.out) + (((size_t)r * p.s_q + t) * p.h_q + head) * 512;
  if (mx == -INFINITY) {  // nothing attended in any split
    const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int k = 0; k < 4; ++k) store4<T>(out + k * 128 + lane * 4, z);
    if (lane == 0) p.lse[((size_t)r * p.h_q + head) * p.s_q + t] = INFINITY;
    return;
  }
  float sum = __expf(lane_lse - mx);
  for (int i = lane + 32; i < n; i += 32) sum += __expf(p.lseacc[row0 + (size_t)i * row_stride] - mx);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const float lse = mx + __logf(sum);
  const float lane_weight = __expf(lane_lse - lse);
  float4 acc[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 1
  for (int i0 = 0; i0 < n; i0 += kSplitsInFlight) {
#pragma unroll
    for (int j = 0; j < kSplitsInFlight; ++j) {
      const int i = i0 + j;
      if (i >= n) break;
      const float w = __shfl_sync(0xffffffffu, lane_weight, i & 31);
      const float weight = i < 32 ? w : __expf(p.lseacc[row0 + (size_t)i * row_stride] - lse);
      if (weight > 0.f) {  // a split with nothing attended holds zeros; skip it (weight == 0)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          acc[k].x += weight * partial[j][k].x;
          acc[k].y += weight * partial[j][k].y;
          acc[k].z += weight * partial[j][k].z;
          acc[k].w += weight * partial[j][k].w;
        }
      }
      if (i + kSplitsInFlight < n)
        load_partial(oacc + (row0 + (size_t)(i + kSplitsInFlight) * row_stride) * 512, lane, partial[j]);
    }
  }
  if (p.attn_sink != nullptr) {  // sigmoid(lse - sink): the sink's share of the softmax is dropped
    const float keep = 1.f / (1.f + __expf(p.attn_sink[head] - lse));
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      acc[k].x *= keep;
      acc[k].y *= keep;
      acc[k].z *= keep;
      acc[k].w *= keep;
    }
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) store4<T>(out + k * 128 + lane * 4, acc[k]);
  if (lane == 0) p.lse[((size_t)r * p.h_q + head) * p.s_q + t] = lse;
}

}  // namespace

void launch_planner(const int* seqlens, int b, int num_sm_parts, int* metadata, int* num_splits, cudaStream_t stream) {
  planner_kernel<<<1, kPlannerThreads, 0, stream>>>(seqlens, b, num_sm_parts, metadata, num_splits);
}

// Programmatic dependent launch: the combine's launch and start overlap the end of the attention kernel
// before it in the stream (the dense attention kernels signal griddepcontrol.launch_dependents once every
// CTA runs; the others at their exit), and combine_kernel waits for that kernel's completion before it reads
// the partials.
// Works the same under CUDA-graph capture (a programmatic edge).
void launch_combine(const CombineParams& p, bool is_bf16, cudaStream_t stream) {
  if (p.b == 0 || p.m_total == 0) return;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(p.b, p.h_kv, (p.m_total + kCombineWarps - 1) / kCombineWarps);
  config.blockDim = dim3(kCombineWarps * 32);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  if (p.oacc_bf16) {
    cudaLaunchKernelEx(&config, combine_kernel<__nv_bfloat16, __nv_bfloat16>, p);
  } else if (is_bf16) {
    cudaLaunchKernelEx(&config, combine_kernel<__nv_bfloat16, float>, p);
  } else {
    cudaLaunchKernelEx(&config, combine_kernel<__half, float>, p);
  }
}

}  // namespace common
}  // namespace flashmla
