"""Times the dense decode op on the compute-bound shapes (and two memory-bound ones) under CUDA-graph
replay and prints one line: `label us... TFLOPS...`. Used to compare kernel variants built one after
another in the same device session (benchmarks/tools/ab.sh dense ...), where the run-to-run spread is
smaller than across sessions.

Usage: python benchmarks/tools/ab_dense.py LABEL [--sequential]   (--sequential: in-order block tables)
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import torch_flashmla  # noqa: E402
from bench_decode import COMPUTE, D_QK, D_V, decode_bytes, decode_flops, inputs  # noqa: E402
from bench_timing import graph_time_us  # noqa: E402

SHAPES = COMPUTE + [(64, 1, 8192, 16), (128, 1, 32768, 64)]


def main():
    label = sys.argv[1] if len(sys.argv) > 1 else "?"
    sequential = "--sequential" in sys.argv
    if sequential:
        label += "/seq"
    cells = []
    for b, s_q, s_k, h_q in SHAPES:
        q, cache, table, lens = inputs(b, s_q, s_k, h_q, sequential=sequential)
        meta, splits = torch_flashmla.get_mla_metadata(lens, s_q * h_q, 1, h_q)
        fn = lambda: torch.ops.flashmla.mla_decode(q, cache, table, lens, D_V, D_QK ** -0.5, False, meta, splits)  # noqa: E731
        us, _, _ = graph_time_us(fn)
        if h_q == 128:
            cells.append(f"{decode_flops(b, s_q, s_k, h_q) / us / 1e6:6.1f}")
        else:
            cells.append(f"{decode_bytes(b, s_q, s_k, h_q) / us / 1e3:6.0f}")
        del q, cache, table, lens
        torch.cuda.empty_cache()
    tf = [float(c) for c in cells[:8]]
    print(f"{label:10} TFLOPS " + " ".join(cells[:8]) + f" | min {min(tf):.1f} >=500: {sum(t >= 500 for t in tf)}/8"
          + " | GB/s " + " ".join(cells[8:]), flush=True)


if __name__ == "__main__":
    main()
