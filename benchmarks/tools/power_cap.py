"""Sustained vs single-call timing of the dense decode op, with the SM clock, power, temperature and
throttle reasons from nvidia-smi after each phase (development tool). Shows the H200 reaching its power
cap (throttle reason 0x4) under back-to-back calls, which is the load the floor method puts on it.
Usage: python3 benchmarks/tools/power_cap.py [--fp8] [B S_Q S_K H_Q ...]
  --fp8   also the FP8 call of each shape (bench_decode.fp8_call: per-tensor e4m3 cache), after the BF16 one
  shapes  quadruples b s_q s_k h_q (default: three BF16 shapes, compute- and memory-bound)
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch_flashmla  # noqa: E402
from bench_decode import D_QK, D_V, decode_flops, fp8_call, inputs  # noqa: E402
from bench_timing import gpu_query, graph_time_us, single_call_us  # noqa: E402

SHAPES = [(128, 1, 32768, 128), (128, 1, 8192, 128), (64, 1, 8192, 16)]


def eager_us(fn, calls):
    """Microseconds per call of `calls` eager calls issued back to back (CUDA events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / calls


def gpu_state():
    """SM clock (MHz), power (W), temperature (C) and active throttle reasons, as nvidia-smi reports them."""
    return gpu_query("clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active")


def probe(b, s_q, s_k, h_q, fp8=False):
    q, cache, table, lens = inputs(b, s_q, s_k, h_q)
    meta, splits = torch_flashmla.get_mla_metadata(lens, s_q * h_q, 1, h_q)

    def bf16_fn():
        return torch.ops.flashmla.mla_decode(q, cache, table, lens, D_V, D_QK ** -0.5, False, meta, splits)

    run(bf16_fn, "bf16", b, s_q, s_k, h_q)
    if fp8:
        fn = fp8_call(q, cache, table, lens)
        del cache
        torch.cuda.empty_cache()
        time.sleep(2.0)  # cool down between the two
        run(fn, "fp8", b, s_q, s_k, h_q)


def run(fn, label, b, s_q, s_k, h_q):
    flops = decode_flops(b, s_q, s_k, h_q)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    singles = []
    for _ in range(8):
        time.sleep(0.2)
        singles.append(eager_us(fn, 1))
    print(f"shape b={b} s_q={s_q} s_k={s_k} h_q={h_q} {label}")
    print("  eager single after 200 ms idle us:", [round(x, 1) for x in singles], gpu_state())
    for calls in (30, 300, 1500):
        us = eager_us(fn, calls)
        print(f"  eager {calls} back-to-back: {us:.1f} us  {flops / us / 1e6:.1f} TF", gpu_state())
    med, lo, hi = graph_time_us(fn)
    print(f"  graph 30x5: {med:.1f} ({lo:.1f}-{hi:.1f}) us  {flops / med / 1e6:.1f} TF", gpu_state())
    one = single_call_us(fn, idle_s=1.0)
    print(f"  graph 1x10 after 1 s idle: {one:.1f} us  {flops / one / 1e6:.1f} TF", gpu_state())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("shape", nargs="*", type=int)
    args = ap.parse_args()
    assert len(args.shape) % 4 == 0, "shapes are quadruples b s_q s_k h_q"
    shapes = [tuple(args.shape[i:i + 4]) for i in range(0, len(args.shape), 4)] or SHAPES
    for shape in shapes:
        probe(*shape, fp8=args.fp8)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
