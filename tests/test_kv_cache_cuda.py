"""Bit-exact tests of the CUDA KV-cache kernels (torch.ops.flashmla_cuda.*) against the PyTorch
reference torch_flashmla/kv_cache.py evaluated on the same GPU.

The kernels come from the built extension (torch_flashmla._C) when it carries them; with
FLASHMLA_KV_JIT=1 they are compiled on the spot from csrc/api/kv_cache_cuda.cpp and
csrc/kv_cache/*.cu (torch.utils.cpp_extension.load), so the tests run without a full build.
Every comparison is on raw bytes (uint8 / int16 views), NaN payloads included.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import pathlib

import pytest
import torch

pytestmark = pytest.mark.cuda

ROOT = pathlib.Path(__file__).resolve().parents[1]
NVCC_FLAGS = ["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr",
              "--use_fast_math", "-lineinfo", "-DNDEBUG", "-U__CUDA_NO_HALF_OPERATORS__",
              "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
              "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]


def _reference_module():
    try:
        from torch_flashmla import kv_cache
        return kv_cache
    except Exception:  # package not built here: load the pure-PyTorch file alone
        spec = importlib.util.spec_from_file_location("_flashmla_kv_cache_ref", ROOT / "torch_flashmla" / "kv_cache.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


def _have_ops() -> bool:
    try:
        torch.ops.flashmla_cuda.quantize_kv_fp8.default
        torch.ops.flashmla_cuda.concat_and_cache_mla.default
        return True
    except (AttributeError, RuntimeError):
        return False


def load_kv_cache_ops():
    """torch.ops.flashmla_cuda with the KV-cache kernels, or None."""
    if not torch.cuda.is_available():
        return None
    if not _have_ops():
        try:
            import torch_flashmla  # noqa: F401
        except Exception:
            pass
    if not _have_ops() and os.environ.get("FLASHMLA_KV_JIT", "0") == "1":
        from torch.utils.cpp_extension import load
        sources = [str(ROOT / "csrc" / "api" / "kv_cache_cuda.cpp")] + sorted(glob.glob(str(ROOT / "csrc" / "kv_cache" / "*.cu")))
        load(name="flashmla_kv_cache_jit", sources=sources, extra_include_paths=[str(ROOT / "csrc")],
             extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=NVCC_FLAGS, is_python_module=False,
             verbose=False)
    return torch.ops.flashmla_cuda if _have_ops() else None


ref = _reference_module()
OPS = load_kv_cache_ops()
if OPS is None:
    pytest.skip("needs a CUDA GPU and the flashmla_cuda KV-cache kernels (build with FLASHMLA_BUILD_CUDA=1 "
                "or set FLASHMLA_KV_JIT=1)", allow_module_level=True)
if torch.cuda.get_device_capability() < (9, 0):
    pytest.skip("the kernels are built for sm_90a", allow_module_level=True)

DEV = torch.device("cuda")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_same_bytes(out: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    a, b = _bits(out), _bits(expected)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    diff = (a != b)
    if diff.any():
        idx = diff.nonzero()[:8].tolist()
        samples = [(i, hex(int(a[tuple(i)])), hex(int(b[tuple(i)]))) for i in idx]
        raise AssertionError(f"{what}: {int(diff.sum())} of {diff.numel()} bytes differ; "
                             f"first (index, ours, ref): {samples}")


def bf16_from_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).to(torch.int16).view(torch.bfloat16)


def random_kv(n: int, gen: torch.Generator, spread: float = 8.0) -> torch.Tensor:
    """Rows of normal values with per-row magnitudes 10^U(-spread, spread)."""
    x = torch.randn(n, 576, generator=gen, device=DEV)
    mag = torch.pow(10.0, (torch.rand(n, 1, generator=gen, device=DEV) * 2 - 1) * spread)
    return (x * mag).to(torch.bfloat16)


def adversarial_kv() -> torch.Tensor:
    """Rows that stress every branch: zeros, signed zeros, bf16 denormals, the clamp, 448*2^k
    boundaries and their bf16 neighbours, e4m3 rounding ties, max finite, inf, NaN of both signs
    and several payloads. Built from bf16 bit patterns so NaN payloads survive."""
    g = torch.Generator(device=DEV).manual_seed(7)
    rows = []  # int16 bit patterns [k, 576]

    def bits(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16).view(torch.int16)

    def rope(k: int) -> torch.Tensor:
        return bits(torch.randn(k, 64, generator=g, device=DEV))

    def tile_with(amax_bits: int, fill_scale: float = 1.0, neg: bool = False) -> torch.Tensor:
        amax = bf16_from_bits(torch.tensor([amax_bits], device=DEV)).float()
        t = bits((torch.rand(128, generator=g, device=DEV) * 2 - 1) * amax * fill_scale)
        i = int(torch.randint(0, 128, (1,), generator=g, device=DEV))
        t[i] = torch.tensor(amax_bits | (0x8000 if neg else 0), dtype=torch.int32).to(torch.int16)
        return t

    def row(tiles) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tiles] + [rope(1).view(-1)]).view(1, 576)

    rows.append(torch.zeros(1, 576, dtype=torch.int16, device=DEV))
    rows.append(torch.full((1, 576), -32768, dtype=torch.int16, device=DEV))  # -0
    allbits = torch.arange(65536, device=DEV, dtype=torch.int32).to(torch.int16)
    finite = allbits[(allbits.int() & 0x7F80) != 0x7F80]
    # finite patterns shuffled, and sorted by magnitude (denormal-only tiles, tiny and huge tiles)
    fin = finite[torch.randperm(finite.numel(), generator=g, device=DEV)]
    fin = fin[: (fin.numel() // 512) * 512].view(-1, 512)
    rows.append(torch.cat([fin, rope(fin.shape[0])], 1))
    mag = (finite.int() & 0x7FFF).unique(sorted=True)
    sgn = (torch.rand(mag.shape, generator=g, device=DEV) < 0.5).int() * 0x8000
    srt = ((mag | sgn).to(torch.int32) - ((mag | sgn) >= 0x8000).int() * 65536).to(torch.int16)
    srt = srt[: (srt.numel() // 512) * 512].view(-1, 512)
    rows.append(torch.cat([srt, rope(srt.shape[0])], 1))
    # every pattern incl. inf/NaN, shuffled (most tiles hold a non-finite value)
    allp = allbits[torch.randperm(65536, generator=g, device=DEV)].view(-1, 512)
    rows.append(torch.cat([allp, rope(allp.shape[0])], 1))
    # amax at 448 * 2^k and its bf16 neighbours over the whole exponent range
    base = 0x43E0  # bf16(448)
    for k in range(-140, 128):
        e = (base >> 7) + k
        if not (0 <= e < 255):
            continue
        for d in (-1, 0, 1):
            b = ((e << 7) | (base & 0x7F)) + d
            if not (0 < b < 0x7F80):
                continue
            rows.append(row([tile_with(b), tile_with(b, 1e-3, True), tile_with(b, 1.0, True), tile_with(b, 0.5)]))
    # around the 1e-4 clamp (amax near 0.0448) and tiny amax
    for amax in torch.linspace(0.04, 0.05, 64).tolist() + [0.0448, 0.04479, 0.04481, 1e-30, 1e-38]:
        b = int(bits(torch.tensor([amax], device=DEV))[0]) & 0xFFFF
        rows.append(row([tile_with(b), tile_with(b + 1), tile_with(max(b - 1, 1)), tile_with(b, 1e-6)]))
    # e4m3 rounding ties at scale 1 (amax 448)
    halves = [0.0009765625 * i for i in range(1, 50)] + [1.0625, 1.1875, 3.25, 13.0, 26.0, 104.0, 208.0,
                                                           416.0, 440.0, 444.0, 446.0, 447.0]
    t = torch.tensor(halves + [-h for h in halves], device=DEV)
    tile = torch.zeros(128, device=DEV)
    tile[: t.numel()] = t
    tile[127] = 448.0
    rows.append(row([bits(tile), bits(tile * 2), bits(tile * 0.5), bits(-tile)]))
    # non-finite values next to finite ones: inf, -inf, NaN of both signs and payloads, max finite
    specials = [0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7F81, 0xFFFF, 0x7F7F, 0xFF7F]
    as16 = lambda v: torch.tensor(v, dtype=torch.int32).to(torch.int16)  # noqa: E731
    for s in specials:
        for other in specials + [None]:
            tiles = [bits(torch.randn(128, generator=g, device=DEV)) for _ in range(4)]
            tiles[0][5] = as16(s)
            if other is not None:
                tiles[0][77] = as16(other)
                tiles[2][3] = as16(other)
            rows.append(row(tiles))
    return torch.cat(rows).view(torch.bfloat16)


# ---------------------------------------------------------------- quantize / dequantize

@pytest.mark.parametrize("n", [1, 7, 1000, 33333])
def test_quantize_random(n):
    g = torch.Generator(device=DEV).manual_seed(n)
    kv = random_kv(n, g)
    assert_same_bytes(OPS.quantize_kv_fp8(kv), ref.quantize_kv_fp8(kv), "quantize random")


def test_quantize_adversarial():
    kv = adversarial_kv()
    out = OPS.quantize_kv_fp8(kv)
    expected = ref.quantize_kv_fp8(kv)
    # report per-part mismatches for diagnosis
    for name, sl in (("values", slice(0, 512)), ("scales", slice(512, 528)), ("rope", slice(528, 656))):
        assert_same_bytes(out[:, sl], expected[:, sl], f"quantize adversarial {name}")


def test_quantize_shapes_and_strides():
    g = torch.Generator(device=DEV).manual_seed(1)
    kv = random_kv(2 * 3 * 5, g).view(2, 3, 5, 576)
    assert_same_bytes(OPS.quantize_kv_fp8(kv), ref.quantize_kv_fp8(kv), "quantize 4-d")
    big = random_kv(300, g, spread=3)
    wide = torch.cat([big, big[:, :24]], 1)  # [300, 600]: row stride 1200 bytes, aligned
    kv2 = wide[:, :576]
    assert_same_bytes(OPS.quantize_kv_fp8(kv2), ref.quantize_kv_fp8(kv2), "quantize strided rows")
    odd = torch.cat([big, big[:, :4]], 1)[:, :576]  # row stride 1160 bytes: not 16-byte aligned
    assert_same_bytes(OPS.quantize_kv_fp8(odd), ref.quantize_kv_fp8(odd), "quantize unaligned rows")
    off = torch.cat([big.view(-1), big.view(-1)[:3]])[3:].view(300, 576)  # misaligned base pointer
    assert_same_bytes(OPS.quantize_kv_fp8(off), ref.quantize_kv_fp8(off), "quantize unaligned base")
    t = kv.transpose(0, 1)  # non-contiguous leading dims
    assert_same_bytes(OPS.quantize_kv_fp8(t), ref.quantize_kv_fp8(t), "quantize transposed")
    empty = torch.empty(0, 576, device=DEV, dtype=torch.bfloat16)
    assert OPS.quantize_kv_fp8(empty).shape == (0, 656)


@pytest.mark.parametrize("n", [1, 5, 4096, 20000])
def test_dequantize_random_bytes(n):
    g = torch.Generator(device=DEV).manual_seed(100 + n)
    raw = torch.randint(0, 256, (n, 656), generator=g, device=DEV, dtype=torch.int32).to(torch.uint8)
    assert_same_bytes(OPS.dequantize_kv_fp8(raw), ref.dequantize_kv_fp8(raw), "dequantize random bytes")
    as_fp8 = raw.view(torch.float8_e4m3fn)
    assert_same_bytes(OPS.dequantize_kv_fp8(as_fp8), ref.dequantize_kv_fp8(as_fp8), "dequantize fp8 view")


def test_dequantize_all_bytes_and_special_scales():
    g = torch.Generator(device=DEV).manual_seed(3)
    scales = torch.tensor([1.0, 2.0 ** -13, 2.0 ** 120, 2.0 ** -140, 1e-45, 3.0e38, 0.0, -0.0, -1.5,
                           float("inf"), float("-inf"), float("nan"), 2.0 ** 127, 1.0 / 3], device=DEV)
    nbits = scales.view(torch.int32)
    extra = torch.tensor([0x7FC00001, -1, 0x7F800001, 0x00000001], device=DEV, dtype=torch.int32)
    sc = torch.cat([nbits, extra]).view(torch.float32)
    rows = []
    allbytes = torch.arange(256, device=DEV, dtype=torch.int32).to(torch.uint8).repeat(2)  # 512 bytes
    for i in range(sc.numel() + 1):
        row = torch.empty(656, dtype=torch.uint8, device=DEV)
        row[:512] = allbytes[torch.randperm(512, generator=g, device=DEV)]
        if i < sc.numel():
            sv = sc[i:i + 1].repeat(4)  # keeps NaN payloads
        else:
            sv = torch.tensor([0.5, float("nan"), 2.0 ** -126, float("inf")], device=DEV)
        row[512:528] = sv.view(torch.uint8)
        row[528:] = torch.randint(0, 256, (128,), generator=g, device=DEV, dtype=torch.int32).to(torch.uint8)
        rows.append(row)
    raw = torch.stack(rows)
    raw[-1, 512:516] = extra[:1].view(torch.uint8)
    assert_same_bytes(OPS.dequantize_kv_fp8(raw), ref.dequantize_kv_fp8(raw), "dequantize specials")


def test_roundtrip_and_shapes():
    g = torch.Generator(device=DEV).manual_seed(11)
    kv = random_kv(3 * 4, g).view(3, 4, 576)
    q = OPS.quantize_kv_fp8(kv)
    assert q.dtype == torch.uint8 and q.shape == (3, 4, 656)
    assert_same_bytes(OPS.dequantize_kv_fp8(q), ref.dequantize_kv_fp8(q), "dequantize of quantized")
    wide = torch.cat([q, q[..., :16]], -1)[..., :656]  # strided rows (672 bytes)
    assert_same_bytes(OPS.dequantize_kv_fp8(wide), ref.dequantize_kv_fp8(wide.contiguous()), "dequantize strided")
    assert OPS.dequantize_kv_fp8(torch.empty(0, 656, dtype=torch.uint8, device=DEV)).shape == (0, 576)


# ---------------------------------------------------------------- concat_and_cache_mla

def _poisoned_cache(num_blocks, page_size, kv_cache_dtype, dtype, gen, pad=0):
    width = 576 if kv_cache_dtype == "auto" else 656
    if kv_cache_dtype == "auto":
        store = torch.randint(-32768, 32767, (num_blocks, page_size, 1, width + pad), generator=gen, device=DEV,
                              dtype=torch.int32).to(torch.int16).view(dtype)
    else:
        store = torch.randint(0, 256, (num_blocks, page_size, 1, width + pad), generator=gen, device=DEV,
                              dtype=torch.int32).to(torch.uint8).view(dtype)
    return store


def _inputs(num_tokens, dtype, gen, strided=False):
    if strided:  # kv_c and k_pe as slices of one [T, 576 + 32] projection output
        proj = (torch.randn(num_tokens, 608, generator=gen, device=DEV) * 3).to(dtype)
        return proj[:, :512], proj[:, 512:576]
    kv_c = (torch.randn(num_tokens, 512, generator=gen, device=DEV) * 3).to(dtype)
    k_pe = torch.randn(num_tokens, 64, generator=gen, device=DEV).to(dtype)
    return kv_c, k_pe


def _slots(num_tokens, num_slots, gen, num_skip):
    slots = torch.randperm(num_slots, generator=gen, device=DEV)[:num_tokens].clone()
    if num_skip:
        pick = torch.randperm(num_tokens, generator=gen, device=DEV)[:num_skip]
        slots[pick] = -torch.randint(1, 1000, (num_skip,), generator=gen, device=DEV)
    return slots.to(torch.int64)


CACHE_CASES = [("auto", torch.bfloat16), ("auto", torch.float16), ("fp8_ds_mla", torch.uint8),
               ("fp8_ds_mla", torch.float8_e4m3fn)]


@pytest.mark.parametrize("kv_cache_dtype,cache_dtype", CACHE_CASES)
@pytest.mark.parametrize("page_size", [1, 16, 64, 128, 256])
def test_concat_and_cache(kv_cache_dtype, cache_dtype, page_size):
    g = torch.Generator(device=DEV).manual_seed(page_size)
    in_dtype = cache_dtype if kv_cache_dtype == "auto" else torch.bfloat16
    num_blocks = max(2, 1024 // page_size)
    num_tokens = min(700, num_blocks * page_size)
    for strided in (False, True):
        kv_c, k_pe = _inputs(num_tokens, in_dtype, g, strided)
        slots = _slots(num_tokens, num_blocks * page_size, g, num_skip=num_tokens // 7)
        cache = _poisoned_cache(num_blocks, page_size, kv_cache_dtype, cache_dtype, g)
        expected = cache.clone()
        ref.concat_and_cache_mla(kv_c, k_pe, expected, slots, kv_cache_dtype)
        OPS.concat_and_cache_mla(kv_c, k_pe, cache, slots, kv_cache_dtype)
        assert_same_bytes(cache, expected, f"concat {kv_cache_dtype} page {page_size} strided {strided}")


@pytest.mark.parametrize("kv_cache_dtype,cache_dtype", CACHE_CASES[:1] + CACHE_CASES[2:3])
def test_concat_adversarial_values_and_edges(kv_cache_dtype, cache_dtype):
    g = torch.Generator(device=DEV).manual_seed(5)
    kv = adversarial_kv()
    n = kv.shape[0]
    page_size = 64
    num_blocks = (n + page_size - 1) // page_size + 3
    slots = _slots(n, num_blocks * page_size, g, num_skip=n // 5)
    cache = _poisoned_cache(num_blocks, page_size, kv_cache_dtype, cache_dtype, g)
    expected = cache.clone()
    kv_c, k_pe = kv[:, :512], kv[:, 512:]
    ref.concat_and_cache_mla(kv_c, k_pe, expected, slots, kv_cache_dtype)
    OPS.concat_and_cache_mla(kv_c, k_pe, cache, slots, kv_cache_dtype)
    assert_same_bytes(cache, expected, f"concat adversarial {kv_cache_dtype}")
    # all tokens skipped, no tokens, and slots past the end (skipped by the kernel; the reference raises)
    before = cache.clone()
    OPS.concat_and_cache_mla(kv_c, k_pe, cache, torch.full_like(slots, -1), kv_cache_dtype)
    OPS.concat_and_cache_mla(kv_c[:0], k_pe[:0], cache, slots[:0], kv_cache_dtype)
    OPS.concat_and_cache_mla(kv_c, k_pe, cache, torch.full_like(slots, num_blocks * page_size), kv_cache_dtype)
    assert_same_bytes(cache, before, "skipped tokens")


@pytest.mark.parametrize("kv_cache_dtype,cache_dtype", CACHE_CASES[:1] + CACHE_CASES[2:3])
def test_concat_strided_cache(kv_cache_dtype, cache_dtype):
    g = torch.Generator(device=DEV).manual_seed(9)
    page_size, num_blocks, num_tokens = 16, 40, 500
    store = _poisoned_cache(num_blocks, page_size, kv_cache_dtype, cache_dtype, g, pad=16)
    width = 576 if kv_cache_dtype == "auto" else 656
    cache = store[..., :width]  # rows padded: row stride != width
    in_dtype = cache_dtype if kv_cache_dtype == "auto" else torch.bfloat16
    kv_c, k_pe = _inputs(num_tokens, in_dtype, g)
    slots = _slots(num_tokens, num_blocks * page_size, g, num_skip=40)
    expected_store = store.clone()
    dense = expected_store[..., :width].contiguous()
    ref.concat_and_cache_mla(kv_c, k_pe, dense, slots, kv_cache_dtype)
    expected_store[..., :width] = dense
    OPS.concat_and_cache_mla(kv_c, k_pe, cache, slots, kv_cache_dtype)
    assert_same_bytes(store, expected_store, "strided cache (padding must stay untouched)")


@pytest.mark.parametrize("kv_cache_dtype,cache_dtype", CACHE_CASES[:1] + CACHE_CASES[2:3])
def test_concat_cuda_graph_replay(kv_cache_dtype, cache_dtype):
    g = torch.Generator(device=DEV).manual_seed(21)
    page_size, num_blocks, num_tokens = 64, 32, 256
    num_slots = page_size * num_blocks
    in_dtype = cache_dtype if kv_cache_dtype == "auto" else torch.bfloat16
    kv_c, k_pe = _inputs(num_tokens, in_dtype, g)
    slots = _slots(num_tokens, num_slots, g, num_skip=10)
    cache = _poisoned_cache(num_blocks, page_size, kv_cache_dtype, cache_dtype, g)
    OPS.concat_and_cache_mla(kv_c, k_pe, cache, slots, kv_cache_dtype)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        OPS.concat_and_cache_mla(kv_c, k_pe, cache, slots, kv_cache_dtype)
    for step in range(3):
        new_c, new_p = _inputs(num_tokens, in_dtype, g)
        kv_c.copy_(new_c)
        k_pe.copy_(new_p)
        slots.copy_(_slots(num_tokens, num_slots, g, num_skip=step * 20))
        expected = cache.clone()
        ref.concat_and_cache_mla(kv_c, k_pe, expected, slots, kv_cache_dtype)
        graph.replay()
        torch.cuda.synchronize()
        assert_same_bytes(cache, expected, f"graph replay step {step}")


def test_public_op_routes_here():
    try:
        import torch_flashmla  # noqa: F401
        op = torch.ops.flashmla.concat_and_cache_mla
    except Exception:
        pytest.skip("torch_flashmla is not importable here")
    g = torch.Generator(device=DEV).manual_seed(4)
    for kv_cache_dtype, cache_dtype in CACHE_CASES:
        in_dtype = cache_dtype if kv_cache_dtype == "auto" else torch.bfloat16
        kv_c, k_pe = _inputs(100, in_dtype, g)
        slots = _slots(100, 16 * 16, g, num_skip=9)
        cache = _poisoned_cache(16, 16, kv_cache_dtype, cache_dtype, g)
        expected = cache.clone()
        ref.concat_and_cache_mla(kv_c, k_pe, expected, slots, kv_cache_dtype)
        op(kv_c, k_pe, cache, slots, kv_cache_dtype)
        assert_same_bytes(cache, expected, f"public op {kv_cache_dtype}")
    kv = random_kv(64, g)
    assert_same_bytes(torch.ops.flashmla.quantize_kv_fp8(kv), ref.quantize_kv_fp8(kv), "public quantize")


# ---------------------------------------------------------------- DeepSeek V4 ("MODEL1") pages

def _storage(t: torch.Tensor) -> torch.Tensor:
    """Every byte of the storage under ``t`` (page padding included), as a uint8 tensor."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def assert_same_storage(out: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert out.shape == expected.shape and out.stride() == expected.stride(), (what, out.stride(), expected.stride())
    assert_same_bytes(_storage(out), _storage(expected), what)


def random_v4_cache(num_blocks: int, page_size: int, gen: torch.Generator, dtype=torch.uint8) -> torch.Tensor:
    cache = ref.new_fp8_v4_cache(num_blocks, page_size, device=DEV, dtype=dtype)
    raw = _storage(cache)
    raw.copy_(torch.randint(0, 256, raw.shape, generator=gen, device=DEV, dtype=torch.int32).to(torch.uint8))
    return cache


V4_PAGE_SIZES = [1, 2, 3, 64, 69, 256]


@pytest.mark.parametrize("page_size", V4_PAGE_SIZES)
def test_v4_quantize_random(page_size):
    g = torch.Generator(device=DEV).manual_seed(200 + page_size)
    num_blocks = max(2, 4096 // page_size)
    kv = random_kv(num_blocks * page_size, g)[:, :512].contiguous().view(num_blocks, page_size, 1, 512)
    out = OPS.quantize_kv_fp8_v4(kv)
    assert out.dtype == torch.uint8 and out.stride() == (ref.fp8_v4_page_stride(page_size), 584, 584, 1)
    assert_same_storage(out, ref.quantize_kv_fp8_v4(kv), f"v4 quantize page {page_size}")


def test_v4_quantize_adversarial():
    rows = adversarial_kv()                                  # [n, 576]: tiles of 128 cover 2 V4 tiles each
    kv = torch.cat([rows[:, :512], rows[:, 64:576]])         # shifted copy: other tile boundaries
    n = kv.shape[0] // 4 * 4
    kv = kv[:n].contiguous().view(n // 4, 4, 1, 512)
    out, expected = OPS.quantize_kv_fp8_v4(kv), ref.quantize_kv_fp8_v4(kv)
    pages, want = ref.fp8_v4_pages(out), ref.fp8_v4_pages(expected)
    for name, sl in (("values+rope", slice(0, 4 * 576)), ("scales", slice(4 * 576, 4 * 584))):
        assert_same_bytes(pages[:, sl], want[:, sl], f"v4 quantize adversarial {name}")
    assert_same_storage(out, expected, "v4 quantize adversarial (storage)")


def test_v4_quantize_strided_inputs():
    g = torch.Generator(device=DEV).manual_seed(17)
    base = random_kv(6 * 64, g, spread=3)[:, :512].contiguous()
    wide = torch.cat([base, base[:, :8]], 1)[:, :512].view(6, 64, 1, 512)       # row stride 520 elements
    t = base.view(64, 6, 1, 512).transpose(0, 1)                                 # non-contiguous pages
    off = torch.cat([base.view(-1), base.view(-1)[:3]])[3:].view(6, 64, 1, 512)  # misaligned base
    for name, kv in (("wide rows", wide), ("transposed", t), ("unaligned base", off)):
        assert_same_storage(OPS.quantize_kv_fp8_v4(kv), ref.quantize_kv_fp8_v4(kv), f"v4 quantize {name}")
    assert OPS.quantize_kv_fp8_v4(torch.empty(0, 64, 1, 512, device=DEV, dtype=torch.bfloat16)).shape == (0, 64, 1, 584)


@pytest.mark.parametrize("page_size", V4_PAGE_SIZES)
def test_v4_dequantize_random_bytes(page_size):
    g = torch.Generator(device=DEV).manual_seed(300 + page_size)
    num_blocks = max(2, 8192 // page_size)
    cache = random_v4_cache(num_blocks, page_size, g)
    expected = ref.dequantize_kv_fp8_v4(cache)
    assert_same_bytes(OPS.dequantize_kv_fp8_v4(cache), expected, f"v4 dequantize page {page_size}")
    assert_same_bytes(OPS.dequantize_kv_fp8_v4(cache.view(torch.float8_e4m3fn)), expected, "v4 dequantize fp8 view")


def test_v4_dequantize_layouts():
    g = torch.Generator(device=DEV).manual_seed(31)
    cache = random_v4_cache(40, 69, g)
    expected = ref.dequantize_kv_fp8_v4(cache)
    pages = ref.fp8_v4_pages(cache)
    # FlashMLA's allocation: a [num_blocks, padded] buffer sliced to the page bytes
    buf = torch.zeros(40, ref.fp8_v4_page_stride(69), dtype=torch.uint8, device=DEV)
    theirs = buf[:, :69 * 584].view(40, 69, 1, 584)
    ref.fp8_v4_pages(theirs).copy_(pages)
    assert_same_bytes(OPS.dequantize_kv_fp8_v4(theirs.view(torch.float8_e4m3fn)), expected, "flashmla allocation")
    # contiguous pages, odd page size: page stride 69 * 584 = 8 mod 16
    dense = torch.empty(40, 69, 1, 584, dtype=torch.uint8, device=DEV)
    ref.fp8_v4_pages(dense).copy_(pages)
    assert_same_bytes(OPS.dequantize_kv_fp8_v4(dense), expected, "contiguous odd pages")
    # base at an odd byte offset
    store = torch.empty(40 * 69 * 584 + 3, dtype=torch.uint8, device=DEV)
    odd = store[3:].view(40, 69, 1, 584)
    ref.fp8_v4_pages(odd).copy_(pages)
    assert_same_bytes(OPS.dequantize_kv_fp8_v4(odd), expected, "odd base")
    assert OPS.dequantize_kv_fp8_v4(cache[:0]).shape == (0, 69, 1, 512)


def test_v4_roundtrip():
    g = torch.Generator(device=DEV).manual_seed(41)
    kv = random_kv(8 * 64, g, spread=4)[:, :512].contiguous().view(8, 64, 1, 512)
    q = OPS.quantize_kv_fp8_v4(kv)
    assert_same_bytes(OPS.dequantize_kv_fp8_v4(q), ref.dequantize_kv_fp8_v4(q), "v4 dequantize of quantized")


def _v4_inputs(num_tokens, gen, strided=False):
    if strided:  # kv_c and k_pe as slices of one projection output
        proj = (torch.randn(num_tokens, 448 + 64 + 32, generator=gen, device=DEV) * 3).to(torch.bfloat16)
        return proj[:, :448], proj[:, 448:512]
    return ((torch.randn(num_tokens, 448, generator=gen, device=DEV) * 3).to(torch.bfloat16),
            torch.randn(num_tokens, 64, generator=gen, device=DEV).to(torch.bfloat16))


@pytest.mark.parametrize("cache_dtype", [torch.uint8, torch.float8_e4m3fn])
@pytest.mark.parametrize("page_size", V4_PAGE_SIZES)
def test_v4_concat_and_cache(page_size, cache_dtype):
    g = torch.Generator(device=DEV).manual_seed(400 + page_size)
    num_blocks = max(2, 2048 // page_size)
    num_tokens = min(900, num_blocks * page_size)
    for strided in (False, True):
        kv_c, k_pe = _v4_inputs(num_tokens, g, strided)
        slots = _slots(num_tokens, num_blocks * page_size, g, num_skip=num_tokens // 7)
        cache = random_v4_cache(num_blocks, page_size, g, cache_dtype)
        expected = random_v4_cache(num_blocks, page_size, g, cache_dtype)
        _storage(expected).copy_(_storage(cache))
        ref.concat_and_cache_mla(kv_c, k_pe, expected, slots, "fp8_ds_mla_v4")
        OPS.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8_ds_mla_v4")
        assert_same_storage(cache, expected, f"v4 concat page {page_size} strided {strided}")


def test_v4_concat_adversarial_and_edges():
    g = torch.Generator(device=DEV).manual_seed(6)
    rows = adversarial_kv()
    kv = torch.cat([rows[:, :448], rows[:, 512:]], 1)
    n, page_size = kv.shape[0], 64
    num_blocks = (n + page_size - 1) // page_size + 3
    slots = _slots(n, num_blocks * page_size, g, num_skip=n // 5)
    cache = random_v4_cache(num_blocks, page_size, g)
    expected = ref.new_fp8_v4_cache(num_blocks, page_size, device=DEV)
    _storage(expected).copy_(_storage(cache))
    ref.concat_and_cache_mla(kv[:, :448], kv[:, 448:], expected, slots, "fp8_ds_mla_v4")
    OPS.concat_and_cache_mla(kv[:, :448], kv[:, 448:], cache, slots, "fp8_ds_mla_v4")
    assert_same_storage(cache, expected, "v4 concat adversarial")
    before = _storage(cache).clone()
    OPS.concat_and_cache_mla(kv[:, :448], kv[:, 448:], cache, torch.full_like(slots, -1), "fp8_ds_mla_v4")
    OPS.concat_and_cache_mla(kv[:0, :448], kv[:0, 448:], cache, slots[:0], "fp8_ds_mla_v4")
    OPS.concat_and_cache_mla(kv[:, :448], kv[:, 448:], cache, torch.full_like(slots, num_blocks * page_size),
                             "fp8_ds_mla_v4")
    assert_same_bytes(_storage(cache), before, "v4 skipped tokens")


def test_v4_concat_odd_page_stride():
    g = torch.Generator(device=DEV).manual_seed(8)
    num_blocks, page_size, num_tokens = 30, 5, 120                  # contiguous: page stride 2920 = 8 mod 16
    cache = torch.randint(0, 256, (num_blocks, page_size, 1, 584), generator=g, device=DEV,
                          dtype=torch.int32).to(torch.uint8)
    expected = cache.clone()
    kv_c, k_pe = _v4_inputs(num_tokens, g)
    slots = _slots(num_tokens, num_blocks * page_size, g, num_skip=10)
    ref.concat_and_cache_mla(kv_c, k_pe, expected, slots, "fp8_ds_mla_v4")
    OPS.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8_ds_mla_v4")
    assert_same_bytes(cache, expected, "v4 concat odd page stride")


def test_v4_concat_cuda_graph_replay():
    g = torch.Generator(device=DEV).manual_seed(22)
    page_size, num_blocks, num_tokens = 64, 32, 256
    num_slots = page_size * num_blocks
    kv_c, k_pe = _v4_inputs(num_tokens, g)
    slots = _slots(num_tokens, num_slots, g, num_skip=10)
    cache = random_v4_cache(num_blocks, page_size, g)
    OPS.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8_ds_mla_v4")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        OPS.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8_ds_mla_v4")
    for step in range(3):
        new_c, new_p = _v4_inputs(num_tokens, g)
        kv_c.copy_(new_c)
        k_pe.copy_(new_p)
        slots.copy_(_slots(num_tokens, num_slots, g, num_skip=step * 20))
        expected = ref.new_fp8_v4_cache(num_blocks, page_size, device=DEV)
        _storage(expected).copy_(_storage(cache))
        ref.concat_and_cache_mla(kv_c, k_pe, expected, slots, "fp8_ds_mla_v4")
        graph.replay()
        torch.cuda.synchronize()
        assert_same_storage(cache, expected, f"v4 graph replay step {step}")


def test_v4_public_ops_route_here():
    try:
        import torch_flashmla  # noqa: F401
        from torch_flashmla import _registration
    except Exception:
        pytest.skip("torch_flashmla is not importable here")
    for name in ("quantize_kv_fp8_v4", "dequantize_kv_fp8_v4"):
        assert _registration.cuda_path(name, DEV) == "sm90", name
    g = torch.Generator(device=DEV).manual_seed(23)
    kv = random_kv(4 * 64, g)[:, :512].contiguous().view(4, 64, 1, 512)
    q = torch.ops.flashmla.quantize_kv_fp8_v4(kv)
    assert_same_storage(q, ref.quantize_kv_fp8_v4(kv), "public v4 quantize")
    assert_same_bytes(torch.ops.flashmla.dequantize_kv_fp8_v4(q), ref.dequantize_kv_fp8_v4(q), "public v4 dequantize")
    kv_c, k_pe = _v4_inputs(100, g)
    slots = _slots(100, 4 * 64, g, num_skip=9)
    cache = random_v4_cache(4, 64, g)
    expected = ref.new_fp8_v4_cache(4, 64, device=DEV)
    _storage(expected).copy_(_storage(cache))
    ref.concat_and_cache_mla(kv_c, k_pe, expected, slots, "fp8_ds_mla_v4")
    torch.ops.flashmla.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8_ds_mla_v4")
    assert_same_storage(cache, expected, "public v4 concat")
