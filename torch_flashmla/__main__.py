"""``python -m torch_flashmla``: self-check and small benchmark on a DeepSeek-V3-shaped problem.

Says which path each op took (SM90 kernel, PyTorch reference on the GPU, or the CPU reference),
checks every op against an independent float64 computation written here (softmax attention over the
gathered tokens; the FP8 records decoded straight from their bytes), and prints a table of error,
time, TFLOPS and GB/s. Exit status 1 if any check fails.

Flags: ``--batch``, ``--seqlen``, ``--heads``, ``--topk``, ``--quick`` (smaller problem, fewer timing
runs), ``--cpu`` (stay on the CPU).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import List, Optional, Tuple

import torch

import torch_flashmla as flashmla
from torch_flashmla import _registration, kv_cache as kvc, testing as T

D_QK, D_V, D_ROPE, PAGE = kvc.D_QK, kvc.D_V, kvc.D_ROPE, 64
MAX_ROWS_CHECKED = 16   # requests / query rows compared with float64 per op (spread over the batch)


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def timed(fn, device: torch.device, quick: bool) -> float:
    """Median milliseconds of ``fn()``: triton's do_bench or CUDA events on a GPU, perf_counter on CPU."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            return float(do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median"))
        except (ImportError, TypeError):
            pass
        fn()
        times = []
        for _ in range(5 if quick else 20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    fn()
    times = []
    for _ in range(1 if quick else 3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def path_of(op: str, device: torch.device) -> str:
    if device.type != "cuda":
        return "CPU reference"
    return "SM90 kernel" if _registration.cuda_path(op, device) == "sm90" else "GPU reference"


# --------------------------------------------------------------------------------------------
# float64 oracle (independent of torch_flashmla.reference)
# --------------------------------------------------------------------------------------------
def attention64(q: torch.Tensor, keys: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """q [h, 576], keys [n, 576] (values = keys[:, :512]) -> out [h, 512] f64, lse [h] f64
    (natural log; nothing to attend to: out 0, lse +inf)."""
    q, keys = q.double(), keys.double()
    if keys.shape[0] == 0:
        return q.new_zeros(q.shape[0], D_V), q.new_full((q.shape[0],), float("inf"))
    scores = q @ keys.T * scale
    return torch.softmax(scores, dim=-1) @ keys[:, :D_V], torch.logsumexp(scores, dim=-1)


def decode_fp8_records64(records: torch.Tensor) -> torch.Tensor:
    """[..., 656] bytes -> [..., 576] f64, read straight from the byte layout: 512 e4m3 values, 4 fp32
    scales (one per 128 values), 64 bf16 RoPE values."""
    r = records.view(torch.uint8)
    values = r[..., :kvc.D_LATENT].contiguous().view(torch.float8_e4m3fn).double()
    scales = r[..., kvc.D_LATENT:kvc.D_LATENT + 16].contiguous().view(torch.float32).double()
    rope = r[..., kvc.D_LATENT + 16:].contiguous().view(torch.bfloat16).double()
    return torch.cat([values * scales.repeat_interleave(kvc.FP8_TILE, dim=-1), rope], dim=-1)


def rows_to_check(n: int) -> List[int]:
    if n <= MAX_ROWS_CHECKED:
        return list(range(n))
    return sorted({round(i * (n - 1) / (MAX_ROWS_CHECKED - 1)) for i in range(MAX_ROWS_CHECKED)})


def close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> Tuple[float, bool]:
    """Max |got - want| and whether every element is within atol + rtol·|want| (equal infinities match)."""
    got, want = got.double(), want.double()
    same_inf = torch.isinf(got) & torch.isinf(want) & (torch.sign(got) == torch.sign(want))
    diff = torch.where(same_inf, 0.0, (got - want).abs())
    ok = bool(((diff <= atol + rtol * torch.where(same_inf, 0.0, want.abs())) | same_inf).all())
    return (diff.max().item() if diff.numel() else 0.0), ok


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
class Table:
    def __init__(self, device: torch.device):
        self.device, self.rows, self.ok = device, [], True

    def add(self, op: str, shape: str, err: float, ok: bool, ms: float, lse_err: Optional[float] = None,
            flops: float = 0.0, nbytes: float = 0.0, path_op: Optional[str] = None) -> None:
        self.ok &= ok
        self.rows.append((op, shape, path_of(path_op or op, self.device), err, lse_err, ok, ms,
                          flops / ms / 1e9 if flops else None, nbytes / ms / 1e6 if nbytes else None))

    def print(self) -> None:
        header = (f"{'op':<26}{'shape':<28}{'path':<15}{'max err':>9}{'lse err':>9}  {'check':<6}"
                  f"{'ms':>9}{'TFLOPS':>8}{'GB/s':>8}")
        print(header)
        print("-" * len(header))
        fmt = lambda x, spec: format(x, spec) if x is not None else format("-", spec.split(".")[0].lstrip("."))  # noqa: E731
        for op, shape, path, err, lse_err, ok, ms, tflops, gbs in self.rows:
            print(f"{op:<26}{shape:<28}{path:<15}{err:>9.2e}{fmt(lse_err, '>9.2e')}  {'ok' if ok else 'FAIL':<6}"
                  f"{ms:>9.3f}{fmt(tflops, '>8.2f')}{fmt(gbs, '>8.1f')}")


def check_dense_decode(t: Table, batch: int, seqlen: int, heads: int, quick: bool) -> None:
    case = T.DenseDecodeCase(b=batch, s_q=1, h_q=heads, seqlen=seqlen, page_size=PAGE)
    a = T.dense_decode_inputs(case, device=t.device, seed=0)
    out, lse = flashmla.mla_decode(**a)
    errs, lse_errs, ok = [], [], True
    for i in rows_to_check(batch):
        n = int(a["cache_seqlens"][i])
        pages = a["block_table"][i, : -(-n // PAGE)].long()
        keys = a["kv_cache"][pages].reshape(-1, D_QK)[:n]                      # h_kv = 1
        ref_out, ref_lse = attention64(a["q"][i, 0], keys, D_QK ** -0.5)
        e, o1 = close(out[i, 0], ref_out, 1e-2, 1e-2)
        le, o2 = close(lse[i, :, 0], ref_lse, 1e-3, 1e-4)
        errs.append(e), lse_errs.append(le)
        ok &= o1 and o2
    flops = batch * heads * seqlen * 2 * (D_QK + D_V)                         # s_q = 1
    nbytes = batch * (heads * D_QK * 2 + seqlen * D_QK * 2 + heads * D_V * 2)
    ms = timed(lambda: flashmla.mla_decode(**a), t.device, quick)
    t.add("mla_decode", f"b={batch} s_k={seqlen} h_q={heads}", max(errs), ok, ms, max(lse_errs), flops, nbytes)


def check_sparse_decode(t: Table, batch: int, topk: int, heads: int, quick: bool) -> None:
    sc = T.SparseDecodeCase(b=batch, s_q=1, h_q=heads, topk=topk, num_blocks=max(4, topk // PAGE), page_size=PAGE)
    s = T.sparse_decode_inputs(sc, device=t.device, seed=1)
    out, lse = flashmla.sparse_mla_decode(**s)
    records = s["kv_cache"].view(torch.uint8).reshape(-1, kvc.FP8_RECORD_BYTES)
    errs, lse_errs, ok = [], [], True
    for i in rows_to_check(batch):
        idx = s["indices"][i, 0]
        idx = idx[(idx >= 0) & (idx < records.shape[0])].long()
        ref_out, ref_lse = attention64(s["q"][i, 0], decode_fp8_records64(records[idx]), D_QK ** -0.5)
        e, o1 = close(out[i, 0], ref_out, 1e-2, 1e-2)
        le, o2 = close(lse[i, :, 0], ref_lse, 1e-3, 1e-4)
        errs.append(e), lse_errs.append(le)
        ok &= o1 and o2
    flops = batch * heads * topk * 2 * (D_QK + D_V)
    nbytes = batch * (heads * D_QK * 2 + topk * kvc.FP8_RECORD_BYTES + heads * D_V * 2)
    ms = timed(lambda: flashmla.sparse_mla_decode(**s), t.device, quick)
    t.add("sparse_mla_decode", f"b={batch} topk={topk} h_q={heads}", max(errs), ok, ms, max(lse_errs), flops, nbytes)


def check_sparse_prefill(t: Table, s_q: int, topk: int, heads: int, quick: bool) -> None:
    pc = T.SparsePrefillCase(s_q=s_q, s_kv=4 * topk, h_q=heads, topk=topk)
    p = T.sparse_prefill_inputs(pc, device=t.device, seed=2)
    out, _, lse = flashmla.sparse_mla_prefill(**p)
    errs, lse_errs, ok = [], [], True
    for r in sorted(set(rows_to_check(s_q)) | {min(1, s_q - 1)}):                # row 1 has no valid index
        idx = p["indices"][r, 0]
        keys = p["kv"][idx[(idx >= 0) & (idx < pc.s_kv)].long(), 0]
        ref_out, ref_lse = attention64(p["q"][r], keys, D_QK ** -0.5)
        e, o1 = close(out[r], ref_out, 1e-2, 1e-2)
        le, o2 = close(lse[r], ref_lse, 1e-3, 1e-4)
        errs.append(e), lse_errs.append(le)
        ok &= o1 and o2
    flops = s_q * heads * topk * 2 * (D_QK + D_V)
    nbytes = s_q * (heads * D_QK * 2 + topk * D_QK * 2 + heads * D_V * 2)      # every gathered row read once
    ms = timed(lambda: flashmla.sparse_mla_prefill(**p), t.device, quick)
    t.add("sparse_mla_prefill", f"s_q={s_q} topk={topk} h_q={heads}", max(errs), ok, ms, max(lse_errs), flops,
          nbytes)


def check_fp8_round_trip(t: Table, tokens: int, quick: bool) -> None:
    g = torch.Generator().manual_seed(4)
    kv = (torch.randn(tokens, D_QK, generator=g) * torch.rand(tokens, 1, generator=g) * 10).to(torch.bfloat16)
    kv = kv.to(t.device)
    records = flashmla.quantize_kv_fp8(kv)
    decoded = decode_fp8_records64(records)
    # e4m3 round-to-nearest: relative error <= 2^-4, or absolute <= 2^-10 · scale in the subnormals.
    scales = records.view(torch.uint8)[..., kvc.D_LATENT:kvc.D_LATENT + 16].contiguous().view(torch.float32).double()
    floor = scales.repeat_interleave(kvc.FP8_TILE, dim=-1) * 2.0 ** -6
    x = kv.double()
    rel = (decoded[:, :D_V] - x[:, :D_V]).abs() / torch.maximum(x[:, :D_V].abs(), floor)
    rope_err = (decoded[:, D_V:] - x[:, D_V:]).abs().max().item()
    err = max(rel.max().item(), rope_err)
    ok = err <= 2 ** -4 and bool((x[:, :D_V].abs().unflatten(-1, (4, 128)).amax(-1) <= 448 * scales).all())
    nbytes = tokens * (D_QK * 2 + kvc.FP8_RECORD_BYTES)
    t.add("quantize_kv_fp8", f"{tokens} tokens (rel err)", err, ok,
          timed(lambda: flashmla.quantize_kv_fp8(kv), t.device, quick), nbytes=nbytes)
    back = flashmla.dequantize_kv_fp8(records)
    err, ok = close(back, decoded, 0.0, 0.0)                                    # exact: fp8 · 2^k fits bf16
    t.add("dequantize_kv_fp8", f"{tokens} tokens", err, ok,
          timed(lambda: flashmla.dequantize_kv_fp8(records), t.device, quick), nbytes=nbytes)


def check_cache_writes(t: Table, tokens: int, quick: bool) -> None:
    for dtype_name in ("auto", "fp8_ds_mla"):
        w = T.cache_write_inputs(num_tokens=tokens, num_blocks=max(2, -(-2 * tokens // PAGE)), page_size=PAGE,
                                 kv_cache_dtype=dtype_name, device=t.device, seed=3)
        before = w["kv_cache"].clone()
        flashmla.concat_and_cache_mla(**w)
        slots, width = w["slot_mapping"], w["kv_cache"].shape[-1]
        keep = slots >= 0
        rows = w["kv_cache"].view(-1, width)
        expect = torch.cat([w["kv_c"], w["k_pe"]], dim=-1)[keep].double()
        untouched = torch.ones(rows.shape[0], dtype=torch.bool, device=t.device)
        untouched[slots[keep]] = False
        same = rows[untouched].view(torch.uint8).equal(before.view(-1, width)[untouched].view(torch.uint8))
        if dtype_name == "auto":
            err, ok = close(rows[slots[keep]], expect, 0.0, 0.0)
            op, elem = "concat_and_cache_mla", D_QK * 2
        else:                                                                    # rel. error of e4m3, as above
            got = decode_fp8_records64(rows[slots[keep]])
            scale = rows[slots[keep]][..., kvc.D_LATENT:kvc.D_LATENT + 16].contiguous().view(torch.float32).double()
            floor = scale.repeat_interleave(kvc.FP8_TILE, dim=-1) * 2.0 ** -6
            err = max(((got[:, :D_V] - expect[:, :D_V]).abs() / torch.maximum(expect[:, :D_V].abs(), floor)).max()
                      .item(), (got[:, D_V:] - expect[:, D_V:]).abs().max().item())
            ok = err <= 2 ** -4
            op, elem = "concat_and_cache_mla fp8", kvc.FP8_RECORD_BYTES
        ms = timed(lambda: flashmla.concat_and_cache_mla(**w), t.device, quick)
        t.add(op, f"{tokens} tokens", err, ok and same, ms, nbytes=tokens * (D_QK * 2 + elem),
              path_op="concat_and_cache_mla")


def run(batch: int, seqlen: int, heads: int, topk: int, prefill_rows: int, device: torch.device, quick: bool) -> bool:
    t = Table(device)
    check_dense_decode(t, batch, seqlen, heads, quick)
    check_sparse_decode(t, batch, topk, heads, quick)
    check_sparse_prefill(t, prefill_rows, topk, heads, quick)
    check_fp8_round_trip(t, 8 * max(batch, 8) * 16, quick)
    check_cache_writes(t, batch, quick)
    t.print()
    return t.ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="requests (default 128 on GPU, 2 on CPU)")
    parser.add_argument("--seqlen", type=int, default=None, help="KV tokens per request (default 4096 GPU / 256 CPU)")
    parser.add_argument("--heads", type=int, default=128, help="query heads h_q (default 128, DeepSeek-V3)")
    parser.add_argument("--topk", type=int, default=None, help="sparse top-k (default 2048 GPU / 128 CPU)")
    parser.add_argument("--quick", action="store_true", help="smaller problem and fewer timing runs")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    gpu = device.type == "cuda"
    defaults = {(True, False): (128, 4096, 2048, 256), (True, True): (16, 1024, 512, 64),
                (False, False): (2, 256, 128, 32), (False, True): (2, 128, 64, 8)}[(gpu, args.quick)]
    batch = args.batch or defaults[0]
    seqlen = args.seqlen or defaults[1]
    topk = args.topk or defaults[2]
    print(f"torch_flashmla {flashmla.__version__}, torch {torch.__version__}, SM90 kernels built: "
          f"{flashmla.has_sm90_kernels()}")
    if gpu:
        name = torch.cuda.get_device_name(device)
        cap = torch.cuda.get_device_capability(device)
        paths = {path_of(op, device) for op in _registration.OP_CHECKS}
        print(f"device: {name} (sm_{cap[0]}{cap[1]}); path: {', '.join(sorted(paths))}")
        if paths != {"SM90 kernel"}:
            print("  (ops without an SM90 kernel for this build/device fall back to the PyTorch reference on the GPU)")
    else:
        print("device: CPU. No CUDA GPU in use: every op fell back to its float32 CPU reference path (the SM90 "
              "kernels need an H100/H200); timings below are the reference's.")
    print(f"DeepSeek-V3 shapes: h_q={args.heads}, d_qk={D_QK}, d_v={D_V}, page={PAGE}; each op checked against "
          f"float64 on up to {MAX_ROWS_CHECKED} requests/rows\n")
    with torch.inference_mode():
        ok = run(batch, seqlen, args.heads, topk, defaults[3], device, args.quick)
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
