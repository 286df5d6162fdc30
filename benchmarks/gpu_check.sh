#!/usr/bin/env bash
# On the H200 machine: build (SM90 kernels), run the GPU tests, run the benchmarks, print a short
# table last. Usage: benchmarks/gpu_check.sh [pytest -k expression] ; logs go to $OUT (or ./gpu_logs).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-gpu_logs}"; mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" FLASHMLA_BUILD_CUDA=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader | tee "$LOG/gpu.txt"
start=$(date +%s)
FLASHMLA_PTXAS_VERBOSE=1 python3 -m pip install -q --no-build-isolation --no-deps -e . > "$LOG/build.log" 2>&1 \
  || { tail -50 "$LOG/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
grep -A2 "Compiling entry function" "$LOG/build.log" | grep -E "entry function|registers" | sed 's/^ *//' > "$LOG/ptxas.txt" || true
python3 -m pytest -q -x -m cuda tests ${1:+-k "$1"} 2>&1 | tee "$LOG/pytest_cuda.log" | tail -25
for bench in benchmarks/bench_*.py; do
  [ -f "$bench" ] && python3 "$bench" 2>&1 | tee "$LOG/$(basename "$bench" .py).log" | tail -40
done
