"""Build torch_flashmla.

The C++ op library (``csrc/ops.cpp``: the ``flashmla`` schemas and the autograd guard) always
builds; it needs only a C++ compiler and torch. The SM90 CUDA kernels (every other source under
``csrc/``) build for ``sm_90a`` when nvcc and a CUDA-enabled torch are present.

Environment:
  FLASHMLA_BUILD_CUDA=0|1   force the CUDA kernels off or on (default: auto-detect)
  MAX_JOBS=N                parallel compile jobs (ninja)
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("FLASHMLA_BUILD_CUDA", "auto").lower()
    available = CUDA_HOME is not None and torch.version.cuda is not None
    if flag in ("1", "on", "true", "yes"):
        if not available:
            raise RuntimeError(
                "FLASHMLA_BUILD_CUDA=1 but no CUDA toolkit (CUDA_HOME) or no CUDA-enabled torch was found"
            )
        return True
    if flag in ("0", "off", "false", "no"):
        return False
    return available


def _cutlass_include():
    """CuTe/CUTLASS headers from the PyPI package ``nvidia-cutlass`` (None when absent)."""
    try:
        import cutlass_library  # noqa: F401  (shipped by nvidia-cutlass)
        base = os.path.dirname(cutlass_library.__file__)
        for candidate in (os.path.join(base, "source", "include"), os.path.join(base, "..", "cutlass", "include")):
            if os.path.isdir(os.path.join(candidate, "cute")):
                return os.path.abspath(candidate)
    except ImportError:
        pass
    return None


def _extension():
    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731
    op_library = ["csrc/ops.cpp"]
    cxx_flags = ["-O3"]  # the C++ standard is the one torch.utils.cpp_extension picks for this torch
    if not _want_cuda():
        print("torch_flashmla: building the C++ op library only (no CUDA kernels)")
        return CppExtension("torch_flashmla._C", op_library, extra_compile_args={"cxx": cxx_flags})

    kernel_sources = sorted(
        rel(p)
        for pattern in ("csrc/**/*.cu", "csrc/**/*_cuda.cpp")
        for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
    )
    include_dirs = [os.path.join(ROOT, "csrc")]
    cutlass = _cutlass_include()
    if cutlass:
        include_dirs.append(cutlass)
    nvcc_flags = [
        "-O3",
        "-gencode=arch=compute_90a,code=sm_90a",
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        "--use_fast_math",
        "-lineinfo",
        "-DNDEBUG",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
    if os.environ.get("FLASHMLA_PTXAS_VERBOSE"):
        nvcc_flags.append("-Xptxas=-v")
    print(f"torch_flashmla: building the op library and {len(kernel_sources)} CUDA sources for sm_90a")
    return CUDAExtension(
        "torch_flashmla._C",
        op_library + kernel_sources,
        include_dirs=include_dirs,
        define_macros=[("FLASHMLA_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
