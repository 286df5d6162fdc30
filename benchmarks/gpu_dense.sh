#!/usr/bin/env bash
# On the H200: build the extension, run the dense-decode GPU tests and the decode benchmark.
# Logs under $OUT (or ./gpu_logs). Usage: benchmarks/gpu_dense.sh [pytest -k expression]
# FLASHMLA_DENSE_VARIANTS="0 1" (kernel schedules to test), FLASHMLA_BENCH_VARIANTS (to time; default: the same).
# If the package build fails (e.g. someone else's work-in-progress source), falls back to a JIT
# build of csrc/ops.cpp + the dense-decode and KV-cache sources only.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-gpu_logs}"; mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" FLASHMLA_BUILD_CUDA=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
start=$(date +%s)
if ! FLASHMLA_PTXAS_VERBOSE=1 python3 -m pip install -q --no-build-isolation --no-deps -e . > "$LOG/build.log" 2>&1; then
  echo "package build failed:"; grep -E "error" "$LOG/build.log" | head -10
  echo "falling back to a JIT build of the dense-decode sources"
  python3 - > "$LOG/build_jit.log" 2>&1 <<'PY' || { tail -30 "$LOG/build_jit.log"; exit 1; }
import glob, shutil, sysconfig, torch
from torch.utils.cpp_extension import load
src = ["csrc/ops.cpp", "csrc/api/dense_decode_cuda.cpp", "csrc/api/kv_cache_cuda.cpp"] + sorted(
    glob.glob("csrc/common/*.cu") + glob.glob("csrc/sm90/decode/dense/*.cu") + glob.glob("csrc/kv_cache/*.cu"))
flags = ["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr", "--use_fast_math",
         "-lineinfo", "-DNDEBUG", "-Xptxas=-v", "-DFLASHMLA_WITH_CUDA=1"]
import os; os.makedirs("/tmp/jit", exist_ok=True)
load(name="_C", sources=src, extra_include_paths=["csrc"], extra_cflags=["-O3", "-DFLASHMLA_WITH_CUDA=1"],
     extra_cuda_cflags=flags, build_directory="/tmp/jit", is_python_module=False, verbose=True)
shutil.copy("/tmp/jit/_C.so", "torch_flashmla/_C" + sysconfig.get_config_var("EXT_SUFFIX"))
PY
  ln -sfn ../meta torch_flashmla/meta
  cp "$LOG/build_jit.log" "$LOG/build.log"
fi
echo "build: $(( $(date +%s) - start )) s"
grep -A2 "Compiling entry function.*dense_decode" "$LOG/build.log" | grep -E "registers|spill" | head -4
VARIANTS="${FLASHMLA_DENSE_VARIANTS:-0 1}"
for v in $VARIANTS; do
  FLASHMLA_DENSE_VARIANT=$v timeout 300 python3 -m pytest -q --maxfail=30 --tb=line -p no:cacheprovider \
    tests/test_dense_decode_cuda.py ${1:+-k "$1"} > "$LOG/pytest_v$v.log" 2>&1
  echo "variant $v: pytest rc=$? $(tail -1 "$LOG/pytest_v$v.log")"
  grep -E "^E " "$LOG/pytest_v$v.log" | head -8
done
# The project's other GPU tests that go through the public ops (default schedule).
timeout 150 python3 -m pytest -q --tb=line -p no:cacheprovider tests/test_gpu_ops.py tests/test_decode_graphs.py \
  > "$LOG/pytest_ops.log" 2>&1
echo "test_gpu_ops + test_decode_graphs: rc=$? $(tail -1 "$LOG/pytest_ops.log")"; grep -E "^E |FAILED" "$LOG/pytest_ops.log" | head -6
BENCH_VARIANTS="${FLASHMLA_BENCH_VARIANTS:-$VARIANTS}"
for v in $BENCH_VARIANTS; do
  FLASHMLA_DENSE_VARIANT=$v timeout 200 python3 benchmarks/bench_decode.py > "$LOG/bench_v$v.log" 2>&1
done
for v in $BENCH_VARIANTS; do echo "== variant $v"; tail -24 "$LOG/bench_v$v.log"; done
