"""The per-tensor e4m3 cache write (``concat_and_cache_mla(..., kv_cache_dtype="fp8", scale)``).

CPU: the bytes against an independent per-element oracle (numpy float32 division, a hand-written e4m3
table, nearest value with ties to even, saturation at 448, NaN -> 0x7F, the sign of zero kept), skip
semantics, saturation and special scales, bad input, torch.compile(fullgraph=True).
GPU (``cuda`` marker, SM90 kernel): kernel bytes against the reference evaluated on the GPU and on the
CPU, every bf16/fp16 bit pattern, special scales, padded cache rows, CUDA-graph replay with new slots
and a new scale value, and the public op routed to the kernel.
"""
from __future__ import annotations

import glob
import os
import pathlib

import numpy as np
import pytest
import torch

import torch_flashmla as F
from torch_flashmla import _registration, kv_cache as K
from torch_flashmla import testing as T

ROOT = pathlib.Path(__file__).resolve().parents[1]


# --- an independent oracle ---------------------------------------------------------------------

def _e4m3_value(code: int) -> float:
    """Value of a positive e4m3 code 0x00..0x7E (no NaN), read from the bit fields."""
    exp, man = (code >> 3) & 0xF, code & 0x7
    return man / 8 * 2.0 ** -6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)


_POS = np.array([_e4m3_value(c) for c in range(0x7F)], dtype=np.float64)   # increasing, 0 .. 448


def oracle_bytes(x: torch.Tensor, scale: float) -> np.ndarray:
    """Per element: q = float32(x) / float32(scale) in IEEE float32 (numpy), NaN -> 0x7F, else |q|
    clamped to 448 and rounded to the nearest e4m3 value (ties: even code), sign bit of q."""
    xf = x.float().numpy().astype(np.float32)
    with np.errstate(all="ignore"):
        q = (xf / np.float32(scale)).astype(np.float64)
    nan = np.isnan(q)
    a = np.minimum(np.abs(np.where(nan, 0.0, q)), 448.0)
    hi = np.clip(np.searchsorted(_POS, a, side="left"), 0, 0x7E)
    lo = np.clip(hi - 1, 0, 0x7E)
    d_hi, d_lo = np.abs(_POS[hi] - a), np.abs(a - _POS[lo])
    code = np.where(d_lo < d_hi, lo, hi)
    tie = d_lo == d_hi
    code = np.where(tie & (lo != hi), np.where(lo % 2 == 0, lo, hi), code)
    code = code | np.where(np.signbit(q), 0x80, 0)
    return np.where(nan, 0x7F, code).astype(np.uint8)


def _rows(values: torch.Tensor) -> torch.Tensor:
    """1-D values -> [T, 576] rows (padded with zeros)."""
    n = -(-values.numel() // 576) * 576
    out = torch.zeros(n, dtype=values.dtype)
    out[:values.numel()] = values
    return out.view(-1, 576)


def write_all(rows: torch.Tensor, scale: float, cache_dtype=torch.uint8, device="cpu") -> torch.Tensor:
    """Write every row to slot t of a fresh 0xFF cache; returns the cache bytes [T, 576]."""
    n = rows.shape[0]
    cache = torch.full((n, 1, 1, 576), 0xFF, dtype=torch.uint8, device=device).view(cache_dtype)
    F.concat_and_cache_mla(rows[:, :512].to(device), rows[:, 512:].to(device), cache,
                           torch.arange(n, device=device), "fp8", torch.tensor([scale], device=device))
    return cache.view(torch.uint8).view(n, 576).cpu()


def all_bit_patterns(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)


SCALES = [1.0, 0.0371, 3.7e-3, 2.0 ** -7, 1e5, 448.0 / 3, 6.1e-5]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", SCALES)
def test_bytes_match_independent_oracle(dtype, scale):
    x = all_bit_patterns(dtype)                                  # every pattern, inf and NaN included
    rows = _rows(x)
    got = write_all(rows, scale).numpy().reshape(-1)
    want = oracle_bytes(rows.reshape(-1), scale)
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, [(int(i), hex(int(rows.reshape(-1)[i].view(torch.int16))), hex(got[i]), hex(want[i]))
                           for i in bad[:8]]


def test_dequantized_value_is_e4m3_times_scale_and_close():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 576, generator=g) * 3).to(torch.bfloat16)
    scale = 0.0371
    cache = torch.empty(64, 1, 1, 576, dtype=torch.float8_e4m3fn)
    F.concat_and_cache_mla(x[:, :512], x[:, 512:], cache, torch.arange(64), "fp8", torch.tensor([scale]))
    deq = K.dequantize_per_tensor_e4m3(cache, torch.tensor([scale])).view(64, 576).double()
    assert torch.equal(deq, (cache.view(64, 576).float() * torch.tensor(scale)).double())   # fp32 product
    # |x / s| < 448 here: relative error <= 2^-4 (3 mantissa bits), absolute <= 2^-10 s for subnormals
    err = (deq - x.double()).abs()
    assert torch.all(err <= torch.maximum(x.double().abs() * 2.0 ** -4, torch.tensor(2.0 ** -10 * scale)))


def test_float8_and_uint8_caches_agree_and_both_parts_use_the_scale():
    a = T.cache_write_inputs(num_tokens=9, num_blocks=3, page_size=4, kv_cache_dtype="fp8", seed=5)
    b = dict(a, kv_cache=a["kv_cache"].clone().view(torch.float8_e4m3fn))
    F.concat_and_cache_mla(**a)
    F.concat_and_cache_mla(**b)
    assert torch.equal(a["kv_cache"], b["kv_cache"].view(torch.uint8))
    rows = a["kv_cache"].view(-1, 576)
    for t, slot in enumerate(a["slot_mapping"].tolist()):
        if slot >= 0:
            row = torch.cat([a["kv_c"][t], a["k_pe"][t]])
            assert np.array_equal(rows[slot].numpy(), oracle_bytes(row, float(a["scale"])))


def test_alias_fp8_e4m3_and_scalar_scale():
    a = T.cache_write_inputs(num_tokens=7, kv_cache_dtype="fp8", seed=2)
    b = dict(a, kv_cache=a["kv_cache"].clone(), kv_cache_dtype="fp8_e4m3", scale=a["scale"].reshape(()))
    F.concat_and_cache_mla(**a)
    F.concat_and_cache_mla(**b)
    assert torch.equal(a["kv_cache"], b["kv_cache"])


@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_writes_only_named_slots_and_skips_the_rest(page_size):
    num_blocks = 6
    num_slots = num_blocks * page_size
    a = T.cache_write_inputs(num_tokens=min(12, num_slots), num_blocks=num_blocks, page_size=page_size,
                             kv_cache_dtype="fp8", seed=page_size)
    a["slot_mapping"][1] = num_slots          # past the cache
    a["slot_mapping"][2] = 10 ** 12
    a["slot_mapping"][3] = -(10 ** 12)
    before = a["kv_cache"].clone()
    F.concat_and_cache_mla(**a)
    rows, old = a["kv_cache"].view(num_slots, 576), before.view(num_slots, 576)
    written = set()
    for t, slot in enumerate(a["slot_mapping"].tolist()):
        if 0 <= slot < num_slots:
            written.add(slot)
            row = torch.cat([a["kv_c"][t], a["k_pe"][t]])
            assert np.array_equal(rows[slot].numpy(), oracle_bytes(row, float(a["scale"])))
    untouched = [s for s in range(num_slots) if s not in written]
    assert written and torch.equal(rows[untouched], old[untouched])
    # nothing to write: no tokens, every token skipped
    snapshot = a["kv_cache"].clone()
    F.concat_and_cache_mla(a["kv_c"][:0], a["k_pe"][:0], a["kv_cache"], a["slot_mapping"][:0], "fp8", a["scale"])
    F.concat_and_cache_mla(a["kv_c"], a["k_pe"], a["kv_cache"], torch.full_like(a["slot_mapping"], -1), "fp8",
                           a["scale"])
    assert torch.equal(a["kv_cache"], snapshot)


def _one(values, scale, dtype=torch.bfloat16) -> list:
    """Bytes of the first len(values) latent values of one written token."""
    x = torch.zeros(576, dtype=dtype)
    x[:len(values)] = torch.tensor(values, dtype=torch.float64).to(dtype)
    return write_all(x.view(1, 576), scale)[0, :len(values)].tolist()


def test_saturation_and_rounding_edges():
    inf = float("inf")
    # 448 is e4m3's largest value (0x7E); 464 is the tie between 448 and 480 (not representable): even
    # code 0x7E; anything larger, and +-inf, saturates.
    assert _one([448, 464, 480, 1e30, inf, -448, -480, -inf], 1.0) == [0x7E, 0x7E, 0x7E, 0x7E, 0x7E,
                                                                       0xFE, 0xFE, 0xFE]
    # ties to even in the normal and subnormal range; the smallest subnormal 2^-9, half of it -> 0
    assert _one([1.0625, 1.1875, 2.0 ** -10, 3 * 2.0 ** -10, 2.0 ** -9, -(2.0 ** -11)], 1.0) == \
        [0x38, 0x3A, 0x00, 0x02, 0x01, 0x80]
    # saturation applies to x / scale: 449 * s saturates, 447 * s rounds
    assert _one([896, 900, -1000], 2.0) == [0x7E, 0x7E, 0xFE]
    # -0 keeps its sign
    assert _one([-0.0, 0.0], 0.5) == [0x80, 0x00]


def test_nan_policy_and_special_scales():
    nan_bits = torch.tensor([0x7FC0, 0xFFC0, 0x7F81, 0xFFFF], dtype=torch.int32).to(torch.int16)
    x = torch.zeros(576, dtype=torch.bfloat16)
    x[:4] = nan_bits.view(torch.bfloat16)
    x[4:8] = torch.tensor([1.0, -1.0, 0.0, -0.0])
    x[512] = float("nan")                         # in the RoPE part too
    got = write_all(x.view(1, 576), 1.0)[0]
    assert got[:8].tolist() == [0x7F] * 4 + [0x38, 0xB8, 0x00, 0x80] and got[512] == 0x7F
    # scale 0: x / 0 = +-inf -> +-448, 0 / 0 = NaN -> 0x7F; negative scale flips signs; inf scale -> +-0;
    # NaN scale -> 0x7F everywhere
    assert write_all(x.view(1, 576), 0.0)[0, 4:8].tolist() == [0x7E, 0xFE, 0x7F, 0x7F]
    assert write_all(x.view(1, 576), -1.0)[0, 4:8].tolist() == [0xB8, 0x38, 0x80, 0x00]
    assert write_all(x.view(1, 576), float("inf"))[0, 4:8].tolist() == [0x00, 0x80, 0x00, 0x80]
    assert torch.all(write_all(x.view(1, 576), float("nan")) == 0x7F)


def test_ignored_scale_for_other_cache_types():
    for kv_cache_dtype in ("auto", "fp8_ds_mla", "fp8_ds_mla_v4"):
        a = T.cache_write_inputs(num_tokens=6, num_blocks=2, page_size=8, kv_cache_dtype=kv_cache_dtype, seed=4)
        b = dict(a, kv_cache=a["kv_cache"].clone(), scale=torch.tensor([3.0]))
        if kv_cache_dtype == "fp8_ds_mla_v4":
            b["kv_cache"] = K.new_fp8_v4_cache(2, 8, fill=0xFF)
        F.concat_and_cache_mla(**a)
        F.concat_and_cache_mla(**b)
        raw = lambda t: torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())  # noqa: E731
        assert torch.equal(raw(a["kv_cache"]), raw(b["kv_cache"])), kv_cache_dtype
        with pytest.raises(ValueError, match="argument 'scale'"):
            F.concat_and_cache_mla(**dict(b, scale=torch.tensor([3.0], dtype=torch.float64)))


def test_bad_input():
    a = T.cache_write_inputs(num_tokens=4, num_blocks=2, page_size=4, kv_cache_dtype="fp8")
    cases = [
        ({"scale": None}, "scale"),
        ({"scale": torch.tensor([1.0], dtype=torch.float64)}, "scale"),
        ({"scale": torch.tensor([1.0], dtype=torch.bfloat16)}, "scale"),
        ({"scale": torch.ones(2)}, "scale"),
        ({"scale": torch.ones(1, 1)}, "scale"),
        ({"scale": torch.ones(0)}, "scale"),
        ({"scale": torch.ones(1, device="meta")}, "scale"),
        ({"kv_cache": torch.zeros(2, 4, 1, 576, dtype=torch.bfloat16)}, "kv_cache"),
        ({"kv_cache": torch.zeros(2, 4, 1, 656, dtype=torch.uint8)}, "kv_cache"),
        ({"kv_cache": torch.zeros(2, 4, 2, 576, dtype=torch.uint8)}, "kv_cache"),
        ({"kv_cache": torch.zeros(2, 4, 576, dtype=torch.uint8)}, "kv_cache"),
        ({"kv_cache": torch.zeros(4, 2, 1, 576, dtype=torch.uint8).transpose(0, 1)}, "kv_cache"),
        ({"kv_c": a["kv_c"].float()}, "kv_c"),
        ({"kv_c": a["kv_c"][:, :448]}, "kv_c"),
        ({"k_pe": a["k_pe"].half()}, "k_pe"),
        ({"slot_mapping": a["slot_mapping"].int()}, "slot_mapping"),
        ({"kv_cache_dtype": "fp8_e5m2"}, "kv_cache_dtype"),
    ]
    for over, arg in cases:
        with pytest.raises(ValueError, match=f"argument '{arg}'"):
            F.concat_and_cache_mla(**{**a, **over})
    with pytest.raises(ValueError, match="argument 'scale'.*float32 tensor of one element"):
        F.concat_and_cache_mla(**{**a, "scale": None})


def test_compiles_fullgraph_without_recompiles():
    def step(kv_c, k_pe, cache, slots, scale):
        F.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8", scale)
        return K.dequantize_per_tensor_e4m3(cache, scale)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, s in enumerate([0.0371, 0.5, 2.0 ** -9]):
            a = T.cache_write_inputs(num_tokens=6, num_blocks=2, page_size=8, kv_cache_dtype="fp8", seed=i, scale=s)
            expected_cache = a["kv_cache"].clone()
            want = step(a["kv_c"], a["k_pe"], expected_cache, a["slot_mapping"], a["scale"])
            got = compiled(a["kv_c"], a["k_pe"], a["kv_cache"], a["slot_mapping"], a["scale"])
            assert torch.equal(a["kv_cache"], expected_cache)
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


# --- GPU: the SM90 kernel ----------------------------------------------------------------------
# Run on a GPU machine: FLASHMLA_KV_JIT=1 python -m pytest -q tests/test_kv_cache_fp8_scaled.py -m cuda
# (with the package built with FLASHMLA_BUILD_CUDA=1, FLASHMLA_KV_JIT is not needed).

NVCC_FLAGS = ["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr",
              "--use_fast_math", "-lineinfo", "-DNDEBUG", "-U__CUDA_NO_HALF_OPERATORS__",
              "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
              "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]


def _kernel():
    try:
        return torch.ops.flashmla_cuda.concat_and_cache_mla.default
    except (AttributeError, RuntimeError):
        return None


@pytest.fixture(scope="module")
def kernel():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an SM90 GPU")
    if _kernel() is None and os.environ.get("FLASHMLA_KV_JIT", "0") == "1":
        from torch.utils.cpp_extension import load
        sources = [str(ROOT / "csrc" / "api" / "kv_cache_cuda.cpp")] + sorted(glob.glob(str(ROOT / "csrc" / "kv_cache" / "*.cu")))
        load(name="flashmla_kv_cache_jit", sources=sources, extra_include_paths=[str(ROOT / "csrc")],
             extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=NVCC_FLAGS, is_python_module=False)
    op = _kernel()
    if op is None:
        pytest.skip("no flashmla_cuda KV-cache kernels (build with FLASHMLA_BUILD_CUDA=1 or set FLASHMLA_KV_JIT=1)")
    return op


def _assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    a, b = got.view(torch.uint8).cpu(), want.view(torch.uint8).cpu()
    diff = (a != b)
    if diff.any():
        idx = diff.nonzero()[:8].tolist()
        raise AssertionError(f"{what}: {int(diff.sum())} bytes differ; first (index, ours, ref): "
                             f"{[(i, hex(int(a[tuple(i)])), hex(int(b[tuple(i)]))) for i in idx]}")


def _gpu_inputs(n, dtype, g, strided=False, spread=3.0):
    x = torch.randn(n, 576, generator=g, device="cuda")
    x = (x * torch.pow(10.0, (torch.rand(n, 1, generator=g, device="cuda") * 2 - 1) * spread)).to(dtype)
    if strided:   # rows inside a wider buffer: the kernel reads them with a row stride
        buf = torch.zeros(n, 640, dtype=dtype, device="cuda")
        buf[:, :512], buf[:, 576:640] = x[:, :512], x[:, 512:]
        return buf[:, :512], buf[:, 576:640]
    return x[:, :512], x[:, 512:]


def _slots(n, num_slots, g, num_skip):
    slots = torch.randperm(num_slots, generator=g, device="cuda")[:n].clone()
    if num_skip:
        slots[torch.randperm(n, generator=g, device="cuda")[:num_skip]] = -1
        slots[0] = num_slots + 7                  # past the cache
    return slots


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cache_dtype", [torch.uint8, torch.float8_e4m3fn])
@pytest.mark.parametrize("page_size", [1, 16, 64, 256])
def test_kernel_matches_reference(kernel, dtype, cache_dtype, page_size):
    g = torch.Generator(device="cuda").manual_seed(page_size)
    num_blocks = max(2, 2048 // page_size)
    n = min(1500, num_blocks * page_size)
    for strided in (False, True):
        for scale_value in (0.0371, 1.0, 2.0 ** -7, 250.0):
            kv_c, k_pe = _gpu_inputs(n, dtype, g, strided)
            slots = _slots(n, num_blocks * page_size, g, n // 9)
            scale = torch.tensor([scale_value], device="cuda")
            cache = torch.randint(0, 256, (num_blocks, page_size, 1, 576), generator=g, device="cuda",
                                  dtype=torch.int32).to(torch.uint8).view(cache_dtype)
            want = cache.clone()
            K.concat_and_cache_mla(kv_c, k_pe, want, slots, "fp8", scale)
            want_cpu = cache.cpu()
            K.concat_and_cache_mla(kv_c.cpu(), k_pe.cpu(), want_cpu, slots.cpu(), "fp8", scale.cpu())
            kernel(kv_c, k_pe, cache, slots, "fp8", scale)
            _assert_same(cache, want, f"vs GPU reference: {dtype} page {page_size} scale {scale_value}")
            _assert_same(cache, want_cpu, f"vs CPU reference: {dtype} page {page_size} scale {scale_value}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_value", SCALES + [0.0, -1.5, float("inf"), float("nan"), 1e-40, 3e38])
def test_kernel_every_bit_pattern_and_special_scales(kernel, dtype, scale_value):
    rows = _rows(all_bit_patterns(dtype))
    n = rows.shape[0]
    scale = torch.tensor([scale_value], device="cuda")
    cache = torch.full((n, 1, 1, 576), 0xAB, dtype=torch.uint8, device="cuda")
    want = cache.cpu()
    K.concat_and_cache_mla(rows[:, :512], rows[:, 512:], want, torch.arange(n), "fp8", scale.cpu())
    x = rows.cuda()
    kernel(x[:, :512], x[:, 512:], cache, torch.arange(n, device="cuda"), "fp8", scale)
    _assert_same(cache, want, f"all {dtype} patterns, scale {scale_value}")
    if scale_value in SCALES:
        assert np.array_equal(cache.view(-1).cpu().numpy(), oracle_bytes(rows.reshape(-1), scale_value))


@pytest.mark.cuda
def test_kernel_padded_cache_rows(kernel):
    """Rows inside a wider buffer (row stride 592 bytes): the padding stays untouched."""
    g = torch.Generator(device="cuda").manual_seed(3)
    store = torch.randint(0, 256, (40, 16, 1, 592), generator=g, device="cuda", dtype=torch.int32).to(torch.uint8)
    cache = store[..., :576]
    kv_c, k_pe = _gpu_inputs(500, torch.bfloat16, g)
    slots = _slots(500, 640, g, 40)
    scale = torch.tensor([0.0371], device="cuda")
    want_store = store.clone()
    dense = want_store[..., :576].contiguous()
    K.concat_and_cache_mla(kv_c, k_pe, dense, slots, "fp8", scale)
    want_store[..., :576] = dense
    kernel(kv_c, k_pe, cache, slots, "fp8", scale)
    _assert_same(store, want_store, "padded cache rows")


@pytest.mark.cuda
def test_kernel_cuda_graph_replay_new_slots_and_scale(kernel):
    g = torch.Generator(device="cuda").manual_seed(21)
    page_size, num_blocks, n = 64, 32, 256
    num_slots = page_size * num_blocks
    kv_c, k_pe = _gpu_inputs(n, torch.bfloat16, g)
    kv_c, k_pe = kv_c.contiguous(), k_pe.contiguous()
    slots = _slots(n, num_slots, g, 10)
    scale = torch.tensor([0.0371], device="cuda")
    cache = torch.full((num_blocks, page_size, 1, 576), 0xFF, dtype=torch.uint8,
                       device="cuda").view(torch.float8_e4m3fn)
    graph, _ = T.capture_cuda_graph(lambda: kernel(kv_c, k_pe, cache, slots, "fp8", scale))
    for step, value in enumerate([0.5, 2.0 ** -6, 123.0, 0.0371]):
        new_c, new_p = _gpu_inputs(n, torch.bfloat16, g)
        kv_c.copy_(new_c)
        k_pe.copy_(new_p)
        slots.copy_(_slots(n, num_slots, g, step * 20))
        scale.fill_(value)                        # a new value in the same tensor
        want = cache.clone()
        K.concat_and_cache_mla(kv_c, k_pe, want, slots, "fp8", scale)
        graph.replay()
        torch.cuda.synchronize()
        _assert_same(cache, want, f"graph replay step {step} (scale {value})")


@pytest.mark.cuda
def test_public_op_routes_to_kernel(kernel):
    if _registration.cuda_path("concat_and_cache_mla", torch.device("cuda")) != "sm90":
        pytest.skip("the public op runs the reference here (FLASHMLA_FORCE_REFERENCE or no built kernel)")
    a = T.cache_write_inputs(num_tokens=100, num_blocks=16, page_size=16, kv_cache_dtype="fp8", device="cuda",
                             seed=4)
    want = a["kv_cache"].cpu()
    K.concat_and_cache_mla(a["kv_c"].cpu(), a["k_pe"].cpu(), want, a["slot_mapping"].cpu(), "fp8", a["scale"].cpu())
    F.concat_and_cache_mla(**a)
    _assert_same(a["kv_cache"], want, "public op")
