"""Nsight Compute of the few-head sparse decode kernel: eager calls to profile, and the stall samples by role.

  run H_Q       six eager calls of sparse_mla_decode at h_q H_Q with the inputs of sparse_few_heads.py (V3.2,
                b 128, s_q 2, topk 2048), for
                  ncu --clock-control none --kernel-name regex:sparse_decode_narrow --launch-skip 3 --launch-count 1
                      --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section SourceCounters
                      -o REPORT python3 benchmarks/tools/few_heads_ncu.py run 8
  report CSV..  from `ncu --import REPORT --page source --csv --print-source sass > CSV`: the warp-stall samples of
                the producer and math warpgroups (split at their setmaxnreg instructions), the mbarrier waits by
                barrier (the V3.2 few-head layout's barriers at shared offset 0x2b100), the stall reasons and the
                samples by opcode per role, and shared-memory wavefronts and L1 tag lookups per role.
The producers-alone and math-alone builds are benchmarks/tools/few_heads_nomath.patch and few_heads_noprod.patch.
"""
from __future__ import annotations

import collections
import csv
import gzip
import os
import re
import sys

# the stage is in the address register, so both stages of a barrier show as the offset of stage 0
BARRIERS = {0x00: "full", 0x08: "full", 0x10: "empty", 0x18: "empty", 0x20: "q_full"}


def run(h_q: int) -> None:
    import torch
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, ".."))
    import torch_flashmla
    from bench_sparse_decode import D_QK, make_cache, make_indices, make_q, plan
    from sparse_few_heads import B, S_K, S_Q, TOPK
    dev = torch.device("cuda")
    cache, table = make_cache(B, S_K, dev)
    indices = make_indices(table, S_K, S_Q, TOPK)
    q = make_q(B, S_Q, h_q, dev)
    meta, splits = plan(B, S_Q, h_q, TOPK, dev)
    for _ in range(6):
        torch_flashmla.sparse_mla_decode(q, cache, indices, meta, splits, softmax_scale=D_QK ** -0.5)
    torch.cuda.synchronize()


def report(path: str) -> None:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", errors="replace") as f:
        rows = list(csv.reader(f))
    hi = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    header = [c.strip() for c in rows[hi]]
    col = header.index
    data = [r for r in rows[hi + 1:] if len(r) == len(header)]

    def num(x: str) -> float:
        return float(x.replace(",", "")) if x.strip() else 0.0

    # the code after `setmaxnreg.dec` is a producer's, after `setmaxnreg.inc` the math warpgroup's
    marks = sorted((int(r[0], 16), "producers" if "DEALLOC" in r[1] else "math") for r in data if "USETMAXREG" in r[1])

    def role(addr: int) -> str:
        name = "setup"
        for start, who in marks:
            if addr >= start:
                name = who
        return name

    reasons = [i for i, c in enumerate(header) if c.startswith("stall_") and "Not Issued" not in c]
    samples = col("Warp Stall Sampling (All Samples)")
    total = sum(num(r[samples]) for r in data) or 1.0
    by_role, by_wait = collections.Counter(), collections.Counter()
    by_reason = collections.defaultdict(collections.Counter)
    traffic = collections.defaultdict(collections.Counter)
    by_opcode = collections.defaultdict(collections.Counter)
    pending = {}
    for r in data:
        who, n, sass = role(int(r[0], 16)), num(r[samples]), r[1].strip()
        by_role[who] += n
        words = [w for w in sass.split() if not w.startswith("@")]
        if words:
            by_opcode[who][words[0].split(".")[0]] += n
        for i in reasons:
            by_reason[who][header[i][len("stall_"):]] += num(r[i])
        traffic[who]["shared wavefronts"] += num(r[col("L1 Wavefronts Shared")])
        traffic[who]["L1 tag lookups (global)"] += num(r[col("L1 Tag Requests Global")])
        # an mbarrier wait is the try-wait and the branch back to it
        m = re.search(r"SYNCS\.PHASECHK\S*\s+(P\d), \[[^\]]*0x2b1([0-9a-f]{2})\]", sass)
        if m:
            pending[m.group(1)] = (who, BARRIERS.get(int(m.group(2), 16), m.group(2)))
            by_wait[pending[m.group(1)]] += n
            continue
        m = re.match(r"@!(P\d)\s+BRA", sass)
        if m and m.group(1) in pending:
            by_wait[pending.pop(m.group(1))] += n
    pct = lambda v: f"{100 * v / total:.1f}%"  # noqa: E731
    print(f"{path}: {total:.0f} samples; " + ", ".join(f"{k} {pct(v)}" for k, v in by_role.most_common()))
    print("  mbarrier waits: " + ", ".join(f"{w}:{b} {pct(v)}" for (w, b), v in by_wait.most_common()))
    for who, c in by_reason.items():
        print(f"  {who}: " + ", ".join(f"{k} {pct(v)}" for k, v in c.most_common(6)))
    for who, c in by_opcode.items():
        print(f"  {who} by opcode: " + ", ".join(f"{k} {v:.0f}" for k, v in c.most_common(8)))
    for who, c in traffic.items():
        print(f"  {who}: " + ", ".join(f"{k} {v:.0f}" for k, v in c.items()))


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "run":
        run(int(sys.argv[2]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "report":
        for p in sys.argv[2:]:
            report(p)
    else:
        print(__doc__)
        raise SystemExit(2)
