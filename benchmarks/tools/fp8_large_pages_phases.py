"""Phases of the 64-row large-page FP8 dense-decode kernel, per CTA (development tool): where the time outside the
chunk loop goes.

Needs a development build with the marks of benchmarks/tools/fp8_large_pages_phases.patch (`git apply` it, rebuild;
`git apply -R` afterwards; that build's output is wrong on purpose): one thread of a warp(group) stores %globaltimer
at 16 points (kernel entry, the loading warp's first loads, the first Q fill (the products'), WG0's QKs of chunks 0, 1, 4 and 36,
the end of its last chunk, the products' first and last PV and their stores) into shared memory past the fourth
stage, and WG1 copies them over the first 128 bytes of the output row of the CTA's last request. b 132, s_q 1,
h_q 64: one request per CTA (no split, no combine). Prints, per mark, min / median / max over the CTAs of µs after
the CTA's first mark, the op time under graph replay, and the span from the first CTA's entry to the last store.
Usage: python3 benchmarks/tools/fp8_large_pages_phases.py [S_K ...]   (default 4096 8192)
"""
import sys

sys.path.insert(0, "benchmarks")
from probe_marks import fp8_probe_run, print_spread  # noqa: E402

NAMES = ["entry (WG0 t0)", "chunk 0 issued (loader)", "first Q loads issued (loader)", "chunk 3 issued (loader)",
         "first Q written (WG1 w0)", "first Q seen (WG0)", "QK 0 done (WG0)", "QK 1 done (WG0)",
         "before QK 4 (WG0)", "before QK 36 (WG0)", "last P consumed (WG0)", "1st PV done (WG1)",
         "last PV done (WG1)", "epilogue barrier (WG1)", "stores done (WG1)", "stores done (WG2)"]
for s_k in [int(x) for x in sys.argv[1:]] or [4096, 8192]:
    b, s_q, h_q = 132, 1, 64
    op_us, raw, extra = fp8_probe_run(b, s_q, s_k, h_q, len(NAMES))
    assert extra == 0, "a request was split: its output row is the combine's"
    g0 = raw[:, 0].min()
    st = (raw[:, 0] - g0).sort().values
    per = ((raw[:, 9] - raw[:, 8]) / 32).median().item()
    n = s_k // 64
    print(f"b {b} s_k {s_k} h_q {h_q}: op {op_us:.1f} us (graph replay); span first entry -> last store "
          f"{(raw[:, 14:16].max() - g0).item():.1f} us; CTA entries after the first: med {st[len(st) // 2]:.2f} max "
          f"{st[-1]:.2f}; chunk period (QK 4 -> 36) {per:.3f} us, x {n} chunks = {per * n:.1f} us")
    print_spread(NAMES, raw)
