"""Compile check of the SM90 kernels on a machine without a GPU (run by .ci/run).

The CPU-only test run never compiles csrc/**/*.cu or the *_cuda.cpp entry points, so a source that
does not build for the GPU machine would pass it. This compiles each of them to an object file (nothing
is linked: a CPU-only torch has no CUDA libraries) with setup.py's flags plus those that
torch.utils.cpp_extension adds, host compilation included (cudafe++ and the host compiler run, as in
the real build), once per C++ standard that torch's extension builder uses (c++17 up to torch 2.12,
c++20 from 2.13). ptxas spill lines and wgmma-serialization lines are printed, not failed on (docs/design.md
§8). The entry points compile against a CPU-only torch's headers with one generated header supplied (below).

Exits 0 with a message when no nvcc is found.
Usage: python .ci/compile_cuda.py [--jobs N] [--std c++17,c++20] [PATH_PART ...]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_setup(root: str = ROOT):
    """setup.py of the tree at `root` as a module (its setup() call runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("flashmla_setup", os.path.join(root, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    # The toolkit's own nvcc first: its include directory is the CUDA headers' (a PATH entry may be a wrapper).
    for candidate in ([os.path.join(home, "bin", "nvcc")] if home else []) + ["/usr/local/cuda/bin/nvcc",
                                                                           shutil.which("nvcc")]:
        if candidate and os.path.exists(candidate):
            return os.path.realpath(candidate)
    return None


def compile_setup(nvcc: str, stub_dir: str, root: str = ROOT):
    """(setup module of `root`, command(src, std, obj) -> the nvcc / c++ command line of one kernel source).

    The flags are setup.py's plus those torch.utils.cpp_extension adds; stub_dir receives the one generated
    header a CPU-only torch lacks (below). benchmarks/tools/sass_compare.py compiles with the same commands.
    """
    from torch.utils import cpp_extension

    setup = load_setup(root)
    cuda_include = os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include")
    includes = [f"-I{d}" for d in setup.include_dirs() + cpp_extension.include_paths()
                + [cuda_include, sysconfig.get_paths()["include"]]]
    defines = [f"-D{k}={v}" for k, v in setup.DEFINE_MACROS] + [
        "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    host_cxx = os.environ.get("CXX", "c++")
    # A CPU-only torch ships c10/cuda's headers without the one its CMake build generates; the entry
    # points include it (through c10/cuda/CUDAMacros.h), so give them what a CUDA torch's says.
    generated = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any(os.path.exists(os.path.join(d, generated)) for d in cpp_extension.include_paths()):
        os.makedirs(os.path.join(stub_dir, os.path.dirname(generated)), exist_ok=True)
        with open(os.path.join(stub_dir, generated), "w") as header:
            header.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(f"-I{stub_dir}")

    def command(src: str, std: str, obj: str) -> list[str]:
        if src.endswith(".cu"):
            return ([nvcc, "-c", src, "-o", obj] + includes + defines + cpp_extension.COMMON_NVCC_FLAGS
                    + ["-Xcompiler", "-fPIC"] + setup.NVCC_FLAGS + ["-Xptxas=-v", f"-std={std}"])
        return [host_cxx, "-c", src, "-o", obj, "-fPIC", f"-std={std}"] + includes + defines + setup.CXX_FLAGS

    return setup, command


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", os.cpu_count() or 2)))
    parser.add_argument("--std", default="c++17,c++20")
    parser.add_argument("only", nargs="*", help="compile only the sources whose path contains one of these")
    args = parser.parse_args()

    nvcc = find_nvcc()
    if nvcc is None:
        print("compile check: no nvcc found (CUDA_HOME, PATH, /usr/local/cuda); skipped")
        return 0

    failures = []
    with tempfile.TemporaryDirectory() as out_dir:
        setup, command = compile_setup(nvcc, os.path.join(out_dir, "stub"))
        sources = [src for src in setup.kernel_sources() if not args.only or any(part in src for part in args.only)]
        jobs = [(src, std) for std in args.std.split(",") for src in sources]
        print(f"compile check: {len(jobs)} compilations ({nvcc}, {args.jobs} at a time)", flush=True)

        def run(job):
            src, std = job
            obj = os.path.join(out_dir, f"{std}_{src.replace('/', '_')}.o")
            start = time.time()
            proc = subprocess.run(command(src, std, obj), cwd=ROOT, capture_output=True, text=True)
            return src, std, proc, time.time() - start

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for src, std, proc, seconds in pool.map(run, jobs):
                log = proc.stdout + proc.stderr
                # spills, and wgmma serialized by ptxas (C7514 / C7515, "Potential Performance Loss": every wgmma of
                # the kernel then waits for the one before, measured 19-27% slower in benchmarks/NOTES_fp8_decode.md)
                ptxas_lines = sorted({line.strip() for line in log.splitlines()
                                      if any(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", line))
                                      or "Potential Performance Loss" in line})
                status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                print(f"  {status:20} {seconds:5.1f} s  -std={std}  {src}", flush=True)
                for line in ptxas_lines:
                    print(f"      ptxas: {line}")
                if proc.returncode != 0:
                    failures.append(src)
                    print("\n".join("      " + line for line in log.strip().splitlines()[-15:]))
    if failures:
        print(f"compile check: {len(failures)} of {len(jobs)} compilations failed")
        return 1
    print("compile check: every kernel source compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
