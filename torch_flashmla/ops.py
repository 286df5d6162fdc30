"""Python API: one function per ``torch.ops.flashmla`` op, defaults filled in, no state.

Every function here is a thin wrapper around a single op call, so it traces under
``torch.compile(fullgraph=True)`` and captures in CUDA graphs. Compute the plan
(:func:`get_mla_metadata`) once per decode step and pass it to every layer.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import checks
from .kv_cache import D_QK, D_V

DEFAULT_SM_COUNT = 132          # H100/H200 SXM; used when planning for a CPU tensor
DECODE_BLOCK_M = 64             # query rows (s_q * h_q / h_kv) handled by one CTA of the decode kernel


@torch.compiler.assume_constant_result
def sm_count(device_index: int) -> int:
    """Number of SMs of CUDA device ``device_index`` (constant under torch.compile)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_sm_parts(device: torch.device, num_q_tokens_per_head_k: int, num_heads_k: int,
                         num_heads_q: Optional[int] = None, sparse: bool = False) -> int:
    """How many SM partitions the decode kernels split the work into, at least 1: one CTA per SM for
    each (kv head, 64-row query tile) pair. Dense decode tiles the ``s_q * h_q // h_kv`` query rows of a
    kv head together; sparse decode launches one CTA per query token and 64-head tile, so with
    ``sparse`` and ``num_heads_q`` given it counts ``s_q * ceil(h_q / 64)`` tiles (docs/design.md §4.1;
    without ``num_heads_q``, FlashMLA's old call form, s_q and h_q are not known apart)."""
    checks.check_plan_sizes(checks._Checker("get_mla_metadata"), num_q_tokens_per_head_k, num_heads_k, num_heads_q)
    sms = sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else DEFAULT_SM_COUNT
    if sparse and num_heads_q is not None:
        s_q = num_q_tokens_per_head_k * num_heads_k // num_heads_q
        row_tiles = s_q * -(-num_heads_q // DECODE_BLOCK_M)
    else:
        row_tiles = -(-num_q_tokens_per_head_k // DECODE_BLOCK_M)
    return max(1, sms // num_heads_k // row_tiles)


def get_mla_metadata(cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int = 1,
                     num_heads_q: Optional[int] = None, is_fp8_kvcache: bool = False, topk: Optional[int] = None,
                     num_sm_parts: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plan a decode step (on the GPU, no host sync; capturable in a CUDA graph).

    Args:
        cache_seqlens: [b] int32, tokens per request (for sparse decode: ``topk_length``, or a
            tensor filled with ``topk``, plus ``extra_topk_length`` with an extra cache). Negative
            lengths count as 0. Every decode kernel attends to every token whatever lengths were
            planned (the last piece of a request runs to its end: the plan's ``end_token`` is
            2^31 - 1 there); other lengths only balance the work worse.
        num_q_tokens_per_head_k: ``s_q * h_q // h_kv`` (the query rows of one kv head).
        num_heads_k: h_kv.
        num_heads_q: h_q, or None (FlashMLA's old call form ``get_mla_metadata(seqlens,
            s_q * h_q // h_kv, h_kv)``). For a given ``num_sm_parts`` the plan depends only on
            ``num_q_tokens_per_head_k``; the default ``num_sm_parts`` of sparse decode uses ``num_heads_q``
            when given. Given, it is checked against ``num_q_tokens_per_head_k`` (``s_q * h_q`` must be a
            multiple of it).
        is_fp8_kvcache, topk: the cache format and top-k of sparse decode (``topk=None``: dense).
        num_sm_parts: SM partitions (1..65535); default :func:`default_num_sm_parts` from the device's
            SM count (132 for CPU tensors), the query rows and, for sparse decode, ``num_heads_q``.
    Returns:
        tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [b + 1].
    """
    if num_sm_parts is None:
        num_sm_parts = default_num_sm_parts(cache_seqlens.device, num_q_tokens_per_head_k, num_heads_k, num_heads_q,
                                            sparse=topk is not None)
    return torch.ops.flashmla.get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q,
                                               is_fp8_kvcache, topk, num_sm_parts)


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
               tile_scheduler_metadata: torch.Tensor, num_splits: torch.Tensor, head_dim_v: int = D_V,
               softmax_scale: Optional[float] = None, causal: bool = False,
               descale_q: Optional[torch.Tensor] = None, descale_k: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense MLA decode over a paged BF16/FP16 cache, or over a per-tensor FP8 (e4m3) cache.

    Args:
        q: [b, s_q, h_q, 576] bf16/fp16; with an FP8 cache bf16, or float8_e4m3fn with ``descale_q``.
        kv_cache: [num_blocks, page_size, h_kv, 576], q's dtype; any page_size >= 1 (a multiple of 64
            is fastest; smaller pages are loaded in slices, see docs/design.md §5.1). Or the
            per-tensor e4m3 cache written by ``concat_and_cache_mla(..., kv_cache_dtype="fp8", scale)``:
            float8_e4m3fn (or uint8 holding the same bytes), value = e4m3 * ``descale_k``.
        block_table: [b, max_blocks_per_seq] int32; entries past the last used page are ignored;
            tokens of a used page whose id is outside ``[0, num_blocks)`` are skipped (never read).
        cache_seqlens: [b] int32 (0 allowed: out = 0, lse = +inf). Values are not checked (that
            would need a host sync): below 0 counts as 0, above the table's capacity
            (``max_blocks_per_seq * page_size``) as that capacity.
        tile_scheduler_metadata, num_splits: the plan from :func:`get_mla_metadata`.
        head_dim_v: 512. softmax_scale: default 576 ** -0.5.
        causal: with s_q > 1, query t sees keys ``< cache_seqlens - s_q + t + 1``.
        descale_q: float32 [1] (or []), q's per-tensor descale; only with a float8_e4m3fn q.
        descale_k: float32 [1] (or []), the FP8 cache's per-tensor descale (the ``scale`` it was
            written with); required with an FP8 cache, refused otherwise. Both are read on the device
            (no host sync: a captured call replays with the values they hold then); they must be
            finite and positive (not checked).
    Returns:
        out [b, s_q, h_q, 512] (q's dtype; bf16 with an FP8 cache), lse [b, h_q, s_q] fp32 (natural log).
    """
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    return torch.ops.flashmla.mla_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                                         tile_scheduler_metadata, num_splits, descale_q, descale_k)


def sparse_mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor,
                      tile_scheduler_metadata: torch.Tensor, num_splits: torch.Tensor,
                      topk_length: Optional[torch.Tensor] = None, attn_sink: Optional[torch.Tensor] = None,
                      extra_kv_cache: Optional[torch.Tensor] = None, extra_indices: Optional[torch.Tensor] = None,
                      extra_topk_length: Optional[torch.Tensor] = None, head_dim_v: int = D_V,
                      softmax_scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token-sparse MLA decode over the 656-byte FP8 cache (DeepSeek Sparse Attention).

    Args:
        q: [b, s_q, h_q, 576] bf16.
        kv_cache: [num_blocks, page_size, 1, 656] uint8 or float8_e4m3fn.
        indices: [b, s_q, topk] int32, ``block_id * page_size + offset``; -1 (or out of range) = skip.
        tile_scheduler_metadata, num_splits: plan from ``get_mla_metadata(..., is_fp8_kvcache=True, topk=topk)``.
        topk_length: [b] int32, only the first ``topk_length[i]`` indices count.
        attn_sink: [h_q] fp32; out *= exp(lse) / (exp(lse) + exp(attn_sink)), lse unchanged.
        extra_kv_cache, extra_indices [b, s_q, extra_topk], extra_topk_length [b]: a second cache
            attended in the same softmax.
    Returns:
        out [b, s_q, h_q, 512] bf16, lse [b, h_q, s_q] fp32.
    """
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    return torch.ops.flashmla.sparse_mla_decode(q, kv_cache, indices, topk_length, attn_sink, extra_kv_cache,
                                                extra_indices, extra_topk_length, head_dim_v, softmax_scale,
                                                tile_scheduler_metadata, num_splits)


def sparse_mla_prefill(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor,
                       softmax_scale: Optional[float] = None, head_dim_v: int = D_V,
                       attn_sink: Optional[torch.Tensor] = None, topk_length: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-sparse MLA prefill.

    Args:
        q: [s_q, h_q, d_qk] bf16 (d_qk 576 or 512). kv: [s_kv, 1, d_qk] bf16.
        indices: [s_q, 1, topk] int32; -1 or >= s_kv = skip. topk_length: [s_q] int32.
        attn_sink: [h_q] fp32. softmax_scale: default d_qk ** -0.5.
    Returns:
        out [s_q, h_q, 512] bf16, max_logits [s_q, h_q] fp32, lse [s_q, h_q] fp32 (natural log;
        -inf / +inf for a query with nothing to attend to, whose out is 0).
    """
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    return torch.ops.flashmla.sparse_mla_prefill(q, kv, indices, softmax_scale, head_dim_v, attn_sink, topk_length)


def concat_and_cache_mla(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                         kv_cache_dtype: str = "auto", scale: Optional[torch.Tensor] = None) -> None:
    """Write new tokens into a paged cache in place.

    Args:
        kv_c: [T, 512] (``[T, 448]`` for ``"fp8_ds_mla_v4"``), k_pe: [T, 64] bf16/fp16.
        kv_cache: [num_blocks, page_size, 1, 576] (``"auto"``, kv_c's dtype) or
            [num_blocks, page_size, 1, 656] uint8/float8_e4m3fn (``"fp8_ds_mla"``, kv_c bf16) or
            [num_blocks, page_size, 1, 576] float8_e4m3fn/uint8 (``"fp8"``, alias ``"fp8_e4m3"``: the
            per-tensor e4m3 cache, kv_c bf16/fp16, byte = e4m3(clamp(x / scale, -448, 448)) rounded to
            nearest even, NaN -> 0x7F; dequantized value = e4m3 * scale) or a DeepSeek V4 cache
            [num_blocks, page_size, 1, 584] uint8/float8_e4m3fn with a padded page stride
            (``"fp8_ds_mla_v4"``, kv_c bf16; allocate it with
            :func:`torch_flashmla.kv_cache.new_fp8_v4_cache`). Contiguous (the V4 cache: its layout).
        slot_mapping: [T] int64, ``block_id * page_size + offset``; negative or past the cache = skip.
        scale: the per-tensor scale of ``"fp8"``: a float32 tensor of one element (shape [] or [1]) on
            kv_c's device, required there and read on the device (no host sync; a CUDA graph replays
            with the value the tensor holds at replay). Meant to be finite and positive; its value is
            not checked. The other cache types compute their own scales and ignore it (a given scale
            is still checked for dtype, shape and device), so engine code that always passes its
            layer's scale runs unchanged. Layout and NaN policy: :mod:`torch_flashmla.kv_cache`.
    """
    torch.ops.flashmla.concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale)


def quantize_kv_fp8(kv: torch.Tensor) -> torch.Tensor:
    """[..., 576] bf16 -> [..., 656] uint8 V3.2 FP8 records (see :mod:`torch_flashmla.kv_cache`)."""
    return torch.ops.flashmla.quantize_kv_fp8(kv)


def dequantize_kv_fp8(kv_fp8: torch.Tensor) -> torch.Tensor:
    """[..., 656] uint8/float8_e4m3fn records -> [..., 576] bf16."""
    return torch.ops.flashmla.dequantize_kv_fp8(kv_fp8)


# DeepSeek V4 ("MODEL1") FP8 paged cache: layout in torch_flashmla/kv_cache.py (V4 section).
def quantize_kv_fp8_v4(kv: torch.Tensor) -> torch.Tensor:
    """Quantize whole pages into the DeepSeek V4 FP8 cache layout.

    Args:
        kv: [num_blocks, page_size, 1, 512] bf16 (448 latent + 64 rope per token).
    Returns:
        [num_blocks, page_size, 1, 584] uint8 with strides ``(page_stride, 584, 584, 1)``,
        ``page_stride = ceil(584 * page_size / 576) * 576`` (FlashMLA's), ready for
        ``sparse_mla_decode`` / ``compat.flash_mla_with_kvcache``; padding between pages is 0.
    """
    return torch.ops.flashmla.quantize_kv_fp8_v4(kv)


def dequantize_kv_fp8_v4(kv_fp8: torch.Tensor) -> torch.Tensor:
    """[num_blocks, page_size, 1, 584] uint8/float8_e4m3fn V4 cache (page stride a multiple of 8,
    at least 584 * page_size) -> [num_blocks, page_size, 1, 512] bf16."""
    return torch.ops.flashmla.dequantize_kv_fp8_v4(kv_fp8)


def mha_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                softmax_scale: Optional[float] = None, causal: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense MHA-mode prefill over packed variable-length sequences (no host sync; capturable).

    DeepSeek models prefill long prompts in MHA form (q/k head dim 192 = 128 nope + 64 rope, v head
    dim 128) and decode in MLA form (:func:`mla_decode`).

    Args:
        q: [total_q, h_q, d_qk] bf16/fp16, the queries of all sequences back to back.
        k: [total_k, h_k, d_qk], v: [total_k, h_k, d_v], q's dtype; h_q a multiple of h_k (GQA/MQA:
            query head ``j`` uses kv head ``j // (h_q // h_k)``). ``(d_qk, d_v)`` must be ``(192, 128)``
            or ``(128, 128)``: the SM90 kernel is specialised for these, and other head dims are
            refused with a ValueError. Only the last dimension must be contiguous (slices of packed
            qkv tensors are fine).
        cu_seqlens_q, cu_seqlens_k: [b + 1] int32, on q's device: sequence ``i`` has query rows
            ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` and key rows ``cu_seqlens_k[i]:cu_seqlens_k[i+1]``
            (zero-length sequences allowed).
        max_seqlen_q, max_seqlen_k: ints >= every sequence's query / key count (they size the work
            without reading ``cu_seqlens`` on the host). Not checked against the values (that would
            need a host sync): a sequence longer than ``max_seqlen_*`` is cut to its first
            ``max_seqlen_*`` positions (rows past it get out = 0, lse = +inf; keys past it are not
            attended). Other values with a defined meaning: rows before ``cu_seqlens_q[0]`` or after
            ``cu_seqlens_q[b]`` (padding tokens) get out = 0, lse = +inf; key rows outside
            ``[0, total_k)`` are not attended (see :func:`torch_flashmla.reference.mha_prefill`).
        softmax_scale: default ``d_qk ** -0.5``.
        causal: bottom-right aligned: query ``j`` of a sequence with ``n_q`` queries and ``n_k`` keys
            sees keys ``< n_k - n_q + j + 1`` (chunked prefill over a cached prefix: the chunk's
            queries are the last ``n_q`` positions; out/lse of chunks merge by lse).
    Returns:
        out [total_q, h_q, d_v] (q's dtype), lse [total_q, h_q] fp32 (natural log; +inf and out = 0
        for a row with nothing to attend to).
    """
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    return torch.ops.flashmla.mha_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          softmax_scale, causal)


__all__ = ["get_mla_metadata", "mla_decode", "sparse_mla_decode", "sparse_mla_prefill", "concat_and_cache_mla",
           "quantize_kv_fp8", "dequantize_kv_fp8", "quantize_kv_fp8_v4", "dequantize_kv_fp8_v4",
           "mha_prefill", "default_num_sm_parts", "D_QK", "D_V"]
