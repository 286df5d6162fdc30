#!/usr/bin/env bash
# A/B of kernel variants on the H200, all in one device session: for each argument (a patch applied
# on top of the working tree, or "base"), build, optionally run the kernel's GPU tests, and time it
# with ab_dense.py / ab_sparse.py. "test:" before a patch also runs the tests. Lines "LABEL ..." last.
#   dense:  AB_SEQUENTIAL=1 also times with in-order block tables.
#   sparse: AB_QUICK=1 times only the two h_q=128 shapes.
# Usage: benchmarks/tools/ab.sh dense|sparse base test:path/to/x.patch ... base
set -uo pipefail
cd "$(dirname "$0")/../.."
kind="$1"; shift
case "$kind" in
  dense) tests="tests/test_dense_decode_cuda.py tests/test_decode_graphs.py" ;;
  sparse) tests="tests/test_sparse_decode_cuda.py" ;;
  *) echo "usage: $0 dense|sparse VARIANT..."; exit 2 ;;
esac
export OUT="${OUT:-gpu_logs}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" FLASHMLA_BUILD_CUDA=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv,noheader
time_variant() {
  if [ "$kind" = dense ]; then
    python3 benchmarks/tools/ab_dense.py "$1"
    [ -n "${AB_SEQUENTIAL:-}" ] && python3 benchmarks/tools/ab_dense.py "$1" --sequential
  else
    quick=""; [ -n "${AB_QUICK:-}" ] && quick="--quick"
    timeout 150 python3 benchmarks/tools/ab_sparse.py "$1" $quick || echo "$1: timing rc=$?"
  fi
}
for arg in "$@"; do
  run_tests=0; patch="$arg"
  [[ "$arg" == test:* ]] && { run_tests=1; patch="${arg#test:}"; }
  label=$(basename "$patch" .patch)
  [ "$patch" != base ] && { git apply "$patch" || { echo "$label: patch does not apply"; continue; }; }
  start=$(date +%s)
  if python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build_$label.log" 2>&1; then
    echo "$label: build $(( $(date +%s) - start )) s"
    if [ $run_tests = 1 ]; then
      timeout 150 python3 -m pytest -q -x -p no:cacheprovider $tests > "$OUT/test_$label.log" 2>&1
      echo "$label: tests rc=$? $(tail -1 "$OUT/test_$label.log")"
    fi
    time_variant "$label" 2>&1 | tee -a "$OUT/ab.txt"
  else
    echo "$label: build failed"; grep -E "error" "$OUT/build_$label.log" | head -5
  fi
  [ "$patch" != base ] && git apply -R "$patch"
done
echo "== summary"; cat "$OUT/ab.txt"
