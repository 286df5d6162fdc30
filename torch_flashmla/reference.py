"""Float32 PyTorch references of every flashmla op.

They are the CPU kernels of the ops, the GPU fallback until an SM90 kernel exists, and the oracle
of the kernel tests. Except for the planner (a sequential greedy loop, run on the host), they use
only tensor operations: no host syncs, so they also run inside CUDA graphs.

Semantics pinned here (docs/design.md §2):
* ``lse`` is the natural-log log-sum-exp of the scaled scores; a query with nothing to attend to
  gets ``out = 0`` and ``lse = +inf``.
* Values in cache slots that are not attended (past ``cache_seqlens``, skipped indices, unused
  pages) never reach the result, NaN included; block-table entries past the last used page are
  never dereferenced (they are replaced before the gather).
* ``attn_sink``: ``out *= exp(lse) / (exp(lse) + exp(attn_sink))``; ``lse`` is unchanged.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import kv_cache as kvc

PLANNER_BLOCK_N = 64        # tokens per planner block
PLANNER_FIXED_OVERHEAD = 5  # cost of one (request, split) piece, in blocks
METADATA_WIDTH = 8

_NEG_INF = float("-inf")
_POS_INF = float("inf")


# --------------------------------------------------------------------------------------------
# planner
# --------------------------------------------------------------------------------------------
def get_mla_metadata(seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int,
                     num_heads_q: Optional[int],
                     is_fp8_kvcache: bool, topk: Optional[int], num_sm_parts: int
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split every request's KV range into 64-token blocks and deal them to ``num_sm_parts``
    partitions so that each gets about the same cost (blocks + a fixed overhead per piece).

    Returns ``tile_scheduler_metadata int32 [num_sm_parts, 8]`` with rows
    ``[begin_req, begin_token, end_req, end_token, begin_split, 0, 0, 0]`` (``end_req`` inclusive,
    ``end_token`` exclusive; ``begin_req > end_req`` means no work) and ``num_splits int32 [b + 1]``,
    the running count of splits (request ``i`` has ``num_splits[i+1] - num_splits[i]`` pieces).
    Requests with one piece are written directly; the others are merged by a combine step.
    """
    lengths = [max(int(x), 0) for x in seqlens.tolist()]  # host loop (the CUDA planner runs on the GPU); < 0 is 0
    b = len(lengths)
    blocks = [(n + PLANNER_BLOCK_N - 1) // PLANNER_BLOCK_N for n in lengths]
    total = sum(blocks) + b * PLANNER_FIXED_OVERHEAD
    payload = (total + num_sm_parts - 1) // num_sm_parts + PLANNER_FIXED_OVERHEAD
    metadata = [[0] * METADATA_WIDTH for _ in range(num_sm_parts)]
    num_splits = [0] * (b + 1)
    req = blk = split = cum = 0
    for part in range(num_sm_parts):
        begin_req, begin_blk, begin_split = req, blk, split
        remain = payload
        while req < b:
            left = blocks[req] - blk
            if remain >= left + PLANNER_FIXED_OVERHEAD:
                cum += split + 1
                num_splits[req + 1] = cum
                remain -= left + PLANNER_FIXED_OVERHEAD
                req, blk, split = req + 1, 0, 0
            else:
                if remain - PLANNER_FIXED_OVERHEAD > 0:
                    blk += remain - PLANNER_FIXED_OVERHEAD
                    split += 1
                break
        if blk > 0:
            end_req, end_tok = req, min(blk * PLANNER_BLOCK_N, lengths[req])
        else:
            end_req, end_tok = req - 1, (lengths[req - 1] if req >= 1 else 0)
        metadata[part][:5] = [begin_req, begin_blk * PLANNER_BLOCK_N, end_req, end_tok, begin_split]
    device = seqlens.device
    return (torch.tensor(metadata, dtype=torch.int32, device=device),
            torch.tensor(num_splits, dtype=torch.int32, device=device))


# --------------------------------------------------------------------------------------------
# attention core
# --------------------------------------------------------------------------------------------
def _masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """scores [..., n] fp32, valid [..., n] bool -> (probs [..., n], natural-log lse [...]).

    Rows with nothing valid get probs = 0 (so out = 0) and lse = +inf, never NaN."""
    scores = scores.masked_fill(~valid, _NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)
    empty = torch.isneginf(lse)
    probs = torch.exp(scores - torch.where(empty, 0.0, lse).unsqueeze(-1)).masked_fill(~valid, 0.0)
    return probs, lse.masked_fill(empty, _POS_INF)


def _sink_scale(lse: torch.Tensor, attn_sink: torch.Tensor) -> torch.Tensor:
    """exp(lse) / (exp(lse) + exp(sink)) computed stably; 1 where lse = +inf (empty rows stay 0)."""
    return torch.where(torch.isposinf(lse), 1.0, torch.sigmoid(lse - attn_sink))


# --------------------------------------------------------------------------------------------
# dense decode
# --------------------------------------------------------------------------------------------
def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
               head_dim_v: int, softmax_scale: float, causal: bool,
               tile_scheduler_metadata: Optional[torch.Tensor] = None, num_splits: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense MLA decode over a paged cache. q [b, s_q, h_q, 576]; kv_cache [num_blocks, page_size,
    h_kv, 576]; block_table [b, max_blocks] int32; cache_seqlens [b] int32.
    Returns out [b, s_q, h_q, head_dim_v] (q's dtype) and lse [b, h_q, s_q] fp32.
    The plan arguments only matter to the kernels; the reference reads every request whole.

    Values that cannot be refused without a host sync have a defined meaning (the SM90 kernel agrees):
    a length below 0 counts as 0 and one above the table's capacity ``max_blocks * page_size`` as
    that capacity (``causal`` aligns to the clamped length); the tokens of a used page whose id is
    outside ``[0, num_blocks)`` are skipped, like masked keys, and that page is never read."""
    b, s_q, h_q, d_qk = q.shape
    num_blocks, page_size, h_kv, _ = kv_cache.shape
    group = h_q // h_kv
    max_blocks = block_table.shape[1]
    device = q.device
    capacity = max_blocks * page_size
    positions = torch.arange(capacity, device=device)                            # [S]
    page_starts = torch.arange(max_blocks, device=device) * page_size            # [max_blocks]
    query_offsets = torch.arange(s_q, device=device)                             # [s_q]
    out = torch.empty(b, s_q, h_q, head_dim_v, dtype=q.dtype, device=device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=device)
    for i in range(b):
        seqlen = cache_seqlens[i].long().clamp(0, capacity)
        # Pages past the sequence end may hold garbage ids, and ids out of range are skipped: neither is
        # dereferenced (a zero-block cache reads nothing at all).
        ids = block_table[i].long()
        page_ok = (page_starts < seqlen) & (ids >= 0) & (ids < num_blocks)        # [max_blocks]
        if num_blocks > 0:
            kv = kv_cache[torch.where(page_ok, ids, 0)].reshape(capacity, h_kv, d_qk).float()
        else:
            kv = torch.zeros(capacity, h_kv, d_qk, device=device)
        attended = (positions < seqlen) & page_ok.repeat_interleave(page_size)    # [S]
        kv = torch.where(attended[:, None, None], kv, 0.0)                       # NaN never attended -> 0
        limit = seqlen - s_q + query_offsets + 1 if causal else seqlen.expand(s_q)
        valid = (positions[None, :] < limit[:, None]) & attended[None, :]        # [s_q, S]
        qi = q[i].float().view(s_q, h_kv, group, d_qk).transpose(0, 1)           # [h_kv, s_q, group, d]
        keys = kv.transpose(0, 1)                                                # [h_kv, S, d]
        scores = torch.einsum("ktgd,ksd->ktgs", qi, keys) * softmax_scale       # [h_kv, s_q, group, S]
        probs, l = _masked_softmax(scores, valid[None, :, None, :].expand_as(scores))
        o = torch.einsum("ktgs,ksd->ktgd", probs, keys[..., :head_dim_v])        # [h_kv, s_q, group, d_v]
        out[i] = o.permute(1, 0, 2, 3).reshape(s_q, h_q, head_dim_v).to(q.dtype)
        lse[i] = l.permute(0, 2, 1).reshape(h_q, s_q)
    return out, lse


# --------------------------------------------------------------------------------------------
# sparse decode over the FP8 cache
# --------------------------------------------------------------------------------------------
def _gather_fp8_tokens(cache: torch.Tensor, indices: torch.Tensor, topk_length: Optional[torch.Tensor]
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """indices [s_q, topk] into a flat FP8 cache -> (dequantized fp32 [s_q, topk, 576] with zeros
    at skipped slots, valid [s_q, topk]). Skipped: -1, out of range, or past topk_length (a 0-d
    tensor or None)."""
    v4 = cache.shape[-1] == kvc.V4_TOKEN_BYTES   # DeepSeek V4 pages (d_qk 512), else V3.2 records
    d_qk = kvc.V4_D_QK if v4 else kvc.D_QK
    num_slots = cache.shape[0] * cache.shape[1]
    valid = (indices >= 0) & (indices < num_slots)
    if topk_length is not None:
        valid &= torch.arange(indices.shape[-1], device=indices.device) < topk_length
    if num_slots == 0:  # nothing can be attended; nothing is read
        return indices.new_zeros((*indices.shape, d_qk), dtype=torch.float32), valid
    safe = torch.where(valid, indices, 0).long()
    if v4:
        tokens = kvc.gather_fp8_v4_tokens(cache, safe.flatten()).float().view(*indices.shape, d_qk)
    else:
        records = cache.view(torch.uint8).reshape(-1, kvc.FP8_RECORD_BYTES)
        tokens = kvc.dequantize_kv_fp8(records[safe.flatten()]).float().view(*indices.shape, d_qk)
    return torch.where(valid[..., None], tokens, 0.0), valid


def sparse_mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor,
                      topk_length: Optional[torch.Tensor], attn_sink: Optional[torch.Tensor],
                      extra_kv_cache: Optional[torch.Tensor], extra_indices: Optional[torch.Tensor],
                      extra_topk_length: Optional[torch.Tensor], head_dim_v: int, softmax_scale: float,
                      tile_scheduler_metadata: Optional[torch.Tensor] = None,
                      num_splits: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token-sparse MLA decode over FP8 caches. q [b, s_q, h_q, 576] bf16 with kv_cache [blocks,
    page_size, 1, 656] (V3.2), or q [b, s_q, h_q, 512] with a DeepSeek V4 cache [blocks, page_size, 1,
    584] (V = all 512 columns of a token; the extra cache in the same layout); indices [b, s_q, topk] int32 (block_id * page_size + offset, -1 = skip);
    topk_length [b]; attn_sink [h_q] fp32; extra cache + extra_indices [b, s_q, extra_topk] +
    extra_topk_length [b] join the same softmax. Returns out [b, s_q, h_q, 512] bf16, lse [b, h_q, s_q]."""
    b, s_q, h_q, _ = q.shape
    out = torch.empty(b, s_q, h_q, head_dim_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)
    for i in range(b):
        tokens, valid = _gather_fp8_tokens(kv_cache, indices[i], None if topk_length is None else topk_length[i])
        if extra_kv_cache is not None:
            extra_tokens, extra_valid = _gather_fp8_tokens(
                extra_kv_cache, extra_indices[i], None if extra_topk_length is None else extra_topk_length[i])
            tokens = torch.cat([tokens, extra_tokens], dim=1)
            valid = torch.cat([valid, extra_valid], dim=1)
        scores = torch.einsum("thd,tnd->thn", q[i].float(), tokens) * softmax_scale   # [s_q, h_q, n]
        probs, l = _masked_softmax(scores, valid[:, None, :].expand_as(scores))
        o = torch.einsum("thn,tnd->thd", probs, tokens[..., :head_dim_v])
        if attn_sink is not None:
            o = o * _sink_scale(l, attn_sink)[..., None]
        out[i] = o.to(q.dtype)
        lse[i] = l.transpose(0, 1)
    return out, lse


# --------------------------------------------------------------------------------------------
# sparse prefill
# --------------------------------------------------------------------------------------------
PREFILL_CHUNK = 64  # query rows per step, to bound the gathered [rows, topk, d] intermediate


def sparse_mla_prefill(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, softmax_scale: float,
                       head_dim_v: int, attn_sink: Optional[torch.Tensor], topk_length: Optional[torch.Tensor]
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-sparse MLA prefill. q [s_q, h_q, d_qk] bf16; kv [s_kv, 1, d_qk] bf16; indices
    [s_q, 1, topk] int32 (-1 or >= s_kv = skip); topk_length [s_q]; attn_sink [h_q].
    Returns out [s_q, h_q, d_v] bf16, max_logits [s_q, h_q] fp32 (max scaled score, -inf if none),
    lse [s_q, h_q] fp32 (natural log of the sum of exp of scaled scores, +inf if none; the sink
    does not enter it)."""
    s_q, h_q, d_qk = q.shape
    s_kv = kv.shape[0]
    keys = kv[:, 0]
    out = torch.empty(s_q, h_q, head_dim_v, dtype=q.dtype, device=q.device)
    max_logits = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    topk = indices.shape[-1]
    slots = torch.arange(topk, device=q.device)
    for start in range(0, s_q, PREFILL_CHUNK):
        rows = slice(start, min(start + PREFILL_CHUNK, s_q))
        idx = indices[rows, 0]
        valid = (idx >= 0) & (idx < s_kv)
        if topk_length is not None:
            valid &= slots[None, :] < topk_length[rows, None]
        gathered = (keys[torch.where(valid, idx, 0).long()].float() if s_kv > 0
                    else keys.new_zeros((*idx.shape, d_qk), dtype=torch.float32))
        gathered = torch.where(valid[..., None], gathered, 0.0)                       # [r, topk, d]
        scores = torch.einsum("rhd,rnd->rhn", q[rows].float(), gathered) * softmax_scale
        mask = valid[:, None, :].expand_as(scores)
        probs, l = _masked_softmax(scores, mask)
        o = torch.einsum("rhn,rnd->rhd", probs, gathered[..., :head_dim_v])
        if attn_sink is not None:
            o = o * _sink_scale(l, attn_sink)[..., None]
        out[rows] = o.to(q.dtype)
        max_logits[rows] = (scores.masked_fill(~mask, _NEG_INF).amax(dim=-1) if topk > 0
                            else torch.full(scores.shape[:-1], _NEG_INF, device=q.device))
        lse[rows] = l
    return out, max_logits, lse


# --------------------------------------------------------------------------------------------
# KV-cache ops (implemented next to the layout they define)
# --------------------------------------------------------------------------------------------
concat_and_cache_mla = kvc.concat_and_cache_mla
quantize_kv_fp8 = kvc.quantize_kv_fp8
dequantize_kv_fp8 = kvc.dequantize_kv_fp8
quantize_kv_fp8_v4 = kvc.quantize_kv_fp8_v4
dequantize_kv_fp8_v4 = kvc.dequantize_kv_fp8_v4
