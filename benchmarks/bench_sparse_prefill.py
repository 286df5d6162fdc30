"""Sparse MLA prefill benchmark: the whole op call (torch.ops.flashmla.sparse_mla_prefill: Python checks +
SM90 kernel) timed under CUDA-graph replay (benchmarks/bench_timing.graph_time_us: 30 calls per graph,
median of 5 replays), side by side with FlashMLA's flash_mla_sparse_fwd when `flash_mla` is importable
(same inputs, same harness), and with the reference path (the float32 PyTorch reference on the GPU, eager, CUDA events)
at one small shape.
TFLOPS = s_q * h_q * topk * 2 * (d_qk + 512) / t (FlashMLA's formula; masked indices count as work).
Inputs: random bf16 q/kv, random valid indices in [0, s_kv) (no duplicates needed).
Usage: python3 benchmarks/bench_sparse_prefill.py [--quick]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_timing import MATMUL_TFLOPS, graph_time_us, sm_clock_mhz  # noqa: E402

import torch_flashmla  # noqa: E402
from torch_flashmla import _registration, reference  # noqa: E402

try:
    import flash_mla  # noqa: F401
    from flash_mla import flash_mla_sparse_fwd as fmla_sparse_fwd
except Exception:  # not installed (the usual case on the GPU machine)
    fmla_sparse_fwd = None

SHAPES = [  # s_q, s_kv, h_q, d_qk, topk
    (4096, 8192, 128, 576, 2048),
    (4096, 32768, 128, 576, 2048),
    (4096, 65536, 128, 576, 2048),
    (4096, 8192, 64, 576, 2048),
    (4096, 8192, 64, 512, 512),
    (4096, 8192, 128, 512, 1024),
    (4096, 65536, 128, 512, 1024),
]
FLOORS = {(4096, 8192, 128, 576, 2048): 530, (4096, 65536, 128, 576, 2048): 480}


def inputs(s_q, s_kv, h_q, d_qk, topk, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(s_q, h_q, d_qk, device="cuda", generator=g).bfloat16()
    kv = torch.randn(s_kv, 1, d_qk, device="cuda", generator=g).bfloat16()
    idx = torch.randint(0, s_kv, (s_q, 1, topk), device="cuda", generator=g, dtype=torch.int32)
    return q, kv, idx


def tflops(s_q, h_q, d_qk, topk, us):
    return s_q * h_q * topk * 2 * (d_qk + 512) / (us * 1e-6) / 1e12


def main():
    quick = "--quick" in sys.argv
    assert _registration.cuda_path("sparse_mla_prefill", torch.device("cuda")) == "sm90", "no SM90 prefill kernel"
    rows = []
    for shape in SHAPES[:3] if quick else SHAPES:
        s_q, s_kv, h_q, d_qk, topk = shape
        q, kv, idx = inputs(*shape)
        scale = d_qk ** -0.5
        ours = graph_time_us(lambda: torch.ops.flashmla.sparse_mla_prefill(q, kv, idx, scale, 512, None, None),
                             iters=10, reps=5)
        mhz = sm_clock_mhz()
        theirs = None
        if fmla_sparse_fwd is not None:
            try:
                theirs = graph_time_us(lambda: fmla_sparse_fwd(q, kv, idx, scale, 512), iters=10, reps=5)
            except Exception as e:  # noqa: BLE001
                print(f"flash_mla failed at {shape}: {e}")
        rows.append((shape, ours, theirs, mhz))
        print(shape, ours, theirs, mhz, flush=True)
        del q, kv, idx
        torch.cuda.empty_cache()
    # The reference path at one small shape (what CUDA calls ran before this kernel).
    small = (256, 8192, 128, 576, 2048)
    q, kv, idx = inputs(*small)
    def ref_call():
        return reference.sparse_mla_prefill(q, kv, idx, 576 ** -0.5, 512, None, None)
    ref_call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        ref_call()
    end.record()
    end.synchronize()
    ref_us = (start.elapsed_time(end) * 1000 / 3,)  # eager (the reference's Python loop), CUDA events
    ours_small = graph_time_us(lambda: torch.ops.flashmla.sparse_mla_prefill(q, kv, idx, 576 ** -0.5, 512, None,
                                                                             None), iters=30, reps=5)

    print("\nsparse_mla_prefill, whole op under CUDA-graph replay (one kernel launch per call, so this is also the "
          "kernel time; median us; TFLOPS = s_q*h_q*topk*2*(d_qk+512)/t; %mm of the 799 TFLOPS matmul ceiling)")
    print(f"{'s_q':>5} {'s_kv':>6} {'h_q':>4} {'d_qk':>4} {'topk':>5} {'ours us':>9} {'TFLOPS':>7} "
          f"{'%mm':>4} {'FlashMLA us':>11} {'TFLOPS':>7} {'ratio':>6} {'MHz':>5} floor")
    for (s_q, s_kv, h_q, d_qk, topk), ours, theirs, mhz in rows:
        t_ours = tflops(s_q, h_q, d_qk, topk, ours[0])
        t_th = tflops(s_q, h_q, d_qk, topk, theirs[0]) if theirs else float("nan")
        floor = FLOORS.get((s_q, s_kv, h_q, d_qk, topk))
        verdict = "-" if floor is None else ("ok" if t_ours >= floor else f"MISS<{floor}")
        print(f"{s_q:>5} {s_kv:>6} {h_q:>4} {d_qk:>4} {topk:>5} {ours[0]:>9.1f} {t_ours:>7.1f} "
              f"{100 * t_ours / MATMUL_TFLOPS:>4.0f} "
              f"{(theirs[0] if theirs else float('nan')):>11.1f} {t_th:>7.1f} "
              f"{(t_ours / t_th if theirs else float('nan')):>6.2f} {(mhz or float('nan')):>5.0f} {verdict}")
    s_q, s_kv, h_q, d_qk, topk = small
    print(f"reference path {small}: {ref_us[0]:.1f} us ({tflops(s_q, h_q, d_qk, topk, ref_us[0]):.1f} TFLOPS); "
          f"ours {ours_small[0]:.1f} us ({tflops(s_q, h_q, d_qk, topk, ours_small[0]):.1f} TFLOPS)")


if __name__ == "__main__":
    main()
