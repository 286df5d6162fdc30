"""GPU tests of the SM90 sparse MLA prefill kernel (torch.ops.flashmla_cuda.sparse_mla_prefill, reached
through torch.ops.flashmla.sparse_mla_prefill / torch_flashmla.sparse_mla_prefill) against the float32
reference (torch_flashmla.reference.sparse_mla_prefill) evaluated on the same GPU inputs.

Inputs come from the shared generator (torch_flashmla.testing.sparse_prefill_inputs: -1 and >= s_kv
indices mixed in, query row 1 with no valid index); the tests then fill every kv row that no valid index
attends with NaN, and fill the caching allocator with NaN before each call, so unwritten outputs show
up. Covered: s_q {1, 62, 213, 1024, 4096}, s_kv {64, 592, 8192, 65536}, topk {1, 64, 100, 128, 512, 2048,
8192}, h_q {1, 16, 64, 128} (and odd h_q), d_qk {512, 576}, sink, topk_length (zero lengths included),
all-invalid rows, empty problems, strided q, CUDA-graph capture + replay with new indices and lengths.
Tolerances (the sparse decode tests'): out abs 8e-4 + rel 3/128 elementwise and
1 - 2<x,y>/(|x|^2+|y|^2) <= 7e-6 over the non-empty rows; lse and max_logits rel 2/65536 (relative to
max(|ref|, 1)); rows with nothing to attend to: out exactly 0, lse +inf, max_logits -inf.
"""
from __future__ import annotations

import zlib

import pytest
import torch

pytestmark = pytest.mark.cuda

torch_flashmla = pytest.importorskip("torch_flashmla")
from torch_flashmla import reference  # noqa: E402
from torch_flashmla.testing import SparsePrefillCase, capture_cuda_graph, sparse_prefill_inputs  # noqa: E402

from attention_asserts import assert_out_rows_close  # noqa: E402
from sm90 import require_sm90_kernel  # noqa: E402

require_sm90_kernel("sparse_mla_prefill")

DEV = torch.device("cuda")
D_V = 512
OUT_ABS, OUT_REL, COS_TOL, LSE_REL = 8e-4, 3 / 128, 7e-6, 2 / 65536
KEYS = ("q", "kv", "indices", "attn_sink", "topk_length")


def case_id(c: SparsePrefillCase) -> str:
    flags = ("L" if c.with_topk_length else "") + ("S" if c.with_attn_sink else "")
    return f"sq{c.s_q}-kv{c.s_kv}-k{c.topk}-h{c.h_q}-d{c.d_qk}" + (f"-{flags}" if flags else "")


def attended_rows(inp) -> torch.Tensor:
    """bool [s_kv]: kv rows some valid index (inside topk_length) points at."""
    idx = inp["indices"][:, 0].long()
    s_kv = inp["kv"].shape[0]
    valid = (idx >= 0) & (idx < s_kv)
    if inp["topk_length"] is not None:
        valid &= torch.arange(idx.shape[1], device=idx.device)[None, :] < inp["topk_length"][:, None]
    used = torch.zeros(s_kv, dtype=torch.bool, device=idx.device)
    used[idx[valid]] = True
    return used


def make_inputs(case: SparsePrefillCase, seed: int):
    inp = sparse_prefill_inputs(case, device=DEV, seed=seed)
    if case.s_kv > 0:
        inp["kv"][~attended_rows(inp)] = float("nan")  # never attended: must never reach a result
    return inp


def poison_allocator(nbytes):
    junk = [torch.full((max(1, n // 4),), float("nan"), dtype=torch.float32, device=DEV) for n in nbytes]
    del junk


def run_kernel(inp, scale):
    s_q, h_q, _ = inp["q"].shape
    poison_allocator([s_q * h_q * D_V * 2 + 256, s_q * h_q * 4 + 256, s_q * h_q * 4 + 256])
    return torch_flashmla.sparse_mla_prefill(inp["q"], inp["kv"], inp["indices"], softmax_scale=scale,
                                             attn_sink=inp["attn_sink"], topk_length=inp["topk_length"])


def run_reference(inp, scale):
    return reference.sparse_mla_prefill(inp["q"], inp["kv"], inp["indices"], scale, D_V, inp["attn_sink"],
                                        inp["topk_length"])


def check_close(got, ref, tag):
    out, mx, lse = got
    r_out, r_mx, r_lse = ref
    assert out.shape == r_out.shape and out.dtype == torch.bfloat16, f"{tag}: out {out.shape} {out.dtype}"
    assert mx.shape == r_mx.shape and mx.dtype == torch.float32, f"{tag}: max_logits {mx.shape}"
    assert lse.shape == r_lse.shape and lse.dtype == torch.float32, f"{tag}: lse {lse.shape}"
    for name, x in (("out", out), ("max_logits", mx), ("lse", lse)):
        assert not torch.isnan(x).any(), f"{tag}: NaN in {name} at {torch.isnan(x).nonzero()[:5].tolist()}"
    empty = torch.isposinf(r_lse)                                   # [s_q, h_q]
    assert torch.equal(empty, torch.isposinf(lse)), \
        f"{tag}: +inf pattern of lse differs at {(empty != torch.isposinf(lse)).nonzero()[:5].tolist()}"
    assert torch.equal(torch.isneginf(r_mx), torch.isneginf(mx)), f"{tag}: -inf pattern of max_logits differs"
    assert (out[empty] == 0).all(), f"{tag}: out of empty rows is not 0"
    assert not torch.isinf(out).any(), f"{tag}: inf in out"
    full = ~empty
    assert_out_rows_close(out, r_out, full, OUT_ABS, OUT_REL, COS_TOL, tag)
    if full.any():
        for name, a, b in (("lse", lse, r_lse), ("max_logits", mx, r_mx)):
            e = (a[full] - b[full]).abs()
            lbad = e > LSE_REL * b[full].abs().clamp_min(1.0)
            assert not lbad.any(), f"{tag}: {name} mismatch ({int(lbad.sum())} rows), max err {e.max().item():.3g}"


def check_case(case: SparsePrefillCase, seed=None):
    seed = zlib.crc32(case_id(case).encode()) % 10007 if seed is None else seed
    inp = make_inputs(case, seed)
    scale = case.d_qk ** -0.5
    got = run_kernel(inp, scale)
    ref = run_reference(inp, scale)
    torch.cuda.synchronize()
    check_close(got, ref, case_id(case))
    return inp, got


C = SparsePrefillCase
# A covering subset of s_q x s_kv x topk x h_q x d_qk x sink x topk_length (every value of each axis
# appears; the large shapes once each, to keep the float32 reference cheap).
MATRIX = [
    C(s_q=1, s_kv=64, topk=1, h_q=128, d_qk=576),
    C(s_q=1, s_kv=592, topk=100, h_q=1, d_qk=512, with_attn_sink=True),
    C(s_q=62, s_kv=64, topk=64, h_q=16, d_qk=576, with_topk_length=True),
    C(s_q=62, s_kv=592, topk=100, h_q=64, d_qk=576, with_attn_sink=True, with_topk_length=True),
    C(s_q=62, s_kv=65536, topk=8192, h_q=64, d_qk=512),
    C(s_q=62, s_kv=592, topk=8192, h_q=16, d_qk=576, with_topk_length=True),
    C(s_q=213, s_kv=592, topk=128, h_q=128, d_qk=512, with_attn_sink=True),
    C(s_q=213, s_kv=8192, topk=512, h_q=1, d_qk=576, with_topk_length=True),
    C(s_q=213, s_kv=65536, topk=100, h_q=128, d_qk=576, with_attn_sink=True, with_topk_length=True),
    C(s_q=1024, s_kv=8192, topk=512, h_q=128, d_qk=576, with_attn_sink=True, with_topk_length=True),
    C(s_q=1024, s_kv=65536, topk=2048, h_q=64, d_qk=512, with_topk_length=True),
    C(s_q=4096, s_kv=8192, topk=2048, h_q=128, d_qk=576),
    C(s_q=213, s_kv=64, topk=1, h_q=16, d_qk=512, invalid_fraction=0.5),
]
ODD_HEADS = [C(s_q=62, s_kv=592, topk=100, h_q=h, d_qk=576, with_attn_sink=True) for h in (3, 63, 65, 100, 127)]


@pytest.mark.parametrize("case", MATRIX, ids=case_id)
def test_matrix(case):
    check_case(case)


@pytest.mark.parametrize("case", ODD_HEADS, ids=case_id)
def test_odd_heads(case):
    check_case(case)


@pytest.mark.parametrize("d_qk", [576, 512])
def test_all_invalid_and_zero_length(d_qk):
    case = C(s_q=40, s_kv=592, topk=200, h_q=64, d_qk=d_qk, with_topk_length=True, with_attn_sink=True)
    inp = make_inputs(case, 3)
    clean_kv = sparse_prefill_inputs(case, device=DEV, seed=3)["kv"]
    inp["indices"][::3] = -1                  # every third query: nothing valid
    inp["indices"][1::3, :, ::2] = 592 + 5    # >= s_kv: skipped
    inp["topk_length"][2::5] = 0
    inp["topk_length"][4] = -3                # negative counts as 0
    inp["topk_length"][5] = 10 ** 6           # past topk counts as topk
    # kv rows poisoned for the first lengths may be attended now (row 5): start again from clean kv
    inp["kv"] = clean_kv
    inp["kv"][~attended_rows(inp)] = float("nan")
    scale = d_qk ** -0.5
    got = run_kernel(inp, scale)
    ref = run_reference(inp, scale)
    check_close(got, ref, f"invalid-d{d_qk}")
    assert torch.isposinf(got[2][::3]).all() and torch.isneginf(got[1][::3]).all()


@pytest.mark.parametrize("what", ["topk0", "skv0", "sq0"])
def test_empty_problems(what):
    s_q, s_kv, topk = {"topk0": (5, 64, 0), "skv0": (5, 0, 16), "sq0": (0, 64, 16)}[what]
    q = torch.randn(s_q, 16, 576, device=DEV).bfloat16()
    kv = torch.randn(s_kv, 1, 576, device=DEV).bfloat16()
    idx = torch.full((s_q, 1, topk), -1, dtype=torch.int32, device=DEV)
    out, mx, lse = torch_flashmla.sparse_mla_prefill(q, kv, idx, softmax_scale=576 ** -0.5)
    assert out.shape == (s_q, 16, 512) and mx.shape == (s_q, 16) and lse.shape == (s_q, 16)
    assert (out == 0).all() and torch.isneginf(mx).all() and torch.isposinf(lse).all()


def test_strided_q_and_kv():
    case = C(s_q=62, s_kv=592, topk=128, h_q=64, d_qk=576, with_topk_length=True)
    inp = make_inputs(case, 11)
    big = torch.randn(62, 80, 640, device=DEV).bfloat16()
    big[:, :64, :576] = inp["q"]
    inp["q"] = big[:, :64, :576]              # head and token strides padded
    kvbig = torch.full((592, 1, 600), float("nan"), device=DEV).bfloat16()
    kvbig[:, :, :576] = inp["kv"]
    inp["kv"] = kvbig[:, :, :576]             # row stride 600 (not a multiple of 16 bytes)
    scale = 576 ** -0.5
    check_close(run_kernel(inp, scale), run_reference(inp, scale), "strided")


def test_contiguous_but_misaligned_q_and_kv():
    """Contiguous views whose base is 2 bytes past a 16-byte boundary: the entry point must copy them
    (a contiguous tensor is returned unchanged by .contiguous())."""
    case = C(s_q=62, s_kv=592, topk=128, h_q=64, d_qk=512, with_topk_length=True)
    inp = make_inputs(case, 12)
    for key in ("q", "kv"):
        t = inp[key]
        flat = torch.empty(t.numel() + 1, device=DEV, dtype=t.dtype)
        view = flat[1:].view(t.shape)
        view.copy_(t)
        assert view.is_contiguous() and view.data_ptr() % 16 != 0
        inp[key] = view
    scale = 512 ** -0.5
    check_close(run_kernel(inp, scale), run_reference(inp, scale), "misaligned")


def test_deterministic():
    case = C(s_q=62, s_kv=8192, topk=512, h_q=128, d_qk=576, with_attn_sink=True)
    inp = make_inputs(case, 5)
    a = run_kernel(inp, 576 ** -0.5)
    b = run_kernel(inp, 576 ** -0.5)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("d_qk", [576, 512])
def test_cuda_graph_replay(d_qk):
    case = C(s_q=213, s_kv=8192, topk=512, h_q=128, d_qk=d_qk, with_attn_sink=True, with_topk_length=True)
    inp = make_inputs(case, 21)
    scale = d_qk ** -0.5
    fn = lambda: torch_flashmla.sparse_mla_prefill(inp["q"], inp["kv"], inp["indices"], softmax_scale=scale,  # noqa: E731
                                                   attn_sink=inp["attn_sink"], topk_length=inp["topk_length"])
    graph, outs = capture_cuda_graph(fn)
    for seed in (1, 2):
        new = sparse_prefill_inputs(case, device=DEV, seed=100 + seed)
        for k in ("q", "indices", "topk_length"):
            inp[k].copy_(new[k])
        inp["kv"].copy_(new["kv"])
        inp["kv"][~attended_rows(inp)] = float("nan")
        graph.replay()
        torch.cuda.synchronize()
        check_close(tuple(o.clone() for o in outs), run_reference(inp, scale), f"graph-{d_qk}-{seed}")
