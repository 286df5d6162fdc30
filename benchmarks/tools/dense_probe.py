"""Timeline of one steady-state chunk pair of the seesaw dense-decode kernel (development tool).

Needs a development build with the probes of benchmarks/tools/dense_probe.patch (`git apply
benchmarks/tools/dense_probe.patch`, rebuild; `git apply -R` afterwards): thread 0 of each warpgroup of CTA
(0, 0, 0) stores clock64() at 11 points of pair 20 into the first 192 bytes of `out` instead of that CTA's
outputs, so such a build gives wrong results on purpose and the probes are kept out of the library's
source. The probe points follow the kernel's schedule; a change of the schedule needs the patch redone.
The probe array costs registers: ptxas spills 8 B (stores) / 8 B (loads) in the seesaw instantiations of such a
build, where the library's kernel has none (nvcc 13.0), so its clocks are close to the library kernel's, not identical.
Slots 8-10 of each warpgroup
tell how long each QK's issue waited for its tiles ("issue begins" to "issued").
Only for shapes whose request 0 is not split (e.g. b 128 s_k 4096 h_q 128): the combine writes a split request's
output over the clocks.
Usage: python3 benchmarks/tools/dense_probe.py [b s_q s_k h_q]
"""
import sys

import torch

sys.path.insert(0, "benchmarks")
import torch_flashmla  # noqa: E402
from bench_decode import D_QK, D_V, inputs  # noqa: E402

WG0 = ["pair start (S_a ready)", "row max of S_a", "scale_a published", "P_a V_a issued",
       "P_a V_a done, V_a[:, :256] released", "scale_b arrived", "P_b V_b issued", "S_{a+2} done",
       "P_b V_b done", "S_{a+2} issue begins (V_b[:, :256] released)", "S_{a+2} issued (its tiles landed)"]
WG1 = ["pair start (S_b ready)", "scale_a arrived", "P_a V_a issued", "scale_b published", "P_b stored",
       "P_a V_a done", "P_b V_b issued", "S_{b+2} done",
       "P_b V_b done", "S_{b+2} issue begins (after S_{a+2} done)", "S_{b+2} issued (its tiles landed)"]


def main():
    b, s_q, s_k, h_q = (int(x) for x in sys.argv[1:5]) if len(sys.argv) >= 5 else (128, 1, 4096, 128)
    q, cache, table, lens = inputs(b, s_q, s_k, h_q)
    meta, splits = torch_flashmla.get_mla_metadata(lens, s_q * h_q, 1, h_q)
    for _ in range(5):
        out, _ = torch.ops.flashmla.mla_decode(q, cache, table, lens, D_V, D_QK ** -0.5, False, meta, splits)
    torch.cuda.synchronize()
    t = out.flatten().view(torch.int64)[:24].cpu().tolist()
    base = t[0]
    for wg, names, vals in ((0, WG0, t[:12]), (1, WG1, t[12:])):
        for name, v in zip(names, vals):
            print(f"wg{wg} {v - base:8d} clk  {name}")


if __name__ == "__main__":
    main()
