"""Per-kernel GPU time of the sparse FP8 decode (ours: attention kernel + combine; FlashMLA when importable),
from the PyTorch profiler, over V3.2 shapes with the same number of 64-token chunks per query token and
a different number of requests (b x topk constant), so that the fixed and per-request costs separate
from the per-chunk cost.

Run on the GPU machine: python benchmarks/tools/sparse_kernel_times.py [--calls N] [--shape B,H_Q,TOPK] [--plain]
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
from bench_sparse_decode import D_QK, flashmla_fns, make_cache, make_indices, make_q, plan  # noqa: E402

S_K = 32768
SHAPES = [(b, h_q, 2, S_K, 262144 // b) for h_q in (128, 64) for b in (256, 128, 64, 32)]


def kernel_times(fn, calls: int) -> dict:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total = collections.defaultdict(float)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            total[evt.name] += evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
    return {name: us / calls for name, us in total.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--shape", help="B,H_Q,TOPK: this shape only")
    ap.add_argument("--plain", action="store_true", help="call each implementation --calls times, no profiler")
    opts = ap.parse_args()
    shapes = SHAPES
    if opts.shape:
        b, h_q, topk = (int(x) for x in opts.shape.split(","))
        shapes = [(b, h_q, 2, S_K, topk)]
    dev = torch.device("cuda")
    try:
        import flash_mla  # noqa: F401
        have_fm = True
    except ImportError:
        have_fm = False
    caches = {}
    print(f"{'b':>4} {'h_q':>4} {'topk':>6} {'impl':<6} {'us/call':>9}  kernel")
    for b, h_q, s_q, s_k, topk in shapes:
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
        del q, indices
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
