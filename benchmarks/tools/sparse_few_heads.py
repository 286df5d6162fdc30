"""Few-head sparse decode (tensor-parallel head counts) against the same call at 64 heads, one run.

V3.2 cache, b 128, s_q 2, topk 2048 (the first row of bench_sparse_decode.py): op us (kernel + combine)
under CUDA-graph replay for h_q 8, 16, 32 and 64, and the ratio 64-head us / h_q us (1.0: a few-head call
costs what 64 heads cost).

Run on the GPU machine: python benchmarks/tools/sparse_few_heads.py
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch_flashmla  # noqa: E402
from bench_sparse_decode import D_QK, make_cache, make_indices, make_q, plan, time_us  # noqa: E402

B, S_Q, S_K, TOPK = 128, 2, 32768, 2048
HEADS = (8, 16, 32, 64)


def main() -> int:
    dev = torch.device("cuda")
    cache, table = make_cache(B, S_K, dev)
    indices = make_indices(table, S_K, S_Q, TOPK)
    times = {}
    for h_q in HEADS:
        q = make_q(B, S_Q, h_q, dev)
        meta, splits = plan(B, S_Q, h_q, TOPK, dev)
        times[h_q] = time_us(lambda: torch_flashmla.sparse_mla_decode(q, cache, indices, meta, splits,
                                                                      softmax_scale=D_QK ** -0.5), True)[0]
    print(f"b {B}, s_q {S_Q}, topk {TOPK} (V3.2 cache): op us under CUDA-graph replay")
    print(f"{'h_q':>4} {'op us':>9} {'64-head us / this':>18}")
    for h_q in HEADS:
        print(f"{h_q:4d} {times[h_q]:9.1f} {times[64] / times[h_q]:18.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
