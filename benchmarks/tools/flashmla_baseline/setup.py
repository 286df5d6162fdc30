# Minimal SM90-only build of deepseek-ai/FlashMLA @ 9241ae3 (benchmark baseline).
# Differences from upstream setup.py: no `git submodule update` (CUTLASS headers are
# unpacked by ../build.sh), no sm100 sources (csrc/sm100_stubs.cpp throws instead),
# only -gencode arch=compute_90a,code=sm_90a, no -lineinfo / --source-in-ptx,
# ptxas -v dropped (log noise only). All other nvcc flags are upstream's.
import os
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension, CUDA_HOME

this_dir = Path(__file__).resolve().parent

features_args = []
if os.getenv("FLASH_MLA_DISABLE_FP16", "0").lower() in ("1", "true", "y", "yes"):
    features_args.append("-DFLASH_MLA_DISABLE_FP16")

nvcc_threads = os.getenv("NVCC_THREADS") or "2"

cxx_args = ["-O3", "-std=c++20", "-DNDEBUG", "-Wno-deprecated-declarations", "-g0"]  # -g0: python sysconfig adds -g
nvcc_args = [
    "-O3",
    "-std=c++20",
    "-DNDEBUG",
    "-D_USE_MATH_DEFINES",
    "-Wno-deprecated-declarations",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
    "--ptxas-options=--register-usage-level=10,--warn-on-spills,--warn-on-local-memory-usage,--warn-on-double-precision-use",
    "-gencode", "arch=compute_90a,code=sm_90a",
    "--threads", nvcc_threads,
] + features_args

sources = [
    "csrc/api/api.cpp",
    "csrc/sm100_stubs.cpp",
    # Misc kernels for decoding
    "csrc/smxx/decode/get_decoding_sched_meta/get_decoding_sched_meta.cu",
    "csrc/smxx/decode/combine/combine.cu",
    # sm90 dense decode
    "csrc/sm90/decode/dense/instantiations/fp16.cu",
    "csrc/sm90/decode/dense/instantiations/bf16.cu",
    # sm90 sparse decode
    "csrc/sm90/decode/sparse_fp8/instantiations/model1_persistent_h64.cu",
    "csrc/sm90/decode/sparse_fp8/instantiations/model1_persistent_h128.cu",
    "csrc/sm90/decode/sparse_fp8/instantiations/v32_persistent_h64.cu",
    "csrc/sm90/decode/sparse_fp8/instantiations/v32_persistent_h128.cu",
    # sm90 sparse prefill
    "csrc/sm90/prefill/sparse/fwd.cu",
    "csrc/sm90/prefill/sparse/instantiations/phase1_k512.cu",
    "csrc/sm90/prefill/sparse/instantiations/phase1_k512_topklen.cu",
    "csrc/sm90/prefill/sparse/instantiations/phase1_k576.cu",
    "csrc/sm90/prefill/sparse/instantiations/phase1_k576_topklen.cu",
]

# Host-only (g++) compiles of api.cpp include cutlass -> <cuda/std/...>, which CUDA 13 keeps
# under include/cccl (nvcc adds it implicitly, g++ does not; torch does not add it).
extra_includes = []
if CUDA_HOME:
    cccl = Path(CUDA_HOME) / "include" / "cccl"
    if cccl.is_dir():
        extra_includes.append(cccl)
    # Minimal CUDA installs lack cusparse.h etc.; torch's pip wheels ship them here.
    if not (Path(CUDA_HOME) / "include" / "cusparse.h").exists():
        import torch
        for cand in (Path(torch.__file__).parent.parent / "nvidia" / "cu13" / "include",):
            if (cand / "cusparse.h").exists():
                extra_includes.append(cand)

setup(
    name="flash_mla",
    version="1.0.0+9241ae3.sm90only",
    packages=["flash_mla"],
    ext_modules=[
        CUDAExtension(
            name="flash_mla.cuda",
            sources=sources,
            extra_compile_args={
                "cxx": cxx_args + features_args + [f"-I{d}" for d in extra_includes],
                "nvcc": nvcc_args,
            },
            include_dirs=[
                this_dir / "csrc",
                this_dir / "csrc" / "kerutils" / "include",
                this_dir / "csrc" / "sm90",
                this_dir / "csrc" / "cutlass" / "include",
                this_dir / "csrc" / "cutlass" / "tools" / "util" / "include",
            ],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
