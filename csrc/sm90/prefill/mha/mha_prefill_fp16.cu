// MHA prefill kernel instantiations for __half (d_qk 192 and 128); one file per dtype so they compile in parallel.
#include "sm90/prefill/mha/mha_prefill_kernel.cuh"

namespace flashmla {
namespace sm90 {
namespace mha_prefill {

void launch_mha_prefill_fp16(const MhaPrefillParams& p, int d_qk, const CUtensorMap& q, const CUtensorMap& k,
                             const CUtensorMap& v, cudaStream_t stream) {
  launch_dtype<__half>(p, d_qk, q, k, v, stream);
}

}  // namespace mha_prefill
}  // namespace sm90
}  // namespace flashmla
