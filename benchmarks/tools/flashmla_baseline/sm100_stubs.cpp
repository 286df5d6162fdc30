// Benchmark-baseline build of FlashMLA for SM90 only.
// The SM100 kernels are not compiled; these stubs provide the symbols that
// csrc/api/*.h reference so that flash_mla.cuda links. Calling any of them throws.
#include <torch/extension.h>

#include "params.h"
#include "sm100/prefill/dense/interface.h"
#include "sm100/decode/head64/kernel.h"
#include "sm100/prefill/sparse/fwd/head64/phase1.h"
#include "sm100/prefill/sparse/fwd/head128/phase1.h"
#include "sm100/prefill/sparse/fwd_for_small_topk/head128/phase1.h"

#define SM100_NOT_BUILT(name) \
    TORCH_CHECK(false, "FlashMLA (SM90-only baseline build): SM100 kernel '" name "' was not compiled")

void FMHACutlassSM100FwdRun(at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor, at::Tensor, int, float, int, int, bool) {
    SM100_NOT_BUILT("dense_prefill_fwd");
}

void FMHACutlassSM100BwdRun(at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            int, float, int, int, bool) {
    SM100_NOT_BUILT("dense_prefill_bwd");
}

namespace sm100::decode::head64 {
template<ModelType MODEL_TYPE>
void run_flash_splitkv_mla_fp8_sparse_kernel(const SparseAttnDecodeParams &) {
    SM100_NOT_BUILT("decode::head64");
}
template void run_flash_splitkv_mla_fp8_sparse_kernel<ModelType::V32>(const SparseAttnDecodeParams &);
template void run_flash_splitkv_mla_fp8_sparse_kernel<ModelType::MODEL1>(const SparseAttnDecodeParams &);
}

namespace sm100::fwd::head64 {
template<int D_QK>
void run_fwd_phase1_kernel(const SparseAttnFwdParams &) {
    SM100_NOT_BUILT("fwd::head64");
}
template void run_fwd_phase1_kernel<512>(const SparseAttnFwdParams &);
template void run_fwd_phase1_kernel<576>(const SparseAttnFwdParams &);
}

namespace sm100::fwd::head128 {
template<int D_QK>
void run_fwd_phase1_kernel(const SparseAttnFwdParams &) {
    SM100_NOT_BUILT("fwd::head128");
}
template void run_fwd_phase1_kernel<512>(const SparseAttnFwdParams &);
template void run_fwd_phase1_kernel<576>(const SparseAttnFwdParams &);
}

namespace sm100::fwd_for_small_topk::head128 {
template<SparseAttnFwdMode FWD_MODE, int D_QK>
void run_fwd_for_small_topk_phase1_kernel(const SparseFwdArgT<FWD_MODE> &) {
    SM100_NOT_BUILT("fwd_for_small_topk::head128");
}
template void run_fwd_for_small_topk_phase1_kernel<SparseAttnFwdMode::Prefill, 512>(const SparseAttnFwdParams &);
template void run_fwd_for_small_topk_phase1_kernel<SparseAttnFwdMode::DecodeWithSplitKV, 512>(const SparseAttnDecodeParams &);
}
