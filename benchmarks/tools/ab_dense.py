"""Times the dense decode op on the compute-bound shapes (and two memory-bound ones) under CUDA-graph
replay and prints one line: `label us... TFLOPS...`. Used to compare kernel variants built one after
another in the same device session (benchmarks/tools/ab.sh dense ...), where the run-to-run spread is
smaller than across sessions.

Usage: python benchmarks/tools/ab_dense.py LABEL [--sequential]   (--sequential: in-order block tables)

With --whole-call: µs of the whole call instead, on the memory-bound shapes where start-up and the combine weigh
most (and one compute shape), as `b<b>s<s_k>h<h_q> ours/FP8/FlashMLA`: FP8 is ours over the per-tensor e4m3
cache (as bench_decode.py's FP8 rows), FlashMLA only when `flash_mla` is importable.

With --fp8-tiles: `b<b>q<s_q>s<s_k>h<h_q> BF16/FP8(BF16 / FP8)` (whole call, µs) on the FP8 memory-bound shapes by
query rows per kv head: 64 (h_q 64, and s_q 2 x h_q 32), 32 and 16, and one compute shape.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import torch_flashmla  # noqa: E402
from bench_decode import COMPUTE, D_QK, D_V, decode_bytes, decode_flops, flashmla_fn, fp8_row, inputs  # noqa: E402
from bench_timing import graph_time_us  # noqa: E402

SHAPES = COMPUTE + [(64, 1, 8192, 16), (128, 1, 32768, 64)]
FP8_TILE_SHAPES = [(64, 1, 8192, 64), (128, 1, 8192, 64), (64, 1, 32768, 64), (128, 1, 32768, 64), (64, 2, 8192, 32),
                   (64, 1, 8192, 16), (128, 1, 8192, 32), (128, 1, 4096, 128)]
WHOLE_CALL_SHAPES = [(64, 1, 8192, 16), (64, 1, 8192, 32), (64, 1, 8192, 64), (128, 1, 8192, 32), (128, 1, 8192, 64),
                     (64, 1, 32768, 16), (128, 1, 4096, 128)]


def timed_cells(shapes, sequential, cell):
    """For each shape: our op timed under graph replay, then cell(shape, inputs, plan, our µs) -> the printed cell."""
    cells = []
    for b, s_q, s_k, h_q in shapes:
        q, cache, table, lens = inputs(b, s_q, s_k, h_q, sequential=sequential)
        meta, splits = torch_flashmla.get_mla_metadata(lens, s_q * h_q, 1, h_q)
        fn = lambda: torch.ops.flashmla.mla_decode(q, cache, table, lens, D_V, D_QK ** -0.5, False, meta, splits)  # noqa: E731
        us, _, _ = graph_time_us(fn)
        cells.append(cell((b, s_q, s_k, h_q), (q, cache, table, lens), (meta, splits), us))
        del q, cache, table, lens
        torch.cuda.empty_cache()
    return cells


def rate_cell(shape, tensors, plan, us):
    b, s_q, s_k, h_q = shape
    if h_q == 128:
        return f"{decode_flops(b, s_q, s_k, h_q) / us / 1e6:6.1f}"
    return f"{decode_bytes(b, s_q, s_k, h_q) / us / 1e3:6.0f}"


def whole_call_cell(shape, tensors, plan, us):
    b, s_q, s_k, h_q = shape
    q, cache, table, lens = tensors
    fp8_us = fp8_row(q, cache, table, lens, b, s_q, s_k, h_q, us)["fp8_us"]
    ref = flashmla_fn(q, cache, table, lens, h_q, s_q)
    fm_us = graph_time_us(ref)[0] if ref is not None else float("nan")
    return f"b{b}s{s_k}h{h_q} {us:.1f}/{fp8_us:.1f}/{fm_us:.1f}"


def fp8_ratio_cell(shape, tensors, plan, us):
    b, s_q, s_k, h_q = shape
    row = fp8_row(*tensors, b, s_q, s_k, h_q, us)
    return f"b{b}q{s_q}s{s_k}h{h_q} {us:.1f}/{row['fp8_us']:.1f}({row['fp8_ratio']:.2f})"


def main():
    label = sys.argv[1] if len(sys.argv) > 1 else "?"
    sequential = "--sequential" in sys.argv
    if sequential:
        label += "/seq"
    if "--fp8-tiles" in sys.argv:
        print(f"{label:10} " + " | ".join(timed_cells(FP8_TILE_SHAPES, sequential, fp8_ratio_cell)), flush=True)
        return
    if "--whole-call" in sys.argv:
        print(f"{label:10} " + " | ".join(timed_cells(WHOLE_CALL_SHAPES, sequential, whole_call_cell)), flush=True)
        return
    cells = timed_cells(SHAPES, sequential, rate_cell)
    tf = [float(c) for c in cells[:8]]
    print(f"{label:10} TFLOPS " + " ".join(cells[:8]) + f" | min {min(tf):.1f} >=500: {sum(t >= 500 for t in tf)}/8"
          + " | GB/s " + " ".join(cells[8:]), flush=True)


if __name__ == "__main__":
    main()
