#!/usr/bin/env bash
# A/B of kernel builds on the GPU machine with the extension builds kept side by side: builds the working tree
# ("main") and each variant (a patch applied on top of it, reverted after its build), optionally runs GPU tests on
# each variant, then runs the timing command once per build in the order main / V1 / V2 ... and again (PASSES
# times, default 2), swapping the built library in place between runs, so that every build is timed in the same
# state of the machine. The timing command gets the build's label as its last argument.
# Usage: benchmarks/tools/ab_swap.sh "TIMING COMMAND" PATCH...
#   e.g. benchmarks/tools/ab_swap.sh "python3 benchmarks/tools/ab_whole_call.py --set long" benchmarks/variants/x.patch
#   TESTS="tests/test_dense_decode_fp8_cuda.py tests/test_decode_graphs.py" runs those tests on every variant build.
# Lines of the timing command go to stdout and to $OUT/ab.txt (OUT defaults to gpu_logs).
set -uo pipefail
cd "$(dirname "$0")/../.."
timing="$1"; shift
export OUT="${OUT:-gpu_logs}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" FLASHMLA_BUILD_CUDA=1
keep="$(mktemp -d)"
build() {  # build the tree as it is now; keep the library as $keep/$1.so
  local start; start=$(date +%s)
  if ! python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build_$1.log" 2>&1; then
    echo "$1: build failed"; grep -E "error" "$OUT/build_$1.log" | head -5; return 1
  fi
  cp torch_flashmla/_C*.so "$keep/$1.so"; echo "$1: build $(( $(date +%s) - start )) s"
}
build main || exit 1
labels=(main)
for patch in "$@"; do
  label=$(basename "$patch" .patch)
  git apply "$patch" || { echo "$label: patch does not apply"; continue; }
  if build "$label"; then
    labels+=("$label")
    if [ -n "${TESTS:-}" ]; then
      timeout 300 python3 -m pytest -q -x -p no:cacheprovider -m cuda $TESTS > "$OUT/test_$label.log" 2>&1
      echo "$label: tests rc=$? $(tail -1 "$OUT/test_$label.log")"
    fi
  fi
  git apply -R "$patch"
done
for _ in $(seq "${PASSES:-2}"); do
  for label in "${labels[@]}"; do
    cp "$keep/$label.so" torch_flashmla/_C*.so
    $timing "$label" 2>&1 | grep -v -i warn | tee -a "$OUT/ab.txt"
  done
done
cp "$keep/main.so" torch_flashmla/_C*.so
rm -rf "$keep"
