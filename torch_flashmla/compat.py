"""FlashMLA's public Python names and return conventions, on top of ``torch.ops.flashmla``.

Drop-in for code written against deepseek-ai/FlashMLA (``from torch_flashmla.compat import
get_mla_metadata, flash_mla_with_kvcache``). Two forms of the planner, as FlashMLA has had:

* old form, ``get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv[, h_q, is_fp8_kvcache, topk])``
  returns the tensor pair ``(tile_scheduler_metadata, num_splits)``, computed on the GPU now;
* new form, ``get_mla_metadata()`` (no arguments) returns ``(FlashMLASchedMeta(), None)``; the plan
  is computed on the first ``flash_mla_with_kvcache`` call that receives the object and reused
  afterwards (reused with other lengths it still gives correct outputs, only balanced worse: each
  request's last piece runs to its real end; a new object per decode step keeps the balance).

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
                           extra_topk_length: Optional[torch.Tensor] = None,
                           descale_q: Optional[torch.Tensor] = None, descale_k: Optional[torch.Tensor] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's decode entry point. Dense when ``indices`` is None (q [b, s_q, h_q, 576], k_cache
    [blocks, page, h_kv, 576], block_table, cache_seqlens), token-sparse over the FP8 cache otherwise
    (k_cache [blocks, page, 1, 656], indices [b, s_q, topk]). Returns (out [b, s_q, h_q, d_v],
    softmax_lse [b, h_q, s_q] fp32).

    Dense with ``is_fp8_kvcache=True`` (the FP8 dense fork's interface): k_cache is the per-tensor
    e4m3 cache (float8_e4m3fn or uint8) with ``descale_k`` float32 [1]; q bf16, or float8_e4m3fn
    with ``descale_q`` float32 [1]; out bf16 (:func:`torch_flashmla.ops.mla_decode`)."""
    sparse = indices is not None
    if sparse and causal:
        raise ValueError("flash_mla_with_kvcache: causal must be False for sparse attention (indices given)")
    if sparse and not is_fp8_kvcache:
        raise ValueError("flash_mla_with_kvcache: sparse attention (indices given) needs is_fp8_kvcache=True")
    if not sparse and any(t is not None for t in (attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length,
                                                  extra_topk_length)):
        raise ValueError("flash_mla_with_kvcache: attn_sink, extra caches and topk lengths need sparse attention "
                         "(indices)")
    if sparse and (descale_q is not None or descale_k is not None):
        raise ValueError("flash_mla_with_kvcache: descale_q / descale_k are for the dense FP8 cache (the sparse "
                         "FP8 cache carries its own scales)")

    _check_call_shapes(q, k_cache, sparse, extra_k_cache, extra_indices_in_kvcache, fp8=is_fp8_kvcache)
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
                    cache_seqlens, s_q * h_q // h_kv, h_kv, h_q, is_fp8_kvcache)
        metadata, splits = plan.tile_scheduler_metadata, plan.num_splits
    else:
        metadata, splits = tile_scheduler_metadata, num_splits

    if sparse:
        return ops.sparse_mla_decode(q, k_cache, indices, metadata, splits, topk_length=topk_length,
                                     attn_sink=attn_sink, extra_kv_cache=extra_k_cache,
                                     extra_indices=extra_indices_in_kvcache, extra_topk_length=extra_topk_length,
                                     head_dim_v=head_dim_v, softmax_scale=softmax_scale)
    return ops.mla_decode(q, k_cache, block_table, cache_seqlens, metadata, splits, head_dim_v=head_dim_v,
                          softmax_scale=softmax_scale, causal=causal, descale_q=descale_q, descale_k=descale_k)


def _check_call_shapes(q, k_cache, sparse: bool, extra_k_cache, extra_indices, fp8: bool = True) -> None:
    """What flash_mla_with_kvcache reads before the op runs its own checks (ranks for the shape
    arithmetic of the plan, and the extra cache's indices), refused with the op checks' messages."""
    c = checks._Checker("flash_mla_with_kvcache")
    dense_fp8 = fp8 and not sparse
    c.tensor("q", q, dtypes=checks.FP8_DECODE_Q_DTYPES if dense_fp8 else (torch.bfloat16, torch.float16), dim=4)
    dtypes = checks.FP8_CACHE_DTYPES if sparse or dense_fp8 else (q.dtype,)
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


def _check_varlen_call(fn: str, q, k, v, cu_seqlens_qo, cu_seqlens_kv, dropout_p, deterministic) -> None:
    """What the varlen wrappers read before the op runs its own checks (ranks for the default scale,
    the batch size shared by both ``cu_seqlens``), refused with FlashMLA's argument names. Metadata
    only: the values of ``cu_seqlens`` are never read here."""
    c = checks._Checker(fn)
    c.value("dropout_p", dropout_p == 0.0, "0 (inference only)", dropout_p)
    c.value("deterministic", isinstance(deterministic, bool), "a bool", repr(deterministic))
    for name, t in (("q", q), ("k", k), ("v", v)):
        c.tensor(name, t, dtypes=checks.HALF_DTYPES, dim=3)
    c.tensor("cu_seqlens_qo", cu_seqlens_qo, dtypes=(torch.int32,), dim=1)
    c.tensor("cu_seqlens_kv", cu_seqlens_kv, dtypes=(torch.int32,), dim=1)
    c.size("cu_seqlens_kv", cu_seqlens_kv, 0, cu_seqlens_qo.shape[0], "batch + 1, as cu_seqlens_qo")


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_qo: torch.Tensor,
                           cu_seqlens_kv: torch.Tensor, max_seqlen_qo: int, max_seqlen_kv: int,
                           dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
                           deterministic: bool = False, is_varlen: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense varlen MHA prefill with FlashMLA's signature (forward only), on :func:`ops.mha_prefill`.

    q [total_q, h_q, d_qk], k [total_kv, h_kv, d_qk], v [total_kv, h_kv, d_v] bf16/fp16 with
    (d_qk, d_v) in {(192, 128), (128, 128)}; cu_seqlens_* int32 [batch + 1]; ``causal`` aligns the
    mask to the bottom right (query i of a sequence of n_q sees keys < n_kv - n_q + i + 1). Returns
    (out [total_q, h_q, d_v] q's dtype, lse [total_q, h_q] fp32; lse = +inf and out = 0 for a row with
    nothing to attend to).

    No host reads: capturable in a CUDA graph and traceable by ``torch.compile(fullgraph=True)``.
    Shapes and dtypes are refused with a ValueError before any work; the values of ``cu_seqlens``
    and the ``max_seqlen_*`` bounds cannot be checked without a host sync and have the meaning of
    :func:`ops.mha_prefill` (a length past ``max_seqlen_*`` is cut there; query rows no sequence owns,
    e.g. padding after ``cu_seqlens_qo[-1]``, get out = 0 and lse = +inf). ``is_varlen`` and
    ``deterministic`` are accepted for compatibility (the result does not depend on them);
    ``dropout_p`` must be 0.
    """
    _check_varlen_call("flash_attn_varlen_func", q, k, v, cu_seqlens_qo, cu_seqlens_kv, dropout_p, deterministic)
    return ops.mha_prefill(q, k, v, cu_seqlens_qo, cu_seqlens_kv, max_seqlen_qo, max_seqlen_kv,
                           softmax_scale=softmax_scale, causal=causal)


def _check_packed(fn: str, arg: str, t, head_dim_qk, parts: int) -> None:
    """``t [total, h, parts * head_dim_qk + d_v]`` with d_v >= 1, before it is sliced."""
    c = checks._Checker(fn)
    c.tensor(arg, t, dtypes=checks.HALF_DTYPES, dim=3)
    c.positive_int("head_dim_qk", head_dim_qk)
    c.value(arg, t.shape[2] > parts * head_dim_qk,
            f"[total, h, {'2 * ' if parts == 2 else ''}head_dim_qk + d_v] (head_dim_qk={head_dim_qk})",
            lambda: f"shape {tuple(t.shape)}")


def flash_attn_varlen_qkvpacked_func(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, head_dim_qk: int,
                                     dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                                     causal: bool = False, deterministic: bool = False, is_varlen: bool = True
                                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's packed form: qkv [total, h, 2 * head_dim_qk + d_v] holds q ‖ k ‖ v of every head
    along the last dimension (so h_q = h_kv); one ``cu_seqlens`` for queries and keys. Same
    semantics and return value as :func:`flash_attn_varlen_func`."""
    _check_packed("flash_attn_varlen_qkvpacked_func", "qkv", qkv, head_dim_qk, 2)
    q, k, v = qkv[..., :head_dim_qk], qkv[..., head_dim_qk:2 * head_dim_qk], qkv[..., 2 * head_dim_qk:]
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=dropout_p,
                                  softmax_scale=softmax_scale, causal=causal, deterministic=deterministic,
                                  is_varlen=is_varlen)


def flash_attn_varlen_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, cu_seqlens_qo: torch.Tensor,
                                    cu_seqlens_kv: torch.Tensor, max_seqlen_qo: int, max_seqlen_kv: int,
                                    head_dim_qk: int, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                                    causal: bool = False, deterministic: bool = False, is_varlen: bool = True
                                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's packed-kv form: kv [total_kv, h_kv, head_dim_qk + d_v] holds k ‖ v along the last
    dimension. Same semantics and return value as :func:`flash_attn_varlen_func`."""
    _check_packed("flash_attn_varlen_kvpacked_func", "kv", kv, head_dim_qk, 1)
    k, v = kv[..., :head_dim_qk], kv[..., head_dim_qk:]
    return flash_attn_varlen_func(q, k, v, cu_seqlens_qo, cu_seqlens_kv, max_seqlen_qo, max_seqlen_kv,
                                  dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                                  deterministic=deterministic, is_varlen=is_varlen)


__all__ = ["FlashMLASchedMeta", "get_mla_metadata", "flash_mla_with_kvcache", "flash_mla_sparse_fwd",
           "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func"]
