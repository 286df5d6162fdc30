"""Start-up and end timeline of the 16-bit 32-row dense-decode kernel, per CTA (development tool).

Needs a development build with the marks of benchmarks/tools/narrow16_probe.patch (`git apply
benchmarks/tools/narrow16_probe.patch`, rebuild; `git apply -R` afterwards; that build's output is wrong on
purpose): thread 0 of the math warpgroup and lane 0 of the loading warp store %globaltimer at 12 points (the
partition read, the loader's first length read and first TMA, Q issued and landed, the first chunk landed, the
first S^T / P^T / PV, the last PV, the column sums, the stores) in shared memory, and thread 0 copies them over
the first 128 bytes of the output row of the CTA's last request. bf16, b 132, s_q 1, h_q 16: one request per
CTA, no splits. Prints, per mark, min / median / max over the CTAs of µs after the first mark.
Usage: python3 benchmarks/tools/narrow16_probe.py
"""
import sys

import torch

sys.path.insert(0, "benchmarks")
import torch_flashmla  # noqa: E402
from bench_decode import D_QK, D_V, inputs  # noqa: E402
from bench_timing import graph_time_us  # noqa: E402
from probe_marks import last_request_marks, print_spread  # noqa: E402

NAMES = ["partition read", "loader: length read", "loader: 1st TMA issued", "Q loads issued", "Q landed",
         "chunk 0 landed", "1st S^T done", "1st P^T written", "1st PV done", "last PV done", "column sums done",
         "stores issued"]
for b, s_k in ((132, 8192), (132, 2048)):
    s_q, h_q = 1, 16
    q, cache, table, lens = inputs(b, s_q, s_k, h_q)
    meta, splits = torch_flashmla.get_mla_metadata(lens, s_q * h_q, 1, h_q)
    extra = int(splits[-1].item()) - b
    fn = lambda: torch.ops.flashmla.mla_decode(q, cache, table, lens, D_V, D_QK ** -0.5, False, meta, splits)  # noqa: E731
    op_us, _, _ = graph_time_us(fn)
    for _ in range(3):
        out, lse = fn()
    torch.cuda.synchronize()
    raw = last_request_marks(out, meta, b, len(NAMES))
    t = raw - raw[:, 0:1]
    print(f"b {b} s_k {s_k} h_q {h_q}: {len(raw)} CTAs, {extra} extra pieces, op {op_us:.1f} us")
    print_spread(NAMES, raw)
    n = s_k // 64
    print(f"  per chunk (1st PV -> last PV): {((t[:, 9] - t[:, 8]) / (n - 1)).median():.3f} us")
