"""Emulated DeepSeek sparse attention operators: npu_lightning_indexer and npu_sparse_flash_attention.

Written from the torch-npu 2.13.0 docstrings and meta registrations and the op-plugin docs and
goldens summarised in shared/research/ascend-ops.md (4.1, 4.2): layouts BSND / TND / PA_BSND,
cumulative (TND) vs per-sequence lengths, right-down causal mode 3, -1-terminated index rows.
Plain torch on CPU; nothing here knows opbridge.
"""
from __future__ import annotations

from typing import Optional

import torch

from .contract import (DEVICE, HALF, INT_MAX64, UNDEFINED_INT, cumulative, need, need_int32, need_kernel,
                       undefined)

SPARSE_COUNTS = set(range(1, 2049)) | {3072, 4096, 5120, 6144, 7168, 8192}


def _per_batch(op: str, name: str, lengths: Optional[torch.Tensor], B: int, cap: int) -> list[int]:
    """Per-sequence lengths (BSND / PA_BSND); None means the full S of the layout."""
    if lengths is None:
        return [cap] * B
    need_int32(op, name, lengths)
    v = lengths.tolist()
    need(len(v) == B and all(0 <= x <= cap for x in v), op, f"{name} must hold {B} lengths in [0, {cap}], got {v}")
    return v


def _paged_keys(op: str, key: torch.Tensor, block_table: torch.Tensor, b: int, length: int) -> torch.Tensor:
    """The first ``length`` tokens of sequence b from a [num_blocks, block_size, N2, D] cache."""
    bs = key.shape[1]
    blocks = block_table[b, : -(-length // bs)].long()
    need(bool(((blocks >= 0) & (blocks < key.shape[0])).all()), op, "block_table entries must be valid block ids")
    return key[blocks].reshape(-1, *key.shape[2:])[:length]


def _sequences(op, layout_q, layout_k, q, key, asl_q, asl_k, block_table):
    """(B, per-batch query row ranges, per-batch key tensors [Lk, N2, D]) for any supported layout pair."""
    if layout_q == "TND":
        need(q.dim() == 3, op, "a TND query is [T, N, D]")
        need(asl_q is not None, op, "TND needs actual_seq_lengths_query (cumulative)")
        qb = cumulative(op, "actual_seq_lengths_query", asl_q, q.shape[0])
        B = len(qb) - 1
        q_rows = [(qb[i], qb[i + 1]) for i in range(B)]
    else:
        need(q.dim() == 4, op, "a BSND query is [B, S, N, D]")
        B, S1 = q.shape[:2]
        q_rows = [(b * S1, b * S1 + n) for b, n in enumerate(_per_batch(op, "actual_seq_lengths_query", asl_q, B, S1))]
    if layout_k == "TND":
        need(key.dim() == 3, op, "a TND key is [T, N2, D]")
        need(asl_k is not None, op, "TND needs actual_seq_lengths key lengths (cumulative)")
        kb = cumulative(op, "actual_seq_lengths_key/kv", asl_k, key.shape[0])
        need(len(kb) - 1 == B, op, "query and key length lists must describe the same batch")
        keys = [key[kb[i]:kb[i + 1]] for i in range(B)]
    elif layout_k == "BSND":
        need(key.dim() == 4 and key.shape[0] == B, op, "a BSND key is [B, S2, N2, D]")
        keys = [key[b, :n] for b, n in enumerate(_per_batch(op, "actual_seq_lengths_key/kv", asl_k, B, key.shape[1]))]
    else:  # PA_BSND
        need(key.dim() == 4, op, "a PA_BSND key cache is [num_blocks, block_size, N2, D]")
        need(asl_k is not None, op, "PA_BSND needs per-sequence key lengths")
        need_int32(op, "block_table", block_table, dims=2)
        need(block_table.shape[0] == B, op, "block_table must have one row per batch")
        lens = _per_batch(op, "actual_seq_lengths_key/kv", asl_k, B, block_table.shape[1] * key.shape[1])
        keys = [_paged_keys(op, key, block_table, b, n) for b, n in enumerate(lens)]
    return B, q_rows, keys


def npu_lightning_indexer(query, key, weights, *, actual_seq_lengths_query=None, actual_seq_lengths_key=None,
                          block_table=None, layout_query="BSND", layout_key="BSND", sparse_count=2048, sparse_mode=3,
                          pre_tokens=INT_MAX64, next_tokens=INT_MAX64, return_value=False):
    op = "npu_lightning_indexer"
    need_kernel(op)
    need(query.dtype in HALF and key.dtype == query.dtype, op, "query and key: bfloat16/float16 of one dtype")
    w_dtypes = HALF + ((torch.float32,) if DEVICE.family in ("A2", "A3") else ())
    need(weights.dtype in w_dtypes, op, f"weights must be one of {w_dtypes} on {DEVICE.name}")
    need(query.is_contiguous() and key.is_contiguous() and weights.is_contiguous(), op,
         "query, key and weights must be contiguous")
    need(layout_query in ("BSND", "TND"), op, "layout_query must be BSND or TND")
    need(layout_key in ("PA_BSND", "BSND", "TND"), op, "layout_key must be PA_BSND, BSND or TND")
    need(layout_key == "PA_BSND" or layout_key == layout_query, op, "without PageAttention layout_key == layout_query")
    need(sparse_count in SPARSE_COUNTS, op, "sparse_count must be 1..2048 or 3072/4096/5120/6144/7168/8192")
    need(sparse_mode in (0, 3), op, "sparse_mode must be 0 or 3")
    need(pre_tokens == INT_MAX64 and next_tokens == INT_MAX64, op, "pre_tokens / next_tokens: defaults only")
    need(not (return_value and layout_key == "PA_BSND"), op, "return_value is not supported with PA_BSND")
    need(key.shape[-2] == 1, op, f"key must have one head (N2 = 1), got {key.shape[-2]}")
    need(query.shape[-1] == 128 and key.shape[-1] == 128, op, "head dim D must be 128")
    N1 = query.shape[-2]
    if DEVICE.family == "950":
        need(N1 in (8, 16, 24, 32, 64), op, f"on Ascend 950 the query head count must be 8/16/24/32/64, got {N1}")
    else:
        need(N1 <= 64, op, f"the query head count must be <= 64, got {N1}")
    need(weights.shape == query.shape[:-1], op, "weights must be [B, S1, N1] / [T, N1] like the query")
    if layout_key == "PA_BSND":
        bs = key.shape[1]
        need(bs % 16 == 0 and bs <= 1024, op, f"block_size must be a multiple of 16 and <= 1024, got {bs}")
    B, q_rows, keys = _sequences(op, layout_query, layout_key, query, key, actual_seq_lengths_query,
                                 actual_seq_lengths_key, block_table)
    qf, wf = query.reshape(-1, N1, 128).float(), weights.reshape(-1, N1).float()
    out = torch.full((qf.shape[0], sparse_count), UNDEFINED_INT, dtype=torch.int32)
    vals = undefined((qf.shape[0], sparse_count), query.dtype)
    for b in range(B):
        lo, hi = q_rows[b]
        kb = keys[b][:, 0].float()  # [Lk, D]
        Lq, Lk = hi - lo, kb.shape[0]
        score = (torch.relu(torch.einsum("ihd,jd->ihj", qf[lo:hi], kb)) * wf[lo:hi].unsqueeze(-1)).sum(1)
        if sparse_mode == 3:  # right-down causal: row i sees j <= Lk - Lq + i
            allowed = torch.arange(Lk).unsqueeze(0) <= (Lk - Lq + torch.arange(Lq)).unsqueeze(1)
        else:
            allowed = torch.ones(Lq, Lk, dtype=torch.bool)
        masked = score.masked_fill(~allowed, float("-inf"))
        order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[:, :sparse_count]
        m = order.shape[1]
        keep = torch.arange(m).unsqueeze(0) < allowed.sum(-1, keepdim=True)  # the first min(count, allowed)
        out[lo:hi] = -1
        out[lo:hi, :m] = torch.where(keep, order, torch.full_like(order, -1)).to(torch.int32)
        vals[lo:hi, :m] = torch.where(keep, score.gather(1, order), torch.full_like(score[:, :m], float("nan"))
                                      ).to(query.dtype)
    shape = (*query.shape[:-2], 1, sparse_count)  # [T, N2=1, sparse_count] / [B, S1, N2=1, sparse_count]
    values = vals.view(shape) if return_value else torch.empty(0, dtype=query.dtype)
    return out.view(shape), values


def npu_sparse_flash_attention(query, key, value, sparse_indices, scale_value, *, block_table=None,
                               actual_seq_lengths_query=None, actual_seq_lengths_kv=None, query_rope=None,
                               key_rope=None, sparse_block_size=1, layout_query="BSND", layout_kv="BSND", sparse_mode=3,
                               pre_tokens=INT_MAX64, next_tokens=INT_MAX64, attention_mode=0,
                               return_softmax_lse=False, sinks=None):
    op = "npu_sparse_flash_attention"
    need_kernel(op)
    need(attention_mode == 2, op, f"attention_mode: only 2 (MLA-absorb) is supported, got {attention_mode}")
    need(query.dtype in HALF and key.dtype == query.dtype, op, "query and key: bfloat16/float16 of one dtype")
    need(value is not None, op, "value=None needs CANN >= 9.2.0")
    need(value is key or (value.data_ptr() == key.data_ptr() and value.shape == key.shape
                          and value.stride() == key.stride()), op, "value must be the key tensor (MLA: K = V)")
    need(query.is_contiguous() and key.is_contiguous() and sparse_indices.is_contiguous(), op,
         "query, key and sparse_indices must be contiguous")
    need(layout_query in ("BSND", "TND"), op, "layout_query must be BSND or TND")
    need(layout_kv in ("TND", "BSND", "PA_BSND"), op, "layout_kv must be TND, BSND or PA_BSND")
    need(layout_kv == "PA_BSND" or layout_kv == layout_query, op, "without PageAttention layout_kv == layout_query")
    need(sparse_mode in (0, 3), op, "sparse_mode must be 0 or 3")
    need(pre_tokens == INT_MAX64 and next_tokens == INT_MAX64, op, "pre_tokens / next_tokens: defaults only")
    need(sparse_indices.dtype == torch.int32, op, "sparse_indices must be int32")
    need(query.shape[-1] == 512 and key.shape[-1] == 512, op, "query and key carry the 512-dim latent (D = 512)")
    need(key.shape[-2] == 1, op, f"one KV head (KV_N = 1), got {key.shape[-2]}")
    need((query_rope is None) == (key_rope is None), op, "query_rope and key_rope go together")
    if query_rope is not None:
        need(query_rope.shape == (*query.shape[:-1], 64) and key_rope.shape == (*key.shape[:-1], 64), op,
             "query_rope / key_rope have the query / key shapes with D = 64")
        need(query_rope.dtype == query.dtype and key_rope.dtype == query.dtype, op, "rope parts share query's dtype")
        need(query_rope.is_contiguous() and key_rope.is_contiguous(), op, "query_rope / key_rope must be contiguous")
    N1 = query.shape[-2]
    if DEVICE.family == "950":
        need(1 <= N1 <= 128, op, f"the query head count must be in 1..128, got {N1}")
        need(sparse_block_size == 1, op, "sparse_block_size must be 1 on Ascend 950")
    else:
        need(N1 in (1, 2, 4, 8, 16, 32, 64, 128), op, f"the query head count must be a power of two <= 128, got {N1}")
        need(sparse_block_size in (1, 2, 4, 8, 16, 32, 64, 128), op, "sparse_block_size: a power of two <= 128")
    need(sparse_indices.shape[:-1] == (*query.shape[:-2], 1), op,
         "sparse_indices must be [T, KV_N=1, sparse_size] / [B, S1, KV_N=1, sparse_size]")
    need(not (return_softmax_lse and layout_kv == "PA_BSND"), op, "return_softmax_lse is not supported with PA_BSND")
    if sinks is not None:
        need(DEVICE.family == "950", op, "sinks are supported on Ascend 950 only")
        need(sinks.dtype == torch.float32 and sinks.shape == (N1,), op, "sinks must be float32 [N1]")
    B, q_rows, keys = _sequences(op, layout_query, layout_kv, query, key, actual_seq_lengths_query,
                                 actual_seq_lengths_kv, block_table)
    rope_keys = None
    if key_rope is not None:
        _, _, rope_keys = _sequences(op, layout_query, layout_kv, query, key_rope, actual_seq_lengths_query,
                                     actual_seq_lengths_kv, block_table)
    qf = query.reshape(-1, N1, 512).float()
    qr = None if query_rope is None else query_rope.reshape(-1, N1, 64).float()
    idx_rows = sparse_indices.reshape(qf.shape[0], -1)
    out = undefined(qf.shape, torch.float32)
    smax, ssum = undefined((qf.shape[0], N1), torch.float32), undefined((qf.shape[0], N1), torch.float32)
    for b in range(B):
        lo, hi = q_rows[b]
        kn = keys[b][:, 0].float()
        kr = None if rope_keys is None else rope_keys[b][:, 0].float()
        Lq, Lkv = hi - lo, kn.shape[0]
        idx = idx_rows[lo:hi].long()
        before_end = (idx != -1).long().cumprod(-1).bool()  # -1 ends the row's valid indices
        pos = (idx.unsqueeze(-1) * sparse_block_size + torch.arange(sparse_block_size)).flatten(1)
        ok = before_end.repeat_interleave(sparse_block_size, -1) & (pos >= 0) & (pos < Lkv)
        at = pos.clamp(0, max(Lkv - 1, 0))
        K = kn[at] if Lkv else torch.zeros(*at.shape, 512)  # [Lq, P, 512]
        logits = torch.einsum("ihd,ipd->ihp", qf[lo:hi], K)
        if qr is not None:
            logits = logits + torch.einsum("ihd,ipd->ihp", qr[lo:hi], kr[at] if Lkv else torch.zeros(*at.shape, 64))
        logits = logits * scale_value
        if sparse_mode == 3:
            late = pos > (Lkv - Lq + torch.arange(Lq)).unsqueeze(-1)
            logits = logits.masked_fill(late.unsqueeze(1), -1e12)
        logits = logits.masked_fill(~ok.unsqueeze(1), float("-inf"))
        m = logits.max(-1).values  # [Lq, N1]; -inf for a row without keys
        e = torch.exp(logits - m.unsqueeze(-1))
        den = e.sum(-1)
        smax[lo:hi], ssum[lo:hi] = m, den
        if sinks is not None:  # the sink joins the softmax denominator, with no value
            m2 = torch.maximum(m, sinks)
            e = torch.exp(logits - m2.unsqueeze(-1))
            den = e.sum(-1) + torch.exp(sinks - m2)
            smax[lo:hi], ssum[lo:hi] = float("nan"), float("nan")  # not documented with sinks
        o = torch.einsum("ihp,ipd->ihd", e / den.unsqueeze(-1), K)
        none = ~ok.any(-1)  # no key: the row's outputs are undefined
        o[none] = float("nan")
        smax[lo:hi][none], ssum[lo:hi][none] = float("nan"), float("nan")
        out[lo:hi] = o
    attention_out = out.to(query.dtype).view(query.shape)
    if not return_softmax_lse:
        return attention_out, torch.empty(0), torch.empty(0)
    if layout_query == "TND":  # [KV_N, T1, N1 / KV_N]
        return attention_out, smax.unsqueeze(0), ssum.unsqueeze(0)
    Bq, S1 = query.shape[:2]  # [B, KV_N, S1, N1 / KV_N]
    return attention_out, smax.view(Bq, 1, S1, N1), ssum.view(Bq, 1, S1, N1)

