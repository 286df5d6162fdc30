#include "sm90/decode/dense/dense_decode_kernel.cuh"

namespace flashmla {
namespace sm90 {
void launch_dense_decode_fp16(const DenseDecodeParams& p, const CUtensorMap& tmap, cudaStream_t stream) {
  dense::launch<__half>(p, tmap, stream);
}
}  // namespace sm90
}  // namespace flashmla
