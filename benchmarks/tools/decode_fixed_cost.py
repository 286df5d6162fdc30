"""Fixed and per-chunk cost of the dense decode call (development tool).

For each h_q and batch b, the whole call (attention + combine, CUDA-graph replay, bench_decode.py's inputs) over
a sweep of s_k, BF16 and FP8 cache, and a least-squares line T = F + C * P through the points, C = the 64-token
chunks per SM (b * s_k / 64 / 132): P is the marginal period of one chunk per SM, F what the call costs beyond
its chunks (start-up, request ends, the split partials and their combine, the launch). b 132 at s_q 1 gives one
request per SM and no split partials; the plan leaves b 128 unsplit too up to s_k 8192 (128 pieces), while b 64 has
two pieces per request, so the rows compare calls with and without the partials and their combine.
Then, under torch.profiler on eager calls, the combine's tail: the median time from the attention kernel's end to
the combine kernel's end.

Usage: python3 benchmarks/tools/decode_fixed_cost.py [--quick]
"""
from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import torch_flashmla  # noqa: E402
from bench_decode import bf16_call, fp8_call, inputs  # noqa: E402
from bench_timing import cuda_kernel_events, graph_time_us, sm_clock_mhz  # noqa: E402

SMS = 132


def calls(b, s_k, h_q):
    """The BF16 and FP8 calls of one shape, and the number of split pieces in its plan."""
    q, cache, table, lens = inputs(b, 1, s_k, h_q)
    pieces = int(torch_flashmla.get_mla_metadata(lens, h_q, 1, h_q)[1][-1].item())
    return {"BF16": bf16_call(q, cache, table, lens), "FP8": fp8_call(q, cache, table, lens)}, pieces


def fit(points):
    """Least-squares (F, P) of T = F + C P through [(C, T)]."""
    n = len(points)
    mc = sum(c for c, _ in points) / n
    mt = sum(t for _, t in points) / n
    p = sum((c - mc) * (t - mt) for c, t in points) / sum((c - mc) ** 2 for c, _ in points)
    return mt - p * mc, p


def combine_tail_us(fn, n_calls=20):
    """Median time from the attention kernel's end to the combine kernel's end, eager calls under the profiler."""
    attn, comb = [], []
    for ev in cuda_kernel_events(fn, n_calls):
        if "combine" in ev.name:
            comb.append(ev.time_range.end)
        elif "dense_decode" in ev.name:
            attn.append(ev.time_range.end)
    if len(attn) != len(comb) or not attn:
        return float("nan")
    return statistics.median(c - a for a, c in zip(sorted(attn), sorted(comb)))


def main():
    quick = "--quick" in sys.argv
    s_ks = [2048, 4096, 8192] if quick else [2048, 4096, 8192, 16384]
    print(f"SM clock {sm_clock_mhz()} MHz")
    print(f"{'h_q':>4} {'b':>4} {'s_k':>6} {'pieces':>6} {'chunks/SM':>9} {'BF16 us':>8} {'FP8 us':>8} {'ratio':>6}")
    lines = {}
    for h_q in (16, 64):
        for b in (64, 128, 132):
            for s_k in s_ks:
                fns, pieces = calls(b, s_k, h_q)
                chunks = b * (s_k // 64) / SMS
                us = {k: graph_time_us(f)[0] for k, f in fns.items()}
                print(f"{h_q:4d} {b:4d} {s_k:6d} {pieces:6d} {chunks:9.1f} {us['BF16']:8.1f} {us['FP8']:8.1f} "
                      f"{us['BF16'] / us['FP8']:6.2f}", flush=True)
                for k, t in us.items():
                    lines.setdefault((h_q, b, k), []).append((chunks, t))
                del fns
                torch.cuda.empty_cache()
    print("\nT = F + chunks/SM x P (least squares over s_k)")
    print(f"{'h_q':>4} {'b':>4} {'cache':>5} {'F us':>7} {'P us':>7}")
    for (h_q, b, kind), pts in lines.items():
        f, p = fit(pts)
        print(f"{h_q:4d} {b:4d} {kind:>5} {f:7.1f} {p:7.3f}")
    print("\ncombine tail (attention end -> combine end, eager, profiler), us")
    for h_q in (16, 64):
        for b in (64, 128, 132):
            fns, pieces = calls(b, 8192, h_q)
            tails = {k: combine_tail_us(f) for k, f in fns.items()}
            print(f"  h_q {h_q} b {b} s_k 8192 ({pieces} pieces): BF16 {tails['BF16']:.1f}, FP8 {tails['FP8']:.1f}",
                  flush=True)
            del fns
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
