"""Few-head sparse decode (tensor-parallel head counts) against the same call at 64 heads, one run.

V3.2 cache, b 128, s_q 2, topk 2048 (the first row of bench_sparse_decode.py), h_q 8, 16, 32 and 64:
  op us     kernel + combine under CUDA-graph replay (median)
  kern us   the attention kernel alone (PyTorch profiler, mean of --calls calls)
  TFLOPS    of the h_q real heads, and % of the bf16 matmul ceiling (benchmarks/bench_timing.py)
  GB/s      records + q + out bytes (bench_sparse_decode.sparse_bytes), and % of the copy ceiling
  ref us    torch_flashmla.reference.sparse_mla_decode on the GPU tensors (the unfused PyTorch path),
            CUDA events; diff = max |ours - ref|
  FM us     FlashMLA on the same inputs under CUDA-graph replay, when importable, for the head counts of
            --flashmla-heads (default 64: the padded call; an error leaves the column empty)
  64/this   64-head op us / this op us (1.0: a few-head call costs what 64 heads cost)

Run on the GPU machine: python benchmarks/tools/sparse_few_heads.py [--no-reference] [--calls N]
                                                                  [--flashmla-heads 64,...] [--num-sm-parts N] [LABEL]
--num-sm-parts N: plan every head count with N partitions instead of the default (docs/design.md §4.1;
132 reproduces the default of before the one-wave plans on an H200).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_flashmla  # noqa: E402
from torch_flashmla import reference  # noqa: E402
from bench_sparse_decode import (D_QK, D_V, events_time_us, flashmla_fns, gbs, make_cache, make_indices,  # noqa: E402
                                 make_q, max_diff, plan, sparse_bytes, sparse_flops, tflops, time_us)
from bench_timing import COPY_GBS, MATMUL_TFLOPS, graph_time_us  # noqa: E402
from sparse_kernel_times import kernel_times  # noqa: E402

B, S_Q, S_K, TOPK = 128, 2, 32768, 2048
HEADS = (8, 16, 32, 64)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-reference", dest="reference", action="store_false", help="skip the reference path")
    ap.add_argument("--calls", type=int, default=20, help="profiled calls for the kernel-alone time")
    ap.add_argument("--flashmla-heads", default="64", help="head counts at which FlashMLA is timed (comma list)")
    ap.add_argument("--num-sm-parts", type=int, default=None, help="partitions of every plan (default: the planner's)")
    ap.add_argument("label", nargs="?", default=None, help="printed first (benchmarks/tools/ab_swap.sh passes the build's)")
    opts = ap.parse_args()
    if opts.label:
        print(f"== {opts.label}")
    dev = torch.device("cuda")
    cache, table = make_cache(B, S_K, dev)
    indices = make_indices(table, S_K, S_Q, TOPK)
    scale = D_QK ** -0.5
    rows = {}
    for h_q in HEADS:
        q = make_q(B, S_Q, h_q, dev)
        if opts.num_sm_parts is None:
            meta, splits = plan(B, S_Q, h_q, TOPK, dev)
        else:
            meta, splits = torch_flashmla.get_mla_metadata(torch.full((B,), TOPK, dtype=torch.int32, device=dev),
                                                           S_Q * h_q, 1, h_q, is_fp8_kvcache=True, topk=TOPK,
                                                           num_sm_parts=opts.num_sm_parts)

        def op():
            return torch_flashmla.sparse_mla_decode(q, cache, indices, meta, splits, softmax_scale=scale)

        row = dict(op=time_us(op, True)[0])
        row["kern"] = sum(us for name, us in kernel_times(op, opts.calls).items() if "sparse_decode" in name)
        if opts.reference:
            def ref():
                return reference.sparse_mla_decode(q, cache, indices, None, None, None, None, None, D_V, scale)
            row["diff"] = max_diff(op()[0], ref()[0])
            row["ref"] = events_time_us(ref, iters=1, warmup=0)[0]
        if str(h_q) not in opts.flashmla_heads.split(","):
            rows[h_q] = row
            continue
        try:
            fm_op = flashmla_fns(q, cache, table, indices, S_K, TOPK, scale)[0]
            fm_op()
            row["fm"] = graph_time_us(fm_op, iters=10)[0]
        except Exception as e:  # noqa: BLE001  (not importable, or no such head count: the column stays empty)
            row["fm_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        rows[h_q] = row

    print(f"b {B}, s_q {S_Q}, topk {TOPK} (V3.2 cache); op = kernel + combine under CUDA-graph replay")
    print(f"{'h_q':>4} {'op us':>8} {'kern us':>8} {'TFLOPS':>7} {'%mm':>4} {'GB/s':>6} {'%copy':>5} {'ref us':>9} "
          f"{'diff':>8} {'FM us':>8} {'64/this':>8}")
    for h_q, r in rows.items():
        flops, nbytes = sparse_flops(B, S_Q, h_q, TOPK), sparse_bytes(B, S_Q, h_q, TOPK)
        tf, gb = tflops(flops, r["op"]), gbs(nbytes, r["op"])
        ref = f"{r['ref']:9.0f} {r['diff']:8.1e}" if "ref" in r else f"{'-':>9} {'-':>8}"
        fm = f"{r['fm']:8.1f}" if "fm" in r else f"{'-':>8}"
        print(f"{h_q:4d} {r['op']:8.1f} {r['kern']:8.1f} {tf:7.1f} {100 * tf / MATMUL_TFLOPS:4.0f} {gb:6.0f} "
              f"{100 * gb / COPY_GBS:5.0f} {ref} {fm} {rows[64]['op'] / r['op']:8.3f}")
    for h_q, r in rows.items():
        if "fm_error" in r:
            print(f"FlashMLA at h_q {h_q}: {r['fm_error']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
