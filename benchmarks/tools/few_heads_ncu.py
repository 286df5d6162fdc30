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

import os
import sys

import ncu_source_report  # benchmarks/tools/, the script's own folder

# shared-memory offsets of the V3.2 few-head layout's barriers; the stage is in the address register, so both stages
# of a barrier show as the offset of stage 0
BARRIERS = {0x2b100: "full", 0x2b108: "full", 0x2b110: "empty", 0x2b118: "empty", 0x2b120: "q_full"}


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
    # the code after `setmaxnreg.dec` is a producer's, after `setmaxnreg.inc` the math warpgroup's
    ncu_source_report.report(path, BARRIERS, {"dec": "producers", "inc": "math"})


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "run":
        run(int(sys.argv[2]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "report":
        for p in sys.argv[2:]:
            report(p)
    else:
        print(__doc__)
        raise SystemExit(2)
