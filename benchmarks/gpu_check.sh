#!/usr/bin/env bash
# On the H200 machine: build with the SM90 kernels, run every GPU test, the benchmarks, the demo and
# the example, and print the short tables last. Logs and JSON/PNG results go to $OUT (or ./gpu_logs).
# Usage: benchmarks/gpu_check.sh [pytest -k expression]
# With .flashmla prepared (benchmarks/tools/flashmla_baseline/prepare.sh) and carried, FlashMLA is built there
# (or taken from FLASHMLA_PREBUILT=DIR) and the benchmarks fill their FlashMLA columns.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-gpu_logs}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" FLASHMLA_BUILD_CUDA=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
start=$(date +%s)
FLASHMLA_PTXAS_VERBOSE=1 python3 -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { grep -E "error" "$OUT/build.log" | head -20; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
# FlashMLA as the benchmarks' baseline, when .flashmla was prepared (benchmarks/tools/flashmla_baseline/)
if [ -f .flashmla/build.sh ]; then
  if bash .flashmla/build.sh ${FLASHMLA_PREBUILT:+--use-prebuilt "$FLASHMLA_PREBUILT"} > "$OUT/flashmla_build.log" 2>&1; then
    export PYTHONPATH="$PWD/.flashmla/src${PYTHONPATH:+:$PYTHONPATH}"; echo "FlashMLA baseline: importable"
  else
    echo "FlashMLA baseline: build failed (see flashmla_build.log); benchmarks run without it"
  fi
fi
# ptxas resource report of every kernel (registers, spills, shared memory)
grep -E "Compiling entry function|registers|spill" "$OUT/build.log" | sed 's/^ptxas info *: //' > "$OUT/ptxas.txt"
timeout 420 python3 -m pytest -q -p no:cacheprovider --tb=short -m cuda tests ${1:+-k "$1"} > "$OUT/pytest_cuda.log" 2>&1
echo "GPU tests: rc=$? $(tail -1 "$OUT/pytest_cuda.log")"; grep -E "^FAILED|^ERROR" "$OUT/pytest_cuda.log" | head -20
timeout 120 python3 -m pytest -q -p no:cacheprovider tests > "$OUT/pytest_all.log" 2>&1
echo "all tests: rc=$? $(tail -1 "$OUT/pytest_all.log")"
python3 -m torch_flashmla > "$OUT/demo.log" 2>&1; echo "demo: rc=$?"
python3 examples/deepseek_mla_layer.py > "$OUT/example.log" 2>&1; echo "example: rc=$?"; tail -4 "$OUT/example.log"
for bench in benchmarks/bench_kv_cache.py benchmarks/bench_sparse_decode.py benchmarks/bench_sparse_prefill.py benchmarks/bench_mha_prefill.py benchmarks/bench_decode.py benchmarks/bench_decode_sq.py; do
  [ -f "$bench" ] || continue
  timeout 300 python3 "$bench" > "$OUT/$(basename "$bench" .py).log" 2>&1; echo "$bench: rc=$?"
done
cat "$OUT/demo.log"
for bench in bench_kv_cache bench_sparse_decode bench_sparse_prefill bench_mha_prefill bench_decode bench_decode_sq; do
  [ -f "$OUT/$bench.log" ] && { echo "== $bench"; tail -30 "$OUT/$bench.log"; }
done
