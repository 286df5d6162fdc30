#include "sm90/decode/dense/dense_decode_kernel.cuh"

namespace flashmla {
namespace sm90 {
// Per-tensor e4m3 cache: converted to fp16 in shared memory, products in fp16, bf16 output.
void launch_dense_decode_fp8(const DenseDecodeParams& p, const CUtensorMap& tmap, cudaStream_t stream) {
  dense::launch<__half, true>(p, tmap, stream);
}
}  // namespace sm90
}  // namespace flashmla
