"""KV-cache layouts of MLA and their float32 PyTorch references.

Layouts (docs/design.md §3):

* BF16/FP16 paged cache: ``[num_blocks, page_size, h_kv, 576]``, each row = 512 latent ‖ 64 RoPE.
* FP8 "V3.2" record, 656 bytes per token, stored as ``[num_blocks, page_size, 1, 656]`` (``uint8``,
  or a ``float8_e4m3fn`` view of the same bytes):

  ======== ==================================================================
  bytes    content
  ======== ==================================================================
  0-511    512 ``float8_e4m3fn`` values of the latent part
  512-527  4 fp32 scales, one per 128-value tile
  528-655  64 bf16 RoPE values (not quantized)
  ======== ==================================================================

  Dequantized value = fp8 × scale. Scale = 2^ceil(log2(max(amax / 448, 1e-4))), evaluated exactly
  (the smallest power of two with amax <= 448 · scale, at least 2^-13), so every device gives the
  same bytes and ``x / scale`` is exact; the only rounding is e4m3's round-to-nearest-even.

NaN/inf policy (the same on every device; pinned by tests): a tile whose 128 values hold a NaN gets
the scale bits ``0x7FFFFFFF`` (NaN) and all its values ``0x7F`` (e4m3 NaN); a tile holding ±inf
and no NaN gets scale ``+inf``, its finite values become ±0 and its infinities ``0x7F``. After
dequantization such tiles read NaN (or ±0). Finite inputs never produce NaN: ``|x| / scale <= 448``.

* FP8 "per-tensor e4m3" cache (``kv_cache_dtype="fp8"``, alias ``"fp8_e4m3"``), the engines' dense FP8
  MLA cache: ``[num_blocks, page_size, 1, 576]`` ``float8_e4m3fn`` (or ``uint8`` holding the same bytes),
  one byte per value of the row 512 latent ‖ 64 RoPE, both parts quantized with one per-tensor scale
  ``s`` (a 1-element float32 tensor, read on the device: the op never looks at its value on the host).
  Stored byte = e4m3(clamp(fp32(x / s), -448, 448)): the quotient is the IEEE float32 division
  (correctly rounded), clamped to the largest finite e4m3 magnitude (saturation, as the engines'
  ``__NV_SATFINITE`` conversion does: ±inf quotients become ±448), then rounded to nearest even. The
  sign of a quotient that rounds to zero is kept (-0 is ``0x80``). A NaN quotient (NaN input, or
  ``0 / 0``, ``inf / inf`` from a zero or infinite scale) is stored as ``0x7F``, whatever its sign.
  Dequantized value = e4m3 × s. The scale is meant to be finite and positive; other values are not
  refused (that would need a host read) and give what the formula above gives (a negative scale flips
  signs, 0 saturates every non-zero value, +inf stores ±0, NaN stores ``0x7F`` everywhere).

* FP8 "V4" paged cache (DeepSeek V4, FlashMLA's "MODEL1"): d_qk 512 = 448 latent + 64 RoPE, 584 bytes
  per token split per page (all tokens' 576 data bytes, then all tokens' 8 scale bytes), stored as
  ``[num_blocks, page_size, 1, 584]`` with a padded page stride. Table, quantization and NaN policy:
  the "V4" section below (``quantize_kv_fp8_v4``, ``new_fp8_v4_cache``, ``"fp8_ds_mla_v4"`` writes).
"""
from __future__ import annotations

import torch

D_LATENT = 512          # "NoPE" part, quantized
D_ROPE = 64             # RoPE part, kept in bf16
D_QK = D_LATENT + D_ROPE  # 576
D_V = 512
FP8_TILE = 128
FP8_NUM_TILES = D_LATENT // FP8_TILE  # 4
FP8_RECORD_BYTES = D_LATENT + 4 * FP8_NUM_TILES + 2 * D_ROPE  # 656
FP8_MAX = 448.0


FP8_MIN_SCALE_EXP = -13     # 2^ceil(log2(1e-4)): the clamp of amax / 448 at 1e-4
FP8_NAN_SCALE_BITS = 0x7FFFFFFF
E4M3_NAN = 0x7F


def fp8_scales(latent: torch.Tensor) -> torch.Tensor:
    """Per-128-value power-of-two scales. ``latent [..., 512]`` -> ``[..., 4]`` float32 (NaN for a
    tile with NaN, +inf for a tile with inf)."""
    amax = latent.float().unflatten(-1, (FP8_NUM_TILES, FP8_TILE)).abs().amax(dim=-1)
    # amax = m * 2^e with m in [0.5, 1); amax <= 448 * 2^k = 0.875 * 2^(9 + k)  <=>  k >= e - 9 + (m > 0.875)
    mantissa, exponent = torch.frexp(amax)
    k = (exponent - 9 + (mantissa > 0.875).int()).clamp_min(FP8_MIN_SCALE_EXP)
    k = torch.where(amax > 0, k, FP8_MIN_SCALE_EXP)
    scales = torch.ldexp(torch.ones_like(amax), k)
    return torch.where(torch.isfinite(amax), scales, amax)


def quantize_kv_fp8(kv: torch.Tensor) -> torch.Tensor:
    """``kv [..., 576]`` bf16 -> ``[..., 656]`` uint8 records (reference, any device)."""
    lead = kv.shape[:-1]
    latent, rope = kv[..., :D_LATENT], kv[..., D_LATENT:]
    scales = fp8_scales(latent)                                            # [..., 4]
    tiles = latent.float().unflatten(-1, (FP8_NUM_TILES, FP8_TILE)) / scales.unsqueeze(-1)
    values = tiles.to(torch.float8_e4m3fn).view(torch.uint8)               # [..., 4, 128]
    # One NaN encoding whatever sign the device's NaN has; a NaN tile is NaN throughout.
    values = torch.where((values & 0x7F) == E4M3_NAN, E4M3_NAN, values)
    values = torch.where(torch.isnan(scales).unsqueeze(-1), E4M3_NAN, values).to(torch.uint8).flatten(-2)
    scale_bits = scales.contiguous().view(torch.int32)
    scale_bits = torch.where(torch.isnan(scales), FP8_NAN_SCALE_BITS, scale_bits)
    scale_bytes = scale_bits.contiguous().view(torch.uint8)               # [..., 16]
    rope_bytes = rope.to(torch.bfloat16).contiguous().view(torch.uint8)    # [..., 128]
    return torch.cat([values, scale_bytes.reshape(*lead, 16), rope_bytes.reshape(*lead, 128)], dim=-1)


def dequantize_kv_fp8(kv_fp8: torch.Tensor) -> torch.Tensor:
    """``kv_fp8 [..., 656]`` uint8 or float8_e4m3fn -> ``[..., 576]`` bf16 (reference, any device)."""
    raw = kv_fp8.view(torch.uint8)
    values = raw[..., :D_LATENT].contiguous().view(torch.float8_e4m3fn).float()
    scales = raw[..., D_LATENT:D_LATENT + 16].contiguous().view(torch.float32)   # [..., 4]
    rope = raw[..., D_LATENT + 16:].contiguous().view(torch.bfloat16)            # [..., 64]
    latent = (values.unflatten(-1, (FP8_NUM_TILES, FP8_TILE)) * scales.unsqueeze(-1)).flatten(-2)
    return torch.cat([latent.to(torch.bfloat16), rope], dim=-1)


# kv_cache_dtype names of the per-tensor e4m3 cache ("fp8_e4m3" is the engines' alias of "fp8").
PER_TENSOR_FP8_DTYPES = ("fp8", "fp8_e4m3")


def quantize_per_tensor_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [...]`` (bf16/fp16/fp32) and a 1-element float32 ``scale`` -> e4m3 bytes ``[...]`` uint8 of the
    per-tensor cache (rule in the module docstring). No host sync; the same bytes on every device:
    float32 division is IEEE on CPU and GPU (``scale`` is a tensor on x's device, never a host scalar,
    which the CUDA division would turn into a multiplication by its reciprocal), and torch's float ->
    float8_e4m3fn conversion rounds to nearest even on both."""
    q = x.float() / scale.float().reshape(())
    q = q.clamp(-FP8_MAX, FP8_MAX)                                        # saturate; NaN stays NaN
    values = q.to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.where(torch.isnan(q), E4M3_NAN, values).to(torch.uint8)  # one NaN encoding


def dequantize_per_tensor_e4m3(kv_cache: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor e4m3 bytes (uint8 or float8_e4m3fn) -> float32 values ``e4m3 * scale``."""
    return kv_cache.view(torch.uint8).view(torch.float8_e4m3fn).float() * scale.float().reshape(())


def quantize_rows_e4m3_pow2(x: torch.Tensor):
    """``x [..., d]`` -> ``(values float8_e4m3fn [..., d], factor float32 [..., 1])``: ``x * factor`` rounded to
    e4m3 (nearest even, saturating at 448), ``factor`` the power of two that brings the row's largest finite
    ``|x|`` (amax = 1.m * 2^e) closest to 448 from below: 2^(8 - e) when 1.m <= 1.75, else 2^(7 - e), exponent
    clamped to [-126, 127]; 1 for rows without a positive finite maximum. The FP8 dense decode quantizes a
    bf16 q this way (csrc/sm90/decode/dense/dense_decode_fp8.cu); dequantize as ``values.float() / factor``.
    No host sync."""
    xf = x.float()
    amax = xf.abs().nan_to_num(nan=0.0).amax(dim=-1, keepdim=True)
    bits = amax.view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 127
    k = (torch.where((bits & 0x7FFFFF) <= 0x600000, 8, 7) - e).clamp(-126, 127)
    ok = (amax > 0) & torch.isfinite(amax)
    factor = torch.where(ok, torch.ldexp(torch.ones_like(amax), k), torch.ones_like(amax))
    values = (xf * factor).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return values, factor


def concat_and_cache_mla(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, kv_cache_dtype: str, scale: torch.Tensor = None) -> None:
    """Write tokens into a paged cache in place (reference, any device, no host sync).

    kv_c [T, 512], k_pe [T, 64]; kv_cache [num_blocks, page_size, 1, 576] (``"auto"``, kv_c's dtype)
    or [num_blocks, page_size, 1, 656] uint8/float8_e4m3fn (``"fp8_ds_mla"``), or
    [num_blocks, page_size, 1, 576] float8_e4m3fn/uint8 (``"fp8"`` / ``"fp8_e4m3"``: per-tensor e4m3
    with ``scale``, a 1-element float32 tensor), or kv_c [T, 448] into a V4 cache
    [num_blocks, page_size, 1, 584] (``"fp8_ds_mla_v4"``, see below); slot_mapping [T] int64 =
    block_id * page_size + offset; negative (or past the cache) = skip the token. ``scale`` is used by
    the per-tensor cache only; the other cache types ignore it.
    """
    if kv_cache_dtype == "fp8_ds_mla_v4":
        _concat_and_cache_fp8_v4(kv_c, k_pe, kv_cache, slot_mapping)
        return
    row = torch.cat([kv_c, k_pe], dim=-1)
    fp8 = kv_cache_dtype != "auto"
    if kv_cache_dtype == "fp8_ds_mla":
        row = quantize_kv_fp8(row.to(torch.bfloat16))
    elif kv_cache_dtype in PER_TENSOR_FP8_DTYPES:
        row = quantize_per_tensor_e4m3(row, scale)
    flat = kv_cache.view(torch.uint8) if fp8 else kv_cache
    flat = flat.view(-1, flat.shape[-1])
    # Skipped tokens are routed to a scratch row past the end, so no host-side filtering is needed.
    num_slots = flat.shape[0]
    slots = torch.where((slot_mapping >= 0) & (slot_mapping < num_slots), slot_mapping, num_slots).long()
    padded = torch.cat([flat, flat.new_empty(1, flat.shape[-1])], dim=0)
    padded.index_copy_(0, slots, row.to(flat.dtype))
    flat.copy_(padded[:num_slots])


# ================================================================================================
# FP8 "V4" paged cache (DeepSeek V4, FlashMLA's "MODEL1" layout)
# ================================================================================================
# FP8 "V4" cache: d_qk = 512 = 448 latent ("NoPE") + 64 RoPE, d_v = 512, h_kv = 1. Unlike the V3.2
# record, the bytes of a token are split in two places of its page, so the format is defined per page:
#
#   =================================  ==========================================================
#   bytes of page ``p`` (``P`` tokens)  content
#   =================================  ==========================================================
#   ``576*t + 0 .. 576*t + 447``         token ``t``: 448 ``float8_e4m3fn`` latent values
#   ``576*t + 448 .. 576*t + 575``       token ``t``: 64 bf16 RoPE values (not quantized)
#   ``576*P + 8*t + j`` (j = 0..6)        token ``t``: UE8M0 scale of latent tile ``j`` (values 64j..64j+63)
#   ``576*P + 8*t + 7``                  token ``t``: pad byte (written as 0)
#   ``584*P .. page_stride - 1``          page padding (written as 0 by :func:`quantize_kv_fp8_v4`)
#   =================================  ==========================================================
#
# So 584 bytes per token; a page's byte stride is ``page_stride >= 584 * P``, which
# :func:`fp8_v4_page_stride` rounds up to a multiple of 576 as FlashMLA allocates it.
#
# Tensor form (as FlashMLA's ``flash_mla_with_kvcache`` takes it): ``[num_blocks, page_size, 1, 584]``,
# ``uint8`` or a ``float8_e4m3fn`` view, strides ``(page_stride, 584, 584, 1)``. Element
# ``[b, t, 0, :]`` is *not* token ``t``'s record: the tensor is a byte window whose shape carries
# ``page_size`` and the token size and whose ``stride(0)`` is the page stride; token ``t`` of page ``b``
# lives at the offsets above from the start of page ``b``. Accepted: ``stride(3) == 1``, ``stride(1) ==
# 584`` (when ``page_size > 1``), ``stride(0)`` a multiple of 8 and ``>= 584 * page_size`` (when
# ``num_blocks > 1``). Indices and slots address tokens as ``block_id * page_size + offset``.
#
# A V3.2 cache (last dimension 656) and a V4 cache (last dimension 584) are told apart by that size;
# the ops refuse the other layout with an error naming the argument.
#
# Quantization of a token's latent tile ``x`` (64 bf16 values), as FlashMLA's test quantizer does it:
# scale = 2^ceil(log2(max(amax(|x|) / 448, 1e-4))), stored as the UE8M0 byte ``log2(scale) + 127``;
# values ``e4m3(x / scale)`` (round to nearest even). For bf16 input this equals the exact rule used
# here: the smallest power of two with ``amax <= 448 * scale``, at least 2^-13. Dequantized value =
# ``bf16(e4m3 * scale)`` (exact, as FlashMLA's bf16 product is).
#
# NaN/inf policy (UE8M0 has no infinity): a tile holding a NaN or an inf gets the scale byte 0xFF
# (UE8M0 NaN); a NaN tile stores 0x7F in all 64 values; an inf tile (no NaN) stores ±0 for its finite
# values and 0x7F for its infinities (x / inf, inf / inf, as FlashMLA computes it, with one NaN
# encoding). Such a tile dequantizes to NaN throughout. Finite inputs never produce NaN. A NaN in the
# dequantized latent part is always the bf16 bits 0x7FFF (same bytes on every device); RoPE bytes are
# copied as stored.

V4_D_NOPE = 448                       # latent part, quantized
V4_D_ROPE = 64                        # RoPE part, bf16
V4_D_QK = V4_D_NOPE + V4_D_ROPE       # 512
V4_TILE = 64
V4_NUM_TILES = V4_D_NOPE // V4_TILE   # 7
V4_TOKEN_DATA_BYTES = V4_D_NOPE + 2 * V4_D_ROPE   # 576: latent fp8 + rope bf16
V4_TOKEN_SCALE_BYTES = V4_NUM_TILES + 1           # 8: 7 UE8M0 scales + 1 pad byte
V4_TOKEN_BYTES = V4_TOKEN_DATA_BYTES + V4_TOKEN_SCALE_BYTES  # 584
V4_PAGE_ALIGN = 576                   # FlashMLA rounds the page stride up to a multiple of this
V4_STRIDE_ALIGN = 8                   # what the kernels need of a page stride (8-byte accesses)
UE8M0_BIAS = 127
UE8M0_NAN = 0xFF
BF16_NAN_BITS = 0x7FFF                # the NaN that dequantized latent values hold


def fp8_v4_page_stride(page_size: int) -> int:
    """Byte stride of a V4 page of ``page_size`` tokens: ``584 * page_size`` rounded up to 576."""
    return (page_size * V4_TOKEN_BYTES + V4_PAGE_ALIGN - 1) // V4_PAGE_ALIGN * V4_PAGE_ALIGN


def fp8_v4_cache_strides(page_size: int):
    return (fp8_v4_page_stride(page_size), V4_TOKEN_BYTES, V4_TOKEN_BYTES, 1)


def new_fp8_v4_cache(num_blocks: int, page_size: int, device=None, dtype: torch.dtype = torch.uint8,
                     fill: int = 0) -> torch.Tensor:
    """Allocate a V4 paged cache ``[num_blocks, page_size, 1, 584]`` (``uint8`` or ``float8_e4m3fn``)
    with FlashMLA's page stride; every byte, page padding included, set to ``fill``."""
    if dtype not in (torch.uint8, torch.float8_e4m3fn):
        raise ValueError(f"new_fp8_v4_cache: dtype must be torch.uint8 or torch.float8_e4m3fn, got {dtype}")
    stride = fp8_v4_page_stride(page_size)
    storage = torch.full((num_blocks * stride,), fill, dtype=torch.uint8, device=device).untyped_storage()
    out = torch.empty(0, dtype=dtype, device=device)
    return out.set_(storage, 0, (num_blocks, page_size, 1, V4_TOKEN_BYTES), fp8_v4_cache_strides(page_size))


def fp8_v4_pages(cache: torch.Tensor) -> torch.Tensor:
    """``[num_blocks, 584 * page_size]`` uint8 view of the bytes of each page of a V4 cache (aliases it)."""
    num_blocks, page_size = cache.shape[0], cache.shape[1]
    raw = cache.view(torch.uint8)
    return raw.as_strided((num_blocks, page_size * V4_TOKEN_BYTES), (raw.stride(0), 1), raw.storage_offset())


def _v4_tile_scale_exponents(latent: torch.Tensor) -> torch.Tensor:
    """``latent [..., 448]`` -> per-tile scale exponents ``[..., 7]`` float32: k of scale 2^k for
    finite tiles, NaN for a tile with NaN, inf for a tile with inf and no NaN."""
    amax = latent.float().unflatten(-1, (V4_NUM_TILES, V4_TILE)).abs().amax(dim=-1)
    # amax = m * 2^e, m in [0.5, 1): amax <= 448 * 2^k = 0.875 * 2^(9 + k)  <=>  k >= e - 9 + (m > 0.875)
    mantissa, exponent = torch.frexp(amax)
    k = (exponent - 9 + (mantissa > 0.875).int()).clamp_min(FP8_MIN_SCALE_EXP)
    k = torch.where(amax > 0, k, FP8_MIN_SCALE_EXP).float()
    return torch.where(torch.isfinite(amax), k, amax)


def _quantize_v4_tokens(x: torch.Tensor):
    """``x [..., 512]`` bf16 -> (latent bytes [..., 448], scale bytes [..., 8] incl. the 0 pad,
    rope bytes [..., 128]) uint8."""
    latent, rope = x[..., :V4_D_NOPE], x[..., V4_D_NOPE:]
    k = _v4_tile_scale_exponents(latent)                                   # [..., 7]
    finite = torch.isfinite(k)
    scales = torch.where(finite, torch.ldexp(torch.ones_like(k), torch.where(finite, k, 0.0).int()), k)
    tiles = latent.float().unflatten(-1, (V4_NUM_TILES, V4_TILE)) / scales.unsqueeze(-1)
    values = tiles.to(torch.float8_e4m3fn).view(torch.uint8)
    values = torch.where((values & 0x7F) == E4M3_NAN, E4M3_NAN, values)   # one NaN encoding
    values = torch.where(torch.isnan(k).unsqueeze(-1), E4M3_NAN, values).to(torch.uint8).flatten(-2)
    scale_bytes = torch.where(finite, k + UE8M0_BIAS, UE8M0_NAN).to(torch.uint8)
    scale_bytes = torch.cat([scale_bytes, torch.zeros_like(scale_bytes[..., :1])], dim=-1)
    rope_bytes = rope.to(torch.bfloat16).contiguous().view(torch.uint8)
    return values, scale_bytes, rope_bytes


def _dequantize_v4_tokens(data: torch.Tensor, scale_bytes: torch.Tensor) -> torch.Tensor:
    """``data [..., 576]`` and ``scale_bytes [..., 8]`` uint8 -> ``[..., 512]`` bf16."""
    values = data[..., :V4_D_NOPE].contiguous().view(torch.float8_e4m3fn).float()
    scales = scale_bytes[..., :V4_NUM_TILES].contiguous().view(torch.float8_e8m0fnu).float()
    rope = data[..., V4_D_NOPE:].contiguous().view(torch.bfloat16)
    latent = (values.unflatten(-1, (V4_NUM_TILES, V4_TILE)) * scales.unsqueeze(-1)).flatten(-2).to(torch.bfloat16)
    # One NaN encoding on every device (the sign and payload of a computed NaN are the device's choice).
    latent = torch.where(torch.isnan(latent), BF16_NAN_BITS, latent.view(torch.int16)).view(torch.bfloat16)
    return torch.cat([latent, rope], dim=-1)


def _v4_split(pages: torch.Tensor, page_size: int):
    """Page bytes ``[n, 584 * P]`` -> (data ``[n, P, 576]``, scales ``[n, P, 8]``), views."""
    n = pages.shape[0]
    data = pages[:, :page_size * V4_TOKEN_DATA_BYTES].unflatten(1, (page_size, V4_TOKEN_DATA_BYTES))
    scales = pages[:, page_size * V4_TOKEN_DATA_BYTES:].unflatten(1, (page_size, V4_TOKEN_SCALE_BYTES))
    return data.view(n, page_size, V4_TOKEN_DATA_BYTES), scales.view(n, page_size, V4_TOKEN_SCALE_BYTES)


def quantize_kv_fp8_v4(kv: torch.Tensor) -> torch.Tensor:
    """``kv [num_blocks, page_size, 1, 512]`` bf16 -> V4 paged cache ``[num_blocks, page_size, 1, 584]``
    uint8 with page stride :func:`fp8_v4_page_stride` (reference, any device). Storage ends with the
    last page's scales; the padding between pages is 0."""
    num_blocks, page_size = kv.shape[0], kv.shape[1]
    stride = fp8_v4_page_stride(page_size)
    cache = torch.empty_strided((num_blocks, page_size, 1, V4_TOKEN_BYTES), fp8_v4_cache_strides(page_size),
                                dtype=torch.uint8, device=kv.device)
    values, scale_bytes, rope_bytes = _quantize_v4_tokens(kv.reshape(num_blocks, page_size, V4_D_QK))
    data, scales = _v4_split(fp8_v4_pages(cache), page_size)
    data[..., :V4_D_NOPE] = values
    data[..., V4_D_NOPE:] = rope_bytes
    scales.copy_(scale_bytes)
    pad = stride - page_size * V4_TOKEN_BYTES
    if num_blocks > 1 and pad > 0:
        cache.as_strided((num_blocks - 1, pad), (stride, 1), page_size * V4_TOKEN_BYTES).zero_()
    return cache


def dequantize_kv_fp8_v4(kv_fp8: torch.Tensor) -> torch.Tensor:
    """V4 paged cache ``[num_blocks, page_size, 1, 584]`` uint8/float8_e4m3fn -> ``[num_blocks,
    page_size, 1, 512]`` bf16 (reference, any device)."""
    num_blocks, page_size = kv_fp8.shape[0], kv_fp8.shape[1]
    data, scales = _v4_split(fp8_v4_pages(kv_fp8), page_size)
    return _dequantize_v4_tokens(data, scales).view(num_blocks, page_size, 1, V4_D_QK)


def gather_fp8_v4_tokens(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Dequantized tokens ``[..., 512]`` bf16 of a V4 cache at in-range ``slots`` (int64,
    ``block_id * page_size + offset``); the caller masks invalid slots beforehand."""
    page_size = cache.shape[1]
    data, scales = _v4_split(fp8_v4_pages(cache), page_size)
    block, offset = slots // page_size, slots % page_size
    return _dequantize_v4_tokens(data[block, offset], scales[block, offset])


def _concat_and_cache_fp8_v4(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                             slot_mapping: torch.Tensor) -> None:
    """``"fp8_ds_mla_v4"`` cache write: kv_c [T, 448], k_pe [T, 64] bf16 into a V4 cache; slots < 0
    or past the cache are skipped (no host sync: they go to a scratch row)."""
    num_blocks, page_size = kv_cache.shape[0], kv_cache.shape[1]
    num_slots = num_blocks * page_size
    values, scale_bytes, rope_bytes = _quantize_v4_tokens(torch.cat([kv_c, k_pe], dim=-1).to(torch.bfloat16))
    data, scales = _v4_split(fp8_v4_pages(kv_cache), page_size)
    slots = torch.where((slot_mapping >= 0) & (slot_mapping < num_slots), slot_mapping, num_slots).long()
    for region, rows in ((data, torch.cat([values, rope_bytes], dim=-1)), (scales, scale_bytes)):
        width = region.shape[-1]
        work = torch.cat([region.reshape(num_slots, width), region.new_empty(1, width)], dim=0)
        work.index_copy_(0, slots, rows)
        region.copy_(work[:num_slots].view(num_blocks, page_size, width))
