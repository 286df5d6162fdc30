"""``python -m torch_flashmla``: self-check and small benchmark on a DeepSeek-V3-shaped problem.

Says which path each op took (SM90 kernels, PyTorch reference on the GPU, CPU reference), checks
every op against an independent float64 computation, and prints a table of error, time, TFLOPS and
GB/s. Exit status 1 if any check fails.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import torch_flashmla as flashmla
from torch_flashmla import _registration, kv_cache as kvc, testing as T

H_Q, D_QK, D_V, PAGE = 128, kvc.D_QK, kvc.D_V, 64


def timed(fn, device) -> float:
    """Median milliseconds of ``fn()``."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            return do_bench(fn, warmup=25, rep=100, return_mode="median")
        except ImportError:
            pass
        fn()
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def path_of(op: str, device: torch.device) -> str:
    if device.type != "cuda":
        return "CPU reference"
    return "SM90 kernel" if _registration.cuda_path(op, device) == "sm90" else "GPU reference"


def float64_decode(q, kv_cache, block_table, cache_seqlens, rows):
    """Dense decode of requests ``rows`` in float64 (a direct softmax over the gathered tokens)."""
    outs = []
    for i in rows:
        n = int(cache_seqlens[i])
        pages = block_table[i, : -(-n // PAGE)].long()
        keys = kv_cache[pages].reshape(-1, D_QK)[:n].double()           # h_kv = 1
        scores = q[i, 0].double() @ keys.T * D_QK ** -0.5                # [h_q, n]
        outs.append(torch.softmax(scores, dim=-1) @ keys[:, :D_V])
    return torch.stack(outs)


def float64_sparse_decode(args, rows):
    records = args["kv_cache"].view(torch.uint8).reshape(-1, kvc.FP8_RECORD_BYTES)
    outs = []
    for i in rows:
        idx = args["indices"][i, 0]
        idx = idx[(idx >= 0) & (idx < records.shape[0])].long()
        keys = kvc.dequantize_kv_fp8(records[idx]).double()
        scores = args["q"][i, 0].double() @ keys.T * D_QK ** -0.5
        outs.append(torch.softmax(scores, dim=-1) @ keys[:, :D_V])
    return torch.stack(outs)


def run(batch: int, seqlen: int, topk: int, device: torch.device) -> bool:
    rows_checked = [0, batch - 1]
    table = []

    def report(op, shape, err, tol, ms, flops=0.0, nbytes=0.0):
        ok = err <= tol
        table.append((op, shape, path_of(op, device), err, ok, ms, flops / ms / 1e9 if flops else None,
                      nbytes / ms / 1e6 if nbytes else None))
        return ok

    ok = True
    # dense decode
    case = T.DenseDecodeCase(b=batch, s_q=1, h_q=H_Q, seqlen=seqlen, page_size=PAGE)
    a = T.dense_decode_inputs(case, device=device, seed=0)
    out, lse = flashmla.mla_decode(**a)
    ref = float64_decode(a["q"], a["kv_cache"], a["block_table"], a["cache_seqlens"], rows_checked)
    err = (out[rows_checked, 0].double() - ref).abs().max().item()
    flops = batch * H_Q * seqlen * 2 * (D_QK + D_V)
    nbytes = batch * (H_Q * D_QK * 2 + seqlen * D_QK * 2 + H_Q * D_V * 2)
    ok &= report("mla_decode", f"b={batch} s_k={seqlen} h_q={H_Q}", err, 1e-2,
                 timed(lambda: flashmla.mla_decode(**a), device), flops, nbytes)

    # sparse decode over the FP8 cache
    sc = T.SparseDecodeCase(b=batch, s_q=1, h_q=H_Q, topk=topk, num_blocks=max(4, topk // PAGE), page_size=PAGE)
    s = T.sparse_decode_inputs(sc, device=device, seed=1)
    out, _ = flashmla.sparse_mla_decode(**s)
    err = (out[rows_checked, 0].double() - float64_sparse_decode(s, rows_checked)).abs().max().item()
    flops = batch * H_Q * topk * 2 * (D_QK + D_V)
    nbytes = batch * (H_Q * D_QK * 2 + topk * kvc.FP8_RECORD_BYTES + H_Q * D_V * 2)
    ok &= report("sparse_mla_decode", f"b={batch} topk={topk} h_q={H_Q}", err, 1e-2,
                 timed(lambda: flashmla.sparse_mla_decode(**s), device), flops, nbytes)

    # sparse prefill
    pc = T.SparsePrefillCase(s_q=64, s_kv=4 * topk, h_q=H_Q, topk=topk)
    p = T.sparse_prefill_inputs(pc, device=device, seed=2)
    out, _, _ = flashmla.sparse_mla_prefill(**p)
    t = 0
    idx = p["indices"][t, 0]
    keys = p["kv"][idx[(idx >= 0) & (idx < pc.s_kv)].long(), 0].double()
    ref = torch.softmax(p["q"][t].double() @ keys.T * D_QK ** -0.5, dim=-1) @ keys[:, :D_V]
    err = (out[t].double() - ref).abs().max().item()
    ok &= report("sparse_mla_prefill", f"s_q={pc.s_q} topk={topk} h_q={H_Q}", err, 1e-2,
                 timed(lambda: flashmla.sparse_mla_prefill(**p), device), pc.s_q * H_Q * topk * 2 * (D_QK + D_V))

    # FP8 cache round trip and cache writes
    tokens = 8 * batch * 64
    kv = torch.randn(tokens, D_QK, device=device).to(torch.bfloat16)
    records = flashmla.quantize_kv_fp8(kv)
    back = flashmla.dequantize_kv_fp8(records).double()
    scales = kvc.fp8_scales(kv[:, :D_V]).double().repeat_interleave(128, dim=1)
    rel = ((back[:, :D_V] - kv[:, :D_V].double()).abs() / torch.maximum(kv[:, :D_V].double().abs(), scales * 2 ** -6))
    err = max(rel.max().item(), (back[:, D_V:] - kv[:, D_V:].double()).abs().max().item())
    ok &= report("quantize_kv_fp8", f"{tokens} tokens", err, 2 ** -4,
                 timed(lambda: flashmla.quantize_kv_fp8(kv), device), 0, tokens * (D_QK * 2 + kvc.FP8_RECORD_BYTES))
    ok &= report("dequantize_kv_fp8", f"{tokens} tokens", err, 2 ** -4,
                 timed(lambda: flashmla.dequantize_kv_fp8(records), device), 0,
                 tokens * (D_QK * 2 + kvc.FP8_RECORD_BYTES))
    w = T.cache_write_inputs(num_tokens=batch, num_blocks=2 * batch, page_size=PAGE, device=device, seed=3)
    flashmla.concat_and_cache_mla(**w)
    slots = w["slot_mapping"]
    written = w["kv_cache"].view(-1, D_QK)[slots[slots >= 0]]
    expect = torch.cat([w["kv_c"], w["k_pe"]], dim=-1)[slots >= 0]
    err = (written.double() - expect.double()).abs().max().item() if len(expect) else 0.0
    ok &= report("concat_and_cache_mla", f"{batch} tokens", err, 0.0,
                 timed(lambda: flashmla.concat_and_cache_mla(**w), device), 0, batch * D_QK * 4)

    header = f"{'op':<22}{'shape':<26}{'path':<15}{'max err':>10}  {'check':<6}{'ms':>9}{'TFLOPS':>9}{'GB/s':>9}"
    print(header)
    print("-" * len(header))
    for op, shape, path, err, good, ms, tflops, gbs in table:
        print(f"{op:<22}{shape:<26}{path:<15}{err:>10.2e}  {'ok' if good else 'FAIL':<6}{ms:>9.3f}"
              f"{tflops if tflops is not None else float('nan'):>9.1f}{gbs if gbs is not None else float('nan'):>9.1f}")
    return bool(ok)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="requests (default 128 on GPU, 2 on CPU)")
    parser.add_argument("--seqlen", type=int, default=None, help="KV tokens per request (default 4096 / 256)")
    parser.add_argument("--topk", type=int, default=None, help="sparse top-k (default 2048 / 128)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    gpu = device.type == "cuda"
    batch = args.batch or (128 if gpu else 2)
    seqlen = args.seqlen or (4096 if gpu else 256)
    topk = args.topk or (2048 if gpu else 128)
    print(f"torch_flashmla {flashmla.__version__}, torch {torch.__version__}, SM90 kernels built: "
          f"{flashmla.has_sm90_kernels()}")
    if gpu:
        name = torch.cuda.get_device_name(device)
        print(f"device: {name} (sm_{''.join(map(str, torch.cuda.get_device_capability(device)))})")
    else:
        print("device: CPU. No CUDA GPU here: every op runs its float32 CPU reference (the SM90 kernels need "
              "an H100/H200); timings below are the reference's.")
    print(f"DeepSeek-V3 shapes: h_q={H_Q}, d_qk={D_QK}, d_v={D_V}, page={PAGE}; checks against float64\n")
    with torch.inference_mode():
        ok = run(batch, seqlen, topk, device)
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
