"""Paged dense-decode inputs drawn on the GPU, shared by the dense decode GPU tests (16-bit and FP8
caches): NaN in every cache slot that is not part of a sequence (tails of last pages, unused pages),
garbage in block-table tails (huge ids, -1, random ids); and the allocator poisoning done before a call."""
from __future__ import annotations

import torch

import torch_flashmla

DEV = torch.device("cuda")
D_QK = 576


def make_inputs(b, s_q, h_q, h_kv, s_k, *, page_size=64, varlen=False, zeros=False, dtype=torch.bfloat16, seed=0,
                num_sm_parts=None, is_fp8_kvcache=False, bad_pages=0.0):
    """Paged decode inputs on the GPU, poisoned wherever the kernel must not look.

    bad_pages > 0: that fraction of the used block-table entries (inside the sequences) becomes an id
    outside the cache (-1, 2^30 or num_blocks), whose tokens are skipped; request 0 also gets every page of
    its tokens 64..127 out of range (a whole 64-token chunk skipped). With pages under 64 tokens this puts
    chunks with some tokens skipped and others attended in front of the kernel."""
    g = torch.Generator(device=DEV)
    g.manual_seed(seed)
    if varlen:
        lens = torch.randint(0, s_k + 1, (b,), generator=g, device=DEV)
        lens[0] = s_k
    else:
        lens = torch.full((b,), s_k, device=DEV)
    if zeros and b > 1:
        lens[1::3] = 0
    lens = lens.to(torch.int32)
    max_pages = -(-s_k // page_size) + 1                     # one garbage column at least
    num_blocks = b * max_pages + 3                           # spare pages stay NaN
    cache = torch.full((num_blocks, page_size, h_kv, D_QK), float("nan"), dtype=dtype, device=DEV)
    perm = torch.randperm(num_blocks, generator=g, device=DEV).to(torch.int32)
    table = perm[: b * max_pages].view(b, max_pages).clone()
    pages_used = (lens + page_size - 1) // page_size
    col = torch.arange(max_pages, device=DEV)[None, :]
    # Tails: a mix of huge ids, -1 and random valid ids (all must be ignored).
    garbage = torch.where(col % 3 == 0, 2 ** 30, torch.where(col % 3 == 1, -1, perm[:max_pages][None, :].expand(b, -1)))
    tail = col >= pages_used[:, None]
    # Fill only the slots inside each sequence: positions < len.
    pos = col * page_size  # first token of each page column
    flat_cache = cache.view(num_blocks, page_size, h_kv, D_QK)
    data = torch.randn(b, max_pages, page_size, h_kv, D_QK, generator=g, device=DEV).to(dtype)
    tok = pos[:, :, None] + torch.arange(page_size, device=DEV)[None, None, :]            # [1, P, page]
    inside = tok < lens[:, None, None]                                                     # [b, P, page]
    used_ids = table.long()
    current = flat_cache[used_ids]                                                         # [b, P, page, h, d]
    flat_cache[used_ids] = torch.where(inside[..., None, None], data, current)
    table = torch.where(tail, garbage.to(torch.int32), table).contiguous()
    if bad_pages > 0:
        out_of_range = torch.tensor([-1, 2 ** 30, num_blocks], device=DEV, dtype=torch.int32)
        pick = torch.rand(b, max_pages, generator=g, device=DEV) < bad_pages
        pick[0, 64 // page_size: -(-128 // page_size)] = True
        pick &= ~tail
        ids = out_of_range[torch.randint(0, 3, (b, max_pages), generator=g, device=DEV)]
        table = torch.where(pick, ids, table).contiguous()
    q = torch.randn(b, s_q, h_q, D_QK, generator=g, device=DEV).to(dtype)
    plan = torch_flashmla.get_mla_metadata(lens, s_q * h_q // h_kv, h_kv, h_q, is_fp8_kvcache=is_fp8_kvcache,
                                           num_sm_parts=num_sm_parts)
    return q, cache, table, lens, plan


def poison_allocator(nbytes):
    """Leave NaN in the caching allocator's next blocks, so unwritten outputs show up."""
    junk = [torch.full((n,), float("nan"), dtype=torch.float32, device=DEV) for n in nbytes]
    del junk
