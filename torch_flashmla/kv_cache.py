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


def concat_and_cache_mla(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, kv_cache_dtype: str) -> None:
    """Write tokens into a paged cache in place (reference, any device, no host sync).

    kv_c [T, 512], k_pe [T, 64]; kv_cache [num_blocks, page_size, 1, 576] (``"auto"``, kv_c's dtype)
    or [num_blocks, page_size, 1, 656] uint8/float8_e4m3fn (``"fp8_ds_mla"``); slot_mapping [T]
    int64 = block_id * page_size + offset; negative (or past the cache) = skip the token.
    """
    row = torch.cat([kv_c, k_pe], dim=-1)
    if kv_cache_dtype == "fp8_ds_mla":
        row = quantize_kv_fp8(row.to(torch.bfloat16))
    flat = kv_cache.view(torch.uint8) if kv_cache_dtype == "fp8_ds_mla" else kv_cache
    flat = flat.view(-1, flat.shape[-1])
    # Skipped tokens are routed to a scratch row past the end, so no host-side filtering is needed.
    num_slots = flat.shape[0]
    slots = torch.where((slot_mapping >= 0) & (slot_mapping < num_slots), slot_mapping, num_slots).long()
    padded = torch.cat([flat, flat.new_empty(1, flat.shape[-1])], dim=0)
    padded.index_copy_(0, slots, row.to(flat.dtype))
    flat.copy_(padded[:num_slots])
