"""CUDA-graph timing shared by the benchmarks."""
from __future__ import annotations

import statistics

import torch


def graph_time_us(fn, iters: int = 30, reps: int = 5):
    """``iters`` calls of ``fn`` captured in one CUDA graph (after 3 warm-up calls on a side
    stream); returns (median, min, max) microseconds per call over ``reps`` replays."""
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
    del graph
    return statistics.median(times), min(times), max(times)
