"""Sparse FP8 MLA decode (DeepSeek Sparse Attention) on the GPU, side by side: our op, the PyTorch
reference path on the GPU and FlashMLA when ``flash_mla`` is importable.

Columns:
  "op us"   = torch_flashmla.sparse_mla_decode (attention kernel + combine, plan computed beforehand),
              median per-call time over several CUDA-graph replays (like bench_decode.py);
  "step us" = planner (get_mla_metadata) + op, the whole call of a decode step, same timing;
  "ref us"  = torch_flashmla.reference.sparse_mla_decode called directly on the GPU tensors (the path
              the op takes without an SM90 kernel), CUDA events, few calls (it is slow);
  "FM us"   = FlashMLA's flash_mla_with_kvcache(..., is_fp8_kvcache=True, indices=...), CUDA graphs;
  "vs FM"   = FM us / op us (1.00 = parity, above 1 ours is faster);
  "MHz0", "MHz", "FM MHz" = SM clock before our op's timing (what the previous measurement left), after
              it, and after FlashMLA's: the long rows run at the power cap, and a row timed right after
              another library's long row can start from a lower clock.
FLOPs and bytes use FlashMLA's formulas (only the topk selected tokens are read, 656 B each):
  FLOPs = b*s_q*h_q*topk*2*(576+512)
  bytes = b*s_q*topk*656 + b*s_q*h_q*576*2 (q) + b*s_q*h_q*512*2 (out)
Ceilings measured on the H200 (docs/design.md §6): copy 4284 GB/s, bf16 matmul 799 TFLOPS ("%mm").
Floors (docs/design.md §6): >= 330 TFLOPS at (b=128, h_q=128, s_q=2, topk=2048), >= 360 TFLOPS at
(b=148, h_q=128, s_q=2, topk=16384). FlashMLA on the same H200 (docs/design.md §6, reference
constants, not measured here): 424 and 468 TFLOPS ("FM doc TF").
Without the SM90 kernel (or with FLASHMLA_FORCE_REFERENCE=1) "ours" IS the reference path; it is
then timed eagerly with CUDA events (the reference planner syncs with the host, no graph capture).

Inputs are built on the GPU: a paged FP8 cache of b * s_k / 64 pages (page_size 64, one set of pages
per request, shuffled block table), indices = topk distinct random positions of the request's s_k
tokens per query, all valid (no -1), mapped through the block table to block_id * 64 + offset.
Writes a table to stdout (last), JSON and a PNG plot to $OUT (or benchmarks/results/).

DeepSeek V4 ("MODEL1") rows (d_qk 512, 584-byte tokens in pages of 64 with FlashMLA's page stride):
topk 128 main indices + 512 or 1024 extra indices (a second V4 cache, also page 64) per query, s_q 2,
h_q 64 and 128, b 74/148/256; every request owns 8192 main and 2048 extra tokens. "topk" in the table
is the attended total (main + extra); FLOPs and bytes count both caches:
  FLOPs = b*s_q*h_q*(topk+extra)*2*(512+512)
  bytes = b*s_q*(topk+extra)*584 + b*s_q*h_q*512*2 (q) + b*s_q*h_q*512*2 (out)

Usage: python benchmarks/bench_sparse_decode.py [--quick] [--no-reference] [--no-flashmla]
                                                [--ref-iters N] [--v4 | --no-v4]
                                                [--flashmla-first] [--settle-ms MS]
  --quick         first case only (b=128, h_q=128, s_q=2, topk=2048)
  --v4            the V4 rows only;  --no-v4: the V3.2 rows only
  --no-reference  skip the reference-path column (c) (when ours is the SM90 kernel)
  --no-flashmla   skip FlashMLA even when importable
  --ref-iters N   timed calls of the reference path (default 3, after one warm-up call)
  --flashmla-first  time FlashMLA before ours on each shape (default: ours first)
  --settle-ms MS  idle MS milliseconds before each op timing (ours and FlashMLA), so that each starts
                  from an idle GPU rather than from the power state the previous timing left (default 0)
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
import traceback

import torch

import torch_flashmla
from torch_flashmla import kv_cache as kvc
from torch_flashmla import reference
from bench_timing import COPY_GBS, MATMUL_TFLOPS, graph_time_us, sm_clock_mhz

D_QK, D_V, RECORD = kvc.D_QK, kvc.D_V, kvc.FP8_RECORD_BYTES   # 576, 512, 656
PAGE = 64
RESULTS = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# (b, h_q, s_q, s_k, topk); cases sharing (b, s_k) share one cache. The first is the --quick case.
CASES = [
    (128, 128, 2, 32768, 2048),
    (128, 64, 2, 32768, 2048),
    (148, 128, 2, 65536, 16384),
    (148, 64, 2, 65536, 16384),
]
# DeepSeek V4 rows: (b, h_q, s_q, s_k, topk, extra_s_k, extra_topk); cases sharing b share the caches.
V4_D_QK, V4_TOKEN = kvc.V4_D_QK, kvc.V4_TOKEN_BYTES   # 512, 584
V4_CASES = [(b, h_q, 2, 8192, 128, 2048, extra) for b in (74, 148, 256) for h_q in (64, 128) for extra in (512, 1024)]
# keyed by (b, h_q, s_q, topk)
FLOOR_TFLOPS = {(128, 128, 2, 2048): 330.0, (148, 128, 2, 16384): 360.0}
FLASHMLA_DOC_TFLOPS = {(128, 128, 2, 2048): 424.0, (148, 128, 2, 16384): 468.0}  # docs/design.md §6, not measured here


# --------------------------------------------------------------------------------------------
# workload formulas
# --------------------------------------------------------------------------------------------
def sparse_flops(b: int, s_q: int, h_q: int, topk: int) -> int:
    return b * s_q * h_q * topk * 2 * (D_QK + D_V)


def sparse_bytes(b: int, s_q: int, h_q: int, topk: int) -> int:
    return b * s_q * topk * RECORD + b * s_q * h_q * D_QK * 2 + b * s_q * h_q * D_V * 2


def tflops(flops: int, us: float) -> float:
    return flops / us / 1e6


def gbs(nbytes: int, us: float) -> float:
    return nbytes / us / 1e3


# --------------------------------------------------------------------------------------------
# inputs (built on the device; work on the CPU too, for small sizes)
# --------------------------------------------------------------------------------------------
def make_cache(b: int, s_k: int, device, seed: int = 0, chunk_pages: int = 2048):
    """FP8 cache [b * pages, 64, 1, 656] uint8 (quantized from bf16 randn, in chunks to bound the
    temporaries) and a shuffled block table [b, pages] int32 (request i owns row i's pages)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed + b + s_k)
    pages = -(-s_k // PAGE)
    num_blocks = b * pages
    cache = torch.empty(num_blocks, PAGE, 1, RECORD, dtype=torch.uint8, device=device)
    for start in range(0, num_blocks, chunk_pages):
        n = min(chunk_pages, num_blocks - start)
        kv = torch.randn(n, PAGE, 1, D_QK, generator=g, device=device).to(torch.bfloat16)
        cache[start:start + n] = kvc.quantize_kv_fp8(kv)
    table = torch.randperm(num_blocks, generator=g, device=device).to(torch.int32).view(b, pages)
    return cache, table


def make_indices(table: torch.Tensor, s_k: int, s_q: int, topk: int, seed: int = 0, chunk_rows: int = 64):
    """[b, s_q, topk] int32: per query, topk distinct random token positions in [0, s_k) of its request,
    as block_id * 64 + offset (all valid, no -1)."""
    b = table.shape[0]
    assert topk <= s_k, (topk, s_k)
    device = table.device
    g = torch.Generator(device=device)
    g.manual_seed(seed + 7 * b + s_q + topk)
    pos = torch.empty(b * s_q, topk, dtype=torch.int64, device=device)
    for start in range(0, b * s_q, chunk_rows):   # distinct positions: top-k of uniform noise
        n = min(chunk_rows, b * s_q - start)
        pos[start:start + n] = torch.rand(n, s_k, generator=g, device=device).topk(topk, dim=-1).indices
    pos = pos.view(b, s_q, topk)
    blocks = torch.gather(table.long(), 1, (pos // PAGE).view(b, -1)).view(b, s_q, topk)
    return (blocks * PAGE + pos % PAGE).to(torch.int32)


def make_q(b: int, s_q: int, h_q: int, device, seed: int = 0, d_qk: int = D_QK) -> torch.Tensor:
    g = torch.Generator(device=device)
    g.manual_seed(seed + 3 * b + s_q + h_q)
    return torch.randn(b, s_q, h_q, d_qk, generator=g, device=device).to(torch.bfloat16)


def make_cache_v4(b: int, s_k: int, device, seed: int = 0, chunk_pages: int = 2048):
    """V4 cache [b * pages, 64, 1, 584] with FlashMLA's page stride (kv_cache.new_fp8_v4_cache),
    quantized from bf16 randn in chunks, and a shuffled block table [b, pages] int32."""
    g = torch.Generator(device=device)
    g.manual_seed(seed + 11 * b + s_k)
    pages = -(-s_k // PAGE)
    num_blocks = b * pages
    cache = kvc.new_fp8_v4_cache(num_blocks, PAGE, device=device)
    dst = kvc.fp8_v4_pages(cache)
    for start in range(0, num_blocks, chunk_pages):
        n = min(chunk_pages, num_blocks - start)
        kv = torch.randn(n, PAGE, 1, V4_D_QK, generator=g, device=device).to(torch.bfloat16)
        dst[start:start + n].copy_(kvc.fp8_v4_pages(kvc.quantize_kv_fp8_v4(kv)))
    table = torch.randperm(num_blocks, generator=g, device=device).to(torch.int32).view(b, pages)
    return cache, table


def plan(b: int, s_q: int, h_q: int, topk: int, device):
    seqlens = torch.full((b,), topk, dtype=torch.int32, device=device)
    return torch_flashmla.get_mla_metadata(seqlens, s_q * h_q, 1, h_q, is_fp8_kvcache=True, topk=topk)


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def events_time_us(fn, iters: int = 3, warmup: int = 1):
    """Eager per-call times with CUDA events: (median, min, max) microseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times), min(times), max(times)


def graph_iters(fn, budget_us: float = 30000.0, lo: int = 3, hi: int = 30) -> int:
    """Calls per graph: about budget_us of work per replay (one eager call estimates the time)."""
    est, _, _ = events_time_us(fn, iters=1, warmup=1)
    return int(max(lo, min(hi, budget_us // max(est, 1.0))))




def time_us(fn, use_graph: bool, eager_iters: int = 3):
    if use_graph:
        return graph_time_us(fn, iters=graph_iters(fn))
    return events_time_us(fn, iters=eager_iters)


# --------------------------------------------------------------------------------------------
# FlashMLA
# --------------------------------------------------------------------------------------------
def flashmla_fns(q, cache, table, indices, s_k, topk, scale):
    """(op_fn, step_fn, api) calling FlashMLA's sparse FP8 decode on the same inputs, or raises.

    Two public interfaces exist: the September 2025 one (get_mla_metadata(cache_seqlens,
    s_q*h_q//h_kv, h_kv, h_q, is_fp8_kvcache, topk) -> (tile_scheduler_metadata, num_splits) tensors;
    flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, metadata, num_splits,
    softmax_scale, causal, is_fp8_kvcache, indices)) and the 2026 one (get_mla_metadata() ->
    (FlashMLASchedMeta, None), the plan made on the first call and kept in the object)."""
    import flash_mla
    b, s_q, h_q, _ = q.shape
    lens = torch.full((b,), s_k, dtype=torch.int32, device=q.device)
    meta, splits = flash_mla.get_mla_metadata(lens, s_q * h_q, 1, h_q, True, topk)

    def call(m, n):
        return flash_mla.flash_mla_with_kvcache(q, cache, table, lens, D_V, m, n, softmax_scale=scale,
                                                causal=False, is_fp8_kvcache=True, indices=indices)

    if splits is None:  # object form: plan on the first call, reused while shapes/lengths stay the same
        call(meta, None)
        torch.cuda.synchronize()

        def step():
            m, _ = flash_mla.get_mla_metadata()
            return call(m, None)
        return (lambda: call(meta, None)), step, "sched_meta"

    def step_tensors():
        m, n = flash_mla.get_mla_metadata(lens, s_q * h_q, 1, h_q, True, topk)
        return call(m, n)
    return (lambda: call(meta, splits)), step_tensors, "tensors"


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------
def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def settle(opts) -> None:
    """Idle opts.settle_ms before a timing (nothing when 0)."""
    if opts.settle_ms > 0:
        torch.cuda.synchronize()
        time.sleep(opts.settle_ms / 1000)


def time_ours(row: dict, op, step, plan_fn, use_graph: bool, eager_iters: int, flops: int, nbytes: int,
              opts) -> None:
    """Our op, step (planner + op) and planner times into `row`, with the SM clock before and after the op's."""
    settle(opts)
    row["ours_mhz_before"] = sm_clock_mhz()
    med, lo, hi = time_us(op, use_graph, eager_iters)
    row.update(ours_us=med, ours_min_us=lo, ours_max_us=hi, ours_mhz=sm_clock_mhz(),
               ours_tflops=tflops(flops, med), ours_gbs=gbs(nbytes, med))
    row["step_us"], _, _ = time_us(step, use_graph, eager_iters)
    row["plan_us"], _, _ = time_us(plan_fn, use_graph, 10)
    row["step_tflops"] = tflops(flops, row["step_us"])
    if row.get("floor_tflops") is not None:
        row["floor_met"] = row["ours_tflops"] >= row["floor_tflops"]


def timed_in_order(opts, ours, flashmla) -> None:
    """Runs the two timing steps of a shape in the order --flashmla-first asks for."""
    for step in ((flashmla, ours) if opts.flashmla_first else (ours, flashmla)):
        step()


def time_reference(row: dict, ref, out_ours: torch.Tensor, flops: int, opts) -> None:
    """The reference path's time (CUDA events, no warm-up: it is slow) and its largest difference from ours."""
    out_ref = ref()[0]
    ref_us, _, _ = events_time_us(ref, iters=opts.ref_iters, warmup=0)
    row.update(ref_us=ref_us, ref_tflops=tflops(flops, ref_us), ours_vs_ref_maxdiff=max_diff(out_ours, out_ref))


def run_case(case, cache, table, opts, ours_graph: bool, ours_is_ref: bool, notes: list):
    b, h_q, s_q, s_k, topk = case
    device = cache.device
    q = make_q(b, s_q, h_q, device)
    indices = make_indices(table, s_k, s_q, topk)
    scale = D_QK ** -0.5
    meta, splits = plan(b, s_q, h_q, topk, device)
    flops, nbytes = sparse_flops(b, s_q, h_q, topk), sparse_bytes(b, s_q, h_q, topk)
    key = (b, h_q, s_q, topk)

    def op():
        return torch_flashmla.sparse_mla_decode(q, cache, indices, meta, splits, softmax_scale=scale)

    def step():
        m, n = plan(b, s_q, h_q, topk, device)
        return torch_flashmla.sparse_mla_decode(q, cache, indices, m, n, softmax_scale=scale)

    eager_iters = opts.ref_iters if ours_is_ref else 10
    out_ours = op()[0]
    row = dict(b=b, h_q=h_q, s_q=s_q, s_k=s_k, topk=topk, page_size=PAGE, flops=flops, bytes=nbytes,
               ours_path="reference" if ours_is_ref else "sm90", ours_timing="graph" if ours_graph else "events",
               floor_tflops=FLOOR_TFLOPS.get(key), flashmla_doc_tflops=FLASHMLA_DOC_TFLOPS.get(key))
    timed_in_order(opts, lambda: time_ours(row, op, step, lambda: plan(b, s_q, h_q, topk, device), ours_graph,
                                           eager_iters, flops, nbytes, opts), lambda: time_flashmla(q, cache, table, indices, s_k, topk, scale, row, flops,
                                                          nbytes, opts, notes, case))

    # (c) the reference path, called directly (ours already is it when there is no SM90 kernel)
    if ours_is_ref:
        row.update(ref_us=row["ours_us"], ref_tflops=row["ours_tflops"], ref_note="ours is the reference path")
    elif opts.reference:
        time_reference(row, lambda: reference.sparse_mla_decode(q, cache, indices, None, None, None, None, None, D_V,
                                                                 scale), out_ours, flops, opts)
    return row


def time_flashmla(q, cache, table, indices, s_k, topk, scale, row, flops, nbytes, opts, notes, case) -> None:
    """(d) FlashMLA's op and step times of a V3.2 row into `row` (its columns stay empty when it fails)."""
    if not opts.flashmla:
        return
    try:
        fm_op, fm_step, api = flashmla_fns(q, cache, table, indices, s_k, topk, scale)
        fm_op()
        settle(opts)
        fm_us, _, _ = graph_time_us(fm_op, iters=graph_iters(fm_op))
        row.update(flashmla_api=api, flashmla_us=fm_us, flashmla_tflops=tflops(flops, fm_us),
                   flashmla_gbs=gbs(nbytes, fm_us), flashmla_mhz=sm_clock_mhz())
        try:
            row["flashmla_step_us"], _, _ = graph_time_us(fm_step, iters=graph_iters(fm_step))
        except Exception as e:  # noqa: BLE001
            notes.append(f"FlashMLA step (planner + op) {case}: {type(e).__name__}: {e}")
    except ImportError as e:
        row["flashmla_error"] = f"not importable ({e})"
    except Exception as e:  # noqa: BLE001  (an API mismatch only empties the column)
        row["flashmla_error"] = f"{type(e).__name__}: {e}"
        notes.append(f"FlashMLA failed on {case}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        traceback.print_exc()


def flashmla_fns_v4(q, cache, indices, extra_cache, extra_indices, topk, scale):
    """(op_fn, step_fn, api): FlashMLA's sparse decode over V4 caches (the 2026 interface: plan in a
    FlashMLASchedMeta made on the first call; extra cache through extra_k_cache /
    extra_indices_in_kvcache), or raises."""
    import flash_mla
    meta, _ = flash_mla.get_mla_metadata()

    def call(m):
        return flash_mla.flash_mla_with_kvcache(q, cache, None, None, D_V, m, None, softmax_scale=scale,
                                                is_fp8_kvcache=True, indices=indices, extra_k_cache=extra_cache,
                                                extra_indices_in_kvcache=extra_indices)
    call(meta)
    torch.cuda.synchronize()

    def step():
        m, _ = flash_mla.get_mla_metadata()
        return call(m)
    return (lambda: call(meta)), step, "sched_meta"


def run_case_v4(case, caches, opts, notes: list):
    """One V4 row (SM90 kernel path, CUDA graphs). caches = (cache, table, extra_cache, extra_table)."""
    b, h_q, s_q, s_k, topk, extra_s_k, extra_topk = case
    cache, table, extra_cache, extra_table = caches
    device = cache.device
    q = make_q(b, s_q, h_q, device, d_qk=V4_D_QK)
    indices = make_indices(table, s_k, s_q, topk)
    extra_indices = make_indices(extra_table, extra_s_k, s_q, extra_topk, seed=1)
    scale = V4_D_QK ** -0.5
    total = topk + extra_topk

    def plan_v4():
        seqlens = torch.full((b,), total, dtype=torch.int32, device=device)
        return torch_flashmla.get_mla_metadata(seqlens, s_q * h_q, 1, h_q, is_fp8_kvcache=True, topk=total)

    meta, splits = plan_v4()
    flops = b * s_q * h_q * total * 2 * (V4_D_QK + D_V)
    nbytes = b * s_q * total * V4_TOKEN + b * s_q * h_q * V4_D_QK * 2 + b * s_q * h_q * D_V * 2

    def op():
        return torch_flashmla.sparse_mla_decode(q, cache, indices, meta, splits, extra_kv_cache=extra_cache,
                                                extra_indices=extra_indices, softmax_scale=scale)

    def step():
        m, n = plan_v4()
        return torch_flashmla.sparse_mla_decode(q, cache, indices, m, n, extra_kv_cache=extra_cache,
                                                extra_indices=extra_indices, softmax_scale=scale)

    out_ours = op()[0]
    row = dict(layout="v4", b=b, h_q=h_q, s_q=s_q, s_k=s_k, topk=total, main_topk=topk, extra_topk=extra_topk,
               page_size=PAGE, flops=flops, bytes=nbytes, ours_path="sm90", ours_timing="graph", floor_tflops=None,
               flashmla_doc_tflops=None)

    def time_fm():
        if not opts.flashmla:
            return
        try:
            fm_op, _, api = flashmla_fns_v4(q, cache, indices, extra_cache, extra_indices, total, scale)
            settle(opts)
            fm_us, _, _ = graph_time_us(fm_op, iters=graph_iters(fm_op))
            row.update(flashmla_api=api, flashmla_us=fm_us, flashmla_tflops=tflops(flops, fm_us),
                       flashmla_gbs=gbs(nbytes, fm_us), flashmla_mhz=sm_clock_mhz())
        except ImportError as e:
            row["flashmla_error"] = f"not importable ({e})"
        except Exception as e:  # noqa: BLE001
            row["flashmla_error"] = f"{type(e).__name__}: {e}"
            notes.append(f"FlashMLA failed on V4 {case}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    timed_in_order(opts, lambda: time_ours(row, op, step, plan_v4, True, 3, flops, nbytes, opts), time_fm)
    if row.get("flashmla_us"):
        row["ours_vs_flashmla"] = row["flashmla_us"] / row["ours_us"]
    if opts.reference:
        time_reference(row, lambda: reference.sparse_mla_decode(q, cache, indices, None, None, extra_cache,
                                                                 extra_indices, None, D_V, scale), out_ours, flops, opts)
    return row


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def case_label(r) -> str:
    if r.get("layout") == "v4":
        return f"V4 b{r['b']} h{r['h_q']} sq{r['s_q']} {r['main_topk']}+{r['extra_topk']}"
    return f"b{r['b']} h{r['h_q']} sq{r['s_q']} topk{r['topk'] // 1024 if r['topk'] >= 1024 else r['topk']}" \
           f"{'k' if r['topk'] >= 1024 else ''}"


def plot(rows, path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed"
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(rows)), 4.5))
    x = list(range(len(rows)))
    series = (("ours_tflops", "ours (op)", "tab:blue", None), ("step_tflops", "ours (planner + op)", "tab:cyan", None),
              ("flashmla_tflops", "FlashMLA (measured)", "tab:orange", None),
              ("flashmla_doc_tflops", "FlashMLA (docs/design.md §6 constant)", "none", "//"),
              ("ref_tflops", "reference path", "tab:gray", None))
    shown = [s for s in series if any(r.get(s[0]) for r in rows)]
    width = 0.8 / max(1, len(shown))
    for k, (key, label, color, hatch) in enumerate(shown):
        vals = [r.get(key) or 0 for r in rows]
        ax.bar([i + (k - (len(shown) - 1) / 2) * width for i in x], vals, width=width, label=label,
               color=color, hatch=hatch, edgecolor="tab:orange" if hatch else None)
    for i, r in enumerate(rows):
        if r.get("floor_tflops"):
            ax.hlines(r["floor_tflops"], i - 0.45, i + 0.45, colors="tab:red", linestyles=":", lw=1.5,
                      label="floor" if i == 0 or not any(rows[j].get("floor_tflops") for j in range(i)) else None)
    ax.axhline(MATMUL_TFLOPS, color="k", ls="--", lw=0.8, label="bf16 matmul ceiling (799)")
    ax.set_xticks(x)
    ax.set_xticklabels([case_label(r) for r in rows], fontsize=8)
    ax.set_ylabel("TFLOPS")
    ax.set_ylim(0, MATMUL_TFLOPS * 1.3)
    path_note = "ours = reference path (no SM90 kernel)" if any(r["ours_path"] == "reference" for r in rows) else ""
    ax.set_title(f"sparse FP8 MLA decode, page 64 ({torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'})"
                 f"{'; ' + path_note if path_note else ''}", fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def fmt(v, spec, width) -> str:
    return f"{v:{width}{spec}}" if isinstance(v, (int, float)) else f"{'-':>{width}}"


def table(rows) -> str:
    head = (f"{'b':>4} {'h_q':>4} {'s_q':>3} {'s_k':>6} {'topk':>6} {'op us':>8} {'step us':>8} {'plan us':>7} "
            f"{'TFLOPS':>7} {'%mm':>4} {'GB/s':>6} {'floor':>5} {'ok':>4} {'ref us':>9} {'diff':>7} "
            f"{'FM us':>8} {'FM TF':>6} {'vs FM':>6} {'FM doc TF':>9} {'MHz0':>5} {'MHz':>5} {'FM MHz':>6}")
    lines = [head]
    for r in rows:
        floor = r.get("floor_met")
        lines.append(
            ("V4 " if r.get("layout") == "v4" else "") +
            f"{r['b']:4d} {r['h_q']:4d} {r['s_q']:3d} {r['s_k']:6d} {r['topk']:6d} {r['ours_us']:8.1f} "
            f"{r['step_us']:8.1f} {r['plan_us']:7.1f} {r['ours_tflops']:7.1f} "
            f"{100 * r['ours_tflops'] / MATMUL_TFLOPS:4.0f} {r['ours_gbs']:6.0f} "
            f"{fmt(r.get('floor_tflops'), '.0f', 5)} {'-' if floor is None else 'ok' if floor else 'MISS':>4} "
            f"{fmt(r.get('ref_us'), '.0f', 9)} {fmt(r.get('ours_vs_ref_maxdiff'), '.1e', 7)} "
            f"{fmt(r.get('flashmla_us'), '.1f', 8)} {fmt(r.get('flashmla_tflops'), '.0f', 6)} "
            f"{fmt(r['flashmla_us'] / r['ours_us'] if r.get('flashmla_us') else None, '.2f', 6)} "
            f"{fmt(r.get('flashmla_doc_tflops'), '.0f', 9)} {fmt(r.get('ours_mhz_before'), 'd', 5)} "
            f"{fmt(r.get('ours_mhz'), 'd', 5)} {fmt(r.get('flashmla_mhz'), 'd', 6)}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="first case only (b=128, h_q=128, s_q=2, topk=2048)")
    p.add_argument("--no-reference", dest="reference", action="store_false", help="skip the reference-path column")
    p.add_argument("--no-flashmla", dest="flashmla", action="store_false", help="skip FlashMLA even when importable")
    p.add_argument("--ref-iters", type=int, default=3, help="timed calls of the (slow) reference path")
    p.add_argument("--v4", dest="layout", action="store_const", const="v4", default="all",
                   help="the DeepSeek V4 rows only")
    p.add_argument("--no-v4", dest="layout", action="store_const", const="v32", help="the V3.2 rows only")
    p.add_argument("--flashmla-first", action="store_true", help="time FlashMLA before ours on each shape")
    p.add_argument("--settle-ms", type=float, default=0.0,
                   help="idle this many milliseconds before each op timing (default 0)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    opts = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_sparse_decode: no CUDA device; nothing to time")
        return 1
    from torch_flashmla._registration import cuda_path
    dev = torch.device("cuda", torch.cuda.current_device())
    op_path, plan_path = cuda_path("sparse_mla_decode", dev), cuda_path("get_mla_metadata", dev)
    ours_is_ref = op_path != "sm90"
    ours_graph = op_path == "sm90" and plan_path == "sm90"
    name = torch.cuda.get_device_name()
    print(f"device: {name}  torch {torch.__version__}  has_sm90_kernels={torch_flashmla.has_sm90_kernels()}  "
          f"sparse_mla_decode path: {op_path}  planner path: {plan_path}")
    notes = []
    if ours_is_ref:
        why = "FLASHMLA_FORCE_REFERENCE=1" if os.environ.get("FLASHMLA_FORCE_REFERENCE", "0") == "1" \
            else "no SM90 kernel in this build/device"
        notes.append(f"ours = the PyTorch reference path on the GPU ({why}); timed eagerly with CUDA events, "
                     f"{opts.ref_iters} calls; 'ref us' repeats it")
    elif not ours_graph:
        notes.append("planner runs the reference (host sync): ours timed eagerly with CUDA events, not in graphs")
    try:
        importlib.import_module("flash_mla")
        fm_status = "FlashMLA importable" if opts.flashmla else "FlashMLA skipped (--no-flashmla)"
    except ImportError as e:
        fm_status = f"FlashMLA not importable ({e}): FM columns empty"
    notes.append(fm_status)

    cases = [] if opts.layout == "v4" else CASES[:1] if opts.quick else CASES
    rows = []
    cache = table_ = None
    cache_key = None
    with torch.no_grad():
        for case in cases:
            b, h_q, s_q, s_k, topk = case
            if cache_key != (b, s_k):
                cache = table_ = None
                torch.cuda.empty_cache()
                cache, table_ = make_cache(b, s_k, dev)
                cache_key = (b, s_k)
            print(f"case b={b} h_q={h_q} s_q={s_q} s_k={s_k} topk={topk} ...", flush=True)
            try:
                rows.append(run_case(case, cache, table_, opts, ours_graph, ours_is_ref, notes))
            except Exception as e:  # noqa: BLE001  (keep the other cases)
                traceback.print_exc()
                notes.append(f"case {case} failed: {type(e).__name__}: {e}")
            torch.cuda.empty_cache()
    del cache, table_

    v4_cases = V4_CASES if opts.layout != "v32" and not opts.quick else []
    if v4_cases and ours_is_ref:
        notes.append("V4 rows skipped: no SM90 kernel in this build/device")
        v4_cases = []
    caches, caches_b = None, None
    with torch.no_grad():
        for case in v4_cases:
            b, h_q, s_q, s_k, topk, extra_s_k, extra_topk = case
            if caches_b != b:
                caches = None
                torch.cuda.empty_cache()
                caches = make_cache_v4(b, s_k, dev) + make_cache_v4(b, extra_s_k, dev, seed=1)
                caches_b = b
            print(f"case V4 b={b} h_q={h_q} s_q={s_q} topk={topk}+{extra_topk} ...", flush=True)
            try:
                rows.append(run_case_v4(case, caches, opts, notes))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                notes.append(f"V4 case {case} failed: {type(e).__name__}: {e}")
    caches = None

    os.makedirs(RESULTS, exist_ok=True)
    json_path = os.path.join(RESULTS, "bench_sparse_decode.json")
    with open(json_path, "w") as f:
        json.dump(dict(device=name, torch=torch.__version__, ours_path=op_path, planner_path=plan_path,
                       copy_gbs=COPY_GBS, matmul_tflops=MATMUL_TFLOPS, page_size=PAGE,
                       floors_tflops={str(k): v for k, v in FLOOR_TFLOPS.items()},
                       flashmla_doc_tflops_reference_constants={str(k): v for k, v in FLASHMLA_DOC_TFLOPS.items()},
                       notes=notes, rows=rows), f, indent=1)
    plot_msg = plot(rows, os.path.join(RESULTS, "bench_sparse_decode.png")) if rows else "plot skipped: no rows"

    print()
    print(f"results: {json_path}; {plot_msg}")
    for n in notes:
        print(f"note: {n}")
    print("op us = op with plan precomputed, step us = planner + op (CUDA-graph replay, median); ref us = "
          "reference path (CUDA events); diff = max|ours - ref|;")
    print("%mm of 799 TFLOPS matmul ceiling; floor = TFLOPS floor (docs/design.md §6); FM = FlashMLA measured here; "
          "FM doc TF = FlashMLA on the H200 per docs/design.md §6 (reference constants, not measured)")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
