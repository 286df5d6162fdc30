// Host-side TMA tensor maps (cuTensorMapEncodeTiled through the runtime's driver entry point, so the
// extension needs no link against libcuda).
#pragma once
#include <ATen/ATen.h>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <mutex>

namespace flashmla {
namespace api {

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder(const char* op) {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status);
    if (err == cudaSuccess && status == cudaDriverEntryPointSuccess) fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  });
  TORCH_CHECK(fn != nullptr, op, ": cannot get cuTensorMapEncodeTiled from the CUDA driver");
  return fn;
}

// A tiled map of rank `rank` over the bf16/fp16 tensor t: dims / strides (bytes, rank - 1 of them) / box
// innermost first, 128B swizzle, zeros outside the tensor.
inline CUtensorMap encode_16bit_map(const char* op, const char* arg, const at::Tensor& t, cuuint32_t rank,
                                    const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box) {
  const cuuint32_t elem_strides[5] = {1, 1, 1, 1, 1};
  const CUtensorMapDataType dt =
      t.scalar_type() == at::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  CUtensorMap map;
  CUresult res = tensor_map_encoder(op)(&map, dt, rank, t.data_ptr(), dims, strides, box, elem_strides,
                                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(res == CUDA_SUCCESS, op, ": cuTensorMapEncodeTiled failed for ", arg, " (", static_cast<int>(res), ")");
  return map;
}

// A 3-D map over t [rows, heads, dim] (bf16/fp16, last dim contiguous, other strides multiples of 16
// bytes, base 16-byte aligned): dims {dim, heads, rows}, box {64, 1, box_rows}, 128B swizzle, zeros
// outside the tensor.
inline CUtensorMap make_rows_heads_map(const char* op, const char* arg, const at::Tensor& t, int box_rows) {
  const int64_t es = t.element_size();
  const int64_t s_head = t.size(1) == 1 ? t.size(2) * es : t.stride(1) * es;
  const int64_t s_row = t.size(0) == 1 ? s_head * t.size(1) : t.stride(0) * es;
  TORCH_CHECK(t.stride(2) == 1 && s_head % 16 == 0 && s_row % 16 == 0 && s_head > 0 && s_row > 0 &&
                  s_row < (int64_t(1) << 40) && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
              op, ": ", arg, " must have a contiguous last dim, strides that are multiples of 16 bytes and a "
              "16-byte aligned base (got strides ", t.strides(), ")");
  cuuint64_t dims[3] = {static_cast<cuuint64_t>(t.size(2)), static_cast<cuuint64_t>(t.size(1)),
                        static_cast<cuuint64_t>(t.size(0))};
  cuuint64_t strides[2] = {static_cast<cuuint64_t>(s_head), static_cast<cuuint64_t>(s_row)};
  cuuint32_t box[3] = {64, 1, static_cast<cuuint32_t>(box_rows)};
  return encode_16bit_map(op, arg, t, 3, dims, strides, box);
}

// A 4-D map over q [b, s_q, h_q, d] (bf16/fp16, last dim contiguous, other strides multiples of 16
// bytes or of size-1 dims, base 16-byte aligned): dims {d, h_q, s_q, b}, box {64, box_heads, 1, 1}, 128B
// swizzle, zeros for heads past h_q. One load is a 64-column tile of box_heads heads of one query token.
inline CUtensorMap make_q_heads_map(const char* op, const at::Tensor& q, int box_heads) {
  const int64_t es = q.element_size();
  // A size-1 dim's stride is never used to address: give it a valid one (the next inner extent).
  const int64_t s_head = q.size(2) == 1 ? q.size(3) * es : q.stride(2) * es;
  const int64_t s_seq = q.size(1) == 1 ? s_head * q.size(2) : q.stride(1) * es;
  const int64_t s_batch = q.size(0) == 1 ? s_seq * q.size(1) : q.stride(0) * es;
  TORCH_CHECK(q.stride(3) == 1 && s_head > 0 && s_seq > 0 && s_batch > 0 && s_head % 16 == 0 && s_seq % 16 == 0 &&
                  s_batch % 16 == 0 && s_batch < (int64_t(1) << 40) && s_seq < (int64_t(1) << 40) &&
                  reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0,
              op, ": q must have a contiguous last dim, positive strides that are multiples of 16 bytes and a "
              "16-byte aligned base (got strides ", q.strides(), ")");
  cuuint64_t dims[4] = {static_cast<cuuint64_t>(q.size(3)), static_cast<cuuint64_t>(q.size(2)),
                        static_cast<cuuint64_t>(q.size(1)), static_cast<cuuint64_t>(q.size(0))};
  cuuint64_t strides[3] = {static_cast<cuuint64_t>(s_head), static_cast<cuuint64_t>(s_seq),
                           static_cast<cuuint64_t>(s_batch)};
  cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_heads), 1, 1};
  return encode_16bit_map(op, "q", q, 4, dims, strides, box);
}

}  // namespace api
}  // namespace flashmla
