"""Runs one sparse prefill case (argv: s_q s_kv topk h_q d_qk sink(0/1) topk_length(0/1)) on the SM90 kernel
and compares it with the float32 reference; prints one line. Used to isolate failures in a fresh process."""
import sys

import torch

import torch_flashmla
from torch_flashmla import reference
from torch_flashmla.testing import SparsePrefillCase, sparse_prefill_inputs

s_q, s_kv, topk, h_q, d_qk, sink, tl = map(int, sys.argv[1:8])
case = SparsePrefillCase(s_q=s_q, s_kv=s_kv, topk=topk, h_q=h_q, d_qk=d_qk, with_attn_sink=bool(sink),
                         with_topk_length=bool(tl))
inp = sparse_prefill_inputs(case, device="cuda", seed=1)
args = (inp["q"], inp["kv"], inp["indices"], d_qk ** -0.5, 512, inp["attn_sink"], inp["topk_length"])
out, mx, lse = torch.ops.flashmla.sparse_mla_prefill(*args)
torch.cuda.synchronize()
r_out, r_mx, r_lse = reference.sparse_mla_prefill(*args)
fin = torch.isfinite(r_lse)
print(sys.argv[1:8], "out err", (out.float() - r_out.float()).abs().max().item(),
      "lse err", (lse[fin] - r_lse[fin]).abs().max().item() if fin.any() else 0,
      "mx err", (mx[fin] - r_mx[fin]).abs().max().item() if fin.any() else 0,
      "inf pattern ok", torch.equal(torch.isinf(lse), torch.isinf(r_lse)))
