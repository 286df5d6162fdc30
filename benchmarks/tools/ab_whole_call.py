"""Whole dense decode call (attention + combine, plan made beforehand) per shape, for A/B runs of kernel builds
(development tool; benchmarks/tools/ab_swap.sh runs it once per build, alternating).

Prints one line: `LABEL b<b>[q<s_q>]s<s_k>h<h_q> FP8 us (one call us, MHz) [BF16 us] | ...` where FP8 us is the
median under CUDA-graph replay (bench_timing.graph_time_us, 30 calls back to back: the H200 at its power cap on the
long rows), one call the median of single calls after idle (bench_timing.single_call_us: the full clock), MHz the
SM clock read after the replays. The inputs and the FP8 call are bench_decode.py's (`inputs`, `fp8_call`).

Usage: python3 benchmarks/tools/ab_whole_call.py LABEL [--set tiles|long|reqlen] [--bf16] [--l2] [--bf16-only]
  --set tiles  (default) eleven FP8 shapes by kernel and query rows per kv head (64-row: h_q 64, s_q 2 x h_q 32,
               h_q 128; 32-row: h_q 16 / 32), and two shapes of many short requests (b512 s1024, b1024 s512, h_q 64)
  --set long   the 32-row kernel's rows with s_k up to 32768 (b128 s32768 h_q 16 / 32 ...)
  --set reqlen the same cached tokens (b x s_k = 524,288) in requests of 512 to 8192 tokens, h_q 64 and 16
  --bf16       also the BF16 call of each shape;  --bf16-only: only the BF16 call
  --l2         cache of 16 pages (L2-resident), as bench_decode.py's l2diag rows
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from bench_decode import bf16_call, fp8_call, inputs  # noqa: E402
from bench_timing import graph_time_us, single_call_us, sm_clock_mhz  # noqa: E402

SETS = {
    "tiles": [(64, 1, 8192, 64), (128, 1, 8192, 64), (64, 1, 32768, 64), (128, 1, 32768, 64), (64, 2, 8192, 32),
              (64, 1, 8192, 16), (64, 1, 8192, 32), (128, 1, 8192, 32), (64, 1, 32768, 16), (128, 1, 4096, 128),
              (128, 2, 8192, 128), (512, 1, 1024, 64), (1024, 1, 512, 64)],
    # the same 524,288 cached tokens in requests of 512 .. 8192 tokens: what a request costs beyond its chunks
    "reqlen": [(1024, 1, 512, 64), (512, 1, 1024, 64), (256, 1, 2048, 64), (128, 1, 4096, 64), (64, 1, 8192, 64),
               (1024, 1, 512, 16), (256, 1, 2048, 16), (64, 1, 8192, 16)],
    "long": [(128, 1, 32768, 16), (128, 1, 32768, 32), (64, 1, 32768, 16), (128, 1, 16384, 16), (64, 1, 8192, 16),
             (128, 1, 8192, 32)],
}


def cell(shape, with_fp8, with_bf16, l2_pages):
    b, s_q, s_k, h_q = shape
    q, cache, table, lens = inputs(b, s_q, s_k, h_q, l2_pages=l2_pages)
    name = f"b{b}{f'q{s_q}' if s_q > 1 else ''}s{s_k}h{h_q}"
    parts = []
    if with_fp8:
        fn = fp8_call(q, cache, table, lens)
        us = graph_time_us(fn)[0]
        mhz = sm_clock_mhz()
        parts.append(f"{us:.1f} ({single_call_us(fn, idle_s=0.3):.1f}, {mhz})")
    if with_bf16:
        parts.append(f"bf16 {graph_time_us(bf16_call(q, cache, table, lens))[0]:.1f}")
    return f"{name} " + " ".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("label")
    ap.add_argument("--set", choices=sorted(SETS), default="tiles")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--bf16-only", action="store_true")
    ap.add_argument("--l2", action="store_true")
    args = ap.parse_args()
    cells = []
    for shape in SETS[args.set]:
        cells.append(cell(shape, not args.bf16_only, args.bf16 or args.bf16_only, 16 if args.l2 else 0))
        torch.cuda.empty_cache()
    print(f"{args.label:8} " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
