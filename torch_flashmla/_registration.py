"""CPU and CUDA kernels of the flashmla ops.

For every op: the CPU kernel is the float32 reference; the CUDA kernel validates the inputs and
calls the SM90 kernel (``torch.ops.flashmla_cuda.<op>``, built from csrc/) when the extension has
one, else runs the same reference on the GPU and warns once that the fast path is missing.
``FLASHMLA_FORCE_REFERENCE=1`` routes CUDA calls to the reference (for comparisons).
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from . import checks, reference

# op name -> its check function; the argument order of both is the op's schema order.
OP_CHECKS = {
    "get_mla_metadata": checks.check_get_mla_metadata,
    "mla_decode": checks.check_mla_decode,
    "sparse_mla_decode": checks.check_sparse_mla_decode,
    "sparse_mla_prefill": checks.check_sparse_mla_prefill,
    "concat_and_cache_mla": checks.check_concat_and_cache_mla,
    "quantize_kv_fp8": checks.check_quantize_kv_fp8,
    "dequantize_kv_fp8": checks.check_dequantize_kv_fp8,
    "quantize_kv_fp8_v4": checks.check_quantize_kv_fp8_v4,
    "dequantize_kv_fp8_v4": checks.check_dequantize_kv_fp8_v4,
    "mha_prefill": checks.check_mha_prefill,
}

_warned = set()


@functools.lru_cache(maxsize=None)
def sm90_kernel(op_name: str):
    """The compiled SM90 kernel of an op (``torch.ops.flashmla_cuda.<op>``), or None."""
    try:
        return getattr(torch.ops.flashmla_cuda, op_name).default
    except (AttributeError, RuntimeError):
        return None


def _is_sm90(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) == (9, 0)


def cuda_path(op_name: str, device: torch.device) -> str:
    """Which path a CUDA call of ``op_name`` takes: ``"sm90"`` or ``"reference"``."""
    if os.environ.get("FLASHMLA_FORCE_REFERENCE", "0") == "1":
        return "reference"
    if sm90_kernel(op_name) is not None and _is_sm90(device):
        return "sm90"
    return "reference"


def _register(op_name: str) -> None:
    check = OP_CHECKS[op_name]
    ref = getattr(reference, op_name)

    def cpu_kernel(*args):
        check(*args)
        return ref(*args)

    def cuda_kernel(*args):
        check(*args)
        if cuda_path(op_name, args[0].device) == "sm90":
            return sm90_kernel(op_name)(*args)
        if op_name not in _warned and os.environ.get("FLASHMLA_FORCE_REFERENCE", "0") != "1":
            _warned.add(op_name)
            warnings.warn(f"flashmla.{op_name}: no SM90 kernel for this build/device; running the PyTorch "
                          f"reference on the GPU (slow)", stacklevel=2)
        return ref(*args)

    torch.library.impl(f"flashmla::{op_name}", "CPU")(cpu_kernel)
    torch.library.impl(f"flashmla::{op_name}", "CUDA")(cuda_kernel)


for _name in OP_CHECKS:
    _register(_name)
