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
PLAN_OPEN_END = 2**31 - 1   # end_token of a partition that ends with a request's last piece (runs to its length)

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
    ``end_token`` exclusive, and ``PLAN_OPEN_END`` (2^31 - 1) when the partition ends with its last request's
    last piece: that piece runs to the request's length at decode time, so a plan made from other lengths
    still covers every token; ``begin_req > end_req`` means no work) and ``num_splits int32 [b + 1]``,
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
            end_req, end_tok = req - 1, PLAN_OPEN_END
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


# Unit roundoff (round to nearest) of the types the 16-bit kernels round P and their outputs to.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _rounded_p_bound(weighted_abs: torch.Tensor, out: torch.Tensor, n_keys: int, dtype: torch.dtype
                     ) -> torch.Tensor:
    """Bound on a 16-bit kernel's out element against the float32 reference (docs/design.md §7): the kernel
    rounds P to ``dtype`` before P V (relative u per weight), sums in float32 (n_keys * 2^-24, both sides)
    and rounds out to ``dtype`` (u, both sides). weighted_abs = sum_j p_j |v_j| and out (float32) carry
    any sink factor already:

        (u + 2 n_keys 2^-24) sum_j p_j |v_j| + 2 u |out| + 1e-6"""
    u = UNIT_ROUNDOFF[dtype]
    return (u + 2 * n_keys * 2.0 ** -24) * weighted_abs + 2 * u * out.abs() + 1e-6


def _rounded_p_bound_of(spec: str, probs: torch.Tensor, values: torch.Tensor, dtype: torch.dtype,
                        sink: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``_rounded_p_bound`` of the output ``einsum(spec, probs, values)`` (times the sink factor, if any), the keys
    on probs' last dimension."""
    weighted_abs, out = torch.einsum(spec, probs, values.abs()), torch.einsum(spec, probs, values)
    if sink is not None:
        weighted_abs, out = weighted_abs * sink, out * sink
    return _rounded_p_bound(weighted_abs, out, probs.shape[-1], dtype)


# --------------------------------------------------------------------------------------------
# dense decode
# --------------------------------------------------------------------------------------------
def _dense_decode_requests(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                           descale_q, descale_k, abs_scores=False):
    """The attention of mla_decode request by request: yields (i, probs [h_kv, s_q, group, S],
    values [h_kv, S, head_dim_v], lse [h_kv, s_q, group]) in float32, and with abs_scores the largest
    softmax_scale * sum_k |q_k| |key_k| over the attended keys of each row [h_kv, s_q, group]."""
    fp8 = kv_cache.dtype in (torch.uint8, torch.float8_e4m3fn)
    if fp8:
        kv_cache = kv_cache.view(torch.uint8)  # gathered as bytes, dequantized below
        if descale_q is None:  # a bf16 q is quantized per row, as the FP8 kernel does
            q8, factor = kvc.quantize_rows_e4m3_pow2(q)
            q = q8.float() / factor
    b, s_q, h_q, d_qk = q.shape
    num_blocks, page_size, h_kv, _ = kv_cache.shape
    group = h_q // h_kv
    max_blocks = block_table.shape[1]
    device = q.device
    capacity = max_blocks * page_size
    positions = torch.arange(capacity, device=device)                            # [S]
    page_starts = torch.arange(max_blocks, device=device) * page_size            # [max_blocks]
    query_offsets = torch.arange(s_q, device=device)                             # [s_q]
    for i in range(b):
        seqlen = cache_seqlens[i].long().clamp(0, capacity)
        # Pages past the sequence end may hold garbage ids, and ids out of range are skipped: neither is
        # dereferenced (a zero-block cache reads nothing at all).
        ids = block_table[i].long()
        page_ok = (page_starts < seqlen) & (ids >= 0) & (ids < num_blocks)        # [max_blocks]
        if num_blocks > 0:
            kv = kv_cache[torch.where(page_ok, ids, 0)].reshape(capacity, h_kv, d_qk)
            kv = kv.view(torch.float8_e4m3fn).float() * descale_k.float().reshape(()) if fp8 else kv.float()
        else:
            kv = torch.zeros(capacity, h_kv, d_qk, device=device)
        attended = (positions < seqlen) & page_ok.repeat_interleave(page_size)    # [S]
        kv = torch.where(attended[:, None, None], kv, 0.0)                       # NaN never attended -> 0
        limit = seqlen - s_q + query_offsets + 1 if causal else seqlen.expand(s_q)
        valid = (positions[None, :] < limit[:, None]) & attended[None, :]        # [s_q, S]
        qf = q[i].float() * descale_q.float().reshape(()) if descale_q is not None else q[i].float()
        qi = qf.view(s_q, h_kv, group, d_qk).transpose(0, 1)                     # [h_kv, s_q, group, d]
        keys = kv.transpose(0, 1)                                                # [h_kv, S, d]
        scores = torch.einsum("ktgd,ksd->ktgs", qi, keys) * softmax_scale       # [h_kv, s_q, group, S]
        probs, l = _masked_softmax(scores, valid[None, :, None, :].expand_as(scores))
        if not abs_scores:
            yield i, probs, keys[..., :head_dim_v], l
            continue
        mags = torch.einsum("ktgd,ksd->ktgs", qi.abs(), keys.abs()) * softmax_scale
        mags = mags.masked_fill(~valid[None, :, None, :], 0.0).amax(dim=-1)
        yield i, probs, keys[..., :head_dim_v], l, mags


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
               head_dim_v: int, softmax_scale: float, causal: bool,
               tile_scheduler_metadata: Optional[torch.Tensor] = None, num_splits: Optional[torch.Tensor] = None,
               descale_q: Optional[torch.Tensor] = None, descale_k: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense MLA decode over a paged cache. q [b, s_q, h_q, 576]; kv_cache [num_blocks, page_size,
    h_kv, 576]; block_table [b, max_blocks] int32; cache_seqlens [b] int32.
    Returns out [b, s_q, h_q, head_dim_v] (q's dtype; bf16 with an FP8 cache) and lse [b, h_q, s_q] fp32.
    The plan arguments only matter to the kernels; the reference reads every request whole.

    Values that cannot be refused without a host sync have a defined meaning (the SM90 kernel agrees):
    a length below 0 counts as 0 and one above the table's capacity ``max_blocks * page_size`` as
    that capacity (``causal`` aligns to the clamped length); the tokens of a used page whose id is
    outside ``[0, num_blocks)`` are skipped, like masked keys, and that page is never read.

    FP8 cache (``float8_e4m3fn`` or its ``uint8`` bytes, per-tensor scale): attention over the dequantized
    values ``e4m3 * descale_k`` and ``q * descale_q`` (a float8_e4m3fn q), in float32; bf16 out. A bf16 q is
    first quantized per query row (``kv_cache.quantize_rows_e4m3_pow2``: e4m3 with a power-of-two factor),
    as the FP8 kernel multiplies e4m3 by e4m3. The descales are 1-element tensors, used as tensors (no host
    read)."""
    fp8 = kv_cache.dtype in (torch.uint8, torch.float8_e4m3fn)
    out_dtype = torch.bfloat16 if fp8 else q.dtype
    b, s_q, h_q, _ = q.shape
    out = torch.empty(b, s_q, h_q, head_dim_v, dtype=out_dtype, device=q.device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)
    for i, probs, values, l in _dense_decode_requests(q, kv_cache, block_table, cache_seqlens, head_dim_v,
                                                      softmax_scale, causal, descale_q, descale_k):
        o = torch.einsum("ktgs,ksd->ktgd", probs, values)                        # [h_kv, s_q, group, d_v]
        out[i] = o.permute(1, 0, 2, 3).reshape(s_q, h_q, head_dim_v).to(out_dtype)
        lse[i] = l.permute(0, 2, 1).reshape(h_q, s_q)
    return out, lse


def mla_decode_error_bound(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                           cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float, causal: bool
                           ) -> torch.Tensor:
    """Per-element bound on a 16-bit kernel's out [b, s_q, h_q, head_dim_v] (float32) against mla_decode on a
    bf16/fp16 cache: P and out rounded to the cache's type (``_rounded_p_bound``). The FP8 cache has its own
    model (``mla_decode_fp8_error_bound``)."""
    b, s_q, h_q, _ = q.shape
    bound = torch.empty(b, s_q, h_q, head_dim_v, dtype=torch.float32, device=q.device)
    for i, probs, values, _ in _dense_decode_requests(q, kv_cache, block_table, cache_seqlens, head_dim_v,
                                                      softmax_scale, causal, None, None):
        e = _rounded_p_bound_of("ktgs,ksd->ktgd", probs, values, kv_cache.dtype)
        bound[i] = e.permute(1, 0, 2, 3).reshape(s_q, h_q, head_dim_v)
    return bound


def mla_decode_fp8_error_bound(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                               cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float, causal: bool,
                               descale_q: Optional[torch.Tensor] = None,
                               descale_k: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-element bounds on the FP8 kernel's difference from mla_decode over an FP8 cache (docs/design.md
    §5.1, "FP8 cache"): out [b, s_q, h_q, head_dim_v] and lse [b, h_q, s_q], float32.

    Scores: e4m3 x e4m3 products are exact, but Hopper's FP8 tensor cores add them with a short (about
    13-bit) accumulator, so a score may be off by a few units of 2^-13 of the sum of its products' magnitudes
    A = softmax_scale * sum_k |q_k| |k_k|; bound: 2^-11 A (the largest A over the row's keys). lse moves by
    at most that; each probability by twice that (relative).
    P = exp(s - running max) <= 2^8 is rounded to e4m3 before P V: relative error <= 2^-4 per weight,
    absolute <= 2^-10 in the subnormal range (in units of a running max, at most the row max). With the
    reference's probs p_j and 1 / max_j p_j = the row sum:

        out: 2^-4 sum_j p_j |v_j| + 2^-10 max_j p_j sum_j |v_j|     (P's rounding)
             + 2 * lse bound * sum_j p_j |v_j|                        (the scores)
             + 2^-8 sum_j p_j |v_j|                                   (split partials rounded to bf16)
             + 2^-7 |out|                                             (bf16 output, both sides)

    (bf16's unit roundoff is 2^-8.) The partials' term: a split piece's output O_i = sum_(j in i) p_j v_j / l_i,
    rounded to bf16 (relative 2^-8), enters with weight l_i / l, so it adds at most 2^-8 sum_j p_j |v_j| (the FP8
    kernels write bf16
    partials for pages of whole 64-token chunks and at most 32 rows per kv head; docs/design.md §4.2)."""
    b, s_q, h_q, _ = q.shape
    out_bound = torch.empty(b, s_q, h_q, head_dim_v, dtype=torch.float32, device=q.device)
    lse_bound = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)
    for i, probs, values, _, mags in _dense_decode_requests(q, kv_cache, block_table, cache_seqlens, head_dim_v,
                                                            softmax_scale, causal, descale_q, descale_k, True):
        av = values.abs()
        weighted = torch.einsum("ktgs,ksd->ktgd", probs, av)
        pmax = probs.amax(dim=-1, keepdim=True)
        out = torch.einsum("ktgs,ksd->ktgd", probs, values).abs()
        score_err = 2.0 ** -11 * mags                                           # [h_kv, s_q, group]
        e = ((2.0 ** -4 + 2.0 ** -8 + 2 * score_err[..., None]) * weighted
             + 2.0 ** -10 * pmax * av.sum(dim=1)[:, None, None, :] + 2.0 ** -7 * out)
        out_bound[i] = e.permute(1, 0, 2, 3).reshape(s_q, h_q, head_dim_v)
        lse_bound[i] = score_err.permute(0, 2, 1).reshape(h_q, s_q)
    return out_bound, lse_bound


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
    for i, probs, values, l, sink in _sparse_decode_requests(q, kv_cache, indices, topk_length, attn_sink,
                                                             extra_kv_cache, extra_indices, extra_topk_length,
                                                             head_dim_v, softmax_scale):
        o = torch.einsum("thn,tnd->thd", probs, values)
        out[i] = (o if sink is None else o * sink).to(q.dtype)
        lse[i] = l.transpose(0, 1)
    return out, lse


def _sparse_decode_requests(q, kv_cache, indices, topk_length, attn_sink, extra_kv_cache, extra_indices,
                            extra_topk_length, head_dim_v, softmax_scale):
    """The attention of sparse_mla_decode request by request: yields (i, probs [s_q, h_q, n], values
    [s_q, n, head_dim_v], lse [s_q, h_q], the sink factor of out [s_q, h_q, 1] or None) in float32."""
    for i in range(q.shape[0]):
        tokens, valid = _gather_fp8_tokens(kv_cache, indices[i], None if topk_length is None else topk_length[i])
        if extra_kv_cache is not None:
            extra_tokens, extra_valid = _gather_fp8_tokens(
                extra_kv_cache, extra_indices[i], None if extra_topk_length is None else extra_topk_length[i])
            tokens = torch.cat([tokens, extra_tokens], dim=1)
            valid = torch.cat([valid, extra_valid], dim=1)
        scores = torch.einsum("thd,tnd->thn", q[i].float(), tokens) * softmax_scale   # [s_q, h_q, n]
        probs, l = _masked_softmax(scores, valid[:, None, :].expand_as(scores))
        sink = _sink_scale(l, attn_sink)[..., None] if attn_sink is not None else None
        yield i, probs, tokens[..., :head_dim_v], l, sink


def sparse_mla_decode_error_bound(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor,
                                  topk_length: Optional[torch.Tensor], attn_sink: Optional[torch.Tensor],
                                  extra_kv_cache: Optional[torch.Tensor], extra_indices: Optional[torch.Tensor],
                                  extra_topk_length: Optional[torch.Tensor], head_dim_v: int, softmax_scale: float
                                  ) -> torch.Tensor:
    """Per-element bound on the kernel's out [b, s_q, h_q, head_dim_v] (float32) against sparse_mla_decode: the
    cache is dequantized to bf16 as here, P and out are rounded to bf16 (``_rounded_p_bound``)."""
    b, s_q, h_q, _ = q.shape
    bound = torch.empty(b, s_q, h_q, head_dim_v, dtype=torch.float32, device=q.device)
    for i, probs, values, _, sink in _sparse_decode_requests(q, kv_cache, indices, topk_length, attn_sink,
                                                             extra_kv_cache, extra_indices, extra_topk_length,
                                                             head_dim_v, softmax_scale):
        bound[i] = _rounded_p_bound_of("thn,tnd->thd", probs, values, torch.bfloat16, sink)
    return bound


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
    s_q, h_q, _ = q.shape
    out = torch.empty(s_q, h_q, head_dim_v, dtype=q.dtype, device=q.device)
    max_logits = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    for rows, probs, values, l, row_max, sink in _sparse_prefill_rows(q, kv, indices, softmax_scale, head_dim_v,
                                                                      attn_sink, topk_length):
        o = torch.einsum("rhn,rnd->rhd", probs, values)
        out[rows] = (o if sink is None else o * sink).to(q.dtype)
        max_logits[rows] = row_max
        lse[rows] = l
    return out, max_logits, lse


def _sparse_prefill_rows(q, kv, indices, softmax_scale, head_dim_v, attn_sink, topk_length):
    """The attention of sparse_mla_prefill, PREFILL_CHUNK query rows at a time: yields (rows, probs [r, h_q, topk],
    values [r, topk, head_dim_v], lse [r, h_q], max_logits [r, h_q], the sink factor of out [r, h_q, 1] or None)
    in float32."""
    s_q, h_q, d_qk = q.shape
    s_kv = kv.shape[0]
    keys = kv[:, 0]
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
        sink = _sink_scale(l, attn_sink)[..., None] if attn_sink is not None else None
        row_max = (scores.masked_fill(~mask, _NEG_INF).amax(dim=-1) if topk > 0
                   else torch.full(scores.shape[:-1], _NEG_INF, device=q.device))
        yield rows, probs, gathered[..., :head_dim_v], l, row_max, sink


def sparse_mla_prefill_error_bound(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, softmax_scale: float,
                                   head_dim_v: int, attn_sink: Optional[torch.Tensor],
                                   topk_length: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-element bound on the kernel's out [s_q, h_q, head_dim_v] (float32) against sparse_mla_prefill: P and
    out rounded to bf16 (``_rounded_p_bound``)."""
    s_q, h_q, _ = q.shape
    bound = torch.empty(s_q, h_q, head_dim_v, dtype=torch.float32, device=q.device)
    for rows, probs, values, _, _, sink in _sparse_prefill_rows(q, kv, indices, softmax_scale, head_dim_v, attn_sink,
                                                                topk_length):
        bound[rows] = _rounded_p_bound_of("rhn,rnd->rhd", probs, values, q.dtype, sink)
    return bound


# --------------------------------------------------------------------------------------------
# dense MHA-mode prefill (varlen)
# --------------------------------------------------------------------------------------------
MHA_PREFILL_BLOCK_ELEMS = 1 << 24  # bound on each fp32 intermediate of one step (scores, gathered K/V)
MHA_PREFILL_ROWS = 128             # query positions per step (per sequence)
MHA_PREFILL_KEYS = 1024            # key positions per step; blocks are merged by an online softmax


def mha_prefill_blocks(batch: int, h_q: int, h_k: int, d_qk: int, d_v: int, max_seqlen_q: int,
                       max_seqlen_k: int) -> Tuple[int, int, int]:
    """(sequences, query positions, key positions) per step of :func:`mha_prefill`, chosen so that
    the score block ``[seqs, h_q, rows, keys]``, the gathered keys and values ``[seqs, keys, h_k,
    d_qk + d_v]`` and the gathered queries and accumulator ``[seqs, rows, h_q, d_qk + d_v]`` each stay
    within ``MHA_PREFILL_BLOCK_ELEMS`` float32 values whatever the sequence lengths (for head counts
    up to thousands; one position at a time beyond that)."""
    budget = MHA_PREFILL_BLOCK_ELEMS
    keys = max(1, min(max_seqlen_k, MHA_PREFILL_KEYS, budget // (h_k * (d_qk + d_v))))
    rows = max(1, min(max_seqlen_q, MHA_PREFILL_ROWS, budget // (h_q * keys), budget // (h_q * (d_qk + d_v))))
    per_seq = max(h_q * rows * keys, keys * h_k * (d_qk + d_v), rows * h_q * (d_qk + d_v))
    seqs = max(1, min(batch, MHA_PREFILL_BLOCK_ELEMS // per_seq))
    return seqs, rows, keys


def mha_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense MHA-mode prefill over packed variable-length sequences.

    q [total_q, h_q, d_qk], k [total_k, h_k, d_qk], v [total_k, h_k, d_v] (bf16/fp16; query head
    ``j`` uses kv head ``j // (h_q // h_k)``); cu_seqlens_q, cu_seqlens_k int32 [b + 1].
    Returns out [total_q, h_q, d_v] (q's dtype) and lse [total_q, h_q] fp32 (natural log).

    Every value of ``cu_seqlens_*`` has a meaning (refusing one would need a host sync); for
    well-formed input (0 first, non-decreasing, every length at most ``max_seqlen_*``) it is the
    usual one:

    * sequence ``i`` owns ``n_q = clamp(cu_seqlens_q[i+1] - cu_seqlens_q[i], 0, max_seqlen_q)`` query
      rows starting at row ``cu_seqlens_q[i]`` and ``n_k = clamp(cu_seqlens_k[i+1] - cu_seqlens_k[i],
      0, max_seqlen_k)`` key rows starting at ``cu_seqlens_k[i]``: a sequence longer than
      ``max_seqlen_*`` is cut to its first ``max_seqlen_*`` positions;
    * ``causal``: its query ``j`` sees keys ``t < n_k - n_q + j + 1`` (bottom-right aligned, on the
      clamped counts), so chunks of a long prompt over a cached prefix merge by lse;
    * key rows outside ``[0, total_k)`` are masked (never read); query rows outside
      ``[0, total_q)`` are not computed;
    * a query row that no sequence owns (before ``cu_seqlens_q[0]``, after ``cu_seqlens_q[b]``, or
      cut by ``max_seqlen_q``) and a row with nothing to attend to get out = 0 and lse = +inf;
    * a row that several sequences own (only with decreasing ``cu_seqlens_q``) gets, element by
      element of out and lse, the value of one of them (unspecified which).

    Rows and keys past a sequence's end never reach a result, NaN included. No host syncs and no
    data-dependent shapes: sequences are laid out in a padded ``[seqs, max_seqlen, h, d]`` view by
    clamped indices and masks, a bounded block at a time (:func:`mha_prefill_blocks`), with an
    online softmax over key blocks, and the results are scattered back to the packed rows; so the
    reference runs inside CUDA graphs, and its memory does not grow with ``max_seqlen_q * max_seqlen_k``.
    """
    total_q, h_q, d_qk = q.shape
    total_k, h_k, d_v = v.shape
    group = h_q // h_k
    b = cu_seqlens_q.shape[0] - 1
    device = q.device
    # One spare row: the scatter target of positions that are not a sequence's rows (dropped at the end).
    out = torch.zeros(total_q + 1, h_q, d_v, dtype=q.dtype, device=device)
    lse = torch.full((total_q + 1, h_q), _POS_INF, dtype=torch.float32, device=device)
    if total_q == 0 or b == 0 or max_seqlen_q == 0:
        return out[:total_q], lse[:total_q]
    cu_q, cu_k = cu_seqlens_q.long(), cu_seqlens_k.long()
    start_q, start_k = cu_q[:-1], cu_k[:-1]
    len_q = (cu_q[1:] - start_q).clamp(0, max_seqlen_q)
    len_k = (cu_k[1:] - start_k).clamp(0, max_seqlen_k)
    key_blocks = max_seqlen_k if total_k > 0 else 0   # no key rows at all: nothing is attended
    seqs, rows, keys = mha_prefill_blocks(b, h_q, h_k, d_qk, d_v, max_seqlen_q, max_seqlen_k)
    row_offsets = torch.arange(rows, device=device)
    key_offsets = torch.arange(keys, device=device)
    for s0 in range(0, b, seqs):
        sl = slice(s0, min(s0 + seqs, b))
        sq, nq, sk, nk = start_q[sl], len_q[sl], start_k[sl], len_k[sl]
        n = sq.shape[0]
        for q0 in range(0, max_seqlen_q, rows):
            r = min(rows, max_seqlen_q - q0)
            qpos = q0 + row_offsets[:r]                                              # [r]
            qrow = sq[:, None] + qpos[None, :]                                       # [n, r]
            q_ok = (qpos[None, :] < nq[:, None]) & (qrow >= 0) & (qrow < total_q)
            qg = q[qrow.clamp(0, total_q - 1)].float()                              # [n, r, h_q, d_qk]
            qg = torch.where(q_ok[:, :, None, None], qg, 0.0).view(n, r, h_k, group, d_qk)
            m = torch.full((n, h_k, group, r), _NEG_INF, device=device)
            l = torch.zeros(n, h_k, group, r, device=device)
            acc = torch.zeros(n, h_k, group, r, d_v, device=device)
            if causal:
                limit = (nk - nq)[:, None] + qpos[None, :] + 1                      # [n, r]: keys < limit
            for k0 in range(0, key_blocks, keys):
                c = min(keys, max_seqlen_k - k0)
                kpos = k0 + key_offsets[:c]                                          # [c]
                krow = sk[:, None] + kpos[None, :]                                   # [n, c]
                k_ok = (kpos[None, :] < nk[:, None]) & (krow >= 0) & (krow < total_k)
                safe = krow.clamp(0, total_k - 1)
                kg = torch.where(k_ok[:, :, None, None], k[safe].float(), 0.0)      # [n, c, h_k, d_qk]
                vg = torch.where(k_ok[:, :, None, None], v[safe].float(), 0.0)      # [n, c, h_k, d_v]
                mask = k_ok[:, None, :].expand(n, r, c)                              # [n, r, c]
                if causal:
                    mask = mask & (kpos[None, None, :] < limit[:, :, None])
                scores = torch.einsum("nrhgd,nchd->nhgrc", qg, kg) * softmax_scale
                scores = scores.masked_fill(~mask[:, None, None], _NEG_INF)
                m_new = torch.maximum(m, scores.amax(dim=-1))
                m_safe = torch.where(torch.isneginf(m_new), 0.0, m_new)
                p = torch.exp(scores - m_safe[..., None])                            # masked: exp(-inf) = 0
                alpha = torch.exp(m - m_safe)
                l = l * alpha + p.sum(dim=-1)
                acc = acc * alpha[..., None] + torch.einsum("nhgrc,nchd->nhgrd", p, vg)
                m = m_new
            empty = l == 0
            o = acc / torch.where(empty, 1.0, l)[..., None]
            block_lse = torch.where(empty, _POS_INF, m + torch.log(torch.where(empty, 1.0, l)))
            dest = torch.where(q_ok, qrow, total_q).flatten()                       # others -> spare row
            out.index_put_((dest,), o.permute(0, 3, 1, 2, 4).reshape(n * r, h_q, d_v).to(q.dtype))
            lse.index_put_((dest,), block_lse.permute(0, 3, 1, 2).reshape(n * r, h_q))
    return out[:total_q], lse[:total_q]


def mha_prefill_error_bound(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                            causal: bool) -> torch.Tensor:
    """Per-element bound on the kernel's out [total_q, h_q, d_v] (float32) against mha_prefill: P and out
    rounded to q's type (``_rounded_p_bound``); sum_j p_j |v_j| is this reference run on |v| in float32."""
    args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal)
    qf, kf = q.float(), k.float()
    weighted_abs, _ = mha_prefill(qf, kf, v.float().abs(), *args)
    out, _ = mha_prefill(qf, kf, v.float(), *args)
    return _rounded_p_bound(weighted_abs, out, max_seqlen_k, q.dtype)


# --------------------------------------------------------------------------------------------
# KV-cache ops (implemented next to the layout they define)
# --------------------------------------------------------------------------------------------
concat_and_cache_mla = kvc.concat_and_cache_mla
quantize_kv_fp8 = kvc.quantize_kv_fp8
dequantize_kv_fp8 = kvc.dequantize_kv_fp8
quantize_kv_fp8_v4 = kvc.quantize_kv_fp8_v4
dequantize_kv_fp8_v4 = kvc.dequantize_kv_fp8_v4
