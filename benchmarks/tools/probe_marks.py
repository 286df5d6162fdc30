"""Reading the marks that the timeline-probe builds leave in the output (fp8_narrow_probe.py, narrow16_probe.py,
fp8_large_pages_phases.py)."""
import torch


def last_request_marks(out: torch.Tensor, meta: torch.Tensor, b: int, n_marks: int) -> torch.Tensor:
    """µs marks, float64 [CTAs, n_marks]. A probe build makes each CTA write n_marks %globaltimer values (int64 ns)
    over the start of the output row of its partition's last request (column 2 of the plan's metadata), so one
    row per CTA that has a request; out is the call's output ([b, ...], any float dtype)."""
    ends = sorted(set(int(x) for x in meta[:, 2].cpu().tolist() if 0 <= x < b))
    return out.reshape(b, -1).view(torch.int64)[:, :n_marks].cpu()[ends].double() / 1000.0


def print_spread(names, t: torch.Tensor) -> None:
    """min / median / max over the CTAs of each mark after the first, in µs after the CTA's first mark."""
    rel = t - t[:, 0:1]
    for k in range(1, len(names)):
        x = rel[:, k].sort().values
        print(f"  {names[k]:28s} min {x[0]:7.2f} med {x[len(x) // 2]:7.2f} max {x[-1]:7.2f}")


def fp8_probe_run(b: int, s_q: int, s_k: int, h_q: int, n_marks: int):
    """One FP8 dense-decode shape on a probe build (bench_decode.py's inputs, its bf16 cache quantized per tensor):
    (op µs under graph replay, the marks of last_request_marks [CTAs, n_marks], extra split pieces of the plan)."""
    from bench_decode import D_QK, D_V, FP8_DESCALE, inputs
    from bench_timing import graph_time_us
    import torch_flashmla
    from torch_flashmla import kv_cache as kvc

    q, cache, table, lens = inputs(b, s_q, s_k, h_q)
    dk = torch.tensor([FP8_DESCALE], device="cuda")
    cache8 = kvc.quantize_per_tensor_e4m3(cache, dk).view(torch.float8_e4m3fn)
    del cache
    meta, splits = torch_flashmla.get_mla_metadata(lens, s_q * h_q, 1, h_q, is_fp8_kvcache=True)
    fn = lambda: torch.ops.flashmla.mla_decode(q, cache8, table, lens, D_V, D_QK ** -0.5, False, meta, splits, None, dk)
    op_us, _, _ = graph_time_us(fn)
    for _ in range(3):
        out, _lse = fn()
    torch.cuda.synchronize()
    return op_us, last_request_marks(out, meta, b, n_marks), int(splits[-1].item()) - b
