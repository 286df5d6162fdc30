"""Dense MLA decode on the GPU, side by side: our op, the naive PyTorch decode (gather pages +
einsum) and FlashMLA when ``flash_mla`` is importable, all timed under CUDA-graph replay.
Columns: "op us" = the decode op (attention kernel + combine, plan computed beforehand), 30 calls
back to back per replay (sustained load; the floors are checked on it); "step us" = planner + decode op
(the whole call of a decode step); "MHz" = SM clock right after the sustained replays (the H200 holds
its 700 W power cap there on the compute-bound shapes); "1call us" = the op alone in a graph, replayed
after the GPU idled (full clock), and "1call" its TFLOPS (compute rows) or GB/s (memory rows).
"FM us", "FM" (TFLOPS or GB/s), "FM MHz", "FM 1call": FlashMLA's call timed the same ways, when importable;
"vs FM" = FM us / op us (1.00 = parity, above 1 ours is faster).
FLOPs and bytes use FlashMLA's formulas:
  FLOPs = b*s_q*h_q*s_k*2*(576+512)
  bytes = b*(s_q*h_q*576*2 + s_k*h_kv*576*2 + s_q*h_q*512*2)
Floors (docs/design.md §6): h_q = 128 cases >= 500 TFLOPS, h_q <= 64 cases >= 3.4 TB/s.

Ceilings measured on the H200 (docs/design.md §6): copy 4284 GB/s, bf16 matmul 799 TFLOPS.
Writes a table to stdout, JSON and a PNG plot to $OUT (or benchmarks/results/).

FP8 rows (--fp8): the same shapes over the per-tensor e4m3 cache (the bf16 cache quantized with descale
2^-6, q bf16), timed the same way right after the BF16 row; "ratio" = BF16 op us / FP8 op us; FP8 bytes
count one byte per cache value: bytes = b*(s_q*h_q*576*2 + s_k*h_kv*576 + s_q*h_q*512*2). Floors (issue
20): ratio >= 1.7 on the memory-bound shapes (h_q <= 64), >= 1.2 on the compute-bound ones (h_q 128).

Page sizes (--page-sizes, only these rows): the op (BF16 and FP8 cache) on b 128, s_q 1, s_k 8192, h_q 128
(compute-bound) and h_q 16 (memory-bound) with pages of 64, 32, 16, 4 and 1 tokens (random-permutation
tables); "x64" = op us / op us of the same shape with pages of 64. Pages that are not a multiple of 64 are
loaded in 64 / gcd(page_size, 64) slices per tile (docs/design.md §5.1).

Usage: python benchmarks/bench_decode.py [--quick] [--no-naive] [--sequential-tables] [--fp8] [--fp8-only-rows]
       python benchmarks/bench_decode.py --page-sizes [--pages=64,16,...]
--fp8-only-rows: only the op timings of the BF16 and FP8 rows (no step/plan/naive/FlashMLA timing).
Block tables are a random permutation of the cache's pages unless --sequential-tables (in order, as in
FlashMLA's benchmark); results then go to bench_decode_seq.{json,png}.
"""
from __future__ import annotations

import json
import os
import sys

import torch

import torch_flashmla
from bench_timing import COPY_GBS, MATMUL_TFLOPS, graph_time_us, single_call_us, sm_clock_mhz

D_QK, D_V = 576, 512
DEV = torch.device("cuda")
RESULTS = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

COMPUTE = [(128, s_q, s_k, 128) for s_q in (1, 2) for s_k in (4096, 8192, 16384, 32768)]
MEMORY = [(b, 1, s_k, h_q) for b in (64, 128) for s_k in (8192, 32768) for h_q in (16, 32, 64)]


def inputs(b, s_q, s_k, h_q, h_kv=1, page_size=64, dtype=torch.bfloat16, l2_pages=0, sequential=False):
    """Block tables are a random permutation of the cache's pages (a fragmented cache), or with
    ``sequential`` request i's pages in order after request i-1's (a fresh cache; FlashMLA's benchmark
    uses this layout). l2_pages > 0: every block-table entry points into a cache of that many pages
    (L2-resident), which times the kernel without the DRAM traffic (a diagnostic, not a real workload)."""
    g = torch.Generator(device=DEV)
    g.manual_seed(b + s_q + s_k + h_q)
    pages = -(-s_k // page_size)
    if l2_pages:
        cache = torch.randn(l2_pages, page_size, h_kv, D_QK, generator=g, device=DEV).to(dtype)
        table = torch.randint(0, l2_pages, (b, pages), generator=g, device=DEV).to(torch.int32)
    else:
        cache = torch.randn(b * pages, page_size, h_kv, D_QK, generator=g, device=DEV).to(dtype)
        if sequential:
            table = torch.arange(b * pages, device=DEV)
        else:
            table = torch.randperm(b * pages, generator=g, device=DEV)
        table = table.to(torch.int32).view(b, pages)
    lens = torch.full((b,), s_k, dtype=torch.int32, device=DEV)
    q = torch.randn(b, s_q, h_q, D_QK, generator=g, device=DEV).to(dtype)
    return q, cache, table, lens




PAGE_SHAPES = [(128, 1, 8192, 128), (128, 1, 8192, 16)]
PAGE_SIZES = (64, 32, 16, 4, 1)


def page_size_rows(page_sizes=PAGE_SIZES):
    """Op time per page size, BF16 and FP8 cache, next to pages of 64 (the one-load-per-tile kernel)."""
    scale = D_QK ** -0.5
    rows = []
    for b, s_q, s_k, h_q in PAGE_SHAPES:
        base = {}
        for page in page_sizes:
            q, cache, table, lens = inputs(b, s_q, s_k, h_q, page_size=page)
            meta, splits = torch_flashmla.get_mla_metadata(lens, s_q * h_q, 1, h_q)
            us, _, _ = graph_time_us(
                lambda: torch.ops.flashmla.mla_decode(q, cache, table, lens, D_V, scale, False, meta, splits))
            clock = sm_clock_mhz()
            fp8 = fp8_call(q, cache, table, lens)
            us8, _, _ = graph_time_us(fp8)
            base.setdefault("bf16", us)
            base.setdefault("fp8", us8)
            rows.append(dict(kind="page", b=b, s_q=s_q, s_k=s_k, h_q=h_q, page_size=page, ours_us=us, fp8_us=us8,
                             sustained_sm_mhz=clock, slowdown=us / base["bf16"], fp8_slowdown=us8 / base["fp8"],
                             ours_tflops=decode_flops(b, s_q, s_k, h_q) / us / 1e6,
                             ours_gbs=decode_bytes(b, s_q, s_k, h_q) / us / 1e3,
                             fp8_gbs=decode_bytes(b, s_q, s_k, h_q, cache_bytes=1) / us8 / 1e3))
            del q, cache, fp8, table, lens
            torch.cuda.empty_cache()
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "bench_decode_pages.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
    print()
    print("page sizes: op us (30 calls back to back per replay, median of 5), x64 = vs pages of 64, same shape")
    print(f"{'b':>4} {'s_q':>3} {'s_k':>6} {'h_q':>4} {'page':>4} {'bf16 us':>8} {'x64':>5} {'TFLOPS':>7} {'GB/s':>6} "
          f"{'MHz':>5} {'fp8 us':>8} {'x64':>5} {'fp8 GB/s':>8}")
    for r in rows:
        print(f"{r['b']:4d} {r['s_q']:3d} {r['s_k']:6d} {r['h_q']:4d} {r['page_size']:4d} {r['ours_us']:8.1f} "
              f"{r['slowdown']:5.2f} {r['ours_tflops']:7.1f} {r['ours_gbs']:6.0f} {r['sustained_sm_mhz'] or float('nan'):5.0f} "
              f"{r['fp8_us']:8.1f} {r['fp8_slowdown']:5.2f} {r['fp8_gbs']:8.0f}")


def decode_flops(b, s_q, s_k, h_q):
    return b * s_q * h_q * s_k * 2 * (D_QK + D_V)


def decode_bytes(b, s_q, s_k, h_q, h_kv=1, cache_bytes=2):
    return b * (s_q * h_q * D_QK * 2 + s_k * h_kv * D_QK * cache_bytes + s_q * h_q * D_V * 2)


FP8_DESCALE = 2.0 ** -6


def bf16_call(q, cache, table, lens):
    """The dense decode call over the 16-bit cache, as a function of no arguments (plan made here, not timed)."""
    s_q, h_q = q.shape[1], q.shape[2]
    meta, splits = torch_flashmla.get_mla_metadata(lens, s_q * h_q, 1, h_q)
    return lambda: torch.ops.flashmla.mla_decode(q, cache, table, lens, D_V, D_QK ** -0.5, False, meta, splits)


def fp8_call(q, cache, table, lens):
    """The FP8 dense decode call on the same inputs, as a function of no arguments: the cache quantized per tensor
    (descale 2^-6, a copy), the plan made with is_fp8_kvcache=True."""
    from torch_flashmla import kv_cache as kvc
    s_q, h_q = q.shape[1], q.shape[2]
    meta, splits = torch_flashmla.get_mla_metadata(lens, s_q * h_q, 1, h_q, is_fp8_kvcache=True)
    dk = torch.tensor([FP8_DESCALE], device=q.device)
    cache8 = kvc.quantize_per_tensor_e4m3(cache, dk).view(torch.float8_e4m3fn)
    scale = D_QK ** -0.5
    return lambda: torch.ops.flashmla.mla_decode(q, cache8, table, lens, D_V, scale, False, meta, splits, None, dk)


def fp8_row(q, cache, table, lens, b, s_q, s_k, h_q, bf16_us):
    """The FP8 dense decode of the same shape (fp8_call), timed as the BF16 rows are."""
    fn = fp8_call(q, cache, table, lens)
    one_us = single_call_us(fn)
    med, _, _ = graph_time_us(fn)
    clock = sm_clock_mhz()
    flops = decode_flops(b, s_q, s_k, h_q)
    nbytes = decode_bytes(b, s_q, s_k, h_q, cache_bytes=1)
    del fn
    return dict(fp8_us=med, fp8_single_us=one_us, fp8_mhz=clock, fp8_tflops=flops / med / 1e6,
                fp8_gbs=nbytes / med / 1e3, fp8_ratio=bf16_us / med)


def naive_decode(q, cache, table, lens, scale):
    """Gather every page, einsum, softmax in fp32 (what a model without a kernel does)."""
    b, s_q, h_q, _ = q.shape
    kv = cache[table.long()].flatten(1, 2)[:, :, 0]                              # [b, s_k, 576]
    scores = torch.einsum("bthd,bsd->bths", q, kv).float() * scale
    valid = torch.arange(kv.shape[1], device=q.device)[None, :] < lens[:, None]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.einsum("bths,bsd->bthd", torch.softmax(scores, dim=-1).to(q.dtype), kv[..., :D_V])


def flashmla_fn(q, cache, table, lens, h_q, s_q):
    """FlashMLA's call on the same inputs, or None when flash_mla is not importable."""
    try:
        import flash_mla
    except ImportError:
        return None
    meta, splits = flash_mla.get_mla_metadata(lens, s_q * h_q, 1)
    if splits is None:  # newer object form: the plan is made on the first call
        flash_mla.flash_mla_with_kvcache(q, cache, table, lens, D_V, meta, None)
    return lambda: flash_mla.flash_mla_with_kvcache(q, cache, table, lens, D_V, meta, splits)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, kind, key, ceiling, unit in ((axes[0], "compute", "tflops", MATMUL_TFLOPS, "TFLOPS"),
                                         (axes[1], "memory", "gbs", COPY_GBS, "GB/s")):
        sel = [r for r in rows if r["kind"] == kind]
        labels = [f"b{r['b']} sq{r['s_q']} sk{r['s_k']//1024}k h{r['h_q']}" for r in sel]
        x = range(len(sel))
        for offset, impl, color in ((-0.27, "ours", "tab:blue"), (0.0, "naive", "tab:gray"), (0.27, "flashmla", "tab:orange")):
            vals = [r.get(f"{impl}_{key}") or 0 for r in sel]
            if any(vals):
                ax.bar([i + offset for i in x], vals, width=0.27, label=impl, color=color)
        ax.axhline(ceiling, color="k", ls="--", lw=0.8, label="measured ceiling")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(unit)
        ax.set_title(f"dense MLA decode, {kind}-bound cases (H200)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    if "--page-sizes" in sys.argv:
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
        pages = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--pages=")]
        page_size_rows(tuple(int(x) for x in pages[0].split(",")) if pages else PAGE_SIZES)
        return
    quick = "--quick" in sys.argv
    with_naive = "--no-naive" not in sys.argv
    sequential = "--sequential-tables" in sys.argv
    with_fp8 = "--fp8" in sys.argv or "--fp8-only-rows" in sys.argv
    rows_only = "--fp8-only-rows" in sys.argv
    if rows_only:
        with_naive = False
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"block tables: {'sequential' if sequential else 'random permutation'}")
    rows = []
    cases = [("compute", c) for c in COMPUTE] + [("memory", c) for c in MEMORY]
    if quick:
        cases = cases[::3]
    if not rows_only:
        cases += [("l2diag", (128, 1, 4096, 128)), ("l2diag", (64, 1, 8192, 64)), ("l2diag", (64, 1, 8192, 16))]
    for kind, (b, s_q, s_k, h_q) in cases:
        q, cache, table, lens = inputs(b, s_q, s_k, h_q, l2_pages=16 if kind == "l2diag" else 0, sequential=sequential)
        meta, splits = torch_flashmla.get_mla_metadata(lens, s_q * h_q, 1, h_q)
        scale = D_QK ** -0.5
        fn = lambda: torch.ops.flashmla.mla_decode(q, cache, table, lens, D_V, scale, False, meta, splits)  # noqa: E731

        def step():
            m, n = torch_flashmla.get_mla_metadata(lens, s_q * h_q, 1, h_q)
            return torch.ops.flashmla.mla_decode(q, cache, table, lens, D_V, scale, False, m, n)

        one_us = single_call_us(fn)
        med, lo, hi = graph_time_us(fn)
        clock = sm_clock_mhz()  # right after the sustained replays
        step_us = plan_us = float("nan")
        if not rows_only:
            step_us, _, _ = graph_time_us(step)
            plan_us, _, _ = graph_time_us(lambda: torch_flashmla.get_mla_metadata(lens, s_q * h_q, 1, h_q))
        flops = decode_flops(b, s_q, s_k, h_q)
        nbytes = decode_bytes(b, s_q, s_k, h_q)
        row = dict(kind=kind, b=b, s_q=s_q, s_k=s_k, h_q=h_q, ours_us=med, ours_min_us=lo, ours_max_us=hi,
                   step_us=step_us, plan_us=plan_us, ours_tflops=flops / med / 1e6, ours_gbs=nbytes / med / 1e3,
                   sustained_sm_mhz=clock, single_us=one_us, single_tflops=flops / one_us / 1e6,
                   single_gbs=nbytes / one_us / 1e3)
        if with_naive and kind != "l2diag":
            naive_us, _, _ = graph_time_us(lambda: naive_decode(q, cache, table, lens, scale), iters=2, reps=3)
            row.update(naive_us=naive_us, naive_tflops=flops / naive_us / 1e6, naive_gbs=nbytes / naive_us / 1e3)
        if with_fp8 and kind != "l2diag":
            row.update(fp8_row(q, cache, table, lens, b, s_q, s_k, h_q, med))
            row["fp8_floor_met"] = row["fp8_ratio"] >= (1.2 if kind == "compute" else 1.7)
        ref = None if rows_only else flashmla_fn(q, cache, table, lens, h_q, s_q)
        if ref is not None:  # timed the same two ways as ours
            fm_one_us = single_call_us(ref)
            fm_us, _, _ = graph_time_us(ref)
            row.update(flashmla_us=fm_us, flashmla_tflops=flops / fm_us / 1e6, flashmla_gbs=nbytes / fm_us / 1e3,
                       flashmla_mhz=sm_clock_mhz(), flashmla_single_us=fm_one_us,
                       flashmla_single_tflops=flops / fm_one_us / 1e6, flashmla_single_gbs=nbytes / fm_one_us / 1e3)
        if kind == "compute":
            row["floor_met"] = row["ours_tflops"] >= 500
        elif kind == "memory":
            row["floor_met"] = row["ours_gbs"] >= 3400
        rows.append(row)
        del q, cache, table, lens
        torch.cuda.empty_cache()
    os.makedirs(RESULTS, exist_ok=True)
    name = "bench_decode_seq" if sequential else "bench_decode"
    with open(os.path.join(RESULTS, name + ".json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_gbs=COPY_GBS,
                       matmul_tflops=MATMUL_TFLOPS, sequential_tables=sequential, rows=rows), f, indent=1)
    plot(rows, os.path.join(RESULTS, name + ".png"))
    print()
    print(f"{'kind':8} {'b':>4} {'s_q':>3} {'s_k':>6} {'h_q':>4} {'op us':>8} {'step us':>8} {'TFLOPS':>7} "
          f"{'%mm':>4} {'GB/s':>6} {'%cp':>4} {'MHz':>5} {'1call us':>8} {'1call':>6} {'naive us':>9} {'naive TF':>8} "
          f"{'FM us':>8} {'FM':>6} {'FM MHz':>6} {'FM 1call':>8} {'vs FM':>6} floor")
    for r in rows:
        floor = r.get("floor_met")
        unit = "gbs" if r["kind"] == "memory" else "tflops"
        print(f"{r['kind']:8} {r['b']:4d} {r['s_q']:3d} {r['s_k']:6d} {r['h_q']:4d} {r['ours_us']:8.1f} "
              f"{r['step_us']:8.1f} {r['ours_tflops']:7.1f} {100 * r['ours_tflops'] / MATMUL_TFLOPS:4.0f} "
              f"{r['ours_gbs']:6.0f} {100 * r['ours_gbs'] / COPY_GBS:4.0f} {r['sustained_sm_mhz'] or float('nan'):5.0f} "
              f"{r['single_us']:8.1f} {r['single_tflops' if r['kind'] != 'memory' else 'single_gbs']:6.0f} "
              f"{r.get('naive_us', float('nan')):9.1f} {r.get('naive_tflops', float('nan')):8.1f} "
              f"{r.get('flashmla_us', float('nan')):8.1f} {r.get('flashmla_' + unit, float('nan')):6.0f} "
              f"{r.get('flashmla_mhz') or float('nan'):6.0f} {r.get('flashmla_single_' + unit, float('nan')):8.0f} "
              f"{r.get('flashmla_us', float('nan')) / r['ours_us']:6.2f} "
              f"{'-' if floor is None else 'ok' if floor else 'MISS'}")
    if with_fp8:
        print()
        print("FP8 (per-tensor e4m3 cache, q bf16) next to BF16, same shapes; ratio = BF16 op us / FP8 op us")
        print(f"{'kind':8} {'b':>4} {'s_q':>3} {'s_k':>6} {'h_q':>4} {'bf16 us':>8} {'fp8 us':>8} {'ratio':>6} "
              f"{'fp8 TF':>7} {'fp8 GB/s':>8} {'MHz':>5} {'1call us':>8} floor")
        for r in rows:
            if "fp8_us" not in r:
                continue
            print(f"{r['kind']:8} {r['b']:4d} {r['s_q']:3d} {r['s_k']:6d} {r['h_q']:4d} {r['ours_us']:8.1f} "
                  f"{r['fp8_us']:8.1f} {r['fp8_ratio']:6.2f} {r['fp8_tflops']:7.1f} {r['fp8_gbs']:8.0f} "
                  f"{r['fp8_mhz'] or float('nan'):5.0f} {r['fp8_single_us']:8.1f} "
                  f"{'ok' if r['fp8_floor_met'] else 'MISS'} (>= {1.2 if r['kind'] == 'compute' else 1.7})")


if __name__ == "__main__":
    main()
