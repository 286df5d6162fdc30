"""How dense decode time scales with s_q (speculative decoding drafts and short prompts sent to the
decode kernel), planned the way engines plan it: ``get_mla_metadata(seqlens, s_q * h_q, 1)``.

For each h_q and s_q: the whole call (planner + decode op) under CUDA-graph replay, 30 calls per
replay; "us/tok" is the time per query token (us / s_q); TFLOPS = b*s_q*h_q*s_k*2*(576+512) / t. A
compute-bound kernel keeps TFLOPS flat as s_q grows, so us grows linearly with s_q; a cliff shows as a
TFLOPS drop.

Usage: python benchmarks/bench_decode_sq.py [--quick]
"""
from __future__ import annotations

import sys

import torch

import torch_flashmla
from bench_decode import D_QK, D_V, decode_flops, inputs
from bench_timing import graph_time_us

B, S_K = 32, 4096
S_QS = (1, 2, 4, 8, 16, 32, 64, 128)
H_QS = (16, 32, 64, 128)


def main():
    quick = "--quick" in sys.argv
    h_qs = (16, 128) if quick else H_QS
    print(f"dense decode, b={B}, s_k={S_K}, causal, plan = get_mla_metadata(seqlens, s_q*h_q, 1) (no num_heads_q)")
    print(f"{'h_q':>4} {'s_q':>4} {'parts':>5} {'us':>9} {'us/tok':>8} {'TFLOPS':>7}")
    for h_q in h_qs:
        for s_q in S_QS:
            q, cache, table, lens = inputs(B, s_q, S_K, h_q)
            meta, splits = torch_flashmla.get_mla_metadata(lens, s_q * h_q, 1)

            def step():
                m, sp = torch_flashmla.get_mla_metadata(lens, s_q * h_q, 1, num_sm_parts=meta.shape[0])
                return torch.ops.flashmla.mla_decode(q, cache, table, lens, D_V, D_QK ** -0.5, True, m, sp)

            us, _, _ = graph_time_us(step)
            tflops = decode_flops(B, s_q, S_K, h_q) / us / 1e6
            print(f"{h_q:4d} {s_q:4d} {meta.shape[0]:5d} {us:9.1f} {us / s_q:8.2f} {tflops:7.1f}", flush=True)
            del q, cache, table, lens
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
