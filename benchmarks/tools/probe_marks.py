"""Reading the marks that the timeline-probe builds leave in the output (fp8_narrow_probe.py, narrow16_probe.py)."""
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
