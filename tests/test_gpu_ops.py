"""Every op on the GPU (SM90 kernel where built, else the GPU reference path) against the CPU float32
reference on the same inputs, bad input on CUDA tensors, and CUDA-graph capture + replay."""
import pytest
import torch

import torch_flashmla as F
from torch_flashmla import _registration, testing as T

import cases
from attention_asserts import assert_attention_close

pytestmark = pytest.mark.cuda
DEV = "cuda"


def to_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, (tuple, list)):
        return type(x)(to_cpu(i) for i in x)
    return x


CASES = cases.op_cases("cpu")  # built on the CPU at collection, moved to the GPU per test


@pytest.mark.parametrize("name,op,cpu_args", CASES, ids=[c[0] for c in CASES])
def test_op_matches_cpu_reference(name, op, cpu_args):
    args = tuple(a.to(DEV) if isinstance(a, torch.Tensor) else a for a in cpu_args)
    cpu_args = to_cpu(args)
    if name.startswith("write"):
        op(*args)
        op(*cpu_args)
        cache, ref = args[2].cpu(), cpu_args[2]
        assert torch.equal(cache.view(torch.uint8), ref.view(torch.uint8))
        return
    got, ref = op(*args), op(*cpu_args)
    if name.startswith("plan") or name.startswith("quantize") or name.startswith("dequantize"):
        for g, r in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,)):
            assert g.device.type == "cuda"
            assert torch.equal(g.cpu().view(torch.uint8) if g.dtype == torch.bfloat16 else g.cpu(),
                               r.view(torch.uint8) if r.dtype == torch.bfloat16 else r)
        return
    if name.startswith("prefill"):
        out, max_logits, lse = got
        r_out, r_max, r_lse = ref
        assert_attention_close(out, lse, r_out, r_lse)
        torch.testing.assert_close(max_logits.cpu(), r_max, atol=1e-5, rtol=1e-5)
        return
    assert_attention_close(got[0], got[1], ref[0], ref[1])


DENSE_MATRIX = [
    T.DenseDecodeCase(b=b, s_q=s_q, h_q=h_q, h_kv=h_kv, seqlen=s_k, varlen=varlen, causal=causal, dtype=dtype,
                      zero_lengths=varlen)
    for (b, s_q, h_q, h_kv, s_k, varlen, causal, dtype) in [
        (1, 1, 128, 1, 4096, False, False, torch.bfloat16),
        (2, 2, 64, 1, 140, True, True, torch.bfloat16),
        (6, 4, 9, 1, 20, True, True, torch.float16),
        (6, 1, 126, 2, 4096, True, False, torch.bfloat16),
        (64, 1, 16, 8, 140, True, False, torch.float16),
        (2, 2, 3, 1, 32768, False, True, torch.bfloat16),
    ]
]


@pytest.mark.parametrize("case", DENSE_MATRIX, ids=str)
def test_dense_decode_matrix(case):
    args = T.dense_decode_inputs(case, device=DEV, seed=case.b * 7 + case.s_q)
    out, lse = F.mla_decode(**args)
    ref_out, ref_lse = F.mla_decode(**to_cpu(args))
    assert_attention_close(out, lse, ref_out, ref_lse)


def test_planner_gpu_equals_cpu_at_scale():
    g = torch.Generator().manual_seed(0)
    cases = []
    for b, parts in [(1, 132), (128, 132), (4096, 66), (333, 7)]:
        seqlens = torch.randint(0, 131072, (b,), generator=g, dtype=torch.int32)
        seqlens[::5] = 0
        cases.append((seqlens, parts))
    # lengths near 2^31: the block count of a length is formed without overflowing int32
    near_max = torch.tensor([2**31 - 1, 5, 2**31 - 64, 2**31 - 63, 0, 2**31 - 65], dtype=torch.int32)
    cases += [(near_max, parts) for parts in (1, 7, 132)]
    for seqlens, parts in cases:
        gpu = F.get_mla_metadata(seqlens.to(DEV), 128, 1, 128, num_sm_parts=parts)
        cpu = F.get_mla_metadata(seqlens, 128, 1, 128, num_sm_parts=parts)
        assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1]), (len(seqlens), parts)


def test_bad_input_on_cuda():
    args = T.dense_decode_inputs(T.DenseDecodeCase(b=2, h_q=4, seqlen=100), device=DEV)
    with pytest.raises(ValueError, match="argument 'block_table'"):
        F.mla_decode(**{**args, "block_table": args["block_table"].cpu()})
    with pytest.raises(ValueError, match="argument 'kv_cache'"):
        F.mla_decode(**{**args, "kv_cache": args["kv_cache"][:, :0]})  # page size 0
    torch.cuda.synchronize()


def test_dense_decode_cuda_graph_replay():
    """Capture (planner +) decode once; replay with new lengths (growth by thousands of tokens) and
    new block tables; results equal eager. The planner is captured too when it runs on the GPU."""
    case = T.DenseDecodeCase(b=8, h_q=16, seqlen=6000, varlen=True)
    args = T.dense_decode_inputs(case, device=DEV, seed=1)
    static = {k: v for k, v in args.items()}
    plan_in_graph = _registration.cuda_path("get_mla_metadata", torch.device(DEV)) == "sm90"
    static_seqlens = static["cache_seqlens"].clone()
    static_seqlens.copy_(torch.full_like(static_seqlens, 100))
    static["cache_seqlens"] = static_seqlens
    parts = F.default_num_sm_parts(torch.device(DEV), 16, 1)

    def step():
        if plan_in_graph:
            static["tile_scheduler_metadata"], static["num_splits"] = F.get_mla_metadata(
                static_seqlens, 16, 1, 16, num_sm_parts=parts)
        return F.mla_decode(**static)

    graph, (out, lse) = T.capture_cuda_graph(step)
    for seed in range(3):
        fresh = T.dense_decode_inputs(case, device=DEV, seed=10 + seed)
        static_seqlens.copy_(fresh["cache_seqlens"])
        static["block_table"].copy_(fresh["block_table"])
        static["kv_cache"].copy_(fresh["kv_cache"])
        static["q"].copy_(fresh["q"])
        if not plan_in_graph:
            m, n = F.get_mla_metadata(static_seqlens, 16, 1, 16, num_sm_parts=parts)
            static["tile_scheduler_metadata"].copy_(m)
            static["num_splits"].copy_(n)
        graph.replay()
        ref_out, ref_lse = F.mla_decode(**fresh)
        torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
        torch.testing.assert_close(lse, ref_lse, atol=0, rtol=0)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_ds_mla"])
def test_cache_write_cuda_graph_replay(kv_cache_dtype):
    a = T.cache_write_inputs(num_tokens=32, num_blocks=8, page_size=64, kv_cache_dtype=kv_cache_dtype, device=DEV)
    F.concat_and_cache_mla(**a)  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        F.concat_and_cache_mla(**a)
    b = T.cache_write_inputs(num_tokens=32, num_blocks=8, page_size=64, kv_cache_dtype=kv_cache_dtype, device=DEV,
                             seed=5)
    for k in ("kv_c", "k_pe", "slot_mapping"):
        a[k].copy_(b[k])
    graph.replay()
    F.concat_and_cache_mla(**b)
    assert torch.equal(a["kv_cache"].view(torch.uint8), b["kv_cache"].view(torch.uint8)) or \
        _written_rows_equal(a, b)


def _written_rows_equal(a, b):
    slots = b["slot_mapping"][b["slot_mapping"] >= 0]
    flat_a = a["kv_cache"].view(torch.uint8).view(-1, a["kv_cache"].shape[-1] * a["kv_cache"].element_size())
    flat_b = b["kv_cache"].view(torch.uint8).view(-1, b["kv_cache"].shape[-1] * b["kv_cache"].element_size())
    return torch.equal(flat_a[slots], flat_b[slots])
