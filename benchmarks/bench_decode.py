"""Dense MLA decode on the GPU: whole decode call (kernel + combine; plan computed beforehand)
timed under CUDA-graph replay, plus the planner alone. FLOPs and bytes use FlashMLA's formulas:
  FLOPs = b*s_q*h_q*s_k*2*(576+512)
  bytes = b*(s_q*h_q*576*2 + s_k*h_kv*576*2 + s_q*h_q*512*2)
Floors (DESIGN §6 / the issue): h_q = 128 cases >= 500 TFLOPS, h_q <= 64 cases >= 3.4 TB/s.

Usage: python benchmarks/bench_decode.py [--quick]
"""
from __future__ import annotations

import statistics
import sys

import torch

import torch_flashmla

D_QK, D_V = 576, 512
DEV = torch.device("cuda")

COMPUTE = [(128, s_q, s_k, 128) for s_q in (1, 2) for s_k in (4096, 8192, 16384, 32768)]
MEMORY = [(b, 1, s_k, h_q) for b in (64, 128) for s_k in (8192, 32768) for h_q in (16, 32, 64)]


def inputs(b, s_q, s_k, h_q, h_kv=1, page_size=64, dtype=torch.bfloat16, l2_pages=0):
    """l2_pages > 0: every block-table entry points into a cache of that many pages (L2-resident),
    which times the kernel without the DRAM traffic (a diagnostic, not a real workload)."""
    g = torch.Generator(device=DEV)
    g.manual_seed(b + s_q + s_k + h_q)
    pages = -(-s_k // page_size)
    if l2_pages:
        cache = torch.randn(l2_pages, page_size, h_kv, D_QK, generator=g, device=DEV).to(dtype)
        table = torch.randint(0, l2_pages, (b, pages), generator=g, device=DEV).to(torch.int32)
    else:
        cache = torch.randn(b * pages, page_size, h_kv, D_QK, generator=g, device=DEV).to(dtype)
        table = torch.randperm(b * pages, generator=g, device=DEV).to(torch.int32).view(b, pages)
    lens = torch.full((b,), s_k, dtype=torch.int32, device=DEV)
    q = torch.randn(b, s_q, h_q, D_QK, generator=g, device=DEV).to(dtype)
    return q, cache, table, lens


def graph_time_us(fn, iters=30, reps=5):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / iters)
    return statistics.median(times), min(times), max(times)


def main():
    quick = "--quick" in sys.argv
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    rows = []
    cases = [("compute", c) for c in COMPUTE] + [("memory", c) for c in MEMORY]
    if quick:
        cases = cases[::3]
    cases += [("l2diag", (128, 1, 4096, 128)), ("l2diag", (64, 1, 8192, 64)), ("l2diag", (64, 1, 8192, 16))]
    for kind, (b, s_q, s_k, h_q) in cases:
        q, cache, table, lens = inputs(b, s_q, s_k, h_q, l2_pages=16 if kind == "l2diag" else 0)
        meta, splits = torch_flashmla.get_mla_metadata(lens, s_q * h_q, 1, h_q)
        scale = D_QK ** -0.5
        fn = lambda: torch.ops.flashmla.mla_decode(q, cache, table, lens, D_V, scale, False, meta, splits)  # noqa: E731
        med, lo, hi = graph_time_us(fn)
        plan_us, _, _ = graph_time_us(lambda: torch_flashmla.get_mla_metadata(lens, s_q * h_q, 1, h_q))
        flops = b * s_q * h_q * s_k * 2 * (D_QK + D_V)
        nbytes = b * (s_q * h_q * D_QK * 2 + s_k * D_QK * 2 + s_q * h_q * D_V * 2)
        tflops = flops / med / 1e6
        gbs = nbytes / med / 1e3
        if kind == "compute":
            ok = tflops >= 500
        elif kind == "memory":
            ok = gbs >= 3400
        else:
            ok = None
        rows.append((kind, b, s_q, s_k, h_q, med, lo, hi, tflops, gbs, plan_us, ok))
        del q, cache, table, lens
        torch.cuda.empty_cache()
    print()
    print(f"{'kind':8} {'b':>4} {'s_q':>3} {'s_k':>6} {'h_q':>4} {'us(med)':>9} {'min':>8} {'max':>8} "
          f"{'TFLOPS':>7} {'GB/s':>6} {'plan us':>7} floor")
    for kind, b, s_q, s_k, h_q, med, lo, hi, tf, gb, pl, ok in rows:
        print(f"{kind:8} {b:4d} {s_q:3d} {s_k:6d} {h_q:4d} {med:9.1f} {lo:8.1f} {hi:8.1f} {tf:7.1f} {gb:6.0f} "
              f"{pl:7.1f} {'-' if ok is None else 'ok' if ok else 'MISS'}")


if __name__ == "__main__":
    main()
