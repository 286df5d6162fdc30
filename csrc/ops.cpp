// The flashmla op library: the one schema block, and the autograd guard shared by every op.
//
// Kernels are registered elsewhere:
//   * CPU reference and the CUDA entry points: Python (torch_flashmla/_registration.py), which
//     validates inputs in one place (torch_flashmla/checks.py) before any launch;
//   * fakes: meta/ (imported as torch_flashmla.meta);
//   * SM90 kernels: internal ops in the `flashmla_cuda` namespace, one TORCH_LIBRARY_FRAGMENT per
//     kernel family under csrc/api/, called by the CUDA registrations after the checks.
#include <Python.h>
#include <torch/library.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>

namespace flashmla {

// Every flashmla op is inference-only. The dispatcher's default autograd fallback only warns
// when a custom op without a backward is called on tensors that require grad, so refuse loudly,
// while grad mode is on, and otherwise redispatch below autograd (refusing unconditionally would break every call).
static void refuse_grad(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const bool grad_enabled = at::GradMode::is_enabled();  // under no_grad nothing would be recorded
  const size_t first = stack->size() - arguments.size();
  for (size_t i = 0; i < arguments.size(); ++i) {
    const c10::IValue& value = (*stack)[first + i];
    if (grad_enabled && value.isTensor() && value.toTensor().defined() && value.toTensor().requires_grad()) {
      TORCH_CHECK(false, op.schema().name(), ": argument '", arguments[i].name(),
                  "' requires grad, but flashmla ops are inference-only (no backward). "
                  "Call them under torch.no_grad()/torch.inference_mode() or pass detached tensors.");
    }
  }
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

TORCH_LIBRARY(flashmla, m) {
  // Fakes live in Python; tell torch where to find them when only this library is loaded.
  m.set_python_module("torch_flashmla.meta");

  m.def(
      "get_mla_metadata(Tensor seqlens, int num_q_tokens_per_head_k, int num_heads_k, int? num_heads_q, "
      "bool is_fp8_kvcache, int? topk, int num_sm_parts) -> (Tensor tile_scheduler_metadata, Tensor num_splits)");
  // descale_q / descale_k: per-tensor fp32 descales ([] or [1], read on the device) of a float8_e4m3fn q and
  // of the per-tensor e4m3 cache (kv_cache_dtype "fp8"); given exactly when q / kv_cache are FP8.
  m.def(
      "mla_decode(Tensor q, Tensor kv_cache, Tensor block_table, Tensor cache_seqlens, int head_dim_v, "
      "float softmax_scale, bool causal, Tensor tile_scheduler_metadata, Tensor num_splits, Tensor? descale_q=None, "
      "Tensor? descale_k=None) -> (Tensor out, Tensor lse)");
  m.def(
      "sparse_mla_decode(Tensor q, Tensor kv_cache, Tensor indices, Tensor? topk_length, Tensor? attn_sink, "
      "Tensor? extra_kv_cache, Tensor? extra_indices, Tensor? extra_topk_length, int head_dim_v, "
      "float softmax_scale, Tensor tile_scheduler_metadata, Tensor num_splits) -> (Tensor out, Tensor lse)");
  m.def(
      "sparse_mla_prefill(Tensor q, Tensor kv, Tensor indices, float softmax_scale, int head_dim_v, "
      "Tensor? attn_sink, Tensor? topk_length) -> (Tensor out, Tensor max_logits, Tensor lse)");
  // scale: the per-tensor fp32 scale of kv_cache_dtype "fp8" ([] or [1], read on the device); the other
  // cache types compute their own scales and ignore it (torch_flashmla/kv_cache.py).
  m.def(
      "concat_and_cache_mla(Tensor kv_c, Tensor k_pe, Tensor(a!) kv_cache, Tensor slot_mapping, "
      "str kv_cache_dtype, Tensor? scale=None) -> ()");
  m.def("quantize_kv_fp8(Tensor kv) -> Tensor");
  m.def("dequantize_kv_fp8(Tensor kv_fp8) -> Tensor");
  // DeepSeek V4 ("MODEL1") FP8 paged cache: [num_blocks, page_size, 1, 512] bf16 <-> [num_blocks,
  // page_size, 1, 584] bytes with a padded page stride (torch_flashmla/kv_cache.py).
  m.def("quantize_kv_fp8_v4(Tensor kv) -> Tensor");
  m.def("dequantize_kv_fp8_v4(Tensor kv_fp8) -> Tensor");
  // Dense MHA-mode prefill over packed varlen sequences (DeepSeek prefills in MHA form: d_qk 192,
  // d_v 128, then decodes in MLA form). Semantics in torch_flashmla/reference.py (mha_prefill).
  m.def(
      "mha_prefill(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float softmax_scale, bool causal) -> (Tensor out, Tensor lse)");
}

TORCH_LIBRARY_IMPL(flashmla, Autograd, m) {
  for (const char* name : {"get_mla_metadata", "mla_decode", "sparse_mla_decode", "sparse_mla_prefill",
                           "concat_and_cache_mla", "quantize_kv_fp8", "dequantize_kv_fp8", "quantize_kv_fp8_v4",
                           "dequantize_kv_fp8_v4", "mha_prefill"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&refuse_grad>());
  }
}

}  // namespace flashmla

// A Python module so that `import torch_flashmla._C` loads the library (and its registrations).
static PyModuleDef flashmla_module = {PyModuleDef_HEAD_INIT, "_C", "flashmla op library", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&flashmla_module);
  if (module != nullptr) {
#ifdef FLASHMLA_WITH_CUDA
    PyModule_AddIntConstant(module, "with_cuda_kernels", 1);
#else
    PyModule_AddIntConstant(module, "with_cuda_kernels", 0);
#endif
  }
  return module;
}
