"""Decode under CUDA graphs: a 4-layer step (planner + decode per layer) captured once and replayed
with new lengths and block tables; a batch-64 graph replayed with a plan for fewer real requests;
flat memory over 1,000 replays."""
import pytest
import torch

import torch_flashmla as F
from torch_flashmla import _registration, testing as T

pytestmark = pytest.mark.cuda
DEV = torch.device("cuda")
H_Q, NUM_LAYERS = 16, 4


def planner_in_graph() -> bool:
    """The planner is capturable only as a GPU kernel (the reference plans on the host)."""
    return _registration.cuda_path("get_mla_metadata", DEV) == "sm90"


class Step:
    """Static buffers of one decode step of NUM_LAYERS layers sharing one plan."""

    def __init__(self, case, seed):
        self.case = case
        # One request layout (lengths, block table, NaN in unused slots) shared by all layers; each
        # layer has its own queries and cache values (layer 0's cache with rolled columns, so the
        # NaN slots stay where the layout puts them).
        base = T.dense_decode_inputs(case, device=DEV, seed=seed)
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        self.q = [base["q"]] + [torch.randn(base["q"].shape, generator=gen).to(case.dtype).to(DEV)
                                for _ in range(NUM_LAYERS - 1)]
        self.kv_caches = [base["kv_cache"].roll(i, dims=-1) for i in range(NUM_LAYERS)]
        self.block_table = base["block_table"]
        self.cache_seqlens = base["cache_seqlens"]
        self.metadata = base["tile_scheduler_metadata"]
        self.num_splits = base["num_splits"]
        self.num_sm_parts = self.metadata.shape[0]

    def plan(self):
        return F.get_mla_metadata(self.cache_seqlens, self.case.s_q * H_Q, 1, H_Q, num_sm_parts=self.num_sm_parts)

    def run(self, in_graph_plan: bool):
        if in_graph_plan:
            metadata, num_splits = self.plan()
        else:
            metadata, num_splits = self.metadata, self.num_splits
        return [F.mla_decode(q, kv, self.block_table, self.cache_seqlens, metadata, num_splits)
                for q, kv in zip(self.q, self.kv_caches)]

    def load(self, case, seed):
        """Copy fresh inputs (new lengths, tables, caches) into the static buffers."""
        fresh = Step(case, seed)
        for dst, src in zip(self.q + self.kv_caches, fresh.q + fresh.kv_caches):
            dst.copy_(src)
        self.block_table.copy_(fresh.block_table)
        self.cache_seqlens.copy_(fresh.cache_seqlens)
        if not planner_in_graph():
            metadata, num_splits = self.plan()
            self.metadata.copy_(metadata)
            self.num_splits.copy_(num_splits)
        return fresh


def test_four_layer_step_replays_with_new_lengths_and_tables():
    # max length 9000, captured while the lengths were short: replays grow them by thousands.
    case = T.DenseDecodeCase(b=8, h_q=H_Q, seqlen=9000, varlen=True)
    step = Step(case, seed=0)
    step.cache_seqlens.fill_(50)
    in_graph = planner_in_graph()
    graph, outputs = T.capture_cuda_graph(lambda: step.run(in_graph))
    for seed in (100, 200, 300):
        fresh = step.load(case, seed)
        graph.replay()
        expected = fresh.run(in_graph_plan=True)
        for (out, lse), (ref_out, ref_lse) in zip(outputs, expected):
            assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_batch64_graph_with_plan_for_fewer_real_requests():
    case = T.DenseDecodeCase(b=64, h_q=H_Q, seqlen=3000, varlen=True)
    step = Step(case, seed=1)
    graph, outputs = T.capture_cuda_graph(lambda: step.run(in_graph_plan=False))
    real = 40
    fresh = step.load(case, seed=7)
    step.cache_seqlens[real:] = 0  # padding requests of the engine
    fresh.cache_seqlens[real:] = 0
    metadata, num_splits = step.plan()  # computed outside the graph
    step.metadata.copy_(metadata)
    step.num_splits.copy_(num_splits)
    graph.replay()
    expected = fresh.run(in_graph_plan=True)
    for (out, lse), (ref_out, ref_lse) in zip(outputs, expected):
        assert torch.equal(out[:real], ref_out[:real]) and torch.equal(lse[:real], ref_lse[:real])
        assert torch.all(out[real:] == 0) and torch.all(torch.isposinf(lse[real:]))


def test_memory_flat_over_1000_replays():
    case = T.DenseDecodeCase(b=16, h_q=H_Q, seqlen=2000, varlen=True)
    step = Step(case, seed=2)
    in_graph = planner_in_graph()
    graph, _ = T.capture_cuda_graph(lambda: step.run(in_graph))
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), torch.cuda.mem_get_info()[0]
    for _ in range(1000):
        graph.replay()
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), torch.cuda.mem_get_info()[0]
    assert after == before, f"(allocated, reserved, device free) before {before}, after {after}"
