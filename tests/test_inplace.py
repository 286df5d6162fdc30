"""concat_and_cache_mla stays in place under torch.compile: Inductor's generated code calls the op
on the cache itself, with no clone or copy of the cache."""
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import torch_flashmla as F
from torch_flashmla import testing as T


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_ds_mla"])
def test_cache_write_compiles_in_place(kv_cache_dtype):
    torch._dynamo.reset()
    a = T.cache_write_inputs(num_tokens=6, num_blocks=64, page_size=64, kv_cache_dtype=kv_cache_dtype, seed=3)
    expected = a["kv_cache"].clone()
    F.concat_and_cache_mla(a["kv_c"], a["k_pe"], expected, a["slot_mapping"], kv_cache_dtype)

    def write(kv_c, k_pe, kv_cache, slot_mapping):
        F.concat_and_cache_mla(kv_c * 1, k_pe, kv_cache, slot_mapping, kv_cache_dtype)

    cache = a["kv_cache"]
    _, codes = run_and_get_code(torch.compile(write, fullgraph=True), a["kv_c"], a["k_pe"], cache,
                                a["slot_mapping"])
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))
    code = "\n".join(codes)
    assert "flashmla.concat_and_cache_mla" in code
    cache_elems = cache.numel()
    assert not re.search(r"\.clone\(|clone_", code), "the cache was cloned"
    assert f"{cache_elems}" not in code, "a kernel iterates over the whole cache (a copy)"
