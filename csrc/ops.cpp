// The flashmla op library: the ops defined from the one schema block (schemas.h), and the autograd guard
// shared by every op.
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

#include <cstring>
#include <string>

#include "schemas.h"

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

  for (const char* op_schema : schema::kAll) m.def(op_schema);
}

TORCH_LIBRARY_IMPL(flashmla, Autograd, m) {
  for (const char* op_schema : schema::kAll) {
    const std::string name(op_schema, std::strchr(op_schema, '('));  // the schema up to its argument list
    m.impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&refuse_grad>());
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
