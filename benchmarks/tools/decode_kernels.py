"""Device time of each kernel of one dense decode call (development tool): the attention kernel, the
combine and the planner, averaged over eager calls under torch.profiler, for the shapes given; the
same for FlashMLA's call (its attention and combine kernels) when ``flash_mla`` is importable.
With ``--fp8``: our call over the per-tensor e4m3 cache (the bf16 cache quantized as bench_decode.py's FP8
rows do), no FlashMLA (it has no FP8 dense decode).
Usage: python3 benchmarks/tools/decode_kernels.py [--fp8] [b s_q s_k h_q ...]   (groups of four numbers)
Our combine is launched as a programmatic dependent of the attention kernel (csrc/common/decode_common.cu): its span
here starts at its early launch and includes its wait for the attention kernel, so only the attention kernel's line
is a time of its own.
"""
import sys
from collections import defaultdict

import torch

sys.path.insert(0, "benchmarks")
import torch_flashmla  # noqa: E402
from bench_decode import D_QK, D_V, FP8_DESCALE, flashmla_fn, inputs  # noqa: E402
from bench_timing import cuda_kernel_events  # noqa: E402
from torch_flashmla import kv_cache as kvc  # noqa: E402

CALLS = 20


def profiled_kernels(fn) -> dict:
    """{kernel name: mean device us per call of fn} over CALLS eager calls (after 3 warm-up calls)."""
    total = defaultdict(float)
    for ev in cuda_kernel_events(fn, CALLS):
        total[ev.name] += ev.device_time
    return {name: us / CALLS for name, us in total.items()}


def kernel_times(b, s_q, s_k, h_q, fp8=False):
    """(our kernels, FlashMLA's kernels or None, extra split pieces of our plan) for one shape."""
    q, cache, table, lens = inputs(b, s_q, s_k, h_q)
    meta, splits = torch_flashmla.get_mla_metadata(lens, s_q * h_q, 1, h_q, is_fp8_kvcache=fp8)
    descale_k = None
    if fp8:
        descale_k = torch.tensor([FP8_DESCALE], device=cache.device)
        cache = kvc.quantize_per_tensor_e4m3(cache, descale_k).view(torch.float8_e4m3fn)

    def step():
        torch_flashmla.get_mla_metadata(lens, s_q * h_q, 1, h_q, is_fp8_kvcache=fp8)
        torch.ops.flashmla.mla_decode(q, cache, table, lens, D_V, D_QK ** -0.5, False, meta, splits, None, descale_k)

    ours = profiled_kernels(step)
    fm = None if fp8 else flashmla_fn(q, cache, table, lens, h_q, s_q)
    return ours, (profiled_kernels(fm) if fm is not None else None), int(splits[-1].item()) - b


def main():
    fp8 = "--fp8" in sys.argv
    args = [int(x) for x in sys.argv[1:] if x != "--fp8"] or [128, 1, 4096, 128, 128, 1, 32768, 128, 64, 1, 8192, 16]
    for i in range(0, len(args), 4):
        shape = tuple(args[i:i + 4])
        ours, theirs, extra = kernel_times(*shape, fp8=fp8)
        print(f"b={shape[0]} s_q={shape[1]} s_k={shape[2]} h_q={shape[3]}: {extra} extra split pieces")
        for tag, times in (("ours", ours), ("FlashMLA", theirs)):
            if times is None:
                continue
            print(f"  {tag}:")
            for name, us in sorted(times.items(), key=lambda kv: -kv[1]):
                print(f"  {us:9.1f} us  {name[:90]}")


if __name__ == "__main__":
    main()
