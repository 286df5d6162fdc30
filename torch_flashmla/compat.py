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

from . import ops


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


def flash_mla_sparse_fwd(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int = 512,
                         attn_sink: Optional[torch.Tensor] = None, topk_length: Optional[torch.Tensor] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashMLA's sparse prefill: q [s_q, h_q, d_qk], kv [s_kv, 1, d_qk], indices [s_q, 1, topk].
    Returns (out [s_q, h_q, d_v] bf16, max_logits [s_q, h_q], lse [s_q, h_q])."""
    return ops.sparse_mla_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_qo: torch.Tensor,
                           cu_seqlens_kv: torch.Tensor, max_seqlen_qo: int, max_seqlen_kv: int,
                           dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
                           deterministic: bool = False, is_varlen: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense varlen MHA prefill with FlashMLA's signature (forward only).

    q [total_q, h_q, d_qk], k [total_kv, h_kv, d_qk], v [total_kv, h_kv, d_v]; cu_seqlens_* int32
    [batch + 1]. ``causal`` aligns the mask to the bottom right (query i of a sequence of n_q sees
    keys < n_kv - n_q + i + 1). Returns (out [total_q, h_q, d_v] q's dtype, lse [total_q, h_q] fp32).
    No SM90 kernel exists for this yet: it runs PyTorch's scaled_dot_product_attention per sequence
    and reads ``cu_seqlens`` on the host, so it is not CUDA-graph capturable.
    """
    if dropout_p != 0.0:
        raise ValueError("flash_attn_varlen_func: dropout_p must be 0 (inference only)")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    total_q, h_q, _ = q.shape
    h_kv = k.shape[1]
    if h_q % h_kv != 0:
        raise ValueError(f"flash_attn_varlen_func: h_q={h_q} must be a multiple of h_kv={h_kv}")
    out = q.new_empty(total_q, h_q, v.shape[-1])
    lse = torch.empty(total_q, h_q, dtype=torch.float32, device=q.device)
    bounds_q, bounds_kv = cu_seqlens_qo.tolist(), cu_seqlens_kv.tolist()
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
