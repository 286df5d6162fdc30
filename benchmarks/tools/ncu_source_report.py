"""Warp-stall samples of one kernel by warpgroup role, from Nsight Compute's source page (development tool).

  python3 benchmarks/tools/ncu_source_report.py CSV [--barriers NAME=OFFSET,...]

CSV is `ncu --import REPORT --page source --csv --print-source sass > CSV` (gzip allowed) of a report taken with
`--section SourceCounters`. The code after each `setmaxnreg` belongs to the warpgroups that ran it: a role is named by
that instruction ("dec 104", "inc 200", ...; "setup" before the first). Printed: samples by role, the mbarrier waits
(each `SYNCS.PHASECHK` try-wait and the retry branch after it) by barrier address, the stall reasons and opcodes per
role, and shared-memory wavefronts and L1 tag lookups per role. --barriers names the shared-memory offsets of the
barriers as they appear in the SASS (`[R+UR+0x38660]` -> 0x38660); a barrier indexed by a register (a stage) shows
at the offset of its index 0.

Used by benchmarks/tools/few_heads_ncu.py (sparse few-head kernel) and for the FP8 large-page dense kernel
(`benchmarks/tools/fp8_large_pages_probe.py --calls`; its barriers in benchmarks/NOTES_fp8_decode.md, session 25).
"""
from __future__ import annotations

import argparse
import collections
import csv
import gzip
import re


def read_source_page(path: str):
    """(header, rows) of the SASS source page."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", errors="replace") as f:
        rows = list(csv.reader(f))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    header = [c.strip() for c in rows[start]]
    return header, [r for r in rows[start + 1:] if len(r) == len(header)]


def number(x: str) -> float:
    return float(x.replace(",", "")) if x.strip() else 0.0


def role_marks(data, role_names=None):
    """[(address, role)] at each setmaxnreg, sorted; role_names maps "dec 104" / "inc 200" (or "dec" / "inc") to a
    name."""
    marks = []
    for r in data:
        if "USETMAXREG" not in r[1]:
            continue
        regs = int(re.findall(r"0x[0-9a-f]+", r[1])[-1], 16)  # `USETMAXREG.DEALLOC.CTAPOOL 0x68`
        direction = "dec" if "DEALLOC" in r[1] else "inc"
        label = f"{direction} {regs}"
        names = role_names or {}
        marks.append((int(r[0], 16), names.get(label, names.get(direction, label))))
    return sorted(marks)


def report(path: str, barriers: dict[int, str] | None = None, role_names: dict[str, str] | None = None) -> None:
    header, data = read_source_page(path)
    col = header.index
    marks = role_marks(data, role_names)

    def role(addr: int) -> str:
        name = "setup"
        for start, who in marks:
            if addr >= start:
                name = who
        return name

    reasons = [i for i, c in enumerate(header) if c.startswith("stall_") and "Not Issued" not in c]
    samples = col("Warp Stall Sampling (All Samples)")
    total = sum(number(r[samples]) for r in data) or 1.0
    by_role, by_wait = collections.Counter(), collections.Counter()
    by_reason = collections.defaultdict(collections.Counter)
    traffic = collections.defaultdict(collections.Counter)
    by_opcode = collections.defaultdict(collections.Counter)
    pending = {}
    for r in data:
        who, n, sass = role(int(r[0], 16)), number(r[samples]), r[1].strip()
        by_role[who] += n
        words = [w for w in sass.split() if not w.startswith("@")]
        if words:
            by_opcode[who][words[0].split(".")[0]] += n
        for i in reasons:
            by_reason[who][header[i][len("stall_"):]] += number(r[i])
        traffic[who]["shared wavefronts"] += number(r[col("L1 Wavefronts Shared")])
        traffic[who]["L1 tag lookups (global)"] += number(r[col("L1 Tag Requests Global")])
        # an mbarrier wait is the try-wait and the branch back to it
        m = re.search(r"SYNCS\.PHASECHK\S*\s+(P\d), \[[^\]]*?(0x[0-9a-f]+)\]", sass)
        if m:
            offset = int(m.group(2), 16)
            pending[m.group(1)] = (who, (barriers or {}).get(offset, hex(offset)))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+")
    parser.add_argument("--barriers", default="", help="NAME=OFFSET,... (hex offsets as in the SASS)")
    args = parser.parse_args()
    barriers = {int(off, 16): name for name, off in (b.split("=") for b in args.barriers.split(",") if b)}
    for path in args.csv:
        report(path, barriers)


if __name__ == "__main__":
    main()
