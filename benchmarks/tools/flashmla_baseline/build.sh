#!/usr/bin/env bash
# Build deepseek-ai/FlashMLA @ 9241ae3 (SM90 kernels only) as an external benchmark baseline.
# Placed as <out>/build.sh by benchmarks/tools/flashmla_baseline/prepare.sh (default <out>: .flashmla).
#
#   bash .flashmla/build.sh                        # build in place (src/flash_mla/cuda*.so)
#   bash .flashmla/build.sh --use-prebuilt DIR     # reuse DIR/cuda*.so or DIR/flash_mla/cuda*.so, no build
#   bash .flashmla/build.sh --force                # rebuild even if a matching .so is present
#
# Afterwards:  export PYTHONPATH=<this dir>/src:$PYTHONPATH ; python3 -c "import flash_mla"
# Env: PYTHON (default python3), MAX_JOBS (default 16), NVCC_THREADS (default 2),
#      CUDA_HOME (default /usr/local/cuda), OUT (if set: the .so and build log are copied there).
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC="$HERE/src"
PY="${PYTHON:-python3}"
PREBUILT=""
FORCE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --use-prebuilt) PREBUILT="${2:?--use-prebuilt needs a DIR}"; shift 2 ;;
        --force) FORCE=1; shift ;;
        -h|--help) sed -n 2,11p "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export MAX_JOBS="${MAX_JOBS:-16}"
export NVCC_THREADS="${NVCC_THREADS:-2}"
export TORCH_CUDA_ARCH_LIST="9.0a"     # not used (setup.py passes -gencode itself), set for safety
export FLASH_MLA_DISABLE_SM100=1

torch_ver="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)" || { echo "build.sh: cannot import torch with $PY" >&2; exit 1; }
stamp="$SRC/flash_mla/.built_with_torch"

try_import() {
    ( cd / && PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c '
import torch, flash_mla, flash_mla.cuda as c
print("flash_mla OK:", c.__file__)
print("ops:", [n for n in dir(c) if not n.startswith("_")])' )
}

finish() {
    local so
    so="$(ls "$SRC"/flash_mla/cuda*.so 2>/dev/null | head -n1)"
    if [ -n "${OUT:-}" ] && [ -n "$so" ]; then
        mkdir -p "$OUT" && cp -f "$so" "$OUT/" && echo "copied $(basename "$so") ($(du -h "$so" | cut -f1)) to \$OUT/"
    fi
    echo
    echo "To use it:"
    echo "export PYTHONPATH=$SRC\${PYTHONPATH:+:\$PYTHONPATH}"
}

# ---- mode 1: prebuilt .so -------------------------------------------------------------
if [ -n "$PREBUILT" ]; then
    so="$(ls "$PREBUILT"/cuda*.so "$PREBUILT"/flash_mla/cuda*.so 2>/dev/null | head -n1)"
    if [ -z "$so" ]; then
        echo "build.sh: no cuda*.so in $PREBUILT or $PREBUILT/flash_mla; building from source instead" >&2
    else
        rm -f "$SRC"/flash_mla/cuda*.so
        cp -f "$so" "$SRC/flash_mla/"
        if try_import; then
            echo "$torch_ver" > "$stamp"
            echo "using prebuilt $so (torch $torch_ver), no build"
            finish; exit 0
        fi
        echo "build.sh: prebuilt $so does not import with torch $torch_ver; building from source" >&2
        rm -f "$SRC"/flash_mla/cuda*.so
    fi
fi

# ---- already built for this torch? -----------------------------------------------------
if [ "$FORCE" = 0 ] && ls "$SRC"/flash_mla/cuda*.so >/dev/null 2>&1 && [ "$(cat "$stamp" 2>/dev/null)" = "$torch_ver" ]; then
    if try_import; then echo "already built for torch $torch_ver (use --force to rebuild)"; finish; exit 0; fi
fi

# ---- unpack CUTLASS headers (submodule csrc/cutlass, include/ + tools/util/include/) ----------
if [ ! -f "$SRC/csrc/cutlass/include/cutlass/cutlass.h" ]; then
    cutlass_tgz="$(ls "$HERE"/cutlass-*-headers.tar.gz 2>/dev/null | head -n1)"
    [ -n "$cutlass_tgz" ] || { echo "build.sh: no cutlass-*-headers.tar.gz in $HERE (run prepare.sh)" >&2; exit 1; }
    mkdir -p "$SRC/csrc/cutlass"
    tar -xzf "$cutlass_tgz" -C "$SRC/csrc/cutlass" || { echo "build.sh: cannot unpack $cutlass_tgz" >&2; exit 1; }
fi

# ---- build ------------------------------------------------------------------------------
echo "FlashMLA SM90 build: torch $torch_ver, $("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*'), MAX_JOBS=$MAX_JOBS NVCC_THREADS=$NVCC_THREADS, $(nproc) cores"
# torch's BuildExtension runs `ninja` from PATH: add the interpreter's bin dir and pip ninja's dir.
export PATH="$("$PY" -c 'import os,sys; print(os.path.dirname(sys.executable))'):$PATH"
command -v ninja >/dev/null || { nd="$("$PY" -c 'import ninja; print(ninja.BIN_DIR)' 2>/dev/null)" && [ -n "$nd" ] && export PATH="$nd:$PATH"; }
command -v ninja >/dev/null || echo "build.sh: WARNING: ninja not found, torch will compile the 15 TUs one by one (slow)" >&2
rm -f "$SRC"/flash_mla/cuda*.so "$stamp"
log="$SRC/build.log"
t0=$(date +%s)
( cd "$SRC" && "$PY" setup.py build_ext --inplace ) > "$log" 2>&1
rc=$?
t1=$(date +%s)
[ -n "${OUT:-}" ] && mkdir -p "$OUT" && cp -f "$log" "$OUT/flashmla_build.log"
grep -E "error|warning: Registers are spilled|Local memory" "$log" | grep -v "^ *|" | head -n 40
if [ $rc -ne 0 ] || ! ls "$SRC"/flash_mla/cuda*.so >/dev/null 2>&1; then
    echo "---- build FAILED (rc=$rc) after $((t1-t0)) s; last lines of $log:"
    tail -n 60 "$log"
    exit 1
fi
echo "FlashMLA build time: $((t1-t0)) s"
echo "$torch_ver" > "$stamp"
if ! try_import; then echo "build.sh: built, but import failed" >&2; finish; exit 1; fi
finish
