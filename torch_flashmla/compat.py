"""FlashMLA's public Python names and return conventions, on top of ``torch.ops.flashmla``.

Drop-in for code written against deepseek-ai/FlashMLA (``from torch_flashmla.compat import
get_mla_metadata, flash_mla_with_kvcache``). Two forms of the planner, as FlashMLA has had:

* old form, ``get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv[, h_q, is_fp8_kvcache, topk])``
  returns the tensor pair ``(tile_scheduler_metadata, num_splits)``, computed on the GPU now;
* new form, ``get_mla_metadata()`` (no arguments) returns ``(FlashMLASchedMeta(), None)``; the plan
  is computed on the first ``flash_mla_with_kvcache`` call that receives the object and reused
  afterwards (so only reuse it while the lengths stay the same, as with FlashMLA).

The object form keeps state in Python between calls; for ``torch.compile`` and CUDA graphs prefer
the tensor form or :mod:`torch_flashmla.ops`, which are stateless.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

import torch

from . import checks, ops


@dataclasses.dataclass
class FlashMLASchedMeta:
    """Plan holder of FlashMLA's newer API: filled by the first ``flash_mla_with_kvcache`` call."""
    tile_scheduler_metadata: Optional[torch.Tensor] = None  # int32 [num_sm_parts, 8]
    num_splits: Optional[torch.Tensor] = None               # int32 [b + 1]

    @property
    def have_initialized(self) -> bool:
        return self.tile_scheduler_metadata is not None


def get_mla_metadata(cache_seqlens: Optional[torch.Tensor] = None, num_q_tokens_per_head_k: Optional[int] = None,
                     num_heads_k: Optional[int] = None, num_heads_q: Optional[int] = None,
                     is_fp8_kvcache: bool = False, topk: Optional[int] = None
                     ) -> Union[Tuple[torch.Tensor, torch.Tensor], Tuple[FlashMLASchedMeta, None]]:
    """Old form (with ``cache_seqlens``): ``(tile_scheduler_metadata int32 [num_sm_parts, 8],
    num_splits int32 [b + 1])``. New form (no arguments): ``(FlashMLASchedMeta(), None)``."""
    if cache_seqlens is None:
        return FlashMLASchedMeta(), None
    if num_q_tokens_per_head_k is None or num_heads_k is None:
        raise ValueError("get_mla_metadata: pass num_q_tokens_per_head_k (s_q * h_q // h_kv) and num_heads_k "
                         "with cache_seqlens, or no arguments at all for the FlashMLASchedMeta form")
    return ops.get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q,
                                is_fp8_kvcache, topk)


def flash_mla_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, block_table: Optional[torch.Tensor],
                           cache_seqlens: Optional[torch.Tensor], head_dim_v: int,
                           tile_scheduler_metadata: Union[torch.Tensor, FlashMLASchedMeta],
                           num_splits: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None,
                           causal: bool = False, is_fp8_kvcache: bool = False,
                           indices: Optional[torch.Tensor] = None, attn_sink: Optional[torch.Tensor] = None,
                           extra_k_cache: Optional[torch.Tensor] = None,
                           extra_indices_in_kvcache: Optional[torch.Tensor] = None,
                           topk_length: Optional[torch.Tensor] = None,
                           extra_topk_length: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's decode entry point. Dense when ``indices`` is None (q [b, s_q, h_q, 576], k_cache
    [blocks, page, h_kv, 576], block_table, cache_seqlens), token-sparse over the FP8 cache otherwise
    (k_cache [blocks, page, 1, 656], indices [b, s_q, topk]). Returns (out [b, s_q, h_q, d_v],
    softmax_lse [b, h_q, s_q] fp32)."""
    sparse = indices is not None
    if sparse and causal:
        raise ValueError("flash_mla_with_kvcache: causal must be False for sparse attention (indices given)")
    if sparse and not is_fp8_kvcache:
        raise ValueError("flash_mla_with_kvcache: sparse attention (indices given) needs is_fp8_kvcache=True")
    if not sparse and any(t is not None for t in (attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length,
                                                  extra_topk_length)):
        raise ValueError("flash_mla_with_kvcache: attn_sink, extra caches and topk lengths need sparse attention "
                         "(indices)")
    if not sparse and is_fp8_kvcache:
        raise ValueError("flash_mla_with_kvcache: the FP8 cache is supported with sparse attention only")

    _check_call_shapes(q, k_cache, sparse, extra_k_cache, extra_indices_in_kvcache)
    if isinstance(tile_scheduler_metadata, FlashMLASchedMeta):
        plan = tile_scheduler_metadata
        if num_splits is not None:
            raise ValueError("flash_mla_with_kvcache: num_splits must be None with a FlashMLASchedMeta")
        if not plan.have_initialized:
            b, s_q, h_q, _ = q.shape
            if sparse:
                seqlens = topk_length if topk_length is not None else torch.full(
                    (b,), indices.shape[-1], dtype=torch.int32, device=q.device)
                topk = indices.shape[-1]
                if extra_k_cache is not None:
                    extra = extra_topk_length if extra_topk_length is not None else extra_indices_in_kvcache.shape[-1]
                    seqlens = (seqlens + extra).to(torch.int32)
                    topk += extra_indices_in_kvcache.shape[-1]
                plan.tile_scheduler_metadata, plan.num_splits = ops.get_mla_metadata(
                    seqlens, s_q * h_q, 1, h_q, True, topk)
            else:
                h_kv = k_cache.shape[2]
                plan.tile_scheduler_metadata, plan.num_splits = ops.get_mla_metadata(
                    cache_seqlens, s_q * h_q // h_kv, h_kv, h_q)
        metadata, splits = plan.tile_scheduler_metadata, plan.num_splits
    else:
        metadata, splits = tile_scheduler_metadata, num_splits

    if sparse:
        return ops.sparse_mla_decode(q, k_cache, indices, metadata, splits, topk_length=topk_length,
                                     attn_sink=attn_sink, extra_kv_cache=extra_k_cache,
                                     extra_indices=extra_indices_in_kvcache, extra_topk_length=extra_topk_length,
                                     head_dim_v=head_dim_v, softmax_scale=softmax_scale)
    return ops.mla_decode(q, k_cache, block_table, cache_seqlens, metadata, splits, head_dim_v=head_dim_v,
                          softmax_scale=softmax_scale, causal=causal)


def _check_call_shapes(q, k_cache, sparse: bool, extra_k_cache, extra_indices) -> None:
    """What flash_mla_with_kvcache reads before the op runs its own checks (ranks for the shape
    arithmetic of the plan, and the extra cache's indices), refused with the op checks' messages."""
    c = checks._Checker("flash_mla_with_kvcache")
    c.tensor("q", q, dtypes=(torch.bfloat16, torch.float16), dim=4)
    dtypes = checks.FP8_CACHE_DTYPES if sparse else (q.dtype,)
    c.tensor("k_cache", k_cache, dtypes=dtypes, dim=4, device=q.device)
    c.value("k_cache", k_cache.shape[2] >= 1, "[num_blocks, page_size, h_kv >= 1, d]",
            lambda: f"shape {tuple(k_cache.shape)}")
    if extra_k_cache is not None:
        c.value("extra_indices_in_kvcache", extra_indices is not None, "given when extra_k_cache is given", None)
        c.tensor("extra_indices_in_kvcache", extra_indices, dtypes=(torch.int32,), dim=3, device=q.device)
    elif extra_indices is not None:
        c.fail("extra_indices_in_kvcache", "None when extra_k_cache is None", "a tensor")


def flash_mla_sparse_fwd(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int = 512,
                         attn_sink: Optional[torch.Tensor] = None, topk_length: Optional[torch.Tensor] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashMLA's sparse prefill: q [s_q, h_q, d_qk], kv [s_kv, 1, d_qk], indices [s_q, 1, topk].
    Returns (out [s_q, h_q, d_v] bf16, max_logits [s_q, h_q], lse [s_q, h_q])."""
    return ops.sparse_mla_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)


def _check_cu_seqlens(c: "checks._Checker", arg: str, cu_seqlens: torch.Tensor, total: int, batch: int) -> list:
    """cu_seqlens int32 [batch + 1], 0 first, non-decreasing, ``total`` last; returns it as a list (host
    read: this function is not capturable)."""
    c.tensor(arg, cu_seqlens, dtypes=(torch.int32,), dim=1)
    c.value(arg, cu_seqlens.shape[0] == batch + 1, f"of size batch + 1 = {batch + 1}", tuple(cu_seqlens.shape))
    bounds = cu_seqlens.tolist()
    ok = bounds[0] == 0 and bounds[-1] == total and all(x <= y for x, y in zip(bounds, bounds[1:]))
    c.value(arg, ok, f"non-decreasing from 0 to the token count {total}", bounds if len(bounds) <= 8 else
            f"{bounds[:4]} ... {bounds[-2:]}")
    return bounds


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_qo: torch.Tensor,
                           cu_seqlens_kv: torch.Tensor, max_seqlen_qo: int, max_seqlen_kv: int,
                           dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
                           deterministic: bool = False, is_varlen: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense varlen MHA prefill with FlashMLA's signature (forward only).

    q [total_q, h_q, d_qk], k [total_kv, h_kv, d_qk], v [total_kv, h_kv, d_v]; cu_seqlens_* int32
    [batch + 1] (0 first, non-decreasing, the token count last). ``causal`` aligns the mask to the
    bottom right (query i of a sequence of n_q sees keys < n_kv - n_q + i + 1). Returns (out
    [total_q, h_q, d_v] q's dtype, lse [total_q, h_q] fp32; lse = +inf and out = 0 for a row with
    nothing to attend to).

    No SM90 kernel exists for this yet: it runs a float32 PyTorch computation per sequence and reads
    ``cu_seqlens`` on the host, so it is NOT capturable in a CUDA graph (a call during capture is
    refused with a RuntimeError) and graph-breaks under torch.compile.
    """
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("flash_attn_varlen_func: not capturable in a CUDA graph (it reads cu_seqlens on the "
                           "host; there is no SM90 dense prefill kernel yet): run it outside the captured region")
    c = checks._Checker("flash_attn_varlen_func")
    c.value("dropout_p", dropout_p == 0.0, "0 (inference only)", dropout_p)
    for name, t in (("q", q), ("k", k), ("v", v)):
        c.tensor(name, t, dtypes=(torch.bfloat16, torch.float16, torch.float32), dim=3, device=q.device)
    c.value("k", k.dtype == q.dtype and v.dtype == q.dtype, "of q's dtype (v too)", k.dtype)
    total_q, h_q, d_qk = q.shape
    total_kv, h_kv, _ = k.shape
    c.value("k", k.shape[2] == d_qk and h_kv >= 1 and h_q % h_kv == 0,
            f"[total_kv, h_kv, {d_qk}] with h_kv dividing h_q={h_q}", tuple(k.shape))
    c.value("v", v.shape[0] == total_kv and v.shape[1] == h_kv, f"[total_kv={total_kv}, h_kv={h_kv}, d_v]",
            tuple(v.shape))
    if softmax_scale is None:
        softmax_scale = d_qk ** -0.5
    c.scale("softmax_scale", softmax_scale)
    batch = cu_seqlens_qo.shape[0] - 1 if cu_seqlens_qo.dim() == 1 else -1
    c.value("cu_seqlens_qo", batch >= 0, "int32 [batch + 1]", tuple(cu_seqlens_qo.shape))
    bounds_q = _check_cu_seqlens(c, "cu_seqlens_qo", cu_seqlens_qo, total_q, batch)
    bounds_kv = _check_cu_seqlens(c, "cu_seqlens_kv", cu_seqlens_kv, total_kv, batch)
    out = q.new_empty(total_q, h_q, v.shape[-1])
    lse = torch.empty(total_q, h_q, dtype=torch.float32, device=q.device)
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_kv, bounds_kv[1:])):
        qs = q[q0:q1].float().transpose(0, 1)                                       # [h_q, n_q, d]
        ks = k[k0:k1].float().transpose(0, 1).repeat_interleave(h_q // h_kv, 0)     # [h_q, n_kv, d]
        vs = v[k0:k1].float().transpose(0, 1).repeat_interleave(h_q // h_kv, 0)
        scores = qs @ ks.transpose(1, 2) * softmax_scale
        if causal:
            n_q, n_kv = q1 - q0, k1 - k0
            keep = torch.arange(n_kv, device=q.device)[None, :] < (torch.arange(n_q, device=q.device)[:, None]
                                                                   + n_kv - n_q + 1)
            scores = scores.masked_fill(~keep, float("-inf"))
        seq_lse = torch.logsumexp(scores, dim=-1)                                   # [h_q, n_q]
        empty = torch.isneginf(seq_lse)
        probs = torch.exp(scores - torch.where(empty, 0.0, seq_lse)[..., None])
        out[q0:q1] = (probs @ vs).transpose(0, 1).to(q.dtype)
        lse[q0:q1] = seq_lse.masked_fill(empty, float("inf")).transpose(0, 1)
    return out, lse


__all__ = ["FlashMLASchedMeta", "get_mla_metadata", "flash_mla_with_kvcache", "flash_mla_sparse_fwd",
           "flash_attn_varlen_func"]
