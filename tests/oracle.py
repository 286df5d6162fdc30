"""Independent float64 computations of the op semantics, written without the references' code:
explicit per-request token lists and per-head softmax, for checking the references themselves."""
import math

import torch

from torch_flashmla import kv_cache as kvc


def _attend(q_rows, keys, d_v, scale, sink=None):
    """q_rows [h, d] f64, keys [n, d] f64 (only the attended tokens) -> out [h, d_v], lse [h]."""
    h = q_rows.shape[0]
    if keys.shape[0] == 0:
        return torch.zeros(h, d_v, dtype=torch.float64), torch.full((h,), math.inf, dtype=torch.float64)
    s = (q_rows @ keys.T) * scale
    m = s.max(dim=1, keepdim=True).values
    e = torch.exp(s - m)
    denom = e.sum(dim=1, keepdim=True)
    out = (e / denom) @ keys[:, :d_v]
    lse = (m + torch.log(denom)).squeeze(1)
    if sink is not None:
        out = out * (torch.exp(lse) / (torch.exp(lse) + torch.exp(sink.double())))[:, None]
    return out, lse


def dense_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale, causal, d_v=512):
    b, s_q, h_q, d = q.shape
    page_size, h_kv = kv_cache.shape[1], kv_cache.shape[2]
    group = h_q // h_kv
    out = torch.zeros(b, s_q, h_q, d_v, dtype=torch.float64)
    lse = torch.zeros(b, h_q, s_q, dtype=torch.float64)
    for i in range(b):
        n = int(cache_seqlens[i])
        rows = [kv_cache[int(block_table[i, t // page_size]), t % page_size].double() for t in range(n)]
        tokens = torch.stack(rows) if rows else torch.zeros(0, h_kv, d, dtype=torch.float64)
        for t in range(s_q):
            visible = n - s_q + t + 1 if causal else n
            visible = max(0, min(visible, n))
            for g in range(h_kv):
                o, l = _attend(q[i, t, g * group:(g + 1) * group].double(), tokens[:visible, g], d_v, softmax_scale)
                out[i, t, g * group:(g + 1) * group] = o
                lse[i, g * group:(g + 1) * group, t] = l
    return out, lse


def dequantize_record(record: torch.Tensor) -> torch.Tensor:
    """One 656-byte record (uint8 [656]) -> float64 [576], read field by field."""
    raw = bytes(record.to(torch.uint8).tolist())
    scales = torch.frombuffer(bytearray(raw[512:528]), dtype=torch.float32).double()
    values = torch.frombuffer(bytearray(raw[:512]), dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    rope = torch.frombuffer(bytearray(raw[528:656]), dtype=torch.bfloat16).double()
    latent = (values.view(4, 128) * scales[:, None]).flatten()
    return torch.cat([latent, rope])


def sparse_decode(q, kv_cache, indices, topk_length, attn_sink, extra_kv_cache, extra_indices, extra_topk_length,
                  softmax_scale, d_v=512):
    b, s_q, h_q, _ = q.shape

    def tokens_of(cache, idx_row, limit):
        flat = cache.view(torch.uint8).reshape(-1, kvc.FP8_RECORD_BYTES)
        picked = []
        for j, ix in enumerate(idx_row.tolist()):
            if limit is not None and j >= limit:
                break
            if 0 <= ix < flat.shape[0]:
                picked.append(dequantize_record(flat[ix]))
        return picked

    out = torch.zeros(b, s_q, h_q, d_v, dtype=torch.float64)
    lse = torch.zeros(b, h_q, s_q, dtype=torch.float64)
    for i in range(b):
        for t in range(s_q):
            toks = tokens_of(kv_cache, indices[i, t], None if topk_length is None else int(topk_length[i]))
            if extra_kv_cache is not None:
                toks += tokens_of(extra_kv_cache, extra_indices[i, t],
                                  None if extra_topk_length is None else int(extra_topk_length[i]))
            keys = torch.stack(toks) if toks else torch.zeros(0, kvc.D_QK, dtype=torch.float64)
            o, l = _attend(q[i, t].double(), keys, d_v, softmax_scale, attn_sink)
            out[i, t], lse[i, :, t] = o, l
    return out, lse


def sparse_prefill(q, kv, indices, softmax_scale, attn_sink, topk_length, d_v=512):
    s_q, h_q, _ = q.shape
    s_kv = kv.shape[0]
    out = torch.zeros(s_q, h_q, d_v, dtype=torch.float64)
    max_logits = torch.full((s_q, h_q), -math.inf, dtype=torch.float64)
    lse = torch.zeros(s_q, h_q, dtype=torch.float64)
    for t in range(s_q):
        limit = indices.shape[-1] if topk_length is None else int(topk_length[t])
        picked = [ix for ix in indices[t, 0, :limit].tolist() if 0 <= ix < s_kv]
        keys = kv[picked, 0].double() if picked else torch.zeros(0, q.shape[-1], dtype=torch.float64)
        o, l = _attend(q[t].double(), keys, d_v, softmax_scale, attn_sink)
        out[t], lse[t] = o, l
        if picked:
            max_logits[t] = ((q[t].double() @ keys.T) * softmax_scale).max(dim=1).values
    return out, max_logits, lse


def mha_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    """Packed varlen MHA prefill, one sequence and one query row at a time (cu_seqlens read on the host).
    Defined meanings: counts clamped to [0, max_seqlen_*]; key rows outside the tensor not attended;
    query rows no sequence owns: out 0, lse +inf. Overlapping sequences (decreasing cu_seqlens_q) are
    not modelled: the later sequence's result is kept; callers must not compare such rows."""
    total_q, h_q, _ = q.shape
    total_k, h_k, d_v = v.shape
    group = h_q // h_k
    out = torch.zeros(total_q, h_q, d_v, dtype=torch.float64)
    lse = torch.full((total_q, h_q), math.inf, dtype=torch.float64)
    cq, ck = [int(x) for x in cu_seqlens_q], [int(x) for x in cu_seqlens_k]
    for i in range(len(cq) - 1):
        n_q = max(0, min(cq[i + 1] - cq[i], max_seqlen_q))
        n_k = max(0, min(ck[i + 1] - ck[i], max_seqlen_k))
        for j in range(n_q):
            row = cq[i] + j
            if not 0 <= row < total_q:
                continue
            visible = min(n_k, n_k - n_q + j + 1) if causal else n_k
            key_rows = [ck[i] + t for t in range(max(visible, 0)) if 0 <= ck[i] + t < total_k]
            for g in range(h_k):
                keys = k[key_rows, g].double() if key_rows else torch.zeros(0, k.shape[2], dtype=torch.float64)
                values = v[key_rows, g].double() if key_rows else torch.zeros(0, d_v, dtype=torch.float64)
                heads = slice(g * group, (g + 1) * group)
                if not key_rows:
                    continue  # out 0, lse +inf
                s = (q[row, heads].double() @ keys.T) * softmax_scale        # [group, n]
                top = s.max(dim=1, keepdim=True).values
                e = torch.exp(s - top)
                out[row, heads] = (e / e.sum(dim=1, keepdim=True)) @ values
                lse[row, heads] = (top + torch.log(e.sum(dim=1, keepdim=True))).squeeze(1)
    return out, lse
