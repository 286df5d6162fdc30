"""flashmla.mha_prefill (dense MHA-mode varlen prefill) on the H200, side by side with PyTorch's
scaled_dot_product_attention on its cuDNN backend and with FlexAttention (torch.compile'd), in one run.

Whole op call under CUDA-graph replay (benchmarks/bench_timing.py), median microseconds. Causal
TFLOPS = sum over sequences of s_q * s_k * (d_qk + d_v) * h (half of the full 2 * s_q * s_k * (d_qk + d_v) * h).
A naive column: SDPA's math backend (plain PyTorch, the score matrix in memory) where it fits.
The op is two launches (the fill of rows no sequence owns, then attention); the whole call is what
is timed. Shapes: h 128, d_qk 192, d_v 128, causal; (b, s) in {(1, 4096), (1, 16384), (4, 4096)} and a
ragged batch of 16 sequences totalling 32k tokens (cuDNN: not run, it has no varlen form here; Flex: a
document-causal block mask over the packed tokens).

Usage: python benchmarks/bench_mha_prefill.py [--json FILE] [--plot FILE.png] [--no-baselines]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_timing import MATMUL_TFLOPS, graph_time_us, sm_clock_mhz  # noqa: E402

import torch_flashmla as F  # noqa: E402

H, D_QK, D_V = 128, 192, 128
FIXED = [(1, 4096), (1, 16384), (4, 4096)]
RAGGED_TOTAL, RAGGED_B = 32768, 16
NAIVE_MAX_S = 4096  # the math backend's fp32 scores: b * h * s^2 * 4 bytes (8.6 GB per sequence at 4096)


def ragged_lengths(total: int, b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(b, generator=g) + 0.25
    lens = (w / w.sum() * total).long().clamp(min=1)
    lens[-1] += total - int(lens.sum())
    return [int(x) for x in lens]


def causal_flops(lens) -> float:
    return sum(s * s * (D_QK + D_V) * H for s in lens)


def ours(lens, dtype=torch.bfloat16):
    total = sum(lens)
    q = torch.randn(total, H, D_QK, device="cuda", dtype=dtype)
    k = torch.randn(total, H, D_QK, device="cuda", dtype=dtype)
    v = torch.randn(total, H, D_V, device="cuda", dtype=dtype)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    m = max(lens)
    return lambda: F.mha_prefill(q, k, v, cu, cu, m, m, causal=True)


def sdpa(b, s, backend, dtype=torch.bfloat16):
    from torch.nn.attention import sdpa_kernel
    q = torch.randn(b, H, s, D_QK, device="cuda", dtype=dtype)
    k = torch.randn(b, H, s, D_QK, device="cuda", dtype=dtype)
    v = torch.randn(b, H, s, D_V, device="cuda", dtype=dtype)

    def run():
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    run()
    return run


def cudnn(b, s):
    from torch.nn.attention import SDPBackend
    return sdpa(b, s, SDPBackend.CUDNN_ATTENTION)


def naive(b, s):
    """Plain PyTorch: SDPA's math backend (the full score matrix in memory)."""
    from torch.nn.attention import SDPBackend
    return sdpa(b, s, SDPBackend.MATH)


def flex(lens, dtype=torch.bfloat16):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    total = sum(lens)
    doc = torch.repeat_interleave(torch.arange(len(lens), device="cuda"), torch.tensor(lens, device="cuda"))

    def mask(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
    block_mask = create_block_mask(mask, None, None, total, total, device="cuda")
    q = torch.randn(1, H, total, D_QK, device="cuda", dtype=dtype)
    k = torch.randn(1, H, total, D_QK, device="cuda", dtype=dtype)
    v = torch.randn(1, H, total, D_V, device="cuda", dtype=dtype)
    compiled = torch.compile(flex_attention, fullgraph=True)
    run = lambda: compiled(q, k, v, block_mask=block_mask)  # noqa: E731
    run()
    return run


def timed(make, *args):
    try:
        fn = make(*args)
        return graph_time_us(fn)[0]
    except Exception as e:  # a baseline that this torch/GPU cannot run: reported, not fatal
        print(f"  ({make.__name__} {args}: {type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--plot")
    ap.add_argument("--no-baselines", action="store_true")
    args = ap.parse_args()
    rows = []
    shapes = [(f"{b}x{s}", [s] * b, (b, s)) for b, s in FIXED]
    shapes.append((f"ragged{RAGGED_B}/{RAGGED_TOTAL // 1024}k", ragged_lengths(RAGGED_TOTAL, RAGGED_B), None))
    for name, lens, fixed in shapes:
        flops = causal_flops(lens)
        t_ours = timed(ours, lens)
        mhz = sm_clock_mhz()
        t_cudnn = timed(cudnn, *fixed) if fixed and not args.no_baselines else float("nan")
        t_flex = timed(flex, lens) if not args.no_baselines else float("nan")
        # naive: only where the [b, h, s, s] score matrix fits (s <= NAIVE_MAX_S)
        t_naive = (timed(naive, *fixed) if fixed and fixed[1] <= NAIVE_MAX_S and not args.no_baselines
                   else float("nan"))
        rows.append(dict(shape=name, lens=lens, ours_us=t_ours, cudnn_us=t_cudnn, flex_us=t_flex, naive_us=t_naive,
                         mhz=mhz, ours_tflops=flops / t_ours / 1e6, cudnn_tflops=flops / t_cudnn / 1e6,
                         flex_tflops=flops / t_flex / 1e6, naive_tflops=flops / t_naive / 1e6))
        torch.cuda.empty_cache()
    print("\nmha_prefill, h 128, d_qk 192, d_v 128, causal, bf16; whole call under CUDA-graph replay (median us);"
          f" TFLOPS = sum s^2 (d_qk + d_v) h; %mm of the {MATMUL_TFLOPS:.0f} TFLOPS matmul ceiling")
    print(f"{'shape':>14} {'ours us':>9} {'TFLOPS':>7} {'%mm':>4} {'cuDNN us':>9} {'TFLOPS':>7} {'x cuDNN':>7} "
          f"{'Flex us':>9} {'TFLOPS':>7} {'naive us':>9} {'TFLOPS':>7} {'MHz':>5} floor")
    for r in rows:
        ratio = r["cudnn_us"] / r["ours_us"]
        floor = "-" if r["cudnn_us"] != r["cudnn_us"] else ("ok" if ratio >= 1.0 else "MISS")
        print(f"{r['shape']:>14} {r['ours_us']:9.1f} {r['ours_tflops']:7.1f} {100 * r['ours_tflops'] / MATMUL_TFLOPS:4.0f} "
              f"{r['cudnn_us']:9.1f} {r['cudnn_tflops']:7.1f} {ratio:7.2f} {r['flex_us']:9.1f} "
              f"{r['flex_tflops']:7.1f} {r['naive_us']:9.1f} {r['naive_tflops']:7.1f} {r['mhz'] or 0:5d} {floor}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names = [r["shape"] for r in rows]
        xs = range(len(rows))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for i, (key, label) in enumerate((("ours_tflops", "torch_flashmla"), ("cudnn_tflops", "SDPA cuDNN"),
                                          ("flex_tflops", "FlexAttention"))):
            ax.bar([x + 0.27 * (i - 1) for x in xs], [r[key] for r in rows], width=0.27, label=label)
        ax.set_xticks(list(xs), names)
        ax.set_ylabel("TFLOPS")
        ax.set_title("MHA prefill, h128 d192/128 causal, H200")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
