"""Times the sparse FP8 decode op on the four shapes of bench_sparse_decode.CASES under CUDA-graph
replay and prints one line: `label us... TFLOPS...`. Used to compare kernel variants built one after
another in the same device session (benchmarks/tools/ab.sh sparse ...).

Usage: python benchmarks/tools/ab_sparse.py LABEL [--quick]   (--quick: the two h_q=128 shapes)
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import torch_flashmla  # noqa: E402
from bench_sparse_decode import CASES, D_QK, make_cache, make_indices, make_q, plan, sparse_flops  # noqa: E402
from bench_timing import graph_time_us  # noqa: E402


def main():
    label = sys.argv[1] if len(sys.argv) > 1 else "?"
    cases = [c for c in CASES if c[1] == 128] if "--quick" in sys.argv else CASES
    cells = []
    cache_key, cache, table = None, None, None
    for b, h_q, s_q, s_k, topk in cases:
        if cache_key != (b, s_k):
            cache = table = None
            torch.cuda.empty_cache()
            cache, table = make_cache(b, s_k, "cuda")
            cache_key = (b, s_k)
        indices = make_indices(table, s_k, s_q, topk)
        q = make_q(b, s_q, h_q, "cuda")
        meta, splits = plan(b, s_q, h_q, topk, "cuda")
        fn = lambda: torch_flashmla.sparse_mla_decode(q, cache, indices, meta, splits, softmax_scale=D_QK ** -0.5)  # noqa: E731
        us, _, _ = graph_time_us(fn, iters=10 if topk > 4096 else 30)
        cells.append((b, h_q, topk, us, sparse_flops(b, s_q, h_q, topk) / us / 1e6))
    print(f"{label:16} " + "  ".join(f"b{b}h{h}k{k}: {us:7.1f} us {tf:5.1f} TF" for b, h, k, us, tf in cells), flush=True)


if __name__ == "__main__":
    main()
