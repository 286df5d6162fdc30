"""A plan's values cannot be checked without a host sync, so the decode kernels give every plan a defined,
memory-safe meaning (docs/design.md §4.1): partitions are clamped into the batch, token ranges into each
request's length, split rows into the scratch. Here plans of random garbage (uninitialised buffers, the wrong
request's plan, hand-edited rows) go to every decode kernel: the call must finish without a CUDA error
(outputs unspecified), and a correct call on the same stream afterwards still matches the reference.

Each op runs in a subprocess: an illegal memory access would end the CUDA context of the process that
makes it, and would otherwise fail every later GPU test."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.cuda

pytest.importorskip("torch_flashmla")
from sm90 import require_sm90_kernel  # noqa: E402

require_sm90_kernel("mla_decode")

SCRIPT = textwrap.dedent('''
    import torch, torch_flashmla as F
    from torch_flashmla import kv_cache as kvc, reference, testing as T
    KIND = {kind!r}
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)

    def inputs(seed):
        if KIND == "sparse":
            a = T.sparse_decode_inputs(T.SparseDecodeCase(b=9, s_q=2, h_q={h_q}, topk=700, num_blocks=40,
                                                          with_topk_length=True, extra_topk=100), device=dev, seed=seed)
            call = lambda a: F.sparse_mla_decode(**a, softmax_scale=0.04)
            keys = ("q", "kv_cache", "indices", "topk_length", "attn_sink", "extra_kv_cache", "extra_indices",
                    "extra_topk_length")
            ref = lambda a: reference.sparse_mla_decode(*(a[k] for k in keys), 512, 0.04)
            return a, call, ref
        a = T.dense_decode_inputs(T.DenseDecodeCase(b=9, s_q=2, h_q={h_q}, seqlen=3000, varlen=True), device=dev,
                                  seed=seed)
        if KIND == "fp8":
            dk = torch.tensor([0.02], device=dev)
            a["kv_cache"] = kvc.quantize_per_tensor_e4m3(a["kv_cache"], dk).view(torch.float8_e4m3fn)
            a["descale_k"] = dk
        return a, (lambda a: F.mla_decode(**a)), (lambda a: F.mla_decode(**{{k: (v.cpu() if torch.is_tensor(v) else v)
                                                                              for k, v in a.items()}}))

    a, call, ref = inputs(1)
    meta, splits = a["tile_scheduler_metadata"], a["num_splits"]
    b = splits.shape[0] - 1
    big = 2 ** 31 - 1
    garbage = [
        (torch.randint(-big, big, meta.shape, generator=g, device=dev, dtype=torch.int32),
         torch.randint(-big, big, splits.shape, generator=g, device=dev, dtype=torch.int32)),
        (torch.randint(-3, b + 3, meta.shape, generator=g, device=dev, dtype=torch.int32),
         torch.randint(-3, 10 ** 6, splits.shape, generator=g, device=dev, dtype=torch.int32)),
        (meta, torch.randint(-5, 3 * meta.shape[0], splits.shape, generator=g, device=dev, dtype=torch.int32)),
        (torch.randint(-3, b + 3, meta.shape, generator=g, device=dev, dtype=torch.int32), splits),
        (meta.flip(0).contiguous(), splits.flip(0).contiguous()),
        (torch.zeros_like(meta), torch.full_like(splits, big)),
    ]
    for m, s in garbage:
        out = call({{**a, "tile_scheduler_metadata": m, "num_splits": s}})
        torch.cuda.synchronize()
    good = call(a)
    want = ref(a)
    torch.cuda.synchronize()
    err = (good[0].float().cpu() - want[0].float().cpu()).abs().max().item()
    assert err < 0.05, err
    print("ok", err)
''')

CASES = [("dense", 128), ("dense", 16), ("fp8", 128), ("fp8", 16), ("sparse", 128), ("sparse", 64), ("sparse", 16)]


@pytest.mark.parametrize("kind,h_q", CASES, ids=[f"{k}-h{h}" for k, h in CASES])
def test_garbage_plan_is_memory_safe(kind, h_q):
    if kind == "sparse":
        require_sm90_kernel("sparse_mla_decode")
    run = subprocess.run([sys.executable, "-c", SCRIPT.format(kind=kind, h_q=h_q)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
