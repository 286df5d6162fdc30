"""Writes csrc/sm90/common/wgmma_ops.h: inline-PTX wgmma wrappers of the SM90 kernels."""
import pathlib


def gen(n, dt, name, transb, a_regs, k=16, transa=0):
    """m64n{n}k{k} wgmma; A from a shared-memory descriptor (MN-major when transa), or from 4 registers
    when a_regs. 8-bit types (k 32) take no transpose operands: both A and B are K-major (transb None)."""
    nreg = n // 2
    regl = [f"%{i}" for i in range(nreg)]
    n_in = 5 if a_regs else 2  # A (4 registers or 1 descriptor) + B descriptor
    pred = nreg + n_in
    a_param = "const uint32_t (&a)[4]" if a_regs else "uint64_t desc_a"
    lines = [f"__device__ __forceinline__ void {name}(float* d, {a_param}, uint64_t desc_b, int scale_d) {{",
             "  asm volatile(",
             '      "{\\n.reg .pred p;\\n"',
             f'      "setp.ne.b32 p, %{pred}, 0;\\n"',
             f'      "wgmma.mma_async.sync.aligned.m64n{n}k{k}.f32.{dt}.{dt} "',
             '      "{"']
    for i in range(0, nreg, 16):
        sep = ", " if i + 16 < nreg else ""
        lines.append(f'      "{", ".join(regl[i:i + 16])}{sep}"')
    if a_regs:
        # Register A: no transpose flag for A (PTX: scale-d, imm-scale-a, imm-scale-b, imm-trans-b).
        trans = "" if transb is None else f", {transb}"
        lines.append(f'      "}}, {{%{nreg}, %{nreg + 1}, %{nreg + 2}, %{nreg + 3}}}, %{nreg + 4}, p, 1, 1{trans};\\n}}\\n"')
    else:
        trans = "" if transb is None else f", {transa}, {transb}"
        lines.append(f'      "}}, %{nreg}, %{nreg + 1}, p, 1, 1{trans};\\n}}\\n"')
    outs = [", ".join(f'"+f"(d[{k}])' for k in range(i, min(i + 8, nreg))) for i in range(0, nreg, 8)]
    lines.append("      : " + ",\n        ".join(outs))
    if a_regs:
        lines.append('      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));')
    else:
        lines.append('      : "l"(desc_a), "l"(desc_b), "r"(scale_d));')
    lines.append("}")
    return "\n".join(lines)


out = ["// Written by benchmarks/tools/gen_wgmma.py: wgmma wrappers of the SM90 kernels.",
       "// fp32 accumulators in registers; B from shared memory (matrix descriptor).",
       "// *_kk: A and B K-major.  *_kmn: A K-major, B MN-major (transposed).  *_mnk: A MN-major, B K-major.",
       "// A from a shared-memory descriptor, or (*_r*) from four registers in the m64k16 A-fragment layout",
       "// (m64k32 for e4m3).",
       "#pragma once", "#include <cstdint>", "", "namespace flashmla {", "namespace sm90 {", ""]
for dt in ("bf16", "f16"):
    out += [gen(64, dt, f"wgmma_m64n64k16_{dt}_kk", 0, False), "",
            gen(256, dt, f"wgmma_m64n256k16_{dt}_kmn", 1, False), "",
            gen(64, dt, f"wgmma_m64n64k16_{dt}_rk", 0, True), "",
            gen(256, dt, f"wgmma_m64n256k16_{dt}_rmn", 1, True), "",
            # MHA prefill: S = Q K^T over 128-key blocks, O += P V with d_v 128.
            gen(128, dt, f"wgmma_m64n128k16_{dt}_kk", 0, False), "",
            gen(128, dt, f"wgmma_m64n128k16_{dt}_rmn", 1, True), ""]
# FP8 dense decode: S = Q K^T and O += P V^T-in-shared-memory on e4m3 tiles (both operands K-major).
out += [gen(64, "e4m3", "wgmma_m64n64k32_e4m3_kk", None, False, k=32), "",
        gen(256, "e4m3", "wgmma_m64n256k32_e4m3_kk", None, False, k=32), "",
        gen(256, "e4m3", "wgmma_m64n256k32_e4m3_rk", None, True, k=32), "",
        # FP8 dense decode with at most 32 query rows (transposed products): S^T = K Q^T, O^T += V^T P^T.
        gen(32, "e4m3", "wgmma_m64n32k32_e4m3_kk", None, False, k=32), "",
        # ... with V^T's fragments in registers (ldmatrix .trans of the cache tile, bytes permuted).
        gen(32, "e4m3", "wgmma_m64n32k32_e4m3_rk", None, True, k=32), "",
        # 64 query rows, O^T += V^T P^T with V^T's fragments in registers (two warpgroups of 256 dims each).
        gen(64, "e4m3", "wgmma_m64n64k32_e4m3_rk", None, True, k=32), ""]
# Sparse decode with few heads (transposed products): S^T = K Q^T and O^T += V^T P^T, N = the head tile.
out += [gen(16, "bf16", "wgmma_m64n16k16_bf16_kk", 0, False), "",
        gen(16, "bf16", "wgmma_m64n16k16_bf16_mnk", 0, False, transa=1), "",
        gen(8, "bf16", "wgmma_m64n8k16_bf16_kk", 0, False), "",
        gen(8, "bf16", "wgmma_m64n8k16_bf16_mnk", 0, False, transa=1), ""]
# Dense 16-bit decode with at most 32 query rows (transposed products): S^T = K Q^T, O^T += V^T P^T.
for dt in ("bf16", "f16"):
    out += [gen(32, dt, f"wgmma_m64n32k16_{dt}_kk", 0, False), "",
            gen(32, dt, f"wgmma_m64n32k16_{dt}_mnk", 0, False, transa=1), ""]
out += ["}  // namespace sm90", "}  // namespace flashmla"]
root = pathlib.Path(__file__).resolve().parents[2]
(root / "csrc/sm90/common/wgmma_ops.h").write_text("\n".join(out) + "\n")
