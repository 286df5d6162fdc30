"""Bad input gets a ValueError naming the argument, before any kernel runs (CPU here; the CUDA
kernels share the same checks, see tests/test_gpu_ops.py)."""
import pytest
import torch

import torch_flashmla as F
from torch_flashmla import testing as T


def dense_args(**over):
    a = T.dense_decode_inputs(T.DenseDecodeCase(b=2, h_q=4, seqlen=100), seed=0)
    a.update(over)
    return a


D = dense_args()


@pytest.mark.parametrize("over,arg", [
    (dict(q=D["q"].float()), "q"),                                   # dtype
    (dict(q=D["q"][0]), "q"),                                        # rank
    (dict(q=D["q"][..., :512]), "q"),                                # head dim
    (dict(q=D["q"].transpose(0, 3).contiguous().transpose(0, 3)), "q"),  # last dim not contiguous
    (dict(kv_cache=D["kv_cache"].half()), "kv_cache"),               # dtype differs from q
    (dict(kv_cache=D["kv_cache"][:, :0]), "kv_cache"),               # page size 0
    (dict(kv_cache=D["kv_cache"].expand(-1, -1, 3, -1)), "kv_cache"),  # h_q % h_kv != 0
    (dict(block_table=D["block_table"].long()), "block_table"),
    (dict(block_table=D["block_table"][:1]), "block_table"),         # batch mismatch
    (dict(cache_seqlens=D["cache_seqlens"][:1]), "cache_seqlens"),
    (dict(cache_seqlens=D["cache_seqlens"].long()), "cache_seqlens"),
    (dict(head_dim_v=576), "head_dim_v"),
    (dict(num_splits=D["num_splits"][:2]), "num_splits"),
    (dict(tile_scheduler_metadata=D["tile_scheduler_metadata"][:, :4].contiguous()), "tile_scheduler_metadata"),
    (dict(block_table=D["block_table"].to("meta")), "block_table"),  # device
])
def test_mla_decode_bad_input(over, arg):
    with pytest.raises(ValueError, match=f"argument '{arg}'"):
        F.mla_decode(**dense_args(**over))


@pytest.mark.parametrize("page_size", [1, 5, 16, 48, 96])
def test_mla_decode_any_page_size(page_size):
    """Any page size >= 1 is accepted (the SM90 kernel loads pages that are not a multiple of 64 tokens
    in slices; tests/test_dense_decode_cuda.py checks it)."""
    a = T.dense_decode_inputs(T.DenseDecodeCase(b=2, h_q=4, seqlen=100, page_size=page_size, varlen=True), seed=1)
    out, lse = F.mla_decode(**a)
    assert out.shape == (2, 1, 4, 512) and not out.isnan().any() and not lse.isnan().any()


def test_mla_decode_plan_over_grid_limit():
    """A dense plan with more partitions than the kernel's grid can hold (65535) is refused: the planner
    never makes one, and a hand-made one is refused by mla_decode."""
    a = dense_args()
    with pytest.raises(ValueError, match="argument 'num_sm_parts'.*65535"):
        F.get_mla_metadata(a["cache_seqlens"], 4, 1, 4, num_sm_parts=65536)
    meta = torch.zeros(65536, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="argument 'tile_scheduler_metadata'.*65535"):
        F.mla_decode(**{**a, "tile_scheduler_metadata": meta})


def test_mla_decode_too_many_heads():
    q = torch.zeros(1, 1, 130, 576, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="argument 'q'"):
        F.mla_decode(**dense_args(q=q))


def sparse_args(**over):
    a = T.sparse_decode_inputs(T.SparseDecodeCase(b=2, h_q=4, topk=64, with_topk_length=True, extra_topk=32), seed=0)
    a.update(over)
    return a


S = sparse_args()


@pytest.mark.parametrize("over,arg", [
    (dict(q=S["q"].half()), "q"),
    (dict(kv_cache=S["kv_cache"][..., :576]), "kv_cache"),
    (dict(kv_cache=S["kv_cache"].view(torch.int8)), "kv_cache"),
    (dict(indices=S["indices"].long()), "indices"),
    (dict(indices=S["indices"][:1]), "indices"),
    (dict(topk_length=S["topk_length"][:1]), "topk_length"),
    (dict(attn_sink=torch.zeros(3)), "attn_sink"),
    (dict(attn_sink=torch.zeros(4, dtype=torch.bfloat16)), "attn_sink"),
    (dict(extra_kv_cache=None), "extra_indices"),
    (dict(extra_indices=None), "extra_indices"),
    (dict(extra_indices=S["extra_indices"][:1]), "extra_indices"),
    (dict(extra_indices=S["extra_indices"].long()), "extra_indices"),
    (dict(extra_topk_length=S["extra_topk_length"][:1]), "extra_topk_length"),
    (dict(extra_topk_length=S["extra_topk_length"].long()), "extra_topk_length"),
])
def test_sparse_decode_bad_input(over, arg):
    with pytest.raises(ValueError, match=f"argument '{arg}'"):
        F.sparse_mla_decode(**sparse_args(**over))


def prefill_args(**over):
    a = T.sparse_prefill_inputs(T.SparsePrefillCase(s_q=4, h_q=4), seed=0)
    a.update(over)
    return a


P = prefill_args()


@pytest.mark.parametrize("over,arg", [
    (dict(q=P["q"].float()), "q"),
    (dict(kv=P["kv"].expand(-1, 2, -1)), "kv"),
    (dict(kv=P["kv"][..., :512]), "kv"),
    (dict(indices=P["indices"][:2]), "indices"),
    (dict(topk_length=torch.zeros(3, dtype=torch.int32)), "topk_length"),
    (dict(head_dim_v=128), "head_dim_v"),
])
def test_sparse_prefill_bad_input(over, arg):
    with pytest.raises(ValueError, match=f"argument '{arg}'"):
        F.sparse_mla_prefill(**prefill_args(**over))


def test_cache_write_bad_input():
    a = T.cache_write_inputs()
    with pytest.raises(ValueError, match="argument 'kv_cache_dtype'"):
        F.concat_and_cache_mla(**{**a, "kv_cache_dtype": "fp8_e5m2"})
    with pytest.raises(ValueError, match="argument 'slot_mapping'"):
        F.concat_and_cache_mla(**{**a, "slot_mapping": a["slot_mapping"].int()})
    with pytest.raises(ValueError, match="argument 'k_pe'"):
        F.concat_and_cache_mla(**{**a, "k_pe": a["k_pe"][:, :32]})
    with pytest.raises(ValueError, match="argument 'kv_cache'"):
        F.concat_and_cache_mla(**{**a, "kv_cache": a["kv_cache"][:, :, :, :512]})
    with pytest.raises(ValueError, match="argument 'kv_cache'"):
        F.concat_and_cache_mla(**{**a, "kv_cache": a["kv_cache"].transpose(0, 1)})


def test_planner_bad_input():
    seqlens = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="argument 'seqlens'"):
        F.get_mla_metadata(seqlens.long(), 128, 1, 128)
    with pytest.raises(ValueError, match="argument 'num_heads_q'"):
        F.get_mla_metadata(seqlens, 128, 2, 127)
    with pytest.raises(ValueError, match="argument 'num_sm_parts'"):
        F.get_mla_metadata(seqlens, 128, 1, 128, num_sm_parts=0)


def test_quantize_bad_input():
    with pytest.raises(ValueError, match="argument 'kv'"):
        F.quantize_kv_fp8(torch.zeros(4, 512, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="argument 'kv'"):
        F.quantize_kv_fp8(torch.zeros(4, 576))
    with pytest.raises(ValueError, match="argument 'kv_fp8'"):
        F.dequantize_kv_fp8(torch.zeros(4, 576, dtype=torch.uint8))


def test_requires_grad_is_refused_and_no_grad_works():
    a = dense_args()
    q = a["q"].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="argument 'q' requires grad"):
        F.mla_decode(**{**a, "q": q})
    with torch.no_grad():
        out, _ = F.mla_decode(**{**a, "q": q})
    out2, _ = F.mla_decode(**a)  # plain tensors, grad mode on: works
    assert torch.equal(out, out2)
    kv = torch.randn(2, 576).to(torch.bfloat16).requires_grad_()
    with pytest.raises(RuntimeError, match="argument 'kv' requires grad"):
        F.quantize_kv_fp8(kv)
