"""Per-kernel GPU time of the sparse FP8 decode (ours: attention kernel + combine; FlashMLA when importable),
from the PyTorch profiler, over V3.2 shapes with the same number of 64-token chunks per query token and
a different number of requests (b x topk constant), so that the fixed and per-request costs separate
from the per-chunk cost.

With --v4: DeepSeek V4 shapes instead (128 main + EXTRA extra indices per query, s_q 2, 8192 main and
2048 extra tokens per request, as in bench_sparse_decode.py), --shape B,H_Q,EXTRA.

Run on the GPU machine: python benchmarks/tools/sparse_kernel_times.py [--calls N] [--v4] [--shape ...] [--plain]
Prints one line per (shape, implementation, kernel): mean us per call. --shape runs one shape only;
--plain only calls each implementation N times (no profiler), for a run under Nsight Compute, e.g.
  ncu -k regex:"sparse_decode_kernel|splitkv_mla" -c 4 --section SpeedOfLight --section WarpStateStats \
      python benchmarks/tools/sparse_kernel_times.py --shape 128,64,2048 --plain --calls 2
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch_flashmla  # noqa: E402
from bench_sparse_decode import (D_QK, V4_D_QK, flashmla_fns, flashmla_fns_v4, make_cache, make_cache_v4,  # noqa: E402
                                 make_indices, make_q, plan)
from bench_timing import cuda_kernel_events  # noqa: E402

S_K = 32768
SHAPES = [(b, h_q, 2, S_K, 262144 // b) for h_q in (128, 64) for b in (256, 128, 64, 32)]
V4_MAIN_S_K, V4_EXTRA_S_K, V4_MAIN_TOPK = 8192, 2048, 128
V4_SHAPES = [(b, h_q, extra) for h_q in (128, 64) for b in (256, 148, 74) for extra in (512, 1024)]


def v4_impls(b: int, h_q: int, extra: int, dev, have_fm: bool):
    """(label, fn) pairs of one V4 shape: ours, and FlashMLA when importable."""
    cache, table = make_cache_v4(b, V4_MAIN_S_K, dev)
    extra_cache, extra_table = make_cache_v4(b, V4_EXTRA_S_K, dev, seed=1)
    q = make_q(b, 2, h_q, dev, d_qk=V4_D_QK)
    indices = make_indices(table, V4_MAIN_S_K, 2, V4_MAIN_TOPK)
    extra_indices = make_indices(extra_table, V4_EXTRA_S_K, 2, extra, seed=1)
    total = V4_MAIN_TOPK + extra
    scale = V4_D_QK ** -0.5
    meta, splits = plan(b, 2, h_q, total, dev)
    impls = [("ours", lambda: torch_flashmla.sparse_mla_decode(q, cache, indices, meta, splits, extra_kv_cache=extra_cache,
                                                               extra_indices=extra_indices, softmax_scale=scale))]
    if have_fm:
        impls.append(("fm", flashmla_fns_v4(q, cache, indices, extra_cache, extra_indices, total, scale)[0]))
    return impls


def kernel_times(fn, calls: int) -> dict:
    total = collections.defaultdict(float)
    for evt in cuda_kernel_events(fn, calls):
        total[evt.name] += evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
    return {name: us / calls for name, us in total.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--shape", help="B,H_Q,TOPK (with --v4: B,H_Q,EXTRA): this shape only")
    ap.add_argument("--v4", action="store_true", help="DeepSeek V4 shapes (128 main + extra indices)")
    ap.add_argument("--plain", action="store_true", help="call each implementation --calls times, no profiler")
    opts = ap.parse_args()
    shapes = V4_SHAPES if opts.v4 else SHAPES
    if opts.shape:
        b, h_q, n = (int(x) for x in opts.shape.split(","))
        shapes = [(b, h_q, n)] if opts.v4 else [(b, h_q, 2, S_K, n)]
    dev = torch.device("cuda")
    try:
        import flash_mla  # noqa: F401
        have_fm = True
    except ImportError:
        have_fm = False
    caches = {}
    print(f"{'b':>4} {'h_q':>4} {'topk':>6} {'impl':<6} {'us/call':>9}  kernel")
    for shape in shapes:
        if opts.v4:
            b, h_q, extra = shape
            topk = V4_MAIN_TOPK + extra
            impls = v4_impls(b, h_q, extra, dev, have_fm)
        else:
            b, h_q, s_q, s_k, topk = shape
            if b not in caches:
                caches.clear()
                torch.cuda.empty_cache()
                caches[b] = make_cache(b, s_k, dev)
            cache, table = caches[b]
            q = make_q(b, s_q, h_q, dev)
            indices = make_indices(table, s_k, s_q, topk)
            scale = D_QK ** -0.5
            meta, splits = plan(b, s_q, h_q, topk, dev)
            impls = [("ours", lambda: torch_flashmla.sparse_mla_decode(q, cache, indices, meta, splits, softmax_scale=scale))]
            if have_fm:
                impls.append(("fm", flashmla_fns(q, cache, table, indices, s_k, topk, scale)[0]))
        for label, fn in impls:
            if opts.plain:
                for _ in range(opts.calls):
                    fn()
                torch.cuda.synchronize()
                continue
            times = kernel_times(fn, opts.calls)
            for name, us in sorted(times.items(), key=lambda kv: -kv[1]):
                print(f"{b:>4} {h_q:>4} {topk:>6} {label:<6} {us:9.1f}  {name[:90]}")
        del impls
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
