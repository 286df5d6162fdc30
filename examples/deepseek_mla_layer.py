"""A DeepSeek-V3-style MLA attention layer for decode, on torch_flashmla's ops.

Absorbed form: W_UK is folded into the query (q_latent = q_nope @ W_UK) and W_UV into the output,
so attention runs in the 512-wide latent space over one shared KV head (MQA mode), and the cache
holds only [kv_c (512) ‖ k_pe (64)] per token. One plan (``get_mla_metadata``) per decode step is
shared by every layer.

Run: ``python examples/deepseek_mla_layer.py`` — compiles the decode step with
``torch.compile(fullgraph=True)``, checks it against eager, and on a GPU also captures the step in
a CUDA graph and replays it with new lengths.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Tuple

import torch
import torch.nn.functional as F_nn
from torch import nn

import torch_flashmla as flashmla
from torch_flashmla import _registration

D_LATENT, D_ROPE = 512, 64


@dataclasses.dataclass
class MLAConfig:
    hidden: int = 1024
    num_heads: int = 16
    q_lora_rank: int = 384
    qk_nope_dim: int = 128
    v_head_dim: int = 128
    num_layers: int = 2
    page_size: int = 64
    rope_theta: float = 10000.0

    @staticmethod
    def deepseek_v3(num_layers: int = 2) -> "MLAConfig":
        return MLAConfig(hidden=7168, num_heads=128, q_lora_rank=1536, num_layers=num_layers)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding on the last dim (64) of x [..., T, heads?, 64]; positions [T] int."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * freqs[None, :]                     # [T, 32]
    while angles.dim() < x.dim():
        angles = angles.unsqueeze(-2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class MLADecodeAttention(nn.Module):
    """One MLA attention layer for decode (s_q = 1 token per request)."""

    def __init__(self, cfg: MLAConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.num_heads
        self.q_a_proj = nn.Linear(cfg.hidden, cfg.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(cfg.q_lora_rank)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * (cfg.qk_nope_dim + D_ROPE), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden, D_LATENT + D_ROPE, bias=False)
        self.kv_a_norm = RMSNorm(D_LATENT)
        # Absorbed up-projections: W_UK [h, nope, 512] (q side), W_UV [h, 512, v] (output side).
        self.w_uk = nn.Parameter(torch.randn(h, cfg.qk_nope_dim, D_LATENT) / math.sqrt(cfg.qk_nope_dim))
        self.w_uv = nn.Parameter(torch.randn(h, D_LATENT, cfg.v_head_dim) / math.sqrt(D_LATENT))
        self.o_proj = nn.Linear(h * cfg.v_head_dim, cfg.hidden, bias=False)
        # The scale of the un-absorbed attention (q·k over nope + rope dims).
        self.softmax_scale = (cfg.qk_nope_dim + D_ROPE) ** -0.5

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                block_table: torch.Tensor, cache_seqlens: torch.Tensor, slot_mapping: torch.Tensor,
                plan: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """hidden [b, hidden]; positions [b] int64 (the new token's position); kv_cache [blocks, page,
        1, 576]; block_table [b, max_blocks] int32; cache_seqlens [b] int32 (lengths including the
        new token); slot_mapping [b] int64; plan from get_mla_metadata. Returns [b, hidden]."""
        cfg, b = self.cfg, hidden.shape[0]
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(hidden))).view(b, cfg.num_heads, -1)
        q_nope, q_pe = q.split([cfg.qk_nope_dim, D_ROPE], dim=-1)
        q_pe = rope(q_pe, positions, cfg.rope_theta)
        q_latent = torch.einsum("bhn,hnl->bhl", q_nope, self.w_uk.to(q.dtype))            # [b, h, 512]
        kv = self.kv_a_proj_with_mqa(hidden)
        kv_c, k_pe = self.kv_a_norm(kv[:, :D_LATENT]), rope(kv[:, D_LATENT:], positions, cfg.rope_theta)
        flashmla.concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping)
        q_full = torch.cat([q_latent, q_pe], dim=-1).unsqueeze(1)                         # [b, 1, h, 576]
        out, _ = flashmla.mla_decode(q_full, kv_cache, block_table, cache_seqlens, *plan,
                                     softmax_scale=self.softmax_scale)
        out = torch.einsum("bhl,hlv->bhv", out[:, 0], self.w_uv.to(out.dtype))            # [b, h, v]
        return self.o_proj(out.reshape(b, -1))


class DecodeModel(nn.Module):
    """A stack of MLA layers (residual blocks, no MLP) sharing one plan per decode step."""

    def __init__(self, cfg: MLAConfig, device: torch.device):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(MLADecodeAttention(cfg) for _ in range(cfg.num_layers))
        # Fixed per deployment: computed here so that nothing device-dependent runs in the step.
        self.num_sm_parts = flashmla.default_num_sm_parts(device, cfg.num_heads, 1)

    def decode_step(self, hidden: torch.Tensor, kv_caches: List[torch.Tensor], block_table: torch.Tensor,
                    cache_seqlens: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """hidden [b, hidden]; kv_caches one [blocks, page, 1, 576] per layer; block_table [b, max_blocks]
        int32; cache_seqlens [b] int32 including the new token; slot_mapping [b] int64."""
        plan = flashmla.get_mla_metadata(cache_seqlens, self.cfg.num_heads, 1, self.cfg.num_heads,
                                         num_sm_parts=self.num_sm_parts)
        positions = (cache_seqlens - 1).clamp_min(0).long()
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = hidden + layer(hidden, positions, kv_cache, block_table, cache_seqlens, slot_mapping, plan)
        return hidden


def static_cache(kv_cache: torch.Tensor) -> torch.Tensor:
    """Mark a paged cache as a static input: its address never changes between steps, so the graphs
    of torch.compile(mode="reduce-overhead") may write into it in place (CUDA graph trees skip graphs
    that mutate ordinary inputs)."""
    torch._dynamo.mark_static_address(kv_cache)
    return kv_cache


def make_state(cfg: MLAConfig, batch: int, max_len: int, device, dtype=torch.bfloat16, seed: int = 0):
    """Random caches filled up to random lengths, and the inputs of the next decode step."""
    g = torch.Generator().manual_seed(seed)
    pages_per_seq = -(-(max_len + 1) // cfg.page_size)
    num_blocks = batch * pages_per_seq + 1
    lengths = torch.randint(1, max_len + 1, (batch,), generator=g)
    block_table = torch.randperm(num_blocks, generator=g)[: batch * pages_per_seq].view(batch, pages_per_seq)
    caches = [(torch.randn(num_blocks, cfg.page_size, 1, D_LATENT + D_ROPE, generator=g) * 0.5).to(dtype)
              for _ in range(cfg.num_layers)]
    cache_seqlens = lengths + 1                                   # the new token is written this step
    slot = block_table.gather(1, (lengths // cfg.page_size)[:, None])[:, 0] * cfg.page_size + lengths % cfg.page_size
    hidden = torch.randn(batch, cfg.hidden, generator=g).to(dtype)
    to = dict(device=device)
    return dict(hidden=hidden.to(**to), kv_caches=[static_cache(c.to(**to)) for c in caches],
                block_table=block_table.to(torch.int32).to(**to), cache_seqlens=cache_seqlens.to(torch.int32).to(**to),
                slot_mapping=slot.to(torch.int64).to(**to))


def clone_state(state):
    return {k: ([static_cache(c.clone()) for c in v] if isinstance(v, list) else v.clone()) for k, v in state.items()}


def describe_path(device: torch.device) -> str:
    if device.type != "cuda":
        return "CPU reference (no GPU)"
    paths = {_registration.cuda_path(op, device) for op in ("get_mla_metadata", "mla_decode", "concat_and_cache_mla")}
    return "SM90 kernels" if paths == {"sm90"} else f"GPU ({', '.join(sorted(paths))})"


@torch.inference_mode()
def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    cfg = MLAConfig()
    torch.manual_seed(0)
    model = DecodeModel(cfg, device).to(device=device, dtype=dtype).eval()
    print(f"path: {describe_path(device)}; layers={cfg.num_layers}, heads={cfg.num_heads}, device={device}")

    state = make_state(cfg, batch=4, max_len=300, device=device)
    eager_state = clone_state(state)
    expected = model.decode_step(**eager_state)
    compiled = torch.compile(model.decode_step, fullgraph=True)
    got = compiled(**state)
    err = (got.float() - expected.float()).abs().max().item()
    cache_err = max((a.float() - b.float()).abs().max().item() for a, b in zip(state["kv_caches"], eager_state["kv_caches"]))
    print(f"compiled (fullgraph=True) vs eager: max |diff| output {err:.3e}, cache {cache_err:.3e} "
          "(bf16 rounding of fused projections)")

    if device.type == "cuda":
        # Capture one step, then replay it with other lengths, tables and cache contents copied
        # into the same buffers (same shapes: same batch and max_len).
        static = make_state(cfg, batch=4, max_len=3000, device=device, seed=1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model.decode_step(**clone_state(static))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_out = model.decode_step(**static)
        for seed in (2, 3):
            fresh = make_state(cfg, batch=4, max_len=3000, device=device, seed=seed)
            for key, value in fresh.items():
                if key == "kv_caches":
                    for dst, src in zip(static[key], value):
                        dst.copy_(src)
                else:
                    static[key].copy_(value)
            graph.replay()
            expected = model.decode_step(**fresh)
            err = (graph_out.float() - expected.float()).abs().max().item()
            print(f"CUDA graph replay (lengths {fresh['cache_seqlens'].tolist()}) vs eager: max |diff| = {err:.3e}")


if __name__ == "__main__":
    main()
