"""Bandwidth of the CUDA KV-cache kernels vs the PyTorch reference (torch_flashmla/kv_cache.py).

Rows: paged-cache writes (concat_and_cache_mla, "auto" bf16, "fp8_ds_mla", "fp8_ds_mla_v4" and the
per-tensor e4m3 "fp8" with a scale tensor) into random distinct slots, plus one whole cache written in
slot order per layout ("(all)"; "fp8": a whole-cache-sized write in random order), and whole-tensor
quantize/dequantize (V3.2 records and DeepSeek V4 pages of 64 tokens). GB/s counts the fewest bytes each op must move: bf16 input rows read (1152 B/token, V4 1024)
+ cache rows written (1152, 656, 584 or 576 B) + slot ids (8 B); quantize reads 1152 and writes 656 B/token
(V4: 1024 and 584), dequantize the reverse. Times are medians (triton.testing.do_bench, CUDA
events); "graph" is the per-call time of 20 writes captured in one CUDA graph (no launch gaps).
% is of the copy ceiling measured in the same run (device-to-device copy, bytes read + written).

Run: FLASHMLA_KV_JIT=1 python benchmarks/bench_kv_cache.py   (JIT-builds the kernels when
torch_flashmla was built without them).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
NVCC_FLAGS = ["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr",
              "--use_fast_math", "-lineinfo", "-DNDEBUG", "-U__CUDA_NO_HALF_OPERATORS__",
              "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
              "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]


def _have_ops() -> bool:
    try:
        torch.ops.flashmla_cuda.quantize_kv_fp8.default
        return True
    except (AttributeError, RuntimeError):
        return False


def load():
    try:
        from torch_flashmla import kv_cache as ref
    except Exception:
        spec = importlib.util.spec_from_file_location("_kvref", ROOT / "torch_flashmla" / "kv_cache.py")
        ref = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ref)
    if not _have_ops() and os.environ.get("FLASHMLA_KV_JIT", "0") == "1":
        from torch.utils.cpp_extension import load as jit
        sources = [str(ROOT / "csrc" / "api" / "kv_cache_cuda.cpp")] + sorted(glob.glob(str(ROOT / "csrc" / "kv_cache" / "*.cu")))
        jit(name="flashmla_kv_cache_jit", sources=sources, extra_include_paths=[str(ROOT / "csrc")],
            extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=NVCC_FLAGS, is_python_module=False)
    if not _have_ops():
        sys.exit("no torch.ops.flashmla_cuda KV-cache kernels (build the package or set FLASHMLA_KV_JIT=1)")
    return torch.ops.flashmla_cuda, ref


def bench_ms(fn, rep_ms: int = 200) -> float:
    try:
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    except ImportError:
        times = []
        for _ in range(5):
            fn()
        for _ in range(50):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2]


def graph_ms(fn, calls: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return bench_ms(g.replay) / calls


def main():
    ops, ref = load()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows = []

    buf = torch.empty(2 * 1024 ** 3, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(buf)
    ceiling = 2 * buf.numel() / (bench_ms(lambda: dst.copy_(buf)) * 1e-3) / 1e9
    del buf, dst

    # Writes into random distinct slots of a cache twice the size (a decode step's 4,096 tokens; 65,536), and
    # a whole cache written in slot order (a prefill filling its pages: the rows of a page and its scale
    # sectors are written by neighbouring warps).
    for mode in ("auto", "fp8_ds_mla", "fp8_ds_mla_v4"):
        for tokens, in_order in ((4096, False), (65536, False), (1 << 20, True)):
            page = 64
            num_blocks = (1 if in_order else 2) * tokens // page
            v4 = mode == "fp8_ds_mla_v4"
            kv_c = torch.randn(tokens, 448 if v4 else 512, device=dev).to(torch.bfloat16)
            k_pe = torch.randn(tokens, 64, device=dev).to(torch.bfloat16)
            if in_order:
                slots = torch.arange(tokens, device=dev)
            else:
                slots = torch.randperm(num_blocks * page, device=dev)[:tokens].contiguous()
            if v4:
                cache = ref.new_fp8_v4_cache(num_blocks, page, device=dev)
                nbytes = tokens * (1024 + 584 + 8)
            else:
                width = 576 if mode == "auto" else 656
                cache = torch.zeros(num_blocks, page, 1, width, device=dev,
                                    dtype=torch.bfloat16 if mode == "auto" else torch.uint8)
                nbytes = tokens * (1152 + (1152 if mode == "auto" else 656) + 8)
            ours = bench_ms(lambda: ops.concat_and_cache_mla(kv_c, k_pe, cache, slots, mode))
            graph = graph_ms(lambda: ops.concat_and_cache_mla(kv_c, k_pe, cache, slots, mode))
            refm = bench_ms(lambda: ref.concat_and_cache_mla(kv_c, k_pe, cache, slots, mode), rep_ms=300)
            rows.append((f"write {mode}" + (" (all)" if in_order else ""), tokens, nbytes, ours, graph, refm))
            del kv_c, k_pe, slots, cache
            torch.cuda.empty_cache()

    # Per-tensor e4m3 ("fp8"): a 4,096-token decode-step write into a cache twice that size, and a
    # whole-cache-sized write (2^20 tokens filling every slot of the cache, in random order).
    scale = torch.tensor([0.0371], device=dev)
    for tokens, num_slots in ((4096, 8192), (1 << 20, 1 << 20)):
        page = 64
        kv_c = torch.randn(tokens, 512, device=dev).to(torch.bfloat16)
        k_pe = torch.randn(tokens, 64, device=dev).to(torch.bfloat16)
        slots = torch.randperm(num_slots, device=dev)[:tokens].contiguous()
        cache = torch.zeros(num_slots // page, page, 1, 576, device=dev, dtype=torch.float8_e4m3fn)
        nbytes = tokens * (1152 + 576 + 8)
        ours = bench_ms(lambda: ops.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8", scale))
        graph = graph_ms(lambda: ops.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8", scale))
        refm = bench_ms(lambda: ref.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8", scale))
        rows.append(("write fp8 (scale)", tokens, nbytes, ours, graph, refm))
        del kv_c, k_pe, slots, cache
        torch.cuda.empty_cache()

    # Whole-cache quantize / dequantize round trips: V3.2 records (576 bf16 -> 656 bytes per token) and
    # V4 pages (512 bf16 -> 584 bytes per token).
    for label, shape, bf16_bytes, fp8_bytes, quantize, dequantize in (
            ("", lambda t: (t, 576), 1152, 656, "quantize_kv_fp8", "dequantize_kv_fp8"),
            (" v4", lambda t: (t // 64, 64, 1, 512), 1024, 584, "quantize_kv_fp8_v4", "dequantize_kv_fp8_v4")):
        for tokens in (1 << 20, 1 << 22):
            kv = torch.randn(*shape(tokens), device=dev).to(torch.bfloat16)
            nbytes = tokens * (bf16_bytes + fp8_bytes)
            ours = bench_ms(lambda: getattr(ops, quantize)(kv))
            refm = bench_ms(lambda: getattr(ref, quantize)(kv), rep_ms=300)
            rows.append(("quantize" + label, tokens, nbytes, ours, None, refm))
            q = getattr(ops, quantize)(kv)
            del kv
            ours = bench_ms(lambda: getattr(ops, dequantize)(q))
            refm = bench_ms(lambda: getattr(ref, dequantize)(q), rep_ms=300)
            rows.append(("dequantize" + label, tokens, nbytes, ours, None, refm))
            del q
            torch.cuda.empty_cache()

    name = torch.cuda.get_device_name()
    print(f"\n{name}, torch {torch.__version__}; copy ceiling {ceiling:.0f} GB/s (read + written)")
    print(f"{'op':<26} {'tokens':>8} {'ours us':>9} {'GB/s':>7} {'%ceil':>6} {'graph us':>9} {'ref us':>10} {'ref GB/s':>9} {'speedup':>8}")
    for op, tokens, nbytes, ours, graph, refm in rows:
        gbs = nbytes / (ours * 1e-3) / 1e9
        rgbs = nbytes / (refm * 1e-3) / 1e9
        g = f"{graph * 1e3:9.2f}" if graph is not None else f"{'-':>9}"
        print(f"{op:<26} {tokens:>8} {ours * 1e3:9.2f} {gbs:7.0f} {100 * gbs / ceiling:5.0f}% {g} "
              f"{refm * 1e3:10.1f} {rgbs:9.0f} {refm / ours:7.1f}x")


if __name__ == "__main__":
    main()
