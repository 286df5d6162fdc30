"""Is a change free of machine-code effects? Compiles kernel sources of the working tree and of a git revision with
CI's commands (.ci/compile_cuda.py: setup.py's flags and those torch's extension builder adds, -std=c++17) and
compares their SASS per kernel function (`cuobjdump -sass`, addresses and encodings stripped). No GPU needed.

Usage: python benchmarks/tools/sass_compare.py REV [PATH_PART ...]
  REV        the revision to compare against (e.g. HEAD, main~1); checked out into a temporary git worktree
  PATH_PART  compile only the kernel sources whose path contains one of these (default: csrc/sm90/decode/dense/)

Needs nvcc (CUDA_HOME, PATH or /usr/local/cuda), and cuobjdump with nvdisasm beside it or on PATH: the toolkit's, or
those of the PyPI wheels nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm (their bin folder on PATH). Prints, per
source, "identical" or the kernels whose SASS differs (with the number of instruction lines that differ
position by position), and the
ptxas spill lines of the working tree's build. Exit status 0 when every source is identical.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_compile_cuda():
    spec = importlib.util.spec_from_file_location("compile_cuda", os.path.join(ROOT, ".ci", "compile_cuda.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_cuobjdump(nvcc: str) -> str | None:
    beside_nvcc = os.path.join(os.path.dirname(nvcc), "cuobjdump")
    return beside_nvcc if os.path.exists(beside_nvcc) else shutil.which("cuobjdump")


def readable(names: list[str]) -> list[str]:
    """Kernel names demangled (template arguments kept, parameters dropped) when c++filt is there."""
    if not names or shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return [name.split("(")[0] for name in out] if len(out) == len(names) else names


def sass_by_function(cuobjdump: str, obj: str) -> dict[str, list[str]]:
    """Kernel name -> its SASS instructions with addresses and encodings removed."""
    env = dict(os.environ, PATH=os.path.dirname(cuobjdump) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True, env=env)
    if proc.returncode != 0 or "fatal" in proc.stderr:
        raise RuntimeError(f"cuobjdump failed on {obj}: {proc.stderr.strip()[-500:]}")
    functions: dict[str, list[str]] = {}
    current = None
    for line in proc.stdout.splitlines():
        header = re.match(r"\s*Function : (\S+)", line)
        if header:
            # an anonymous namespace is mangled with a hash of the source's path: the same kernel in two trees
            current = functions.setdefault(re.sub(r"\d+_GLOBAL__N__\w+?_cu_[0-9a-f]+", "_GLOBAL__N_", header.group(1)), [])
        elif current is not None and re.match(r"\s+/\*[0-9a-f]+\*/", line):
            current.append(re.sub(r"/\*[0-9a-f]+\*/", "", line).split(";")[0].strip())
    return functions


def compile_tree(compile_cuda, nvcc: str, root: str, parts: list[str], out_dir: str) -> dict[str, tuple[str, str]]:
    """Source -> (object file, ptxas log) for the matching kernel sources of the tree at `root`."""
    setup, command = compile_cuda.compile_setup(nvcc, os.path.join(out_dir, "stub"), root)
    results = {}
    for src in setup.kernel_sources():
        if not src.endswith(".cu") or not any(part in src for part in parts):
            continue
        obj = os.path.join(out_dir, src.replace("/", "_") + ".o")
        proc = subprocess.run(command(src, "c++17", obj), cwd=root, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{root}: {src} did not compile:\n{proc.stderr[-3000:]}")
        results[src] = (obj, proc.stderr)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev")
    parser.add_argument("parts", nargs="*", default=["csrc/sm90/decode/dense/"])
    args = parser.parse_args()

    compile_cuda = load_compile_cuda()
    nvcc = compile_cuda.find_nvcc()
    cuobjdump = find_cuobjdump(nvcc) if nvcc else None
    if nvcc is None or cuobjdump is None:
        print("sass_compare: needs nvcc and cuobjdump (see the docstring)")
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        base_tree = os.path.join(tmp, "base")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "-q", "--detach", base_tree, args.rev], check=True)
        try:
            ours = compile_tree(compile_cuda, nvcc, ROOT, args.parts, os.path.join(tmp, "ours"))
            base = compile_tree(compile_cuda, nvcc, base_tree, args.parts, os.path.join(tmp, "rev"))
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", base_tree], check=False)
        all_identical = True
        for src in sorted(set(ours) | set(base)):
            if src not in ours or src not in base:
                print(f"{src}: only in {'the working tree' if src in ours else args.rev}")
                all_identical = False
                continue
            new, old = sass_by_function(cuobjdump, ours[src][0]), sass_by_function(cuobjdump, base[src][0])
            names, counts = [], []
            for name in sorted(set(new) | set(old)):
                a, b = old.get(name, []), new.get(name, [])
                if a != b:
                    names.append(name)
                    counts.append(sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b)))
            differing = [f"{name} ({count} lines)" for name, count in zip(readable(names), counts)]
            all_identical &= not differing
            print(f"{src}: " + ("identical" if not differing else "differs in " + ", ".join(differing)))
            for line in ours[src][1].splitlines():
                if any(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", line)):
                    print(f"    ptxas (working tree): {line.strip()}")
    return 0 if all_identical else 1


if __name__ == "__main__":
    sys.exit(main())
