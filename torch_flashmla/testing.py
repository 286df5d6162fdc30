"""One input generator for the references, opcheck, compile tests, kernel tests and benchmarks.

Every generator draws fresh random data from a ``torch.Generator`` seeded by ``seed`` and fills
what must not be read with poison: NaN in cache slots past each sequence and in unused pages,
huge ids in block-table tails, NaN in FP8 records that only skipped indices point at.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Union

import torch

from . import kv_cache as kvc
from . import ops

POISON_BLOCK_ID = 2 ** 30  # a block id no cache has: tails of block tables hold it


@dataclasses.dataclass
class DenseDecodeCase:
    b: int = 2
    s_q: int = 1
    h_q: int = 16
    h_kv: int = 1
    seqlen: int = 200          # max length; varlen draws lengths in [0, seqlen]
    page_size: int = 64
    varlen: bool = False
    causal: bool = False
    dtype: torch.dtype = torch.bfloat16
    zero_lengths: bool = False  # force some requests to length 0
    extra_blocks: int = 2       # unused pages beyond what the table needs (filled with NaN)


def _gen(seed: int, device) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _randn(shape, g, dtype, device, scale=1.0):
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


def dense_decode_inputs(case: DenseDecodeCase, device: Union[str, torch.device] = "cpu", seed: int = 0,
                        num_sm_parts: Optional[int] = None) -> Dict[str, object]:
    """Inputs of ``flashmla.mla_decode`` plus its plan, as keyword arguments of :func:`ops.mla_decode`."""
    g = _gen(seed, device)
    if case.varlen:
        lengths = torch.randint(0, case.seqlen + 1, (case.b,), generator=g)
        lengths[0] = case.seqlen
    else:
        lengths = torch.full((case.b,), case.seqlen)
    if case.zero_lengths:
        lengths[1::3] = 0
    max_blocks = max(1, -(-case.seqlen // case.page_size)) + 1  # one spare column: a garbage tail
    num_blocks = case.b * max_blocks + case.extra_blocks
    kv_cache = torch.full((num_blocks, case.page_size, case.h_kv, kvc.D_QK), float("nan"), dtype=case.dtype)
    perm = torch.randperm(num_blocks, generator=g)
    block_table = torch.full((case.b, max_blocks), POISON_BLOCK_ID, dtype=torch.int32)
    used = 0
    for i, n in enumerate(lengths.tolist()):
        pages = -(-n // case.page_size)
        ids = perm[used:used + pages]
        used += pages
        block_table[i, :pages] = ids.to(torch.int32)
        flat = kv_cache[ids].view(-1, case.h_kv, kvc.D_QK)
        flat[:n] = torch.randn(n, case.h_kv, kvc.D_QK, generator=g).to(case.dtype)
        kv_cache[ids] = flat.view(pages, case.page_size, case.h_kv, kvc.D_QK)
    q = _randn((case.b, case.s_q, case.h_q, kvc.D_QK), g, case.dtype, "cpu")
    cache_seqlens = lengths.to(torch.int32)
    to = lambda t: t.to(device)  # noqa: E731
    q, kv_cache, block_table, cache_seqlens = map(to, (q, kv_cache, block_table, cache_seqlens))
    metadata, num_splits = ops.get_mla_metadata(cache_seqlens, case.s_q * case.h_q // case.h_kv, case.h_kv,
                                                case.h_q, num_sm_parts=num_sm_parts)
    return dict(q=q, kv_cache=kv_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                tile_scheduler_metadata=metadata, num_splits=num_splits, causal=case.causal)


@dataclasses.dataclass
class SparseDecodeCase:
    b: int = 2
    s_q: int = 1
    h_q: int = 16
    topk: int = 128
    num_blocks: int = 8
    page_size: int = 64
    with_topk_length: bool = False
    with_attn_sink: bool = False
    extra_topk: int = 0          # > 0: add an extra cache with this many indices per query
    extra_page_size: int = 32
    invalid_fraction: float = 0.2  # share of indices set to -1 (and pointing at NaN otherwise)
    d_qk: int = kvc.D_QK          # 576: V3.2 records; 512: DeepSeek V4 pages (both caches)


def _fp8_v4_cache(num_blocks, page_size, g, poison_mask=None):
    kv = torch.randn(num_blocks, page_size, 1, kvc.V4_D_QK, generator=g).to(torch.bfloat16)
    if poison_mask is not None:  # NaN tokens: NaN scales and NaN rope (only skipped indices may point here)
        kv.view(-1, kvc.V4_D_QK)[poison_mask] = float("nan")
    return kvc.quantize_kv_fp8_v4(kv)


def _fp8_cache(num_blocks, page_size, g, poison_mask=None, d_qk=kvc.D_QK):
    if d_qk == kvc.V4_D_QK:
        return _fp8_v4_cache(num_blocks, page_size, g, poison_mask)
    kv = torch.randn(num_blocks, page_size, 1, kvc.D_QK, generator=g).to(torch.bfloat16)
    records = kvc.quantize_kv_fp8(kv)
    if poison_mask is not None:
        # A NaN record: NaN scales and NaN rope (only skipped indices may point here).
        nan_record = kvc.quantize_kv_fp8(torch.full((kvc.D_QK,), float("nan"), dtype=torch.bfloat16))
        records.view(-1, kvc.FP8_RECORD_BYTES)[poison_mask] = nan_record
    return records


def _sparse_indices(b, s_q, topk, num_slots, invalid_fraction, g):
    idx = torch.randint(0, num_slots, (b, s_q, topk), generator=g, dtype=torch.int64)
    invalid = torch.rand(b, s_q, topk, generator=g) < invalid_fraction
    return torch.where(invalid, -1, idx).to(torch.int32)


def sparse_decode_inputs(case: SparseDecodeCase, device: Union[str, torch.device] = "cpu", seed: int = 0,
                         num_sm_parts: Optional[int] = None) -> Dict[str, object]:
    """Inputs of ``flashmla.sparse_mla_decode`` plus its plan, as keyword arguments of
    :func:`ops.sparse_mla_decode`. The last slot of each cache holds a NaN record that only
    skipped indices (past ``topk_length``) point at."""
    g = _gen(seed, device)
    num_slots = case.num_blocks * case.page_size
    poison = torch.zeros(num_slots, dtype=torch.bool)
    poison[-1] = True
    kv_cache = _fp8_cache(case.num_blocks, case.page_size, g, poison, case.d_qk)
    indices = _sparse_indices(case.b, case.s_q, case.topk, num_slots - 1, case.invalid_fraction, g)
    out = dict(q=_randn((case.b, case.s_q, case.h_q, case.d_qk), g, torch.bfloat16, "cpu"),
               kv_cache=kv_cache, indices=indices, topk_length=None, attn_sink=None,
               extra_kv_cache=None, extra_indices=None, extra_topk_length=None)
    if case.with_topk_length:
        lengths = torch.randint(0, case.topk + 1, (case.b,), generator=g).to(torch.int32)
        lengths[0] = case.topk
        if case.b > 2:
            lengths[2] = 0
        out["topk_length"] = lengths
        tail = torch.arange(case.topk)[None, None, :] >= lengths[:, None, None].long()
        out["indices"] = torch.where(tail, num_slots - 1, indices).to(torch.int32)  # past topk_length: NaN slot
    if case.with_attn_sink:
        out["attn_sink"] = torch.randn(case.h_q, generator=g) * 2
    if case.extra_topk > 0:
        extra_blocks = max(2, case.extra_topk // case.extra_page_size)
        out["extra_kv_cache"] = _fp8_cache(extra_blocks, case.extra_page_size, g, d_qk=case.d_qk)
        out["extra_indices"] = _sparse_indices(case.b, case.s_q, case.extra_topk, extra_blocks * case.extra_page_size,
                                               case.invalid_fraction, g)
        if case.with_topk_length:
            out["extra_topk_length"] = torch.randint(0, case.extra_topk + 1, (case.b,), generator=g).to(torch.int32)
    out = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
    seqlens = out["topk_length"] if out["topk_length"] is not None else \
        torch.full((case.b,), case.topk, dtype=torch.int32, device=device)
    if out["extra_kv_cache"] is not None:
        extra = out["extra_topk_length"] if out["extra_topk_length"] is not None else case.extra_topk
        seqlens = seqlens + extra
    out["tile_scheduler_metadata"], out["num_splits"] = ops.get_mla_metadata(
        seqlens.to(torch.int32), case.s_q * case.h_q, 1, case.h_q, is_fp8_kvcache=True, topk=case.topk + case.extra_topk,
        num_sm_parts=num_sm_parts)
    return out


@dataclasses.dataclass
class SparsePrefillCase:
    s_q: int = 16
    s_kv: int = 256
    h_q: int = 16
    topk: int = 64
    d_qk: int = kvc.D_QK
    with_topk_length: bool = False
    with_attn_sink: bool = False
    invalid_fraction: float = 0.2


def sparse_prefill_inputs(case: SparsePrefillCase, device: Union[str, torch.device] = "cpu", seed: int = 0
                          ) -> Dict[str, object]:
    """Inputs of ``flashmla.sparse_mla_prefill`` as keyword arguments of :func:`ops.sparse_mla_prefill`.
    Invalid indices are -1 or >= s_kv; row 1 (if any) has no valid index at all."""
    g = _gen(seed, device)
    idx = torch.randint(0, case.s_kv, (case.s_q, 1, case.topk), generator=g)
    r = torch.rand(case.s_q, 1, case.topk, generator=g)
    idx = torch.where(r < case.invalid_fraction / 2, -1, idx)
    idx = torch.where((r >= case.invalid_fraction / 2) & (r < case.invalid_fraction), case.s_kv + 7, idx)
    if case.s_q > 1:
        idx[1] = -1
    out = dict(q=_randn((case.s_q, case.h_q, case.d_qk), g, torch.bfloat16, "cpu"),
               kv=_randn((case.s_kv, 1, case.d_qk), g, torch.bfloat16, "cpu"),
               indices=idx.to(torch.int32), attn_sink=None, topk_length=None)
    if case.with_topk_length:
        out["topk_length"] = torch.randint(0, case.topk + 1, (case.s_q,), generator=g).to(torch.int32)
    if case.with_attn_sink:
        out["attn_sink"] = torch.randn(case.h_q, generator=g) * 2
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


def cache_write_inputs(num_tokens: int = 10, num_blocks: int = 4, page_size: int = 16, kv_cache_dtype: str = "auto",
                       dtype: torch.dtype = torch.bfloat16, device: Union[str, torch.device] = "cpu", seed: int = 0,
                       scale: float = 0.0371) -> Dict[str, object]:
    """Inputs of ``flashmla.concat_and_cache_mla``: a poisoned cache, distinct slots, some negative.
    ``"fp8_ds_mla_v4"``: kv_c [T, 448] and a V4 paged cache (:func:`kv_cache.new_fp8_v4_cache`) whose
    every byte, page padding included, is 0xFF. ``"fp8"`` / ``"fp8_e4m3"``: a uint8 cache
    [num_blocks, page_size, 1, 576] of 0xFF bytes (e4m3 NaN) and ``scale``, a float32 tensor [1]
    holding ``scale`` (not a power of two by default, so the division rounds); ``scale`` is None for
    the other cache types."""
    g = _gen(seed, device)
    num_slots = num_blocks * page_size
    slots = torch.randperm(num_slots, generator=g)[:num_tokens]
    slots[::4] = -1
    latent = kvc.D_V
    if kv_cache_dtype == "auto":
        cache = torch.full((num_blocks, page_size, 1, kvc.D_QK), float("nan"), dtype=dtype)
    elif kv_cache_dtype == "fp8_ds_mla_v4":
        # made on the target device: .to() would drop the padded page stride
        cache = kvc.new_fp8_v4_cache(num_blocks, page_size, device=device, fill=0xFF)
        latent = kvc.V4_D_NOPE
    elif kv_cache_dtype in kvc.PER_TENSOR_FP8_DTYPES:
        cache = torch.full((num_blocks, page_size, 1, kvc.D_QK), 0xFF, dtype=torch.uint8)
    else:
        cache = torch.full((num_blocks, page_size, 1, kvc.FP8_RECORD_BYTES), 0xFF, dtype=torch.uint8)
    per_tensor = kv_cache_dtype in kvc.PER_TENSOR_FP8_DTYPES
    out = dict(kv_c=_randn((num_tokens, latent), g, dtype, "cpu"),
               k_pe=_randn((num_tokens, kvc.D_QK - kvc.D_V), g, dtype, "cpu"),
               kv_cache=cache, slot_mapping=slots.to(torch.int64), kv_cache_dtype=kv_cache_dtype,
               scale=torch.tensor([scale], dtype=torch.float32) if per_tensor else None)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


def capture_cuda_graph(fn: Callable, warmup: Optional[Callable] = None, warmup_iters: int = 1):
    """Run ``warmup`` (default ``fn``) ``warmup_iters`` times on a side stream (compilation, lazy
    initialisation, allocator warm-up stay outside the graph), then capture ``fn()`` in a CUDA graph.
    Returns ``(graph, outputs)``: the outputs live in the graph's memory and change on each replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_iters):
            (warmup or fn)()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs



@dataclasses.dataclass
class MHAPrefillCase:
    """Packed varlen batch for ``mha_prefill``. Lengths: ``q_lens`` / ``k_lens`` if given, else drawn:
    query counts in [1, seqlen_q] (all ``seqlen_q`` unless ``varlen``), key counts = query count +
    a prefix in [0, kv_prefix] (a cached prefix: n_k >= n_q)."""
    b: int = 3
    h_q: int = 8
    h_k: int = 2
    d_qk: int = 192
    d_v: int = 128
    seqlen_q: int = 40
    kv_prefix: int = 0
    varlen: bool = True
    zero_lengths: bool = False  # force some sequences to 0 queries (and 0 keys)
    causal: bool = True
    dtype: torch.dtype = torch.bfloat16
    q_lens: Optional[tuple] = None
    k_lens: Optional[tuple] = None
    pad_tokens: int = 3         # NaN rows after the last sequence (engine padding); no sequence owns them
    max_seqlen_slack: int = 5   # max_seqlen_* = longest + slack: padded views reach into the NaN rows


def mha_prefill_inputs(case: MHAPrefillCase, device: Union[str, torch.device] = "cpu", seed: int = 0
                       ) -> Dict[str, object]:
    """Inputs of ``flashmla.mha_prefill`` as keyword arguments of :func:`ops.mha_prefill` (default
    scale). q, k and v end with ``pad_tokens`` NaN rows that no sequence owns (their out must be 0 and
    lse +inf, and they must never reach another row's result)."""
    g = _gen(seed, device)
    if case.q_lens is not None:
        q_lens = torch.tensor(case.q_lens, dtype=torch.int64)
    elif case.varlen:
        q_lens = torch.randint(1, case.seqlen_q + 1, (case.b,), generator=g)
        q_lens[0] = case.seqlen_q
    else:
        q_lens = torch.full((case.b,), case.seqlen_q)
    if case.k_lens is not None:
        k_lens = torch.tensor(case.k_lens, dtype=torch.int64)
    else:
        k_lens = q_lens + torch.randint(0, case.kv_prefix + 1, (q_lens.shape[0],), generator=g)
    if case.zero_lengths and case.q_lens is None:
        q_lens[1::3] = 0
        if case.k_lens is None:
            k_lens[1::3] = 0
    total_q, total_k = int(q_lens.sum()) + case.pad_tokens, int(k_lens.sum()) + case.pad_tokens
    cu_q = torch.cat([torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0)]).to(torch.int32)
    cu_k = torch.cat([torch.zeros(1, dtype=torch.int64), k_lens.cumsum(0)]).to(torch.int32)
    q = _randn((total_q, case.h_q, case.d_qk), g, case.dtype, "cpu")
    k = _randn((total_k, case.h_k, case.d_qk), g, case.dtype, "cpu")
    v = _randn((total_k, case.h_k, case.d_v), g, case.dtype, "cpu")
    for t in (q, k, v):
        if case.pad_tokens:
            t[-case.pad_tokens:] = float("nan")
    longest = lambda x: int(x.max()) if x.numel() else 0  # noqa: E731
    out = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
               max_seqlen_q=longest(q_lens) + case.max_seqlen_slack,
               max_seqlen_k=longest(k_lens) + case.max_seqlen_slack, causal=case.causal)
    return {key: (val.to(device) if isinstance(val, torch.Tensor) else val) for key, val in out.items()}
