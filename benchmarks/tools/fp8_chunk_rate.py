"""The FP8 dense call's time per chunk with the cache in DRAM and with an L2-resident cache (every block-table
entry inside 256 pages: inputs(l2_pages=...) of bench_decode.py, a diagnostic, not a workload), which tells a
kernel bound by its own chunk period from one bound by DRAM.

Prints per shape: `b<b>q<s_q>s<s_k>h<h_q> DRAM us (us per chunk) / L2 us (us per chunk)`, where chunks = the
64-token chunks of the busiest partition of the FP8 plan (get_mla_metadata(..., is_fp8_kvcache=True)).

Usage: python benchmarks/tools/fp8_chunk_rate.py LABEL [b s_q s_k h_q]...
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import torch_flashmla  # noqa: E402
from torch_flashmla import kv_cache as kvc  # noqa: E402
from bench_decode import D_QK, D_V, FP8_DESCALE, inputs  # noqa: E402
from bench_timing import graph_time_us  # noqa: E402

DEFAULT = [(128, 1, 8192, 32), (64, 1, 8192, 16), (128, 1, 8192, 64)]


def chunks_per_partition(b, s_k, parts):
    return -(-b * -(-s_k // 64) // parts)


def main():
    label = sys.argv[1] if len(sys.argv) > 1 else "?"
    nums = [int(x) for x in sys.argv[2:]]
    shapes = [tuple(nums[i:i + 4]) for i in range(0, len(nums), 4)] or DEFAULT
    dk = torch.tensor([FP8_DESCALE], device="cuda")
    cells = []
    for b, s_q, s_k, h_q in shapes:
        times = []
        for l2_pages in (0, 256):
            q, cache, table, lens = inputs(b, s_q, s_k, h_q, l2_pages=l2_pages)
            cache8 = kvc.quantize_per_tensor_e4m3(cache, dk).view(torch.float8_e4m3fn)
            meta, splits = torch_flashmla.get_mla_metadata(lens, s_q * h_q, 1, h_q, is_fp8_kvcache=True)
            us = graph_time_us(lambda: torch.ops.flashmla.mla_decode(q, cache8, table, lens, D_V, D_QK ** -0.5, False,
                                                                      meta, splits, None, dk))[0]
            times.append((us, us / chunks_per_partition(b, s_k, meta.shape[0])))
            del q, cache, cache8, table
            torch.cuda.empty_cache()
        cells.append(f"b{b}q{s_q}s{s_k}h{h_q} " + " / ".join(f"{us:.1f} ({c:.2f})" for us, c in times))
    print(f"{label:8} " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
