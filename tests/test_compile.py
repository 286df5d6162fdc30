"""The example DeepSeek-style MLA layer (examples/deepseek_mla_layer.py) under torch.compile:
fullgraph with zero graph breaks, matches eager and the float32 reference model, no recompile when
the batch changes (dynamic=True), prefill in MHA mode followed by decode in MLA mode; on a GPU,
reduce-overhead with zero cudagraph skips and a hand-captured CUDA graph replayed with new lengths."""
import importlib.util
import pathlib
import sys

import pytest
import torch
import torch._dynamo.testing
from torch._dynamo.utils import counters

from torch_flashmla.testing import capture_cuda_graph

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
def test_reference_step_matches_ops_on_cpu():
    """On the CPU the ops' kernels are the float32 references, so the two eager paths agree exactly."""
    model = build("cpu")
    state = example.make_state(CFG, batch=3, max_len=MAX_LEN, device="cpu", seed=2)
    ref_state = example.clone_state(state)
    assert torch.equal(model.decode_step(**state), model.reference_step(**ref_state))
    for cache, ref in zip(state["kv_caches"], ref_state["kv_caches"]):
        assert torch.equal(cache, ref)


@torch.inference_mode()
def test_inductor_fullgraph_matches_reference_over_steps():
    """Inductor-compiled steps (lengths growing, one page boundary crossed) vs the eager float32
    reference model; one compile for all steps."""
    model = build("cpu")
    state = example.make_state(CFG, batch=3, max_len=MAX_LEN, device="cpu", seed=1, spare_tokens=3)
    state["cache_seqlens"][0] = CFG.page_size            # step 1 starts a new page for request 0
    state["slot_mapping"] = example.slots_of_last_token(state, CFG.page_size)
    ref_state = example.clone_state(state)
    backend = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    step = torch.compile(model.decode_step, fullgraph=True, backend=backend)
    for _ in range(3):
        got, want = step(**state), model.reference_step(**ref_state)
        torch.testing.assert_close(got.float(), want.float(), atol=6e-2, rtol=5e-2)
        for cache, ref in zip(state["kv_caches"], ref_state["kv_caches"]):
            torch.testing.assert_close(cache.float(), ref.float(), atol=6e-2, rtol=5e-2)
        example.advance(state, got, CFG.page_size)
        example.advance(ref_state, want, CFG.page_size)
    assert backend.frame_count == 1
    assert sum(counters["graph_break"].values()) == 0


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
    # The first call may reach the backend twice (dynamo restarts its analysis once to specialize a
    # Python float under dynamic=True); what matters is that later batches add nothing.
    assert compiles[0] >= 1 and compiles[1:] == [compiles[0]] * 2, f"recompiled: compile count per call {compiles}"
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0


# MHA-mode prefill needs DeepSeek's head dims (q/k 128 nope + 64 rope = 192, v 128).
CFG_PREFILL = example.MLAConfig(hidden=256, num_heads=4, q_lora_rank=96, qk_nope_dim=128, v_head_dim=128,
                                num_layers=2)


@torch.inference_mode()
def test_prefill_mha_mode_then_decode_mla_mode_fullgraph():
    """Prompts prefilled in MHA mode (mha_prefill) and then decoded in MLA mode (mla_decode) over the
    caches the prefill wrote: both steps compile with fullgraph=True and no graph break, match the
    eager op path exactly and the float32 reference model within the bf16 tolerances."""
    torch.manual_seed(0)
    model = example.DecodeModel(CFG_PREFILL, torch.device("cpu")).to(dtype=torch.bfloat16).eval()
    prefill, state = example.make_prompts(CFG_PREFILL, batch=3, max_len=70, device="cpu", seed=3, spare_tokens=2)
    eager = dict(prefill, kv_caches=[c.clone() for c in prefill["kv_caches"]])
    ref = dict(prefill, kv_caches=[c.clone() for c in prefill["kv_caches"]])
    backend = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    got = torch.compile(model.prefill_step, fullgraph=True, backend=backend)(**prefill)
    assert torch.equal(got, model.prefill_step(**eager))
    want = model.reference_prefill_step(**ref)
    torch.testing.assert_close(got.float(), want.float(), atol=6e-2, rtol=5e-2)
    slots = prefill["slot_mapping"]
    for cache, ref_cache in zip(prefill["kv_caches"], ref["kv_caches"]):
        torch.testing.assert_close(cache.view(-1, 576)[slots].float(), ref_cache.view(-1, 576)[slots].float(),
                                   atol=6e-2, rtol=5e-2)
    ref_state = dict(example.clone_state(state), kv_caches=ref["kv_caches"])
    example.after_prefill(prefill, state, got)
    example.after_prefill(ref, ref_state, want)
    step = torch.compile(model.decode_step, fullgraph=True, backend=backend)
    for _ in range(2):
        out, ref_out = step(**state), model.reference_step(**ref_state)
        torch.testing.assert_close(out.float(), ref_out.float(), atol=6e-2, rtol=5e-2)
        example.advance(state, out, CFG_PREFILL.page_size)
        example.advance(ref_state, ref_out, CFG_PREFILL.page_size)
    assert backend.frame_count == 2
    assert sum(counters["graph_break"].values()) == 0


@pytest.mark.cuda
@torch.inference_mode()
def test_reduce_overhead_zero_cudagraph_skips():
    model = build("cuda")
    step = torch.compile(model.decode_step, mode="reduce-overhead", fullgraph=True)
    # An engine keeps its buffers (caches, tables, lengths) and refills them every step.
    state = example.make_state(CFG, batch=3, max_len=MAX_LEN, device="cuda", seed=0)
    for seed in range(1, 5):  # warm-up, record, then replays with new lengths/tables/caches
        fresh = example.make_state(CFG, batch=3, max_len=MAX_LEN, device="cuda", seed=seed)
        example.copy_state_(state, fresh)
        expected = model.reference_step(**example.clone_state(state))
        got = step(**state).clone()
        torch.testing.assert_close(got.float(), expected.float(), atol=6e-2, rtol=5e-2)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert sum(counters["graph_break"].values()) == 0


@pytest.mark.cuda
@torch.inference_mode()
def test_cuda_graph_capture_replays_with_new_lengths():
    """The compiled step captured by hand in a torch.cuda.CUDAGraph; replays after new lengths,
    tables, slots and caches are copied into the captured buffers match the eager reference."""
    model = build("cuda")
    step = torch.compile(model.decode_step, fullgraph=True)
    static = example.make_state(CFG, batch=3, max_len=MAX_LEN, device="cuda", seed=0)
    # compile and warm up outside the capture
    graph, out = capture_cuda_graph(lambda: step(**static), warmup=lambda: step(**example.clone_state(static)),
                                    warmup_iters=2)
    for seed in (1, 2, 3):
        fresh = example.make_state(CFG, batch=3, max_len=MAX_LEN, device="cuda", seed=seed)
        example.copy_state_(static, fresh)
        graph.replay()
        want = model.reference_step(**fresh)
        torch.testing.assert_close(out.float(), want.float(), atol=6e-2, rtol=5e-2)
        for cache, ref in zip(static["kv_caches"], fresh["kv_caches"]):
            torch.testing.assert_close(cache.float(), ref.float(), atol=6e-2, rtol=5e-2)
    assert sum(counters["graph_break"].values()) == 0
