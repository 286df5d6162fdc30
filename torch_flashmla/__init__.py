"""torch_flashmla: Hopper MLA attention kernels as ``torch.ops.flashmla`` custom ops.

Importing the package loads the op library (schemas), the kernels and the fakes.
"""
import torch  # noqa: F401  (loads libtorch, which _C links against)

from . import _C  # noqa: F401  (registers the flashmla schemas and, when built, the SM90 kernels)
from . import _registration  # noqa: F401  (CPU reference and CUDA kernels)
from . import meta  # noqa: F401  (fakes)
from .ops import (D_QK, D_V, concat_and_cache_mla, default_num_sm_parts, dequantize_kv_fp8, get_mla_metadata,
                  mla_decode, quantize_kv_fp8, sparse_mla_decode, sparse_mla_prefill)
from .ops import dequantize_kv_fp8_v4, quantize_kv_fp8_v4
from .ops import mha_prefill

__version__ = "0.1.0"


def has_sm90_kernels() -> bool:
    """Whether this build carries the compiled SM90 CUDA kernels."""
    return bool(_C.with_cuda_kernels)


__all__ = ["get_mla_metadata", "mla_decode", "sparse_mla_decode", "sparse_mla_prefill", "concat_and_cache_mla",
           "quantize_kv_fp8", "dequantize_kv_fp8", "quantize_kv_fp8_v4", "dequantize_kv_fp8_v4",
           "mha_prefill", "default_num_sm_parts", "has_sm90_kernels", "D_QK", "D_V"]
