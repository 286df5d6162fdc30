"""Writes csrc/sm90/common/wgmma_ops.h: inline-PTX wgmma wrappers (operands from shared memory)."""
import pathlib


def gen(n, dt, name, transb):
    nreg = n // 2
    regl = [f"%{i}" for i in range(nreg)]
    lines = [f"__device__ __forceinline__ void {name}(float* d, uint64_t desc_a, uint64_t desc_b, int scale_d) {{",
             "  asm volatile(",
             '      "{\\n.reg .pred p;\\n"',
             f'      "setp.ne.b32 p, %{nreg + 2}, 0;\\n"',
             f'      "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{dt}.{dt} "',
             '      "{"']
    for i in range(0, nreg, 16):
        sep = ", " if i + 16 < nreg else ""
        lines.append(f'      "{", ".join(regl[i:i + 16])}{sep}"')
    lines.append(f'      "}}, %{nreg}, %{nreg + 1}, p, 1, 1, 0, {transb};\\n}}\\n"')
    outs = [", ".join(f'"+f"(d[{k}])' for k in range(i, min(i + 8, nreg))) for i in range(0, nreg, 8)]
    lines.append("      : " + ",\n        ".join(outs))
    lines.append('      : "l"(desc_a), "l"(desc_b), "r"(scale_d));')
    lines.append("}")
    return "\n".join(lines)


out = ["// Written by benchmarks/tools/gen_wgmma.py: wgmma wrappers of the SM90 decode kernels.",
       "// Both operands from shared memory (matrix descriptors); fp32 accumulators in registers.",
       "// *_kk: A and B K-major.  *_kmn: A K-major, B MN-major (transposed).",
       "#pragma once", "#include <cstdint>", "", "namespace flashmla {", "namespace sm90 {", ""]
for dt in ("bf16", "f16"):
    out += [gen(32, dt, f"wgmma_m64n32k16_{dt}_kk", 0), "", gen(64, dt, f"wgmma_m64n64k16_{dt}_kk", 0), "",
            gen(256, dt, f"wgmma_m64n256k16_{dt}_kmn", 1), ""]
out += ["}  // namespace sm90", "}  // namespace flashmla"]
root = pathlib.Path(__file__).resolve().parents[2]
(root / "csrc/sm90/common/wgmma_ops.h").write_text("\n".join(out) + "\n")
