"""Steady-state timeline of the large-page FP8 dense-decode kernel, per chunk (development tool).

Needs a development build with the marks of benchmarks/tools/fp8_large_pages_timeline.patch (`git apply
benchmarks/tools/fp8_large_pages_timeline.patch`, rebuild; `git apply -R` afterwards; that build's output is wrong
on purpose): thread 0 of each warpgroup stores clock64 at 16 points of chunks 40..43 of its CTA (WG0: before the
QK, QK issued, QK done, softmax done, PEmpty passed, P stored; WG1: stage full, PFull passed, PV issued, PV done;
WG2: PFull passed, PV done; WG1's loading warp: PEmpty arrived, and for the refill of the chunk's stage, which it
issues in its next iteration: VtFull passed, loads issued, walked on), and WG1 copies them over the output row of
the CTA's last request. b 132, s_q 1, h_q 64, s_k 8192: one request per CTA, no splits. Prints, per mark, the
median over the CTAs of SM clocks after WG0's first mark of chunk 40, for the four chunks, and the median chunk
period.
Usage: python3 benchmarks/tools/fp8_large_pages_timeline.py LABEL [--s-k S_K] [--sustain CALLS]
  --s-k      cache length of each request (default 8192; still one request per CTA)
  --sustain  read the marks of the last of CALLS eager calls issued back to back (e.g. 2000 at s_k 32768: the
             H200 then runs at its power cap, and the marks show the chunk period at the capped SM clock; the
             clock and power are nvidia-smi's right after the calls)
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch_flashmla  # noqa: E402
from bench_decode import fp8_call, inputs  # noqa: E402
from bench_timing import gpu_query, graph_time_us, sm_clock_mhz  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("label", nargs="?", default="")
parser.add_argument("--s-k", type=int, default=8192)
parser.add_argument("--sustain", type=int, default=0)
args = parser.parse_args()

MARKS = ["WG0 before QK", "WG0 QK issued", "WG0 QK done", "WG0 softmax done", "WG0 PEmpty passed",
         "WG0 P stored", "WG1 stage full", "WG1 PFull passed", "WG1 PV issued", "WG1 PV done",
         "WG2 PFull passed", "WG2 PV done", "WG1 PEmpty arrived", "WG3 stage empty passed", "WG3 loads issued",
         "WG3 walked on"]
CHUNKS = 4
b, s_q, s_k, h_q = 132, 1, args.s_k, 64
q, cache, table, lens = inputs(b, s_q, s_k, h_q)
fn = fp8_call(q, cache, table, lens)
del cache
meta, splits = torch_flashmla.get_mla_metadata(lens, s_q * h_q, 1, h_q, is_fp8_kvcache=True)
assert int(splits[-1].item()) == b, "a request was split: its output row is the combine's"
op_us, _, _ = graph_time_us(fn)
graph_mhz = mhz = sm_clock_mhz()  # graph_mhz: the op time's clock; mhz: the marks' clock (below)
for _ in range(max(3, args.sustain)):
    out, _lse = fn()
torch.cuda.synchronize()
if args.sustain:
    # the clock the marks were taken at: nvidia-smi's SM clock right after the calls (clocks.sm, power, throttle)
    state = gpu_query("clocks.sm,power.draw,clocks_throttle_reasons.active")
    if state:
        mhz = int(float(state.split(",")[0]))
    print(f"after {args.sustain} eager calls: {state}")
raw = out.reshape(b, -1).view(torch.int64)[:, : CHUNKS * len(MARKS)].cpu().double()
rel = raw - raw[:, 0:1]
med = rel.median(dim=0).values.reshape(CHUNKS, len(MARKS))
print(f"{args.label} (s_k {s_k}): op {op_us:.1f} us at {graph_mhz} MHz; marks at {mhz} MHz, clocks after WG0's "
      f"first mark of chunk 40 (median over {b} CTAs)")
print(f"  {'mark':20s}" + "".join(f"{'chunk ' + str(40 + k):>11s}" for k in range(CHUNKS)))
for i, name in enumerate(MARKS):
    print(f"  {name:20s}" + "".join(f"{med[k, i].item():11.0f}" for k in range(CHUNKS)))
period = (rel[:, 3 * len(MARKS)] / 3).median().item()
print(f"  period (WG0 before QK, chunk 40 -> 43) {period:.0f} clocks, {period / mhz:.3f} us at {mhz} MHz")
