"""Module-level guard of the SM90 kernel test files."""
import pytest
import torch

from torch_flashmla import _registration


def require_sm90_kernel(op_name: str) -> None:
    """Skip the calling test module unless a CUDA GPU of compute capability 9.0 is present and
    the extension was built with the SM90 kernel of ``op_name``."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU", allow_module_level=True)
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the kernels are built for sm_90a", allow_module_level=True)
    if _registration.sm90_kernel(op_name) is None:
        pytest.skip(f"torch_flashmla was built without the SM90 {op_name} kernel (FLASHMLA_BUILD_CUDA=1)",
                    allow_module_level=True)
