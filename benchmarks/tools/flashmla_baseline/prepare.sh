#!/usr/bin/env bash
# Assemble the build folder for the external FlashMLA (SM90) benchmark baseline.
#
#   bash benchmarks/tools/flashmla_baseline/prepare.sh [--flashmla-repo DIR] [--cutlass-repo DIR]
#                                                      [--commit REV] [--out DIR] [--force]
#
#   --flashmla-repo DIR  git repository of deepseek-ai/FlashMLA (default /work/.mirror/deepseek-ai+FlashMLA/repo)
#   --cutlass-repo DIR   git repository of NVIDIA/cutlass       (default /work/.mirror/NVIDIA+cutlass/repo)
#   --commit REV         FlashMLA commit to take the sources from (default 9241ae3; setup.py's source list
#                        and sm100_stubs.cpp are written for that commit)
#   --out DIR            output folder (default: .flashmla at the repository root)
#   --force              replace the sources, tarball and scripts of an existing output folder
#                        (other entries, e.g. prebuilt/, are kept; a previous build in src/ is removed)
#
# Output:
#   DIR/build.sh, DIR/README.md                  copied from this folder
#   DIR/src/                                     `git archive` of the FlashMLA paths below at REV,
#                                                plus setup.py and csrc/sm100_stubs.cpp from this folder
#   DIR/cutlass-<sha8>-headers.tar.gz            CUTLASS LICENSE.txt, include/, tools/util/include/ at the
#                                                commit FlashMLA REV records for its csrc/cutlass submodule
# Nothing from FlashMLA or CUTLASS is stored in this repository; DIR must stay git-ignored.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(git -C "$HERE" rev-parse --show-toplevel 2>/dev/null || (cd "$HERE/../../.." && pwd))"

FLASHMLA_REPO="/work/.mirror/deepseek-ai+FlashMLA/repo"
CUTLASS_REPO="/work/.mirror/NVIDIA+cutlass/repo"
COMMIT="9241ae3"
OUTDIR="$ROOT/.flashmla"
FORCE=0
MAX_MIB=30

while [ $# -gt 0 ]; do
    case "$1" in
        --flashmla-repo) FLASHMLA_REPO="${2:?$1 needs a DIR}"; shift 2 ;;
        --cutlass-repo)  CUTLASS_REPO="${2:?$1 needs a DIR}"; shift 2 ;;
        --commit)        COMMIT="${2:?$1 needs a REV}"; shift 2 ;;
        --out)           OUTDIR="${2:?$1 needs a DIR}"; shift 2 ;;
        --force)         FORCE=1; shift ;;
        -h|--help)       sed -n 2,20p "$0"; exit 0 ;;
        *) echo "prepare.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

die() { echo "prepare.sh: $*" >&2; exit 1; }

# ---- inputs --------------------------------------------------------------------------------
git -C "$FLASHMLA_REPO" rev-parse --git-dir >/dev/null 2>&1 || die "not a git repository: $FLASHMLA_REPO"
git -C "$CUTLASS_REPO" rev-parse --git-dir >/dev/null 2>&1 || die "not a git repository: $CUTLASS_REPO"
FM_SHA="$(git -C "$FLASHMLA_REPO" rev-parse --verify -q "$COMMIT^{commit}")" || die "no commit $COMMIT in $FLASHMLA_REPO"

# The CUTLASS commit is the gitlink FlashMLA records for csrc/cutlass ("160000 commit <sha>\tcsrc/cutlass").
read -r cl_mode cl_type CUTLASS_SHA _ < <(git -C "$FLASHMLA_REPO" ls-tree "$FM_SHA" csrc/cutlass) || true
[ "${cl_mode:-}" = 160000 ] && [ "${cl_type:-}" = commit ] || die "$COMMIT has no csrc/cutlass submodule entry"
git -C "$CUTLASS_REPO" cat-file -e "$CUTLASS_SHA^{commit}" 2>/dev/null \
    || die "CUTLASS commit $CUTLASS_SHA (recorded by FlashMLA $COMMIT) is not in $CUTLASS_REPO"

# FlashMLA paths: python package, LICENSE, the SM90/common sources, and only the SM100 declaration
# headers that csrc/api/*.h include (taken from the #include lines of sm100_stubs.cpp).
mapfile -t SM100_HEADERS < <(sed -n 's|^#include "\(sm100/[^"]*\)".*|csrc/\1|p' "$HERE/sm100_stubs.cpp")
[ "${#SM100_HEADERS[@]}" -gt 0 ] || die "no sm100/ includes found in $HERE/sm100_stubs.cpp"
FM_PATHS=(LICENSE flash_mla csrc/api csrc/kerutils csrc/sm90 csrc/smxx
          csrc/params.h csrc/utils.h csrc/defines.h "${SM100_HEADERS[@]}")
for p in "${FM_PATHS[@]}"; do
    git -C "$FLASHMLA_REPO" cat-file -e "$FM_SHA:$p" 2>/dev/null || die "$p is missing at FlashMLA $COMMIT"
done
CUTLASS_PATHS=(LICENSE.txt include tools/util/include)
for p in "${CUTLASS_PATHS[@]}"; do
    git -C "$CUTLASS_REPO" cat-file -e "$CUTLASS_SHA:$p" 2>/dev/null || die "$p is missing at CUTLASS $CUTLASS_SHA"
done

# ---- output folder ------------------------------------------------------------------------
mkdir -p "$(dirname "$OUTDIR")"
OUTDIR="$(cd "$(dirname "$OUTDIR")" && pwd)/$(basename "$OUTDIR")"
if [ -e "$OUTDIR" ] && [ -n "$(ls -A "$OUTDIR" 2>/dev/null)" ] && [ "$FORCE" = 0 ]; then
    die "$OUTDIR exists and is not empty (use --force to replace its sources, tarball and scripts)"
fi

STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/src"

git -C "$FLASHMLA_REPO" archive --format=tar "$FM_SHA" "${FM_PATHS[@]}" | tar -x -C "$STAGE/src"
want="$(git -C "$FLASHMLA_REPO" ls-tree -r --name-only "$FM_SHA" "${FM_PATHS[@]}" | sort)"
have="$(cd "$STAGE/src" && find . -type f | sed 's|^\./||' | sort)"
[ "$want" = "$have" ] || die "git archive of FlashMLA $COMMIT is incomplete"
install -m 644 "$HERE/setup.py" "$STAGE/src/setup.py"
install -m 644 "$HERE/sm100_stubs.cpp" "$STAGE/src/csrc/sm100_stubs.cpp"
install -m 755 "$HERE/build.sh" "$STAGE/build.sh"
install -m 644 "$HERE/README.md" "$STAGE/README.md"

# A partial mirror may lack blobs outside the requested paths; git archive then reports them
# ("invalid object ...") but still writes the requested paths, so its messages are kept aside and
# the tarball is checked file by file against the tree instead.
TGZ="cutlass-${CUTLASS_SHA:0:8}-headers.tar.gz"
git -C "$CUTLASS_REPO" archive --format=tar "$CUTLASS_SHA" "${CUTLASS_PATHS[@]}" 2>"$STAGE/cutlass_archive.err" \
    | gzip -9 -n > "$STAGE/$TGZ" || { cat "$STAGE/cutlass_archive.err" >&2; die "git archive of CUTLASS failed"; }
want="$(git -C "$CUTLASS_REPO" ls-tree -r --name-only "$CUTLASS_SHA" "${CUTLASS_PATHS[@]}" | sort)"
have="$(tar -tzf "$STAGE/$TGZ" | grep -v '/$' | sort)" || die "cannot read $TGZ"
if [ "$want" != "$have" ]; then
    cat "$STAGE/cutlass_archive.err" >&2
    die "$TGZ does not hold exactly the $(wc -l <<<"$want") files of ${CUTLASS_PATHS[*]} at $CUTLASS_SHA"
fi
grep -qx 'include/cutlass/cutlass.h' <<<"$have" || die "$TGZ lacks include/cutlass/cutlass.h"
[ -s "$STAGE/cutlass_archive.err" ] && echo "note: git archive reported $(wc -l < "$STAGE/cutlass_archive.err") unreadable object(s) outside ${CUTLASS_PATHS[*]} (partial mirror); the tarball is complete"

if [ -e "$OUTDIR" ]; then
    rm -rf "$OUTDIR/src" "$OUTDIR/build.sh" "$OUTDIR/README.md" "$OUTDIR"/cutlass-*-headers.tar.gz
else
    mkdir -p "$OUTDIR"
fi
mv "$STAGE/src" "$STAGE/build.sh" "$STAGE/README.md" "$STAGE/$TGZ" "$OUTDIR/"

# ---- report -------------------------------------------------------------------------------
kib="$(du -sk "$OUTDIR" | cut -f1)"
echo "FlashMLA $FM_SHA ($(git -C "$FLASHMLA_REPO" log -1 --format=%s "$FM_SHA"))"
echo "CUTLASS  $CUTLASS_SHA (submodule csrc/cutlass of that commit) -> $TGZ"
echo "wrote $OUTDIR: $(find "$OUTDIR/src" -type f | wc -l) source files, size $(du -sh "$OUTDIR" | cut -f1) (${kib} KiB)"
[ "$kib" -lt $((MAX_MIB * 1024)) ] || die "$OUTDIR is ${kib} KiB, over the ${MAX_MIB} MiB limit (it is carried to the GPU machine)"
[ "${FM_SHA:0:7}" = 9241ae3 ] || echo "NOTE: setup.py's source list and sm100_stubs.cpp were written for FlashMLA 9241ae3; check them against $COMMIT."

# The folder must never be committed: make sure git ignores it.
rel=""
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    rel="$(realpath --relative-to="$ROOT" "$OUTDIR")"
    case "$rel" in ..|../*|.) rel="" ;; esac
fi
if [ -n "$rel" ]; then
    if git -C "$ROOT" check-ignore -q "$rel/"; then
        echo "$rel/ is git-ignored (keep it that way: it holds FlashMLA and CUTLASS sources)"
    else
        exclude="$(git -C "$ROOT" rev-parse --git-path info/exclude)"
        case "$exclude" in /*) ;; *) exclude="$ROOT/$exclude" ;; esac
        mkdir -p "$(dirname "$exclude")"
        echo "/$rel/" >> "$exclude"
        echo "added /$rel/ to $exclude: the folder holds FlashMLA and CUTLASS sources and must never be committed"
    fi
else
    echo "REMINDER: $OUTDIR holds FlashMLA and CUTLASS sources; inside a checkout it must be git-ignored"
    echo "          ('/.flashmla/' in .git/info/exclude for the default location)."
fi
echo
echo "Next, on the GPU machine (carry [\"$(basename "$OUTDIR")\"] when it is at the repository root):"
echo "    bash $(basename "$OUTDIR")/build.sh          # or: bash $(basename "$OUTDIR")/build.sh --use-prebuilt DIR"
