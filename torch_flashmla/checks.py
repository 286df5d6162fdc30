"""Input validation for every flashmla op: the one place where bad input is turned away.

Each ``check_<op>`` is called by that op's CPU kernel, CUDA kernel and fake, before anything is
launched. The checks read only metadata (dtype, rank, sizes, strides, device), never tensor values,
so they are free of host syncs and also run on fake tensors with symbolic sizes.
Errors are ``ValueError`` naming the op, the argument and what was expected.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .kv_cache import D_QK, D_V, FP8_RECORD_BYTES
from .kv_cache import V4_D_NOPE, V4_D_QK, V4_D_ROPE, V4_STRIDE_ALIGN, V4_TOKEN_BYTES

HALF_DTYPES = (torch.bfloat16, torch.float16)
FP8_CACHE_DTYPES = (torch.uint8, torch.float8_e4m3fn)
FP8_DECODE_Q_DTYPES = (torch.bfloat16, torch.float8_e4m3fn)  # q of mla_decode over a per-tensor e4m3 cache
MAX_HEADS_Q = 128
DENSE_MAX_SM_PARTS = 65535  # mla_decode's partitions are the z dimension of its CUDA grid
MAX_SM_PARTS = DENSE_MAX_SM_PARTS  # the planner's limit, so that every plan fits every decode kernel
METADATA_WIDTH = 8          # int32 fields per SM partition in tile_scheduler_metadata
KV_CACHE_DTYPES = ("auto", "fp8_ds_mla", "fp8_ds_mla_v4", "fp8", "fp8_e4m3")
PER_TENSOR_FP8_DTYPES = ("fp8", "fp8_e4m3")  # per-tensor e4m3 cache with a scale tensor


def _all(*conds):
    """Conjunction of (possibly symbolic) bools without evaluating them on the host: ``a and b`` would
    call ``bool()`` on a SymBool and add a shape guard under torch.compile."""
    out = True
    for cond in conds:
        out = out & cond
    return out


class _Checker:
    """Argument checks of one op. Conditions on sizes go through ``torch._check_with``, so that under
    torch.compile they become runtime asserts on symbolic sizes instead of guards that specialise a
    dynamic batch (or fail on an unbacked one). Messages are built only when a check fails."""

    def __init__(self, op: str):
        self.op = op

    def fail(self, arg: str, expected: str, got) -> None:
        raise ValueError(self._message(arg, expected, got))

    def _message(self, arg: str, expected: str, got) -> str:
        got = got() if callable(got) else got
        return f"flashmla.{self.op}: argument '{arg}' must be {expected}, got {got}"

    def tensor(self, arg: str, t, *, dtypes: Sequence[torch.dtype], dim: int, device=None,
               last_dim_contiguous: bool = True, contiguous: bool = False) -> None:
        if not isinstance(t, torch.Tensor):
            self.fail(arg, "a Tensor", type(t).__name__)
        if t.dtype not in dtypes:
            self.fail(arg, "of dtype " + " or ".join(str(d) for d in dtypes), t.dtype)
        if t.dim() != dim:
            self.fail(arg, f"a {dim}-D tensor", f"shape {tuple(t.shape)}")
        if device is not None and t.device != device:
            self.fail(arg, f"on device {device} (the device of the first argument)", t.device)
        if contiguous:
            self.value(arg, t.is_contiguous(), "contiguous", lambda: f"strides {tuple(t.stride())}")
        if last_dim_contiguous and dim > 0:
            # The stride is a plain 1 for contiguous inputs, so the size is only looked at otherwise.
            stride_ok = t.stride(-1) == 1
            if not (isinstance(stride_ok, bool) and stride_ok):
                self.value(arg, stride_ok | (t.shape[-1] <= 1), "contiguous in its last dimension",
                           lambda: f"strides {tuple(t.stride())}")

    def size(self, arg: str, t: torch.Tensor, dim: int, expected, what: str) -> None:
        self.value(arg, t.shape[dim] == expected, f"of size {expected} in dimension {dim} ({what})",
                   lambda: f"shape {tuple(t.shape)}")

    def value(self, arg: str, ok, expected: str, got) -> None:
        """``ok`` a bool or SymBool; ``got`` a value or a callable giving it (evaluated on failure)."""
        if isinstance(ok, bool):
            if not ok:
                self.fail(arg, expected, got)
            return
        torch._check_with(ValueError, ok, lambda: self._message(arg, expected, got))

    def positive_int(self, arg: str, x, upper: Optional[int] = None) -> None:
        """A Python int in 1..upper (ints only: bools and floats are refused before any arithmetic)."""
        expected = "a positive int" if upper is None else f"an int in 1..{upper}"
        if isinstance(x, bool) or not isinstance(x, (int, torch.SymInt)):
            self.fail(arg, expected, repr(x))
        self.value(arg, x >= 1 if upper is None else _all(x >= 1, x <= upper), expected, x)

    def scale(self, arg: str, x) -> None:
        """A finite positive float (inf or NaN would turn every output into NaN)."""
        if isinstance(x, torch.SymFloat):  # traced: the value is not known here
            self.value(arg, x > 0, "a finite positive float", x)
            return
        ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
        self.value(arg, ok, "a finite positive float", x)


def check_get_mla_metadata(seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q,
                           is_fp8_kvcache, topk, num_sm_parts) -> None:
    """``num_heads_q`` may be None: FlashMLA's old call form (``get_mla_metadata(seqlens, s_q * h_q //
    h_kv, h_kv)``) does not say how ``num_q_tokens_per_head_k`` splits into s_q and h_q, and the plan
    does not depend on it. Given, it must be consistent with the other two. Negative ``seqlens`` count
    as 0 (values are never checked: no host sync)."""
    c = _Checker("get_mla_metadata")
    c.tensor("seqlens", seqlens, dtypes=(torch.int32,), dim=1)
    check_plan_sizes(c, num_q_tokens_per_head_k, num_heads_k, num_heads_q)
    if topk is not None:
        c.value("topk", isinstance(topk, (int, torch.SymInt)) and not isinstance(topk, bool),
                "None (dense) or a non-negative int", repr(topk))
        c.value("topk", topk >= 0, "None (dense) or a non-negative int", topk)
    c.positive_int("num_sm_parts", num_sm_parts, MAX_SM_PARTS)


def check_plan_sizes(c: "_Checker", num_q_tokens_per_head_k, num_heads_k, num_heads_q=None) -> None:
    """The sizes a plan is made for (also checked before the default ``num_sm_parts`` divides by them)."""
    c.positive_int("num_q_tokens_per_head_k", num_q_tokens_per_head_k)
    c.positive_int("num_heads_k", num_heads_k)
    if num_heads_q is not None:
        c.positive_int("num_heads_q", num_heads_q, MAX_HEADS_Q)
        c.value("num_heads_q", num_heads_q % num_heads_k == 0,
                f"in 1..{MAX_HEADS_Q} and a multiple of num_heads_k={num_heads_k}", num_heads_q)
        c.value("num_heads_q", (num_q_tokens_per_head_k * num_heads_k) % num_heads_q == 0,
                f"a divisor of num_q_tokens_per_head_k * num_heads_k = {num_q_tokens_per_head_k * num_heads_k} "
                "(= s_q * h_q)", num_heads_q)


def _check_plan(c: _Checker, tile_scheduler_metadata, num_splits, batch, device) -> None:
    c.tensor("tile_scheduler_metadata", tile_scheduler_metadata, dtypes=(torch.int32,), dim=2, device=device,
             contiguous=True)
    c.size("tile_scheduler_metadata", tile_scheduler_metadata, 1, METADATA_WIDTH, "fields per SM partition")
    c.value("tile_scheduler_metadata", tile_scheduler_metadata.shape[0] >= 1,
            "[num_sm_parts >= 1, 8]", lambda: f"shape {tuple(tile_scheduler_metadata.shape)}")
    c.tensor("num_splits", num_splits, dtypes=(torch.int32,), dim=1, device=device, contiguous=True)
    c.size("num_splits", num_splits, 0, batch + 1, "batch size + 1, from get_mla_metadata")


def _check_q(c: _Checker, q, dtypes, d_qk=(D_QK,)) -> None:
    c.tensor("q", q, dtypes=dtypes, dim=4)
    c.value("q", q.shape[3] in d_qk if len(d_qk) > 1 else q.shape[3] == d_qk[0],
            f"of size {' or '.join(map(str, d_qk))} in dimension 3 (d_qk)", lambda: f"shape {tuple(q.shape)}")
    c.value("q", _all(q.shape[2] >= 1, q.shape[2] <= MAX_HEADS_Q),
            f"[b, s_q, h_q, d_qk] with h_q in 1..{MAX_HEADS_Q}", lambda: f"shape {tuple(q.shape)}")


def check_mla_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                     tile_scheduler_metadata, num_splits, descale_q=None, descale_k=None) -> None:
    """Values are not checked (no host sync): ``cache_seqlens`` below 0 count as 0 and above the block
    table's capacity (``max_blocks * page_size``) as that capacity; tokens of pages whose id is outside
    ``[0, num_blocks)`` are skipped (never read). See the reference ``mla_decode``.

    FP8 path: a per-tensor e4m3 cache (``float8_e4m3fn``, or ``uint8`` holding the same bytes) with
    ``descale_k``; q bf16, or ``float8_e4m3fn`` with ``descale_q`` (1-element float32 tensors on q's
    device, values not checked)."""
    c = _Checker("mla_decode")
    fp8 = isinstance(kv_cache, torch.Tensor) and kv_cache.dtype in FP8_CACHE_DTYPES
    _check_q(c, q, FP8_DECODE_Q_DTYPES if fp8 else HALF_DTYPES)
    dev = q.device
    if fp8:
        c.value("descale_k", descale_k is not None, "a float32 tensor of one element with an FP8 kv_cache "
                "(the cache's per-tensor descale)", None)
        _check_scale_tensor(c, "descale_k", descale_k, dev, "q")
        if q.dtype == torch.float8_e4m3fn:
            c.value("descale_q", descale_q is not None, "a float32 tensor of one element with a float8_e4m3fn q",
                    None)
            _check_scale_tensor(c, "descale_q", descale_q, dev, "q")
        else:
            c.value("descale_q", descale_q is None, "None with a bf16 q", "a tensor")
    else:
        c.value("descale_q", descale_q is None, "None with a bf16/fp16 kv_cache (FP8 caches only)", "a tensor")
        c.value("descale_k", descale_k is None, "None with a bf16/fp16 kv_cache (FP8 caches only)", "a tensor")
    c.tensor("kv_cache", kv_cache, dtypes=FP8_CACHE_DTYPES if fp8 else (q.dtype,), dim=4, device=dev)
    c.size("kv_cache", kv_cache, 3, D_QK, "[num_blocks, page_size, h_kv, 576]")
    page_size, h_kv = kv_cache.shape[1], kv_cache.shape[2]
    # Any page size >= 1: the SM90 kernel loads pages that are not a multiple of 64 tokens in slices
    # (slower, docs/design.md §5.1).
    c.value("kv_cache", page_size > 0, "paged with page_size >= 1", lambda: f"page_size {page_size}")
    c.value("kv_cache", h_kv >= 1, f"of h_kv dividing h_q={q.shape[2]}", lambda: f"h_kv {h_kv}")
    c.value("kv_cache", q.shape[2] % h_kv == 0, f"of h_kv dividing h_q={q.shape[2]}", lambda: f"h_kv {h_kv}")
    b = q.shape[0]
    c.tensor("block_table", block_table, dtypes=(torch.int32,), dim=2, device=dev)
    c.size("block_table", block_table, 0, b, "batch size of q")
    c.tensor("cache_seqlens", cache_seqlens, dtypes=(torch.int32,), dim=1, device=dev, contiguous=True)
    c.size("cache_seqlens", cache_seqlens, 0, b, "batch size of q")
    c.value("head_dim_v", head_dim_v == D_V, str(D_V), head_dim_v)
    c.scale("softmax_scale", softmax_scale)
    _check_plan(c, tile_scheduler_metadata, num_splits, b, dev)
    # The SM90 kernel puts the partitions on grid.z (CUDA limit 65535); checked on every device so that
    # a plan behaves alike everywhere.
    c.value("tile_scheduler_metadata", tile_scheduler_metadata.shape[0] <= DENSE_MAX_SM_PARTS,
            f"at most {DENSE_MAX_SM_PARTS} rows (num_sm_parts)", lambda: f"{tile_scheduler_metadata.shape[0]} rows")


def _check_fp8_cache(c: _Checker, arg: str, cache, device) -> None:
    c.tensor(arg, cache, dtypes=FP8_CACHE_DTYPES, dim=4, device=device)
    c.size(arg, cache, 3, FP8_RECORD_BYTES, V32_RECORD_WHAT)
    c.size(arg, cache, 2, 1, "h_kv = 1 for sparse attention")


def _check_topk_indices(c: _Checker, arg: str, indices, length_arg: str, lengths, topk: str, b: int, s_q: int,
                        device) -> None:
    """Sparse decode's token indices [b, s_q, topk] int32 and, when given, their counts per request [b] int32."""
    c.tensor(arg, indices, dtypes=(torch.int32,), dim=3, device=device)
    c.value(arg, _all(indices.shape[0] == b, indices.shape[1] == s_q), f"[b={b}, s_q={s_q}, {topk}]",
            lambda: f"shape {tuple(indices.shape)}")
    if lengths is not None:
        c.tensor(length_arg, lengths, dtypes=(torch.int32,), dim=1, device=device, contiguous=True)
        c.size(length_arg, lengths, 0, b, "batch size of q")


def check_sparse_mla_decode(q, kv_cache, indices, topk_length, attn_sink, extra_kv_cache, extra_indices,
                            extra_topk_length, head_dim_v, softmax_scale, tile_scheduler_metadata,
                            num_splits) -> None:
    c = _Checker("sparse_mla_decode")
    # The cache layout is told by the last dimension: 584 = DeepSeek V4 pages (d_qk 512), else the
    # 656-byte V3.2 record (d_qk 576); q and the extra cache must match it.
    v4 = isinstance(kv_cache, torch.Tensor) and kv_cache.dim() == 4 and kv_cache.shape[3] == V4_TOKEN_BYTES
    check_cache = check_fp8_v4_cache if v4 else _check_fp8_cache
    _check_q(c, q, (torch.bfloat16,), d_qk=(V4_D_QK,) if v4 else (D_QK,))
    dev = q.device
    b, s_q, h_q = q.shape[0], q.shape[1], q.shape[2]
    check_cache(c, "kv_cache", kv_cache, dev)
    _check_topk_indices(c, "indices", indices, "topk_length", topk_length, "topk", b, s_q, dev)
    if attn_sink is not None:
        c.tensor("attn_sink", attn_sink, dtypes=(torch.float32,), dim=1, device=dev, contiguous=True)
        c.size("attn_sink", attn_sink, 0, h_q, "h_q")
    if extra_kv_cache is not None:
        check_cache(c, "extra_kv_cache", extra_kv_cache, dev)
        c.value("extra_indices", extra_indices is not None, "given when extra_kv_cache is given", None)
    else:
        c.value("extra_indices", extra_indices is None, "None when extra_kv_cache is None", "a tensor")
        c.value("extra_topk_length", extra_topk_length is None, "None when extra_kv_cache is None", "a tensor")
    if extra_indices is not None:  # (extra_topk_length without it was refused above)
        _check_topk_indices(c, "extra_indices", extra_indices, "extra_topk_length", extra_topk_length, "extra_topk",
                            b, s_q, dev)
    c.value("head_dim_v", head_dim_v == D_V, str(D_V), head_dim_v)
    c.scale("softmax_scale", softmax_scale)
    _check_plan(c, tile_scheduler_metadata, num_splits, b, dev)


def check_sparse_mla_prefill(q, kv, indices, softmax_scale, head_dim_v, attn_sink, topk_length) -> None:
    c = _Checker("sparse_mla_prefill")
    c.tensor("q", q, dtypes=(torch.bfloat16,), dim=3)
    dev = q.device
    s_q, h_q, d_qk = q.shape
    c.value("q", _all(d_qk in (D_QK, D_V), h_q >= 1, h_q <= MAX_HEADS_Q),
            f"[s_q, h_q, d_qk] with d_qk 576 or 512 and h_q in 1..{MAX_HEADS_Q}", lambda: f"shape {tuple(q.shape)}")
    c.tensor("kv", kv, dtypes=(torch.bfloat16,), dim=3, device=dev)
    c.value("kv", _all(kv.shape[1] == 1, kv.shape[2] == d_qk), f"[s_kv, 1, {d_qk}]", lambda: f"shape {tuple(kv.shape)}")
    c.tensor("indices", indices, dtypes=(torch.int32,), dim=3, device=dev)
    c.value("indices", _all(indices.shape[0] == s_q, indices.shape[1] == 1), f"[s_q={s_q}, 1, topk]",
            lambda: f"shape {tuple(indices.shape)}")
    c.value("head_dim_v", head_dim_v == D_V, str(D_V), head_dim_v)
    c.scale("softmax_scale", softmax_scale)
    if attn_sink is not None:
        c.tensor("attn_sink", attn_sink, dtypes=(torch.float32,), dim=1, device=dev, contiguous=True)
        c.size("attn_sink", attn_sink, 0, h_q, "h_q")
    if topk_length is not None:
        c.tensor("topk_length", topk_length, dtypes=(torch.int32,), dim=1, device=dev, contiguous=True)
        c.size("topk_length", topk_length, 0, s_q, "s_q")


def _check_scale_tensor(c: _Checker, arg: str, t, device, device_of: str = "kv_c") -> None:
    """A float32 tensor with one element (shape [] or [1]) on ``device``; its value is never read here."""
    if not isinstance(t, torch.Tensor):
        c.fail(arg, "a Tensor", type(t).__name__)
    if t.dtype != torch.float32:
        c.fail(arg, "of dtype torch.float32", t.dtype)
    c.value(arg, t.dim() <= 1, "a 1-element tensor of shape [] or [1]", lambda: f"shape {tuple(t.shape)}")
    c.value(arg, t.numel() == 1, "a 1-element tensor of shape [] or [1]", lambda: f"shape {tuple(t.shape)}")
    if t.device != device:
        c.fail(arg, f"on device {device} (the device of {device_of}; it is read on the device)", t.device)


def check_concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale=None) -> None:
    c = _Checker("concat_and_cache_mla")
    c.value("kv_cache_dtype", kv_cache_dtype in KV_CACHE_DTYPES, " or ".join(map(repr, KV_CACHE_DTYPES)),
            repr(kv_cache_dtype))
    v4 = kv_cache_dtype == "fp8_ds_mla_v4"
    per_tensor = kv_cache_dtype in PER_TENSOR_FP8_DTYPES
    c.tensor("kv_c", kv_c, dtypes=HALF_DTYPES, dim=2)
    dev = kv_c.device
    if v4:
        c.size("kv_c", kv_c, 1, V4_D_NOPE, "latent width of the fp8_ds_mla_v4 cache")
    else:
        c.size("kv_c", kv_c, 1, D_V, "latent width")
    c.tensor("k_pe", k_pe, dtypes=(kv_c.dtype,), dim=2, device=dev)
    c.size("k_pe", k_pe, 1, D_QK - D_V, "rope width")
    c.size("k_pe", k_pe, 0, kv_c.shape[0], "number of tokens of kv_c")
    c.tensor("slot_mapping", slot_mapping, dtypes=(torch.int64,), dim=1, device=dev, contiguous=True)
    c.size("slot_mapping", slot_mapping, 0, kv_c.shape[0], "number of tokens of kv_c")
    # The per-tensor cache needs its scale; the other cache types compute their own scales and ignore
    # it (engines pass their layer's scale whatever the cache type), but a given scale must still be
    # a proper scale tensor.
    if per_tensor:
        c.value("scale", scale is not None, f"a float32 tensor of one element for kv_cache_dtype "
                f"{kv_cache_dtype!r} (the per-tensor scale)", None)
    if scale is not None:
        _check_scale_tensor(c, "scale", scale, dev)
    if kv_cache_dtype == "auto":
        c.tensor("kv_cache", kv_cache, dtypes=(kv_c.dtype,), dim=4, device=dev, contiguous=True)
        c.size("kv_cache", kv_cache, 3, D_QK, "[num_blocks, page_size, 1, 576]")
    elif per_tensor:
        c.tensor("kv_cache", kv_cache, dtypes=FP8_CACHE_DTYPES, dim=4, device=dev, contiguous=True)
        c.size("kv_cache", kv_cache, 3, D_QK,
               f"[num_blocks, page_size, 1, 576]: one e4m3 byte per value for kv_cache_dtype {kv_cache_dtype!r}")
    elif v4:
        c.value("kv_c", kv_c.dtype == torch.bfloat16, "bfloat16 for the fp8_ds_mla_v4 cache", kv_c.dtype)
        check_fp8_v4_cache(c, "kv_cache", kv_cache, dev)
    else:
        c.value("kv_c", kv_c.dtype == torch.bfloat16, "bfloat16 for the fp8_ds_mla cache", kv_c.dtype)
        _check_fp8_cache(c, "kv_cache", kv_cache, dev)
        c.value("kv_cache", kv_cache.is_contiguous(), "contiguous", f"strides {tuple(kv_cache.stride())}")
    c.size("kv_cache", kv_cache, 2, 1, "h_kv = 1")


def check_quantize_kv_fp8(kv) -> None:
    c = _Checker("quantize_kv_fp8")
    c.value("kv", isinstance(kv, torch.Tensor) and kv.dim() >= 1, "a tensor of shape [..., 576]", type(kv).__name__)
    c.tensor("kv", kv, dtypes=(torch.bfloat16,), dim=kv.dim())
    c.size("kv", kv, -1, D_QK, "512 latent + 64 rope")


def check_dequantize_kv_fp8(kv_fp8) -> None:
    c = _Checker("dequantize_kv_fp8")
    c.value("kv_fp8", isinstance(kv_fp8, torch.Tensor) and kv_fp8.dim() >= 1, "a tensor of shape [..., 656]",
            type(kv_fp8).__name__)
    c.tensor("kv_fp8", kv_fp8, dtypes=FP8_CACHE_DTYPES, dim=kv_fp8.dim())
    c.size("kv_fp8", kv_fp8, -1, FP8_RECORD_BYTES, V32_RECORD_WHAT)


# --------------------------------------------------------------------------------------------
# FP8 "V4" paged cache (torch_flashmla/kv_cache.py, V4 section)
# --------------------------------------------------------------------------------------------
V32_RECORD_WHAT = "bytes of the V3.2 FP8 record; a 584-byte V4 cache goes to the *_v4 ops / 'fp8_ds_mla_v4'"


def check_fp8_v4_cache(c: _Checker, arg: str, cache, device=None) -> None:
    """A V4 paged cache: ``[num_blocks, page_size, 1, 584]`` uint8/float8_e4m3fn, ``stride(3) == 1``,
    ``stride(1) == 584`` (page_size > 1), ``stride(0)`` a multiple of 8 and ``>= 584 * page_size``
    (num_blocks > 1). Reads sizes and strides only."""
    c.tensor(arg, cache, dtypes=FP8_CACHE_DTYPES, dim=4, device=device)
    c.size(arg, cache, 3, V4_TOKEN_BYTES,
           "bytes per token of the V4 FP8 cache; a 656-byte V3.2 cache goes to the V3.2 ops / 'fp8_ds_mla'")
    c.size(arg, cache, 2, 1, "h_kv = 1")
    num_blocks, page_size = cache.shape[0], cache.shape[1]
    page_stride, token_stride = cache.stride(0), cache.stride(1)
    c.value(arg, (page_size <= 1) | (token_stride == V4_TOKEN_BYTES),
            f"a V4 cache with stride(1) == {V4_TOKEN_BYTES} (tokens of a page back to back)",
            lambda: f"strides {tuple(cache.stride())}")
    c.value(arg, (num_blocks <= 1) | ((page_stride >= page_size * V4_TOKEN_BYTES)
                                      & (page_stride % V4_STRIDE_ALIGN == 0)),
            f"a V4 cache whose page stride stride(0) is a multiple of {V4_STRIDE_ALIGN} and at least "
            f"{V4_TOKEN_BYTES} * page_size (kv_cache.new_fp8_v4_cache allocates one)",
            lambda: f"shape {tuple(cache.shape)}, strides {tuple(cache.stride())}")


def check_quantize_kv_fp8_v4(kv) -> None:
    c = _Checker("quantize_kv_fp8_v4")
    c.tensor("kv", kv, dtypes=(torch.bfloat16,), dim=4)
    c.size("kv", kv, 3, V4_D_QK, f"[num_blocks, page_size, 1, {V4_D_QK}]: {V4_D_NOPE} latent + {V4_D_ROPE} rope")
    c.size("kv", kv, 2, 1, "h_kv = 1")


def check_dequantize_kv_fp8_v4(kv_fp8) -> None:
    c = _Checker("dequantize_kv_fp8_v4")
    check_fp8_v4_cache(c, "kv_fp8", kv_fp8)


# --------------------------------------------------------------------------------------------
# dense MHA-mode prefill (varlen)
# --------------------------------------------------------------------------------------------
# (d_qk, d_v) pairs of mha_prefill: DeepSeek's MHA-mode prefill (128 nope + 64 rope, v 128) and
# plain head dim 128. The SM90 kernel is specialised for exactly these.
MHA_PREFILL_HEAD_DIMS = ((192, 128), (128, 128))


def _non_negative_int(c: _Checker, arg: str, x) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, torch.SymInt)):
        c.fail(arg, "a non-negative int", repr(x))
    c.value(arg, x >= 0, "a non-negative int", x)


def check_mha_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                      causal) -> None:
    """Metadata only. The values of ``cu_seqlens_*`` are not checked (no host sync); every value has
    the meaning defined by the reference ``mha_prefill`` (lengths clamped to ``[0, max_seqlen_*]``,
    rows outside the tensors skipped, rows of no sequence giving out = 0, lse = +inf)."""
    c = _Checker("mha_prefill")
    c.tensor("q", q, dtypes=HALF_DTYPES, dim=3)
    dev = q.device
    total_q, h_q, d_qk = q.shape
    pairs = " or ".join(f"({a}, {b})" for a, b in MHA_PREFILL_HEAD_DIMS)
    d_qk_ok = False
    for a, _ in MHA_PREFILL_HEAD_DIMS:
        d_qk_ok = d_qk_ok | (d_qk == a)
    c.value("q", d_qk_ok,
            f"[total_q, h_q, d_qk] with d_qk 192 or 128 ((d_qk, d_v) in {pairs})",
            lambda: f"shape {tuple(q.shape)}")
    c.value("q", h_q >= 1, "[total_q, h_q >= 1, d_qk]", lambda: f"shape {tuple(q.shape)}")
    c.tensor("k", k, dtypes=(q.dtype,), dim=3, device=dev)
    h_k = k.shape[1]
    c.value("k", _all(k.shape[2] == d_qk, h_k >= 1),
            f"[total_k, h_k, d_qk={d_qk}] with h_k >= 1", lambda: f"shape {tuple(k.shape)}")
    c.value("k", h_q % h_k == 0, f"of h_k dividing h_q={h_q} (GQA/MQA)", lambda: f"h_k {h_k}")
    c.tensor("v", v, dtypes=(q.dtype,), dim=3, device=dev)
    c.value("v", _all(v.shape[0] == k.shape[0], v.shape[1] == h_k),
            f"[total_k={k.shape[0]}, h_k={h_k}, d_v] (k's first two sizes)", lambda: f"shape {tuple(v.shape)}")
    c.value("v", _all(*(((d_qk != a) | (v.shape[2] == b)) for a, b in MHA_PREFILL_HEAD_DIMS)),
            f"of d_v 128 ((d_qk, d_v) in {pairs})", lambda: f"shape {tuple(v.shape)}")
    for arg, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        c.tensor(arg, t, dtypes=(torch.int32,), dim=1, device=dev, contiguous=True)
    c.value("cu_seqlens_q", cu_seqlens_q.shape[0] >= 1, "int32 [batch + 1]",
            lambda: f"shape {tuple(cu_seqlens_q.shape)}")
    c.size("cu_seqlens_k", cu_seqlens_k, 0, cu_seqlens_q.shape[0], "batch + 1, as cu_seqlens_q")
    _non_negative_int(c, "max_seqlen_q", max_seqlen_q)
    _non_negative_int(c, "max_seqlen_k", max_seqlen_k)
    c.scale("softmax_scale", softmax_scale)
    c.value("causal", isinstance(causal, bool), "a bool", repr(causal))
