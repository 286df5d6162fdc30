"""torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch dynamic) on every
op over several input sets. FP8 caches are passed as uint8 (the ops accept both): opcheck's schema
test multiplies inputs, which PyTorch cannot do for float8 tensors."""
import pytest
import torch

import cases

CPU_CASES = cases.op_cases("cpu")


@pytest.mark.parametrize("name,op,args", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


def test_every_op_is_covered():
    covered = {op._qualified_op_name.split("::")[1] for _, op, _ in CPU_CASES}
    assert covered == {"get_mla_metadata", "mla_decode", "sparse_mla_decode", "sparse_mla_prefill",
                       "concat_and_cache_mla", "quantize_kv_fp8", "dequantize_kv_fp8", "quantize_kv_fp8_v4",
                       "dequantize_kv_fp8_v4", "mha_prefill"}
