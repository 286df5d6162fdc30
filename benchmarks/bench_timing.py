"""CUDA-graph timing shared by the benchmarks."""
from __future__ import annotations

import statistics
import subprocess
import time

import torch
import torch.profiler

# The H200's ceilings measured on this machine kind (docs/design.md §6): device-to-device copy GB/s and
# bf16 dense matmul TFLOPS. The benchmarks print their shares of these.
COPY_GBS, MATMUL_TFLOPS = 4284.0, 799.0


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


def single_call_us(fn, reps: int = 10, idle_s: float = 0.5):
    """One call per CUDA-graph replay, after ``idle_s`` of idle GPU: the time at the GPU's full clock.
    (Back-to-back replay, as in graph_time_us, holds the H200 at its power cap, where the SM clock
    drops from 1980 to ~1500-1830 MHz on the compute-bound shapes.) Returns the median."""
    time.sleep(idle_s)
    return graph_time_us(fn, iters=1, reps=reps)[0]


def cuda_kernel_events(fn, calls: int, warmup: int = 3) -> list:
    """The CUDA kernel events of ``calls`` eager calls of ``fn`` under torch.profiler (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]


def gpu_query(fields: str):
    """nvidia-smi's CSV values of `fields` (e.g. "clocks.sm,power.draw") for the current device, or None
    where nvidia-smi is not available."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits", "-i",
                              str(torch.cuda.current_device())], capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0]
    except (OSError, IndexError, RuntimeError, AssertionError, subprocess.SubprocessError):  # no GPU / no nvidia-smi
        return None


def sm_clock_mhz():
    """Current SM clock in MHz (None where it is not available)."""
    try:
        return int(gpu_query("clocks.sm"))
    except (TypeError, ValueError):
        return None
