"""Fakes on fake CUDA tensors (no GPU needed) give the reference's shapes, dtypes and a CUDA device,
and work with symbolic sizes."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import cases

CPU_CASES = cases.op_cases("cpu")


def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _flat(item)]
    return []


def _to_fake_cuda(mode, args):
    """Fake CUDA tensors with the same sizes and strides (creatable without a GPU)."""
    return tuple(torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="cuda")
                 if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("name,op,args", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_fake_cuda_matches_reference(name, op, args):
    real_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    expected = _flat(op(*real_args))
    with FakeTensorMode() as mode:
        fake_args = _to_fake_cuda(mode, args)
        got = _flat(op(*fake_args))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype
        assert g.device.type == "cuda"


@pytest.mark.parametrize("name,op,args", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_fake_symbolic_shapes(name, op, args):
    """Every size symbolic: the fakes must not specialize on or read values."""
    expected = _flat(op(*tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)))
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        from torch._dynamo.source import ConstantSource
        from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

        def sym(t, i):
            ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * t.dim())
            return mode.from_tensor(t, source=ConstantSource(f"{name}_{i}"), symbolic_context=ctx)

        fake_args = tuple(sym(a, i) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args))
        got = _flat(op(*fake_args))
    for g, e in zip(got, expected):
        assert tuple(int(s) for s in g.shape) == tuple(e.shape) and g.dtype == e.dtype
