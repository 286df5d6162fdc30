"""The example DeepSeek-style MLA layer under torch.compile: fullgraph with zero graph breaks, no
recompile when the batch changes (dynamic=True), and on a GPU reduce-overhead with zero cudagraph
skips."""
import importlib.util
import pathlib
import sys

import pytest
import torch
import torch._dynamo.testing
from torch._dynamo.utils import counters

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "deepseek_mla_layer.py"
spec = importlib.util.spec_from_file_location("deepseek_mla_layer", EXAMPLE)
example = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = example  # dataclasses look their module up
spec.loader.exec_module(example)

# Small and with distinct sizes (batch 3/5, 7 pages per sequence, 4 heads), so duck sizing cannot
# tie the batch to another dimension.
CFG = example.MLAConfig(hidden=256, num_heads=4, q_lora_rank=96, qk_nope_dim=32, v_head_dim=32, num_layers=2)
MAX_LEN = 400


def build(device):
    torch.manual_seed(0)
    return example.DecodeModel(CFG, torch.device(device)).to(device=device, dtype=torch.bfloat16).eval()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@torch.inference_mode()
def test_fullgraph_no_graph_breaks_and_matches_eager():
    model = build("cpu")
    state = example.make_state(CFG, batch=3, max_len=MAX_LEN, device="cpu")
    eager_state = example.clone_state(state)
    expected = model.decode_step(**eager_state)
    backend = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")  # eager numerics: exact compare
    got = torch.compile(model.decode_step, fullgraph=True, backend=backend)(**state)
    assert backend.frame_count == 1
    assert sum(counters["graph_break"].values()) == 0
    assert torch.equal(got, expected)
    for cache, ref in zip(state["kv_caches"], eager_state["kv_caches"]):
        assert torch.equal(cache, ref)  # the in-place cache write happened, exactly once


@torch.inference_mode()
def test_inductor_fullgraph_matches_eager():
    model = build("cpu")
    state = example.make_state(CFG, batch=3, max_len=MAX_LEN, device="cpu", seed=1)
    expected = model.decode_step(**example.clone_state(state))
    got = torch.compile(model.decode_step, fullgraph=True)(**state)
    assert sum(counters["graph_break"].values()) == 0
    torch.testing.assert_close(got.float(), expected.float(), atol=6e-2, rtol=5e-2)


@torch.inference_mode()
def test_dynamic_batch_does_not_recompile():
    model = build("cpu")
    backend = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = torch.compile(model.decode_step, fullgraph=True, dynamic=True, backend=backend)
    compiles = []
    with torch.fx.experimental._config.patch(use_duck_shape=False):
        for batch in (3, 5, 6):
            state = example.make_state(CFG, batch=batch, max_len=MAX_LEN, device="cpu", seed=batch)
            expected = model.decode_step(**example.clone_state(state))
            assert torch.equal(step(**state), expected)
            compiles.append(backend.frame_count)
    assert compiles[0] >= 1 and compiles[1:] == [compiles[0]] * 2, f"recompiled: compile count per call {compiles}"


@pytest.mark.cuda
@torch.inference_mode()
def test_reduce_overhead_zero_cudagraph_skips():
    model = build("cuda")
    step = torch.compile(model.decode_step, mode="reduce-overhead", fullgraph=True)
    # An engine keeps its buffers (caches, tables, lengths) and refills them every step.
    state = example.make_state(CFG, batch=3, max_len=MAX_LEN, device="cuda", seed=0)
    for seed in range(1, 5):  # warm-up, record, then replays with new lengths/tables/caches
        fresh = example.make_state(CFG, batch=3, max_len=MAX_LEN, device="cuda", seed=seed)
        for key, value in fresh.items():
            for dst, src in (zip(state[key], value) if key == "kv_caches" else [(state[key], value)]):
                dst.copy_(src)
        expected = model.decode_step(**example.clone_state(state))
        got = step(**state).clone()
        torch.testing.assert_close(got.float(), expected.float(), atol=6e-2, rtol=5e-2)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert sum(counters["graph_break"].values()) == 0
