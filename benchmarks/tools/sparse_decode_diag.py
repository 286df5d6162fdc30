"""Eager timing of sparse_mla_decode (CUDA events, 20 calls after 3 warm-ups) on uniform random
indices, from DRAM (a cache of b * s_k slots) and L2-resident (4,096 slots), used for the kernel
history in benchmarks/NOTES_sparse_decode.md. The L2-resident run times the kernel without most of
its DRAM traffic (a diagnostic, not a real workload).

Usage: python benchmarks/tools/sparse_decode_diag.py [all]
"""
import sys

import torch

import torch_flashmla as tf
from torch_flashmla import kv_cache as kvc


def timeit(b, s_q, h_q, topk, slots):
    pages = slots // 64
    cache = kvc.quantize_kv_fp8(torch.randn(pages, 64, 1, 576, device="cuda").to(torch.bfloat16))
    idx = torch.randint(0, pages * 64, (b, s_q, topk), device="cuda", dtype=torch.int32)
    q = torch.randn(b, s_q, h_q, 576, device="cuda").to(torch.bfloat16)
    lens = torch.full((b,), topk, dtype=torch.int32, device="cuda")
    md, ns = tf.get_mla_metadata(lens, s_q * h_q, 1, h_q, is_fp8_kvcache=True, topk=topk)
    for _ in range(3):
        tf.sparse_mla_decode(q, cache, idx, md, ns)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(20):
        tf.sparse_mla_decode(q, cache, idx, md, ns)
    e1.record()
    torch.cuda.synchronize()
    us = e0.elapsed_time(e1) / 20 * 1e3
    tflops = b * s_q * h_q * topk * 2 * 1088 / us / 1e6
    print(f"b{b} s_q{s_q} h{h_q} topk{topk} slots {slots}: "
          f"{us:.1f} us  {tflops:.1f} TFLOPS", flush=True)


if __name__ == "__main__":
    timeit(128, 2, 128, 2048, 128 * 32768)
    timeit(128, 2, 128, 2048, 4096)
    if len(sys.argv) > 1:
        timeit(128, 2, 64, 2048, 128 * 32768)
        timeit(148, 2, 128, 16384, 148 * 65536 // 4)
