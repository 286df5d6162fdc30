"""What sets the FP8 large-page kernel's chunk period: FP8 whole call (µs) of the 64-row shapes, with the cache in
DRAM and L2-resident (`bench_decode.inputs(..., l2_pages=16)`), for builds that leave one stage out (development
tool; those builds give wrong results and never go into the library):

  benchmarks/tools/fp8_large_pages_no_pv.patch       the product warpgroups issue no PV wgmma (V^T fragments still
                                                     loaded, every barrier kept)
  benchmarks/tools/fp8_large_pages_no_softmax.patch  WG0 writes P = 1 and factors 1 without the softmax arithmetic
  benchmarks/tools/fp8_large_pages_no_qk.patch       WG0 waits for the stage but issues no QK (S = 0)
  benchmarks/tools/fp8_large_pages_no_v_fragments.patch  the product warpgroups skip the V^T fragment loads (A =
                                                     constants): 32 KB less shared-memory reading per chunk
  benchmarks/tools/fp8_large_pages_pv_twice.patch    the PV product issued twice: its tensor-core work and its
                                                     32 KB of shared-memory operand reads doubled

Usage (on the GPU machine, after `pip install --no-build-isolation --no-deps -e .`):
  python3 benchmarks/tools/fp8_large_pages_probe.py LABEL
  git apply PATCH && python3 setup.py build_ext --inplace && python3 benchmarks/tools/fp8_large_pages_probe.py LABEL
  git apply -R PATCH
Prints one line: `AB LABEL shape µs | ...` (L2 = L2-resident cache). Results: benchmarks/NOTES_fp8_decode.md,
session 25.

  python3 benchmarks/tools/fp8_large_pages_probe.py --calls B S_Q S_K H_Q [L2_PAGES]
six eager FP8 calls of that shape (cache in L2_PAGES pages when given), for Nsight Compute:
  ncu --clock-control none --kernel-name regex:dense_decode_fp8_large_pages_kernel --launch-skip 3 --launch-count 1
      --section SpeedOfLight --section WarpStateStats --section SourceCounters -o REPORT python3 ... --calls ...
  ncu --import REPORT.ncu-rep --page source --csv --print-source sass | gzip > CSV.gz
  python3 benchmarks/tools/ncu_source_report.py CSV.gz \
      --barriers kv_full=0x38620,wg2_done=0x38640,p_full=0x38660,p_empty=0x38668
(barrier offsets of the tree at 6f02d23: `kOffBar` of dense_decode_fp8.cuh is 0x38620 from the 1024-aligned base;
the roles print as "dec 104" (WG0) and "inc 200" (the product warpgroups).)
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from bench_decode import fp8_call, fp8_row, inputs  # noqa: E402

SHAPES = [((64, 1, 8192, 64), 0), ((128, 1, 8192, 64), 0), ((128, 1, 32768, 64), 0), ((64, 2, 8192, 32), 0),
          ((64, 1, 8192, 64), 16), ((128, 1, 8192, 64), 16)]


def eager_calls(b: int, s_q: int, s_k: int, h_q: int, l2_pages: int = 0) -> None:
    q, cache, table, lens = inputs(b, s_q, s_k, h_q, l2_pages=l2_pages)
    call = fp8_call(q, cache, table, lens)
    for _ in range(6):
        call()
    torch.cuda.synchronize()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--calls":
        eager_calls(*(int(x) for x in sys.argv[2:]))
        return
    cells = []
    for (b, s_q, s_k, h_q), l2_pages in SHAPES:
        q, cache, table, lens = inputs(b, s_q, s_k, h_q, l2_pages=l2_pages)
        row = fp8_row(q, cache, table, lens, b, s_q, s_k, h_q, float("nan"))
        cells.append(f"{'L2' if l2_pages else ''}b{b}q{s_q}s{s_k}h{h_q} {row['fp8_us']:.1f}")
        del q, cache, table, lens
        torch.cuda.empty_cache()
    print("AB", sys.argv[1] if len(sys.argv) > 1 else "build", " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
