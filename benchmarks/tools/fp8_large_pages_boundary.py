"""Request-boundary timeline of the large-page FP8 dense-decode kernel (development tool).

Needs a development build with the marks of benchmarks/tools/fp8_large_pages_boundary.patch (`git apply
benchmarks/tools/fp8_large_pages_boundary.patch`, rebuild; `git apply -R` afterwards; that build's output is wrong
on purpose): thread 0 of each warpgroup stores clock64 at 16 points around the boundaries after its CTA's requests
2, 3 and 4 (WG0: last QK done, last P stored, PEmpty passed, next Q filled, Q barrier passed, first QK done, first
P stored; WG1: last PV done, epilogue barrier passed, outputs stored, next stage full, first PFull passed, first PV
done; WG2: epilogue barrier passed, outputs stored, first PFull passed), and WG1 copies them over the output row of
the partition's second request. Prints, per mark, the median over the CTAs and the three boundaries of SM clocks
after WG0's last QK of the request, and the median chunk period inside a request (first QK done to last QK done).
Usage: python3 benchmarks/tools/fp8_large_pages_boundary.py LABEL [B S_K ...]   (s_q 1, h_q 64; default 1024 512
2048 256)

Two diagnostic builds time the boundary's parts with whole calls (`ab_swap.sh "python3
benchmarks/tools/ab_whole_call.py --set reqlen" PATCH...`; wrong results, never in the library):
  benchmarks/tools/fp8_large_pages_no_epilogue_stores.patch  the product warpgroups store no outputs or partials
  benchmarks/tools/fp8_large_pages_no_q_fill.patch           WG0 fills Q for the CTA's first request only
  benchmarks/tools/fp8_large_pages_fill_loads_only.patch    after the first request WG0 issues the fill's loads (same
                                                             batches) and waits for them, but converts and writes no Q
                                                             (its session 33 run predates that wait and is void)
Results: benchmarks/NOTES_fp8_decode.md, sessions 31 and 33.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch_flashmla  # noqa: E402
from bench_decode import fp8_call, inputs  # noqa: E402
from bench_timing import graph_time_us, sm_clock_mhz  # noqa: E402

MARKS = ["WG0 last QK done", "WG0 last P stored", "WG0 PEmpty passed", "WG0 next Q filled", "WG0 Q barrier passed",
         "WG0 first QK done", "WG0 first P stored", "WG1 last PV done", "WG1 epilogue passed", "WG1 outputs stored",
         "WG1 next stage full", "WG1 first PFull", "WG1 first PV done", "WG2 epilogue passed", "WG2 outputs stored",
         "WG2 first PFull"]
SLOTS, FIRST_REQ = 3, 2
label = sys.argv[1] if len(sys.argv) > 1 else ""
args = [int(x) for x in sys.argv[2:]] or [1024, 512, 2048, 256]
for b, s_k in zip(args[0::2], args[1::2]):
    s_q, h_q = 1, 64
    q, cache, table, lens = inputs(b, s_q, s_k, h_q)
    fn = fp8_call(q, cache, table, lens)
    del cache
    meta, _splits = torch_flashmla.get_mla_metadata(lens, s_q * h_q, 1, h_q, is_fp8_kvcache=True)
    op_us, _, _ = graph_time_us(fn)
    mhz = sm_clock_mhz()
    for _ in range(3):
        out, _lse = fn()
    torch.cuda.synchronize()
    parts = meta.cpu()
    rows = [int(m[0]) + 1 for m in parts if int(m[2]) - int(m[0]) >= FIRST_REQ + SLOTS]
    raw = out.reshape(b, -1).view(torch.int64)[rows, : SLOTS * len(MARKS)].cpu().double()
    marks = raw.reshape(len(rows), SLOTS, len(MARKS))
    rel = (marks - marks[:, :, 0:1]).reshape(-1, len(MARKS))
    med = rel.median(dim=0).values
    chunks = s_k // 64
    period = ((marks[:, 1:, 0] - marks[:, :-1, 5]) / (chunks - 1)).median().item()
    print(f"{label}: b{b} s_k {s_k} h_q 64 FP8, op {op_us:.1f} us (with the marks), SM clock {mhz} MHz; median over "
          f"{len(rows)} CTAs x {SLOTS} boundaries, clocks after WG0's last QK of a request")
    for i, name in enumerate(MARKS):
        print(f"  {name:22s}{med[i].item():9.0f}")
    print(f"  chunk period inside a request: {period:.0f} clocks; boundary (last QK done -> next first QK done) "
          f"{med[5].item():.0f} clocks = {med[5].item() / period:.1f} periods, {med[5].item() / mhz:.2f} us")
    del q, table, lens, fn, out
    torch.cuda.empty_cache()
