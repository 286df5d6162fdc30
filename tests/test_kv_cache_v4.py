"""The DeepSeek V4 ("MODEL1") FP8 paged cache on CPU: byte layout read back by an independent decoder,
agreement with FlashMLA's quantization procedure (amax / 448, clamp at 1e-4, log2, ceil), round trip,
NaN/inf policy, cache writes, and the errors that keep V3.2 and V4 caches apart."""
import math
import struct

import pytest
import torch

import torch_flashmla as F
from torch_flashmla import kv_cache as K
from torch_flashmla import testing as T


# --- an independent reading of the bytes ------------------------------------------------------

def _e4m3(byte: int) -> float:
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 0xF, byte & 0x7
    if exp == 0xF and man == 0x7:
        return math.nan
    if exp == 0:
        return sign * man / 8 * 2.0 ** -6
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


def _bf16(lo: int, hi: int) -> float:
    return struct.unpack("<f", bytes([0, 0, lo, hi]))[0]


def storage_bytes(t: torch.Tensor) -> bytes:
    """Every byte of the storage under ``t`` (padding included)."""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).numpy().tobytes()


def decode_v4_token(cache: torch.Tensor, slot: int, raw: bytes = None) -> list:
    """Token ``slot`` of a V4 cache -> 512 floats, from the raw storage bytes and the documented offsets."""
    page_size, page_stride = cache.shape[1], cache.stride(0)
    raw = storage_bytes(cache) if raw is None else raw
    base = cache.storage_offset() + (slot // page_size) * page_stride
    t = slot % page_size
    data = raw[base + 576 * t: base + 576 * t + 576]
    scales = raw[base + 576 * page_size + 8 * t: base + 576 * page_size + 8 * t + 8]
    out = []
    for j in range(448):
        s = scales[j // 64]
        scale = math.nan if s == 0xFF else 2.0 ** (s - 127)
        out.append(_e4m3(data[j]) * scale)
    out += [_bf16(data[448 + 2 * i], data[449 + 2 * i]) for i in range(64)]
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# --- FlashMLA's procedure, as its test quantizer states it (fp32 division, log2, ceil) --------

def procedure_quantize(x: torch.Tensor):
    """x [n, 512] bf16 (finite) -> (latent bytes [n, 448], scale bytes [n, 7], rope bytes [n, 128])."""
    vals, scales = [], []
    for j in range(7):
        tile = x[:, 64 * j: 64 * j + 64]
        inv = tile.abs().amax(dim=-1).float() / 448.0
        scale = torch.pow(2, inv.clamp_min(1e-4).log2().ceil()).float()
        scales.append(scale.to(torch.float8_e8m0fnu).view(torch.uint8))
        vals.append((tile.float() / scale[:, None]).to(torch.float8_e4m3fn).view(torch.uint8))
    return torch.cat(vals, 1), torch.stack(scales, 1), x[:, 448:].contiguous().view(torch.uint8)


def adversarial_rows() -> torch.Tensor:
    """Finite bf16 rows: every finite bit pattern, amax at 448 * 2^k and its neighbours, the 1e-4
    clamp, zeros and denormals."""
    g = torch.Generator().manual_seed(3)
    allbits = torch.arange(65536, dtype=torch.int32)
    finite = allbits[(allbits & 0x7F80) != 0x7F80]
    shuffled = finite[torch.randperm(finite.numel(), generator=g)]
    rows = [shuffled[: (shuffled.numel() // 512) * 512].view(-1, 512)]
    mags = (finite & 0x7FFF).unique(sorted=True)          # sorted: tiles of similar magnitude
    rows.append(mags[: (mags.numel() // 512) * 512].view(-1, 512))
    boundary = []
    for k in range(-140, 121):
        for d in (-1, 0, 1):
            e = (0x43E0 >> 7) + k
            if 0 <= e < 255:
                b = ((e << 7) | (0x43E0 & 0x7F)) + d
                if 0 < b < 0x7F80:
                    boundary.append(b)
    tiles = torch.tensor(boundary, dtype=torch.int32)[:, None].expand(-1, 64).clone()
    tiles[:, 1:] = (torch.rand(tiles.shape[0], 63, generator=g) * 65536).int() & 0x3FFF  # smaller values
    rows.append(tiles.reshape(-1)[: (tiles.numel() // 512) * 512].view(-1, 512))
    clamp = torch.tensor([0.0448, 0.04479, 0.04481, 1e-30, 0.0, 2.0 ** -133]).to(torch.bfloat16)
    rows.append(clamp.view(torch.int16).int()[:, None].expand(-1, 512).clone())
    bits = torch.cat(rows).to(torch.int32)
    bits = torch.where(bits >= 32768, bits - 65536, bits)
    return bits.to(torch.int16).view(torch.bfloat16)


# --- tests -------------------------------------------------------------------------------------

def test_v4_constants_and_allocation():
    assert (K.V4_D_NOPE, K.V4_D_ROPE, K.V4_NUM_TILES, K.V4_TOKEN_BYTES) == (448, 64, 7, 584)
    for page_size, stride in ((1, 1152), (2, 1728), (64, 37440), (69, 40320), (256, 149760)):
        assert K.fp8_v4_page_stride(page_size) == stride and stride % 576 == 0
        c = K.new_fp8_v4_cache(3, page_size)
        assert c.shape == (3, page_size, 1, 584) and c.stride() == (stride, 584, 584, 1) and c.dtype == torch.uint8
    assert K.new_fp8_v4_cache(2, 4, dtype=torch.float8_e4m3fn).dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("page_size", [1, 2, 5, 64])
def test_v4_layout_read_back_independently(page_size):
    g = torch.Generator().manual_seed(page_size)
    kv = (torch.randn(3, page_size, 1, 512, generator=g) * torch.logspace(-4, 3, 512)).to(torch.bfloat16)
    cache = F.quantize_kv_fp8_v4(kv)
    assert cache.dtype == torch.uint8 and cache.shape == (3, page_size, 1, 584)
    assert cache.stride() == (K.fp8_v4_page_stride(page_size), 584, 584, 1)
    back = F.dequantize_kv_fp8_v4(cache)
    assert back.shape == (3, page_size, 1, 512) and back.dtype == torch.bfloat16
    raw = storage_bytes(cache)
    for slot in range(0, 3 * page_size, 1 if page_size < 8 else 5):
        ours = back[slot // page_size, slot % page_size, 0]
        theirs = torch.tensor(decode_v4_token(cache, slot, raw), dtype=torch.float64).to(torch.bfloat16)
        assert _same(ours, theirs), slot
    # pad bytes and the padding between pages are 0
    pages = K.fp8_v4_pages(cache)
    assert torch.all(pages[:, 576 * page_size + 7::8] == 0)
    pad = cache.stride(0) - 584 * page_size
    storage = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    for b in range(2):
        assert torch.all(storage[b * cache.stride(0) + 584 * page_size: (b + 1) * cache.stride(0)] == 0)
    assert storage.numel() == 2 * cache.stride(0) + 584 * page_size and pad >= 0


def test_v4_known_bytes():
    kv = torch.zeros(1, 2, 1, 512, dtype=torch.bfloat16)
    kv[0, 1, 0, 0] = 448.0       # tile 0 of token 1: scale 1
    kv[0, 1, 0, 1] = -1.5
    kv[0, 1, 0, 64] = 0.001      # tile 1: amax / 448 < 1e-4 -> 2^-13
    kv[0, 1, 0, 128:192] = 3.0   # tile 2: 3 / 448 -> 2^-7, values 384
    kv[0, 1, 0, 448] = 1.25      # rope
    kv[0, 1, 0, 511] = -2.0
    pages = K.fp8_v4_pages(F.quantize_kv_fp8_v4(kv))[0]
    tok = pages[576:1152]
    assert tok[0] == 0x7E and tok[1] == 0xBC and tok[128] == 0x7C   # e4m3 448, -1.5, 384
    assert tok[448:576].view(torch.bfloat16)[0] == 1.25 and tok[448:576].view(torch.bfloat16)[63] == -2.0
    scales = pages[2 * 576 + 8: 2 * 576 + 16]
    assert scales.tolist() == [127, 114, 120, 114, 114, 114, 114, 0]
    assert pages[2 * 576: 2 * 576 + 8].tolist() == [114] * 7 + [0]    # token 0: all zero -> 2^-13


@pytest.mark.parametrize("source", ["random", "adversarial"])
def test_v4_matches_flashmla_procedure(source):
    if source == "random":
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(300, 512, generator=g) * torch.pow(10.0, torch.rand(300, 1, generator=g) * 16 - 8))
        x = x.to(torch.bfloat16)
    else:
        x = adversarial_rows()
    n = x.shape[0]
    values, scales, rope = procedure_quantize(x)
    cache = F.quantize_kv_fp8_v4(x.view(n, 1, 1, 512))
    pages = K.fp8_v4_pages(cache)
    assert torch.equal(pages[:, :448], values)
    assert torch.equal(pages[:, 448:576], rope)
    assert torch.equal(pages[:, 576:583], scales)
    # FlashMLA dequantizes in bf16: e4m3 -> bf16 times e8m0 -> bf16
    want_latent = (values.view(torch.float8_e4m3fn).to(torch.bfloat16).view(n, 7, 64)
                   * scales.view(torch.float8_e8m0fnu).to(torch.bfloat16)[..., None]).view(n, 448)
    back = F.dequantize_kv_fp8_v4(cache).view(n, 512)
    assert _same(back[:, :448], want_latent)
    assert _same(back[:, 448:], x[:, 448:])


def test_v4_round_trip_within_e4m3_rounding():
    x = (torch.randn(4, 8, 1, 512) * torch.logspace(-3, 2, 8)[None, :, None, None]).to(torch.bfloat16)
    back = F.dequantize_kv_fp8_v4(F.quantize_kv_fp8_v4(x)).float()
    xf = x.float()
    scale = torch.ldexp(torch.ones(4, 8, 1, 7), K._v4_tile_scale_exponents(x[..., :448]).int())
    scale = scale.repeat_interleave(64, dim=-1)
    bound = torch.maximum(xf[..., :448].abs() * 2 ** -4, scale * 2 ** -10)
    assert torch.all((back[..., :448] - xf[..., :448]).abs() <= bound)
    assert torch.equal(back[..., 448:], xf[..., 448:])


def test_v4_nan_inf_policy():
    x = torch.randn(1, 3, 1, 512).to(torch.bfloat16)
    x[0, 0, 0, 5], x[0, 0, 0, 6] = float("inf"), float("-inf")   # token 0, tile 0: inf, no NaN
    x[0, 1, 0, 70] = -float("nan")                                # token 1, tile 1: NaN
    x[0, 2, 0, 449] = float("nan")                                # token 2: NaN in rope only
    cache = F.quantize_kv_fp8_v4(x)
    pages = K.fp8_v4_pages(cache)[0]
    sc = pages[576 * 3:].view(3, 8)
    assert sc[0, 0] == 0xFF and sc[1, 1] == 0xFF and torch.all(sc[2, :7] != 0xFF)
    tok0 = pages[:576]
    assert tok0[5] == 0x7F and tok0[6] == 0x7F
    assert torch.all((torch.cat([tok0[:5], tok0[7:64]]) & 0x7F) == 0)   # finite / inf = signed zero
    assert torch.all(pages[576 + 64: 576 + 128] == 0x7F)
    back = F.dequantize_kv_fp8_v4(cache).float()[0, :, 0]
    assert torch.isnan(back[0, :64]).all() and torch.isfinite(back[0, 64:]).all()
    assert torch.isnan(back[1, 64:128]).all() and torch.isfinite(back[1, :64]).all()
    assert torch.isfinite(back[1, 128:]).all()
    assert torch.isnan(back[2, 449]) and torch.isfinite(back[2, :449]).all()


def test_v4_dequantize_accepts_views_and_flashmla_allocation():
    x = torch.randn(4, 69, 1, 512).to(torch.bfloat16)
    cache = F.quantize_kv_fp8_v4(x)
    want = F.dequantize_kv_fp8_v4(cache)
    assert _same(F.dequantize_kv_fp8_v4(cache.view(torch.float8_e4m3fn)), want)
    # FlashMLA's allocation: [num_blocks, padded] buffer, sliced to the page bytes, viewed 4-D
    buf = torch.full((4, K.fp8_v4_page_stride(69)), 0xAB, dtype=torch.uint8)
    theirs = buf[:, :69 * 584].view(4, 69, 1, 584)
    K.fp8_v4_pages(theirs).copy_(K.fp8_v4_pages(cache))
    assert _same(F.dequantize_kv_fp8_v4(theirs.view(torch.float8_e4m3fn)), want)
    # a contiguous cache (page stride 584 * page_size) is a valid V4 cache too
    dense = torch.empty(4, 69, 1, 584, dtype=torch.uint8)
    K.fp8_v4_pages(dense).copy_(K.fp8_v4_pages(cache))
    assert _same(F.dequantize_kv_fp8_v4(dense), want)


@pytest.mark.parametrize("page_size", [1, 3, 64])
def test_v4_concat_writes_only_named_slots(page_size):
    num_blocks = 16 if page_size == 1 else 4
    num_slots = num_blocks * page_size
    a = T.cache_write_inputs(num_tokens=12, num_blocks=num_blocks, page_size=page_size,
                             kv_cache_dtype="fp8_ds_mla_v4", seed=page_size)
    a["slot_mapping"][1] = num_slots + 3          # past the cache: skipped
    cache = a["kv_cache"]
    before = storage_bytes(cache)
    F.concat_and_cache_mla(**a)
    after = storage_bytes(cache)
    rows = torch.cat([a["kv_c"], a["k_pe"]], dim=-1)
    expect = {}
    for t, slot in enumerate(a["slot_mapping"].tolist()):
        if 0 <= slot < num_slots:
            expect[slot] = t
    stride = cache.stride(0)
    diff = torch.frombuffer(bytearray(before), dtype=torch.uint8) != torch.frombuffer(bytearray(after), dtype=torch.uint8)
    changed = set(diff.nonzero().flatten().tolist())
    allowed = set()
    for slot, t in expect.items():
        b, o = divmod(slot, page_size)
        allowed |= set(range(b * stride + 576 * o, b * stride + 576 * o + 576))
        allowed |= set(range(b * stride + 576 * page_size + 8 * o, b * stride + 576 * page_size + 8 * o + 8))
        tok = torch.tensor(decode_v4_token(cache, slot), dtype=torch.float64).to(torch.bfloat16)
        ref = F.dequantize_kv_fp8_v4(F.quantize_kv_fp8_v4(rows[t].view(1, 1, 1, 512))).view(512)
        assert _same(tok, ref)
    assert changed <= allowed and len(expect) > 0


def test_v4_concat_float8_view_and_reference_agree():
    a = T.cache_write_inputs(num_tokens=9, num_blocks=3, page_size=4, kv_cache_dtype="fp8_ds_mla_v4", seed=5)
    b = dict(a, kv_cache=K.new_fp8_v4_cache(3, 4, dtype=torch.float8_e4m3fn, fill=0xFF))
    F.concat_and_cache_mla(**a)
    F.concat_and_cache_mla(**b)
    assert storage_bytes(a["kv_cache"]) == storage_bytes(b["kv_cache"])


def test_v4_compiles_without_graph_breaks():
    def step(kv_c, k_pe, cache, slots):
        F.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8_ds_mla_v4")
        return F.dequantize_kv_fp8_v4(cache)

    a = T.cache_write_inputs(num_tokens=6, num_blocks=2, page_size=8, kv_cache_dtype="fp8_ds_mla_v4", seed=2)
    expected_cache = K.new_fp8_v4_cache(2, 8, fill=0xFF)
    want = step(a["kv_c"], a["k_pe"], expected_cache, a["slot_mapping"])
    got = torch.compile(step, fullgraph=True, backend="inductor")(a["kv_c"], a["k_pe"], a["kv_cache"],
                                                                  a["slot_mapping"])
    assert _same(got, want)
    assert storage_bytes(a["kv_cache"]) == storage_bytes(expected_cache)


# --- bad input ---------------------------------------------------------------------------------

def test_v4_bad_input():
    v4 = K.new_fp8_v4_cache(2, 4)
    v32 = torch.zeros(2, 4, 1, 656, dtype=torch.uint8)
    with pytest.raises(ValueError, match="argument 'kv_fp8'.*584"):
        F.dequantize_kv_fp8_v4(v32)                      # a V3.2 cache is never read as V4
    with pytest.raises(ValueError, match="argument 'kv_fp8'.*656"):
        F.dequantize_kv_fp8(v4)                          # nor a V4 cache as V3.2 records
    with pytest.raises(ValueError, match="argument 'kv_fp8'"):
        F.dequantize_kv_fp8_v4(torch.zeros(2, 4, 2, 584, dtype=torch.uint8))        # h_kv != 1
    with pytest.raises(ValueError, match="argument 'kv_fp8'"):
        F.dequantize_kv_fp8_v4(torch.zeros(2, 4, 1, 584, dtype=torch.bfloat16))     # dtype
    with pytest.raises(ValueError, match="argument 'kv_fp8'.*stride"):
        F.dequantize_kv_fp8_v4(torch.zeros(4, 2, 1, 584, dtype=torch.uint8).transpose(0, 1))
    with pytest.raises(ValueError, match="argument 'kv_fp8'.*page stride"):
        F.dequantize_kv_fp8_v4(torch.zeros(2 * 584 * 4 + 4, dtype=torch.uint8)
                               .as_strided((2, 4, 1, 584), (584 * 4 + 4, 584, 584, 1)))
    with pytest.raises(ValueError, match="argument 'kv'"):
        F.quantize_kv_fp8_v4(torch.zeros(2, 4, 1, 576, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="argument 'kv'"):
        F.quantize_kv_fp8_v4(torch.zeros(8, 512, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="argument 'kv'"):
        F.quantize_kv_fp8_v4(torch.zeros(2, 4, 1, 512))
    a = T.cache_write_inputs(num_tokens=4, num_blocks=2, page_size=4, kv_cache_dtype="fp8_ds_mla_v4")
    with pytest.raises(ValueError, match="argument 'kv_cache'.*584"):
        F.concat_and_cache_mla(**{**a, "kv_cache": v32})
    with pytest.raises(ValueError, match="argument 'kv_cache'.*656"):
        F.concat_and_cache_mla(**{**a, "kv_cache": v4, "kv_cache_dtype": "fp8_ds_mla",
                                  "kv_c": torch.zeros(4, 512, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match="argument 'kv_c'.*448"):
        F.concat_and_cache_mla(**{**a, "kv_c": torch.zeros(4, 512, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match="argument 'kv_c'.*bfloat16"):
        F.concat_and_cache_mla(**{**a, "kv_c": a["kv_c"].half(), "k_pe": a["k_pe"].half()})
    with pytest.raises(ValueError, match="argument 'kv_cache_dtype'"):
        F.concat_and_cache_mla(**{**a, "kv_cache_dtype": "fp8_v4"})


# --- sparse decode with d_qk 512 over V4 caches (reference path) --------------------------------

def _oracle_sparse_v4(a, scale):
    """float64 attention over tokens read back by the independent byte decoder."""
    q = a["q"].double()
    b, s_q, h_q, _ = q.shape
    caches = [(a["kv_cache"], a["indices"], a["topk_length"])]
    if a["extra_kv_cache"] is not None:
        caches.append((a["extra_kv_cache"], a["extra_indices"], a["extra_topk_length"]))
    raws = [storage_bytes(c) for c, _, _ in caches]
    out = torch.zeros(b, s_q, h_q, 512, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64)
    for i in range(b):
        for t in range(s_q):
            keys = []
            for (cache, idx, length), raw in zip(caches, raws):
                n_slots = cache.shape[0] * cache.shape[1]
                limit = idx.shape[-1] if length is None else int(length[i])
                for j, ix in enumerate(idx[i, t].tolist()):
                    if j < limit and 0 <= ix < n_slots:
                        keys.append(decode_v4_token(cache, ix, raw))
            if not keys:
                continue
            k = torch.tensor(keys, dtype=torch.float64).to(torch.bfloat16).double()   # [n, 512]
            s = q[i, t] @ k.T * scale                                                  # [h_q, n]
            l = torch.logsumexp(s, dim=-1)
            o = torch.softmax(s, dim=-1) @ k
            if a["attn_sink"] is not None:
                o = o * torch.sigmoid(l - a["attn_sink"].double())[:, None]
            out[i, t], lse[i, :, t] = o, l
    return out, lse


@pytest.mark.parametrize("case", [
    T.SparseDecodeCase(b=2, h_q=8, topk=48, d_qk=512, page_size=5, num_blocks=12),
    T.SparseDecodeCase(b=3, s_q=2, h_q=4, topk=64, d_qk=512, page_size=64, num_blocks=3, with_topk_length=True,
                       with_attn_sink=True, extra_topk=40, extra_page_size=2),
], ids=["basic_page5", "extra_page2_all_options"])
def test_sparse_decode_v4_reference(case):
    a = T.sparse_decode_inputs(case, seed=21)
    scale = 512 ** -0.5
    out, lse = F.sparse_mla_decode(**a, softmax_scale=scale)
    want_out, want_lse = _oracle_sparse_v4(a, scale)
    assert out.shape == (case.b, case.s_q, case.h_q, 512) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want_out, atol=1e-2, rtol=1e-2)
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isinf(lse), ~finite)
    torch.testing.assert_close(lse.double()[finite], want_lse[finite], atol=1e-4, rtol=1e-4)


def test_sparse_decode_v4_through_compat_and_all_invalid():
    from torch_flashmla import compat
    case = T.SparseDecodeCase(b=2, s_q=2, h_q=64, topk=64, d_qk=512, page_size=64, num_blocks=4, extra_topk=32,
                              extra_page_size=2, with_attn_sink=True)
    a = T.sparse_decode_inputs(case, seed=5)
    a["indices"][1] = -1
    a["extra_indices"][1] = -1                       # request 1: nothing to attend to
    plan, _ = compat.get_mla_metadata()
    out, lse = compat.flash_mla_with_kvcache(a["q"], a["kv_cache"], None, None, 512, plan, is_fp8_kvcache=True,
                                             indices=a["indices"], attn_sink=a["attn_sink"],
                                             extra_k_cache=a["extra_kv_cache"],
                                             extra_indices_in_kvcache=a["extra_indices"])
    want, want_lse = F.sparse_mla_decode(**{k: v for k, v in a.items() if k not in ("tile_scheduler_metadata",
                                                                                    "num_splits")},
                                         tile_scheduler_metadata=plan.tile_scheduler_metadata,
                                         num_splits=plan.num_splits)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    assert torch.all(out[1] == 0) and torch.all(torch.isposinf(lse[1]))


def test_sparse_decode_v4_bad_input():
    v4 = T.sparse_decode_inputs(T.SparseDecodeCase(b=2, h_q=4, topk=16, d_qk=512, extra_topk=8), seed=1)
    v32 = T.sparse_decode_inputs(T.SparseDecodeCase(b=2, h_q=4, topk=16, extra_topk=8), seed=1)
    with pytest.raises(ValueError, match="argument 'q'.*512"):
        F.sparse_mla_decode(**{**v4, "q": v32["q"]})              # V4 cache, q of d_qk 576
    with pytest.raises(ValueError, match="argument 'q'.*576"):
        F.sparse_mla_decode(**{**v32, "q": v4["q"]})              # V3.2 records are never read as V4
    with pytest.raises(ValueError, match="argument 'extra_kv_cache'.*584"):
        F.sparse_mla_decode(**{**v4, "extra_kv_cache": v32["extra_kv_cache"]})
    with pytest.raises(ValueError, match="argument 'extra_kv_cache'.*656"):
        F.sparse_mla_decode(**{**v32, "extra_kv_cache": v4["extra_kv_cache"]})
