"""The attention-output comparison shared by the GPU test files (docs/design.md §7 tolerances)."""
import torch

# decode: out abs 8e-4 + rel 2/128, cosine distance <= 5e-6, lse rel 8/65536
DECODE_TOL = dict(out_rtol=2 / 128, cos_tol=5e-6, lse_rtol=8 / 65536)
# sparse prefill: out abs 8e-4 + rel 3/128, cosine distance <= 7e-6, lse rel 2/65536
PREFILL_TOL = dict(out_rtol=3 / 128, cos_tol=7e-6, lse_rtol=2 / 65536)
# MHA prefill (d_v 128): out abs 8e-4 + rel 2/128, cosine distance <= 7e-6, lse rel 2/65536
MHA_PREFILL_TOL = dict(out_rtol=2 / 128, cos_tol=7e-6, lse_rtol=2 / 65536)


def assert_attention_close(out, lse, ref_out, ref_lse, out_rtol=DECODE_TOL["out_rtol"],
                           cos_tol=DECODE_TOL["cos_tol"], lse_rtol=DECODE_TOL["lse_rtol"]):
    """No NaN, +inf lse exactly where the reference has it, out within abs 8e-4 + rel ``out_rtol`` and
    cosine distance <= ``cos_tol`` (over the whole output), finite lse within rel ``lse_rtol``."""
    # Compared in float64 on out's device (large GPU outputs stay there).
    out, lse, ref_out, ref_lse = (t.detach().to(out.device).double() for t in (out, lse, ref_out, ref_lse))
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isposinf(lse), torch.isposinf(ref_lse))
    torch.testing.assert_close(out, ref_out, atol=8e-4, rtol=out_rtol)
    if ref_out.abs().sum() > 0:
        cos = torch.nn.functional.cosine_similarity(out.flatten(), ref_out.flatten(), dim=0)
        assert 1 - cos <= cos_tol
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-6, rtol=lse_rtol)


def assert_mha_prefill_close(out, lse, ref_out, ref_lse):
    """mha_prefill against its reference (out [total_q, h_q, d_v], lse [total_q, h_q]): same shapes and
    dtype, out exactly 0 where the reference lse is +inf (rows with nothing to attend), then
    :func:`assert_attention_close` with MHA_PREFILL_TOL."""
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert torch.all(out.cpu()[torch.isposinf(ref_lse.cpu())] == 0), "rows with nothing to attend must give out = 0"
    assert_attention_close(out, lse, ref_out, ref_lse, **MHA_PREFILL_TOL)


def assert_out_rows_close(out, ref_out, full_rows, out_abs, out_rel, cos_tol, tag=""):
    """Every element within abs ``out_abs`` + rel ``out_rel``; over the rows ``full_rows`` (a boolean
    mask of out's leading dims: the rows that attend to something) the cosine-like distance
    ``1 - 2<x,y>/(|x|^2 + |y|^2)`` at most ``cos_tol``. Messages start with ``tag``."""
    o, r = out.float(), ref_out.float()
    err = (o - r).abs()
    bad = err > out_abs + out_rel * r.abs()
    assert not bad.any(), (f"{tag}: out mismatch at {bad.nonzero()[:5].tolist()} ({int(bad.sum())} elements), "
                           f"max err {err.max().item():.3g}")
    if full_rows.any():
        od, rd = o[full_rows].double(), r[full_rows].double()
        denom = (od * od + rd * rd).sum().item()
        if denom > 0:
            diff = 1 - 2 * (od * rd).sum().item() / denom
            assert diff <= cos_tol, f"{tag}: cosine distance {diff:.3g}"


def assert_within_error_model(out, lse, ref_out, ref_lse, bound, lse_rtol, tag=""):
    """Every out element within ``bound`` (the reference's per-element error model of the kernel, e.g.
    ``reference.sparse_mla_decode_error_bound``) of the reference; no NaN; ``+inf`` lse exactly where the
    reference has it (rows with nothing to attend to, whose bound is 1e-6 about out = 0); finite lse within
    ``lse_rtol * max(|lse|, 1)``. ``out`` is [..., d_v]; ``lse`` in the reference's layout."""
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype, f"{tag}: out {out.shape} {out.dtype}"
    assert lse.shape == ref_lse.shape, f"{tag}: lse {lse.shape}"
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), f"{tag}: NaN in out or lse"
    empty = torch.isposinf(ref_lse)
    assert torch.equal(empty, torch.isposinf(lse)), f"{tag}: +inf pattern of lse differs"
    err = (out.double() - ref_out.double()).abs()
    bad = err > bound.double()
    worst = (err / bound.double()).max().item() if err.numel() else 0.0
    assert not bad.any(), (f"{tag}: {int(bad.sum())} of {bad.numel()} out elements past the error bound, worst "
                           f"err / bound {worst:.3g}, first at {bad.nonzero()[:3].tolist()}")
    fin = torch.isfinite(ref_lse)
    lerr = (lse[fin].double() - ref_lse[fin].double()).abs()
    lbad = lerr > lse_rtol * ref_lse[fin].double().abs().clamp_min(1.0)  # scores' absolute rounding near lse 0
    assert not lbad.any(), f"{tag}: lse mismatch ({int(lbad.sum())} rows), max err {lerr.max().item():.3g}"
