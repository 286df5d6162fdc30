"""The call sequences inference engines use with FlashMLA's API, replayed against torch_flashmla.

* Dense decode planned with FlashMLA's old call form and no ``num_heads_q``:
  ``get_mla_metadata(seq_lens, max_query_len * num_q_heads, 1)`` then ``flash_mla_with_kvcache(q [b, s_q,
  h_q, 576], ..., causal=True)``, s_q from 1 (decode) through MTP drafts (2-4) up to short prompts (128).
* CUDA graphs as engines capture them: metadata buffers preallocated once ([num_sms, 8], [max_num_seqs + 1])
  and refilled with ``.copy_()``, or the plan computed inside the graph; a graph captured for batch B
  replayed with fewer real requests (zero-length tail with garbage block tables).
* V3.2 sparse decode: ``get_mla_metadata()`` (object form), a dummy block table, constant
  ``cache_seqlens``, ``-1``-padded indices, q heads padded up to 64/128.
* Sparse prefill with ``topk_length`` and padded heads.
* Dense varlen prefill (``flash_attn_varlen_func``): captured in a CUDA graph for a token budget and
  replayed with new ``cu_seqlens`` contents and a padded tail; shapes refused before any work,
  ``cu_seqlens`` values with their defined meaning.
* Values that cannot be refused without a host sync (negative or over-capacity lengths, page ids
  outside the cache) and zero-size inputs, with their documented results on every path.

CPU tests run everywhere (the CPU kernels are the references); ``cuda`` tests compare the GPU path
against the float32 reference on the same GPU.
"""
from __future__ import annotations

import math

import pytest
import torch

import torch_flashmla as F
from torch_flashmla import compat, reference, testing as T

import oracle
from attention_asserts import PREFILL_TOL, assert_attention_close

SCALE = 576 ** -0.5
needs_gpu = pytest.mark.cuda


def _dense(b, s_q, h_q, seqlen, device, seed, causal=True, page_size=64):
    case = T.DenseDecodeCase(b=b, s_q=s_q, h_q=h_q, seqlen=seqlen, varlen=True, zero_lengths=b > 1,
                             causal=causal, page_size=page_size)
    return T.dense_decode_inputs(case, device=device, seed=seed)


# ------------------------------------------------------------------------------------------------
# planning without num_heads_q (CPU: reference kernels; fakes)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s_q,h_q", [(1, 128), (2, 128), (4, 128), (3, 16), (128, 128)])
def test_old_call_form_plan_equals_full_form(s_q, h_q):
    seqlens = torch.tensor([0, 70, 4000, 1, 129], dtype=torch.int32)
    old = compat.get_mla_metadata(seqlens, s_q * h_q, 1)
    full = F.get_mla_metadata(seqlens, s_q * h_q, 1, h_q)
    for a, b in zip(old, full):
        assert torch.equal(a, b)


@pytest.mark.parametrize("s_q,h_q,causal", [(2, 128, True), (4, 16, True), (3, 32, False), (17, 8, True)])
def test_old_call_form_decodes_mtp_on_cpu(s_q, h_q, causal):
    a = _dense(3, s_q, h_q, 150, "cpu", seed=s_q, causal=causal)
    meta, splits = compat.get_mla_metadata(a["cache_seqlens"], s_q * h_q, 1)   # as engines call it
    out, lse = compat.flash_mla_with_kvcache(a["q"], a["kv_cache"], a["block_table"], a["cache_seqlens"], 512,
                                             meta, splits, softmax_scale=SCALE, causal=causal)
    want_out, want_lse = oracle.dense_decode(a["q"], a["kv_cache"], a["block_table"], a["cache_seqlens"], SCALE,
                                             causal)
    torch.testing.assert_close(out.double(), want_out, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-4, rtol=1e-4)


def test_old_call_form_opcheck():
    seqlens = torch.tensor([0, 70, 4000, 1], dtype=torch.int32)
    torch.library.opcheck(torch.ops.flashmla.get_mla_metadata, (seqlens, 2 * 128, 1, None, False, None, 16))


def test_old_call_form_fake_cuda():
    """The fake plans the old form on fake CUDA tensors (no GPU, no values read)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        seqlens = torch.empty(5, dtype=torch.int32, device="cuda")
        meta, splits = torch.ops.flashmla.get_mla_metadata(seqlens, 2 * 128, 1, None, False, None, 7)
    assert meta.shape == (7, 8) and splits.shape == (6,) and meta.device.type == "cuda"


@pytest.mark.parametrize("kw,arg", [
    (dict(num_heads_q=48), "num_heads_q"),            # 256 rows are not s_q * 48 for an integer s_q
    (dict(num_heads_q=0), "num_heads_q"),
    (dict(num_sm_parts=2 ** 31), "num_sm_parts"),     # bounded: the host planner would loop 2^31 times
])
def test_planner_refuses(kw, arg):
    seqlens = torch.tensor([3, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match=f"argument '{arg}'"):
        F.get_mla_metadata(seqlens, 256, 1, **kw)


@pytest.mark.parametrize("tokens,heads_k,arg", [(0, 1, "num_q_tokens_per_head_k"), (128, 0, "num_heads_k"),
                                                (-4, 1, "num_q_tokens_per_head_k")])
def test_planner_sizes_checked_before_defaults(tokens, heads_k, arg):
    seqlens = torch.tensor([3, 4], dtype=torch.int32)
    for plan in (F.get_mla_metadata, compat.get_mla_metadata):
        with pytest.raises(ValueError, match=f"argument '{arg}'"):
            plan(seqlens, tokens, heads_k)


@pytest.mark.parametrize("s_q,h_q,topk,parts", [
    (1, 128, None, 66), (2, 128, None, 33), (2, 8, None, 132), (2, 32, None, 132),     # dense: rows tiled together
    (2, 8, 2048, 66), (2, 32, 2048, 66), (1, 16, 2048, 132), (2, 64, 2048, 66),        # sparse: one CTA per token
    (2, 128, 2048, 33), (4, 16, 512, 33), (3, 96, 2048, 22),
])
def test_default_partitions_fill_the_sms_once(s_q, h_q, topk, parts):
    """Default num_sm_parts (132 SMs for CPU tensors): partitions x the CTAs each launches = the SMs, for
    dense (64-row tiles of s_q * h_q rows) and sparse decode (s_q x 64-head tiles; docs/design.md §4.1)."""
    seqlens = torch.tensor([5, 4000, 0], dtype=torch.int32)
    assert F.default_num_sm_parts(torch.device("cpu"), s_q * h_q, 1, h_q, sparse=topk is not None) == parts
    meta, _ = F.get_mla_metadata(seqlens, s_q * h_q, 1, h_q, is_fp8_kvcache=topk is not None, topk=topk)
    assert meta.shape == (parts, 8)


def test_sparse_old_call_form_keeps_the_row_count_plan():
    """Without num_heads_q, s_q and h_q are not known apart: the sparse default is the dense count."""
    seqlens = torch.tensor([2048] * 4, dtype=torch.int32)
    meta, _ = compat.get_mla_metadata(seqlens, 2 * 8, 1, None, True, 2048)
    assert meta.shape == (132, 8)
    with pytest.raises(ValueError, match="argument 'num_heads_q'"):   # checked before the default divides
        F.default_num_sm_parts(torch.device("cpu"), 16, 1, 3, sparse=True)


def test_negative_lengths_plan_as_zero():
    neg = torch.tensor([-5, 70, -100, 1], dtype=torch.int32)
    zero = neg.clamp_min(0)
    for a, b in zip(F.get_mla_metadata(neg, 128, 1, num_sm_parts=9), F.get_mla_metadata(zero, 128, 1, num_sm_parts=9)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# values with a defined meaning, and zero-size inputs (every path; GPU variants below)
# ------------------------------------------------------------------------------------------------
def _dense_edge_inputs(device, seed=0):
    """Four requests: length -3 (counts as 0), past the table's capacity (counts as the capacity), one
    with a used page id out of range (skipped), one with a negative used page id (skipped)."""
    a = _dense(4, 2, 16, 200, "cpu", seed=seed, causal=True)
    a["zero_lengths"] = None
    table, lens = a["block_table"].clone(), a["cache_seqlens"].clone()
    capacity = table.shape[1] * 64
    lens[:] = torch.tensor([-3, capacity + 500, 200, 200], dtype=torch.int32)
    num_blocks = a["kv_cache"].shape[0]
    table[1] = torch.randperm(num_blocks)[:table.shape[1]].to(torch.int32)    # every column used
    used = table[1:].flatten().long()
    used = used[(used >= 0) & (used < num_blocks)]
    a["kv_cache"][used] = torch.randn(used.numel(), 64, 1, 576).to(torch.bfloat16)  # every attended slot is data
    table[2, 1] = num_blocks + 5
    table[3, 0] = -7
    a["block_table"], a["cache_seqlens"] = table, lens
    a["tile_scheduler_metadata"], a["num_splits"] = F.get_mla_metadata(lens, 2 * 16, 1, 16, num_sm_parts=5)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in a.items()}


def _dense_edge_oracle(a):
    """float64 attention over exactly the tokens the contract says are attended."""
    q, cache, table, lens = (a[k].cpu() for k in ("q", "kv_cache", "block_table", "cache_seqlens"))
    b, s_q, h_q, _ = q.shape
    num_blocks, page_size = cache.shape[0], cache.shape[1]
    capacity = table.shape[1] * page_size
    out = torch.zeros(b, s_q, h_q, 512, dtype=torch.float64)
    lse = torch.zeros(b, h_q, s_q, dtype=torch.float64)
    for i in range(b):
        n = min(max(int(lens[i]), 0), capacity)
        for t in range(s_q):
            visible = max(0, n - s_q + t + 1)
            keys = [cache[int(table[i, p // page_size]), p % page_size, 0].double() for p in range(visible)
                    if 0 <= int(table[i, p // page_size]) < num_blocks]
            keys = torch.stack(keys) if keys else torch.zeros(0, 576, dtype=torch.float64)
            o, l = oracle._attend(q[i, t].double(), keys, 512, SCALE)
            out[i, t], lse[i, :, t] = o, l
    return out, lse


def _call_dense(a):
    return F.mla_decode(a["q"], a["kv_cache"], a["block_table"], a["cache_seqlens"], a["tile_scheduler_metadata"],
                        a["num_splits"], softmax_scale=SCALE, causal=True)


def test_dense_values_with_defined_meaning_cpu():
    a = _dense_edge_inputs("cpu")
    out, lse = _call_dense(a)
    want_out, want_lse = _dense_edge_oracle(a)
    torch.testing.assert_close(out.double(), want_out, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-4, rtol=1e-4)
    assert torch.isposinf(lse[0]).all() and (out[0] == 0).all()


def _zero_size_calls(device):
    """(name, call) pairs whose every query has nothing to attend to."""
    d = _dense(2, 2, 8, 100, "cpu", seed=1)
    empty_cache = d["kv_cache"][:0]
    s = T.sparse_decode_inputs(T.SparseDecodeCase(b=2, s_q=2, h_q=8, topk=32), seed=2)
    p = T.sparse_prefill_inputs(T.SparsePrefillCase(s_q=5, h_q=8, topk=16), seed=3)
    to = lambda t: t.to(device)  # noqa: E731
    dense_plan = [to(x) for x in (d["tile_scheduler_metadata"], d["num_splits"])]
    sparse_plan = [to(x) for x in (s["tile_scheduler_metadata"], s["num_splits"])]
    return [
        ("dense_zero_block_cache", lambda: F.mla_decode(to(d["q"]), to(empty_cache), to(d["block_table"]),
                                                        to(d["cache_seqlens"]), *dense_plan, causal=True)),
        ("sparse_zero_block_cache", lambda: F.sparse_mla_decode(to(s["q"]), to(s["kv_cache"][:0]), to(s["indices"]),
                                                                *sparse_plan)),
        ("sparse_topk_0", lambda: F.sparse_mla_decode(to(s["q"]), to(s["kv_cache"]), to(s["indices"][..., :0]),
                                                      *sparse_plan)),
        ("prefill_s_kv_0", lambda: F.sparse_mla_prefill(to(p["q"]), to(p["kv"][:0]), to(p["indices"]))),
        ("prefill_topk_0", lambda: F.sparse_mla_prefill(to(p["q"]), to(p["kv"]), to(p["indices"][..., :0]))),
    ]


def _assert_empty_result(result):
    out, lse = result[0], result[-1]
    assert (out == 0).all() and torch.isposinf(lse).all()
    if len(result) == 3:  # sparse prefill: max_logits
        assert torch.isneginf(result[1]).all()


@pytest.mark.parametrize("index", range(5), ids=[c[0] for c in _zero_size_calls("cpu")])
def test_zero_size_inputs_give_the_empty_result_cpu(index):
    _assert_empty_result(_zero_size_calls("cpu")[index][1]())


@pytest.mark.parametrize("scale", [math.inf, math.nan, -1.0, 0.0])
def test_non_finite_softmax_scale_refused(scale):
    a = _dense(2, 1, 4, 64, "cpu", seed=0)
    with pytest.raises(ValueError, match="argument 'softmax_scale'"):
        F.mla_decode(a["q"], a["kv_cache"], a["block_table"], a["cache_seqlens"], a["tile_scheduler_metadata"],
                     a["num_splits"], softmax_scale=scale)
    p = T.sparse_prefill_inputs(T.SparsePrefillCase(s_q=3, h_q=4), seed=0)
    with pytest.raises(ValueError, match="argument 'softmax_scale'"):
        F.sparse_mla_prefill(p["q"], p["kv"], p["indices"], softmax_scale=scale)


# ------------------------------------------------------------------------------------------------
# compat: clear errors before any shape arithmetic
# ------------------------------------------------------------------------------------------------
def test_compat_refuses_bad_ranks_before_arithmetic():
    a = _dense(2, 1, 4, 64, "cpu", seed=0)
    meta, _ = compat.get_mla_metadata()
    with pytest.raises(ValueError, match="argument 'q'"):
        compat.flash_mla_with_kvcache(a["q"][0], a["kv_cache"], a["block_table"], a["cache_seqlens"], 512, meta)
    with pytest.raises(ValueError, match="argument 'k_cache'"):
        compat.flash_mla_with_kvcache(a["q"], a["kv_cache"][:, :, 0], a["block_table"], a["cache_seqlens"], 512, meta)
    s = T.sparse_decode_inputs(T.SparseDecodeCase(b=2, h_q=4, topk=32, extra_topk=16), seed=0)
    with pytest.raises(ValueError, match="argument 'extra_indices_in_kvcache'"):
        compat.flash_mla_with_kvcache(s["q"], s["kv_cache"], None, None, 512, compat.get_mla_metadata()[0],
                                      is_fp8_kvcache=True, indices=s["indices"], extra_k_cache=s["extra_kv_cache"])


def _varlen_qkv(seed=0, total_q=6, total_k=6, h_q=4, h_k=2, d_qk=128, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g).to(torch.bfloat16).to(device)
                 for shape in ((total_q, h_q, d_qk), (total_k, h_k, d_qk), (total_k, h_k, 128)))


@pytest.mark.parametrize("change,arg", [
    (dict(cu_k=[0, 2, 4]), "cu_seqlens_kv"),                     # other batch size
    (dict(cu_q=[[0, 3, 4, 6]]), "cu_seqlens_qo"),                 # 2-D
    (dict(cu_dtype=torch.int64), "cu_seqlens_qo"),
    (dict(q_dtype=torch.float32), "q"),
    (dict(d_qk=64), "q"),                                         # no kernel for head dim 64
    (dict(dropout_p=0.1), "dropout_p"),
])
def test_varlen_prefill_refuses_bad_shapes_before_any_work(change, arg):
    """Shapes, dtypes and options are checked (metadata only) before anything runs."""
    q, k, v = _varlen_qkv(d_qk=change.get("d_qk", 128))
    q = q.to(change.get("q_dtype", q.dtype))
    dtype = change.get("cu_dtype", torch.int32)
    cu_q = torch.tensor(change.get("cu_q", [0, 3, 4, 6]), dtype=dtype)
    cu_k = torch.tensor(change.get("cu_k", [0, 2, 4, 6]), dtype=dtype)
    with pytest.raises(ValueError, match=f"argument '{arg}'"):
        compat.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 2, dropout_p=change.get("dropout_p", 0.0))


@pytest.mark.parametrize("cu_q,cu_k,twice", [
    ([0, 3, 2, 6], [0, 2, 4, 6], [2]),      # decreasing: sequence 1 is empty, row 2 is owned twice
    ([0, 3, 4, 5], [0, 2, 4, 6], []),       # ends before the token count: row 5 is padding
    ([1, 3, 4, 6], [0, 2, 4, 6], []),       # does not start at 0: row 0 belongs to no sequence
    ([0, 3, 4, 9], [0, 2, 4, 7], []),       # runs past the tensors: rows / keys beyond do not exist
])
def test_varlen_prefill_inconsistent_cu_seqlens_have_a_defined_meaning(cu_q, cu_k, twice):
    """cu_seqlens values cannot be checked without a host sync (the call is capturable): every value
    has the meaning of ops.mha_prefill. Counts are clamped to [0, max_seqlen_*] (sequence 2 of the
    first case has 4 rows, cut to max_seqlen_qo = 3), rows no sequence owns get out 0 and lse +inf,
    keys outside the tensor are not attended; rows owned twice hold one of the owners' values."""
    q, k, v = _varlen_qkv(seed=1)
    cu_q_t, cu_k_t = torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)
    out, lse = compat.flash_attn_varlen_func(q, k, v, cu_q_t, cu_k_t, 3, 2, causal=True)
    want_out, want_lse = oracle.mha_prefill(q, k, v, cu_q_t, cu_k_t, 3, 2, 128 ** -0.5, True)
    rows = [r for r in range(q.shape[0]) if r not in twice]
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isposinf(lse[rows]), torch.isposinf(want_lse[rows]))
    torch.testing.assert_close(out[rows].double(), want_out[rows], atol=2e-2, rtol=1e-2)
    finite = torch.isfinite(want_lse[rows])
    torch.testing.assert_close(lse[rows][finite].double(), want_lse[rows][finite], atol=1e-4, rtol=1e-4)
    assert torch.all(out[rows][~finite] == 0)


# ------------------------------------------------------------------------------------------------
# torch.compile: checks are asserts, not guards (no specialisation of batch 1 / table width 1)
# ------------------------------------------------------------------------------------------------
def _decode_step(q, cache, table, lens, meta, splits):
    return torch.ops.flashmla.mla_decode(q, cache, table, lens, 512, SCALE, False, meta, splits)


def _decode_args(b, seqlen):
    a = _dense(b, 1, 4, seqlen, "cpu", seed=b)
    return (a["q"], a["kv_cache"], a["block_table"], a["cache_seqlens"], a["tile_scheduler_metadata"],
            a["num_splits"])


def test_compiled_decode_compiles_once_for_every_batch_and_table_width():
    """dynamic=True: batch sizes and table widths (sizes >= 2; PyTorch specialises 0 and 1 itself) share
    one graph: the checks add no guard on them."""
    import torch._dynamo.testing
    torch._dynamo.reset()
    backend = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_decode_step, fullgraph=True, dynamic=True, backend=backend)
    counts = []
    with torch.fx.experimental._config.patch(use_duck_shape=False):
        for b, seqlen in ((2, 70), (3, 200), (6, 130), (5, 600)):       # table widths 3, 5, 4, 11
            args = _decode_args(b, seqlen)
            torch.testing.assert_close(compiled(*args), _decode_step(*args), atol=0, rtol=0)
            counts.append(backend.frame_count)
    # The first call may reach the backend twice (dynamo restarts once to specialise the float
    # softmax_scale under dynamic=True); later calls must add nothing.
    assert counts[1:] == [counts[0]] * 3, f"recompiled: compile count per call {counts}"
    torch._dynamo.reset()


def test_compiled_decode_with_unbacked_batch():
    """An unbacked batch size (as from data-dependent code) traces: the size checks become runtime
    asserts instead of failing on a guard that cannot be evaluated."""
    import torch._dynamo.testing
    torch._dynamo.reset()
    backend = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_decode_step, fullgraph=True, backend=backend)
    for b, seqlen in ((3, 200), (1, 60)):
        args = _decode_args(b, seqlen)
        for i in (0, 2, 3, 5):  # q, block_table, cache_seqlens, num_splits: every batch-sized dimension
            torch._dynamo.decorators.mark_unbacked(args[i], 0)
        torch._dynamo.mark_dynamic(args[1], 0)  # num_blocks and the table width vary too
        torch._dynamo.mark_dynamic(args[2], 1)
        torch.testing.assert_close(compiled(*args), _decode_step(*args), atol=0, rtol=0)
    assert backend.frame_count == 1, f"recompiled ({backend.frame_count} graphs)"
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# GPU: the same call forms against the float32 reference on the GPU
# ------------------------------------------------------------------------------------------------
def _gpu_reference(a, causal):
    return reference.mla_decode(a["q"], a["kv_cache"], a["block_table"], a["cache_seqlens"], 512, SCALE, causal)


@needs_gpu
@pytest.mark.parametrize("h_q", [16, 32, 64, 128])
@pytest.mark.parametrize("s_q", [1, 2, 3, 4, 8, 16, 33, 64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_dense_decode_s_q_up_to_128_old_call_form(s_q, h_q, causal):
    seqlen = 2100 if (s_q * h_q) % 3 == 0 else 300    # both kernel paths (seesaw past 1024 tokens)
    a = _dense(4, s_q, h_q, seqlen, "cuda", seed=s_q * 1000 + h_q, causal=causal)
    meta, splits = compat.get_mla_metadata(a["cache_seqlens"], s_q * h_q, 1)
    out, lse = compat.flash_mla_with_kvcache(a["q"], a["kv_cache"], a["block_table"], a["cache_seqlens"], 512,
                                             meta, splits, softmax_scale=SCALE, causal=causal)
    ref_out, ref_lse = _gpu_reference(a, causal)
    assert_attention_close(out, lse, ref_out, ref_lse)
    # the op layer with the same (num_heads_q-less) plan gives the same bits
    out2, lse2 = torch.ops.flashmla.mla_decode(a["q"], a["kv_cache"], a["block_table"], a["cache_seqlens"], 512,
                                               SCALE, causal, meta, splits)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def _engine_dense_state(batch, s_q, h_q, seqlen, seed, real):
    """Decode inputs for a graph of `batch` requests of which the first `real` are real: the tail has
    length 0 and a garbage block table (huge ids, -1)."""
    a = _dense(batch, s_q, h_q, seqlen, "cuda", seed=seed, causal=True)
    lens, table = a["cache_seqlens"].clone(), a["block_table"].clone()   # varlen, some zero, data inside
    lens[real:] = 0
    table[real:] = torch.where(torch.arange(table.shape[1], device="cuda") % 2 == 0, 2 ** 30, -1).to(torch.int32)
    a["cache_seqlens"], a["block_table"] = lens, table
    return a


@needs_gpu
@pytest.mark.parametrize("plan_in_graph", [False, True])
def test_gpu_dense_graph_as_engines_capture_it(plan_in_graph):
    batch, s_q, h_q, seqlen = 8, 2, 128, 700
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    meta_buf = torch.zeros(num_sms, 8, dtype=torch.int32, device="cuda")       # allocated once
    splits_buf = torch.zeros(64 + 1, dtype=torch.int32, device="cuda")         # max_num_seqs + 1
    static = _engine_dense_state(batch, s_q, h_q, seqlen, seed=0, real=batch)

    def plan_eager():
        return compat.get_mla_metadata(static["cache_seqlens"], s_q * h_q, 1)

    meta0, splits0 = plan_eager()
    parts = meta0.shape[0]
    meta_view, splits_view = meta_buf[:parts], splits_buf[:batch + 1]

    def step():
        if plan_in_graph:
            meta, splits = plan_eager()
        else:
            meta, splits = meta_view, splits_view
        return compat.flash_mla_with_kvcache(static["q"], static["kv_cache"], static["block_table"],
                                             static["cache_seqlens"], 512, meta, splits, softmax_scale=SCALE,
                                             causal=True)

    meta_view.copy_(meta0)
    splits_view.copy_(splits0)
    graph, (out, lse) = T.capture_cuda_graph(step)
    for seed, real in ((1, 8), (2, 5), (3, 1), (4, 3)):
        fresh = _engine_dense_state(batch, s_q, h_q, seqlen, seed=seed, real=real)
        for key in ("q", "kv_cache", "block_table", "cache_seqlens"):
            static[key].copy_(fresh[key])
        meta, splits = plan_eager()
        if not plan_in_graph:
            meta_view.copy_(meta)            # the engine refills its buffers before each replay
            splits_buf[batch + 1:].fill_(0)
            splits_view.copy_(splits)
        graph.replay()
        want_out, want_lse = compat.flash_mla_with_kvcache(static["q"], static["kv_cache"], static["block_table"],
                                                           static["cache_seqlens"], 512, meta, splits,
                                                           softmax_scale=SCALE, causal=True)
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
        assert (out[real:] == 0).all() and torch.isposinf(lse[real:]).all()
        ref_out, ref_lse = _gpu_reference(static, True)
        assert_attention_close(out, lse, ref_out, ref_lse)


@needs_gpu
@pytest.mark.parametrize("h_real,h_pad", [(16, 64), (64, 64), (100, 128)])
@pytest.mark.parametrize("in_graph", [False, True])
def test_gpu_sparse_decode_as_v32_engines_call_it(h_real, h_pad, in_graph):
    b, s_q, topk = 6, 2, 256
    s = T.sparse_decode_inputs(T.SparseDecodeCase(b=b, s_q=s_q, h_q=h_real, topk=topk, invalid_fraction=0.3),
                               device="cuda", seed=h_real)
    q_pad = torch.zeros(b, s_q, h_pad, 576, dtype=torch.bfloat16, device="cuda")
    q_pad[:, :, :h_real] = s["q"]
    dummy_table = torch.zeros(b, 1, dtype=torch.int32, device="cuda")
    constant_lens = torch.full((b,), 1, dtype=torch.int32, device="cuda")

    def step():
        meta, _ = compat.get_mla_metadata()            # a new object every step, as engines do
        return compat.flash_mla_with_kvcache(q_pad, s["kv_cache"], dummy_table, constant_lens, 512, meta, None,
                                             softmax_scale=SCALE, causal=False, is_fp8_kvcache=True,
                                             indices=s["indices"])

    if in_graph:
        graph, (out, lse) = T.capture_cuda_graph(step)
        s["indices"].copy_(torch.where(torch.rand_like(s["indices"], dtype=torch.float) < 0.5, -1, s["indices"]))
        graph.replay()
    else:
        out, lse = step()
    ref_out, ref_lse = reference.sparse_mla_decode(s["q"], s["kv_cache"], s["indices"], None, None, None, None, None,
                                                   512, SCALE)
    assert_attention_close(out[:, :, :h_real], lse[:, :h_real], ref_out, ref_lse)


@needs_gpu
@pytest.mark.parametrize("h_real,h_pad", [(16, 64), (100, 128)])
def test_gpu_sparse_prefill_topk_length_padded_heads(h_real, h_pad):
    p = T.sparse_prefill_inputs(T.SparsePrefillCase(s_q=70, s_kv=600, h_q=h_real, topk=256, with_topk_length=True),
                                device="cuda", seed=h_real)
    q_pad = torch.zeros(70, h_pad, 576, dtype=torch.bfloat16, device="cuda")
    q_pad[:, :h_real] = p["q"]
    out, max_logits, lse = compat.flash_mla_sparse_fwd(q_pad, p["kv"], p["indices"], SCALE,
                                                       topk_length=p["topk_length"])
    ref = reference.sparse_mla_prefill(p["q"], p["kv"], p["indices"], SCALE, 512, None, p["topk_length"])
    assert_attention_close(out[:, :h_real], lse[:, :h_real], ref[0], ref[2], **PREFILL_TOL)
    got_max, ref_max = max_logits[:, :h_real], ref[1]
    assert torch.equal(torch.isneginf(got_max), torch.isneginf(ref_max))
    finite = torch.isfinite(ref_max)
    torch.testing.assert_close(got_max[finite], ref_max[finite], atol=1e-6, rtol=2 / 65536)


@needs_gpu
def test_gpu_dense_values_with_defined_meaning():
    a = _dense_edge_inputs("cuda", seed=4)
    out, lse = _call_dense(a)
    want_out, want_lse = _dense_edge_oracle(a)
    assert_attention_close(out, lse, want_out, want_lse)


@needs_gpu
@pytest.mark.parametrize("index", range(5), ids=[c[0] for c in _zero_size_calls("cpu")])
def test_gpu_zero_size_inputs_give_the_empty_result(index):
    _assert_empty_result(_zero_size_calls("cuda")[index][1]())


@needs_gpu
def test_gpu_varlen_prefill_captures_and_replays():
    """As an engine captures prefill: a graph for a token budget, replayed with fewer real tokens (the
    tail is padding: out 0, lse +inf) and new cu_seqlens contents copied into the captured buffers."""
    q, k, v = _varlen_qkv(seed=2, total_q=64, total_k=96, h_q=8, h_k=2, d_qk=192, device="cuda")
    cu_q = torch.tensor([0, 20, 40, 64], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 30, 60, 96], dtype=torch.int32, device="cuda")
    graph, (out, lse) = T.capture_cuda_graph(
        lambda: compat.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 48, causal=True))
    for new_q, new_k in (([0, 10, 10, 37], [0, 25, 40, 80]), ([0, 40, 40, 40], [0, 48, 48, 48])):
        cu_q.copy_(torch.tensor(new_q, dtype=torch.int32))
        cu_k.copy_(torch.tensor(new_k, dtype=torch.int32))
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        want_out, want_lse = reference.mha_prefill(q.cpu(), k.cpu(), v.cpu(), cu_q.cpu(), cu_k.cpu(), 40, 48,
                                                   192 ** -0.5, True)
        tail = slice(new_q[-1], None)
        assert torch.all(out[tail] == 0) and torch.all(torch.isposinf(lse[tail]))
        assert torch.equal(torch.isposinf(lse.cpu()), torch.isposinf(want_lse))
        torch.testing.assert_close(out.cpu().float(), want_out.float(), atol=8e-4, rtol=2 / 128)
        finite = torch.isfinite(want_lse)
        torch.testing.assert_close(lse.cpu()[finite], want_lse[finite], atol=1e-6, rtol=2 / 65536)
