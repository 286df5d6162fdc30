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


# Flags of the SM90 kernels, shared with the compile check (.ci/compile_cuda.py).
NVCC_FLAGS = [
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
CXX_FLAGS = ["-O3"]  # the C++ standard is the one torch.utils.cpp_extension picks for this torch
OP_LIBRARY = ["csrc/ops.cpp"]
DEFINE_MACROS = [("FLASHMLA_WITH_CUDA", "1")]


def kernel_sources():
    """The CUDA kernels and their C++ entry points, relative to the repository root."""
    return sorted(
        os.path.relpath(p, ROOT)
        for pattern in ("csrc/**/*.cu", "csrc/**/*_cuda.cpp")
        for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
    )


def include_dirs():
    dirs = [os.path.join(ROOT, "csrc")]
    cutlass = _cutlass_include()
    if cutlass:
        dirs.append(cutlass)
    return dirs


def _extension():
    if not _want_cuda():
        print("torch_flashmla: building the C++ op library only (no CUDA kernels)")
        return CppExtension("torch_flashmla._C", OP_LIBRARY, extra_compile_args={"cxx": CXX_FLAGS})

    sources = kernel_sources()
    nvcc_flags = list(NVCC_FLAGS)
    if os.environ.get("FLASHMLA_PTXAS_VERBOSE"):
        nvcc_flags.append("-Xptxas=-v")
    print(f"torch_flashmla: building the op library and {len(sources)} CUDA sources for sm_90a")
    return CUDAExtension(
        "torch_flashmla._C",
        OP_LIBRARY + sources,
        include_dirs=include_dirs(),
        define_macros=DEFINE_MACROS,
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": nvcc_flags},
    )


# setuptools runs this file as __main__ (pip's build backend too); the compile check imports it for the flags.
if __name__ == "__main__":
    setup(
        ext_modules=[_extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
