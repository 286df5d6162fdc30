"""Start-up timeline of the 32-row FP8 dense-decode kernel, per CTA (development tool).

Needs a development build with the marks of benchmarks/tools/fp8_narrow_probe.patch (`git apply
benchmarks/tools/fp8_narrow_probe.patch`, rebuild; `git apply -R` afterwards; that build's output is wrong on
purpose): one thread of a warpgroup stores %globaltimer at 16 points (the partition read, WG2's steps to the
first Q, the first QK / transpose / PV, the last PV, the stores) into a free corner of the P tile, and WG1
copies them over the first 128 bytes of the output row of the CTA's last request. b 132, s_q 1, h_q 16, s_k
8192: one request per CTA. Prints, per mark, min / median / max over the CTAs of µs after the first mark.
Usage: python3 benchmarks/tools/fp8_narrow_probe.py
"""
import sys
sys.path.insert(0, "benchmarks")
from probe_marks import fp8_probe_run, print_spread  # noqa: E402

NAMES = ["start", "1st loads issued (WG1 w0)", "Q written (WG2)", "QFull seen (WG0)", "1st QK done (WG0)",
         "1st V fragments read (WG1)", "1st PV done (WG1)", "last PV done (WG1)", "stores done (WG1)", "WG2 begins",
         "WG2 prefetch issued", "WG2 len read", "WG2 QEmpty passed", "WG2 fill rows 0-3", "WG2 fill rows 4-7",
         "WG2 chunks 1-3 issued"]
for b, s_k in ((132, 8192),):
    s_q, h_q = 1, 16
    op_us, raw, extra = fp8_probe_run(b, s_q, s_k, h_q, len(NAMES))
    t = raw - raw[:, 0:1]
    g0 = raw[:, 0].min()
    st = (raw[:, 0] - g0).sort().values
    print(f"b {b} s_k {s_k} h_q {h_q}: {len(raw)} CTAs, {extra} extra pieces, op {op_us:.1f} us; CTA starts (us after the first): "
          f"min {st[0]:.2f} med {st[len(st)//2]:.2f} max {st[-1]:.2f}; end max {(raw[:, 8] - g0).max():.1f}")
    print_spread(NAMES, raw)
    n = s_k // 64
    per = ((t[:, 7] - t[:, 6]) / (n - 1)).median()
    print(f"  per chunk (1st PV -> last PV): {per:.3f} us")
