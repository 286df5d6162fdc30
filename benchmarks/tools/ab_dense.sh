#!/usr/bin/env bash
# A/B of dense-kernel variants on the H200, all in one device session: for each argument (a patch
# applied on top of the working tree, or "base"), build, optionally run the dense tests, and time it
# with ab_dense.py (AB_SEQUENTIAL=1: also with in-order block tables); "test:" before a patch also runs
# the dense GPU tests. Lines "LABEL TFLOPS ..." last.
# Usage: benchmarks/tools/ab_dense.sh base test:benchmarks/variants/x.patch ... base
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT="${OUT:-gpu_logs}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" FLASHMLA_BUILD_CUDA=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv,noheader
for arg in "$@"; do
  run_tests=0; patch="$arg"
  [[ "$arg" == test:* ]] && { run_tests=1; patch="${arg#test:}"; }
  label=$(basename "$patch" .patch)
  [ "$patch" != base ] && { git apply "$patch" || { echo "$label: patch does not apply"; continue; }; }
  start=$(date +%s)
  if python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build_$label.log" 2>&1; then
    echo "$label: build $(( $(date +%s) - start )) s"
    if [ $run_tests = 1 ]; then
      python3 -m pytest -q -x -p no:cacheprovider tests/test_dense_decode_cuda.py tests/test_decode_graphs.py \
        > "$OUT/test_$label.log" 2>&1; echo "$label: tests rc=$? $(tail -1 "$OUT/test_$label.log")"
    fi
    python3 benchmarks/tools/ab_dense.py "$label" | tee -a "$OUT/ab.txt"
    [ -n "${AB_SEQUENTIAL:-}" ] && python3 benchmarks/tools/ab_dense.py "$label" --sequential | tee -a "$OUT/ab.txt"
  else
    echo "$label: build failed"; grep -E "error" "$OUT/build_$label.log" | head -5
  fi
  [ "$patch" != base ] && git apply -R "$patch"
done
echo "== summary"; cat "$OUT/ab.txt"
