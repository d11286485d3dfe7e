"""Reference DeepSeek sparse attention: indexer, KV compression, sparse MQA (OPS.md section 3)."""
from __future__ import annotations

from typing import Optional

import torch

from ...core.checks import wide_dtype
from ...core.kv_cache import dequantize_kv_cache, packed_layout
from ...core.sparse_attention import query_positions, seq_bounds, seq_ids
from . import BACKEND

# Gathered keys are materialised per chunk of queries; this bounds the chunk's element count.
_CHUNK_ELEMS = 1 << 26


def _dequant(x: torch.Tensor, scale: Optional[torch.Tensor], dt: torch.dtype) -> torch.Tensor:
    x = x.to(dt)
    return x if scale is None else x * scale.to(dt).unsqueeze(-1)


def _scores(qf, kf, w, pos, Lk: int, width: int, causal: bool, rate: int) -> torch.Tensor:
    """One sequence: ``[Lq, width]`` indexer scores, -inf outside the candidate set."""
    s = torch.einsum("thd,sd->ths", qf, kf).relu()
    s = (s * w.unsqueeze(-1)).sum(1)  # [Lq, Lk]
    cols = torch.arange(Lk, device=qf.device)
    ok = torch.ones_like(s, dtype=torch.bool)
    if causal:
        ok = cols.unsqueeze(0) < ((pos.long() + 1) // rate).unsqueeze(1)
    out = s.new_full((qf.shape[0], width), float("-inf"))
    out[:, :Lk] = s.masked_fill(~ok, float("-inf"))
    return out


@BACKEND.implement("indexer_logits")
def indexer_logits(q, k, weights, *, cu_seqlens_q, cu_seqlens_k, causal, compress_rate, q_positions, q_scale,
                   k_scale):
    dt = wide_dtype(q, k, weights)
    Tq, Tk = q.shape[0], k.shape[0]
    qf, kf, w = _dequant(q, q_scale, dt), _dequant(k, k_scale, dt), weights.to(dt)
    if q_positions is None:
        q_positions = query_positions(cu_seqlens_q, cu_seqlens_k, Tq, Tk, q.device)
    bq = seq_bounds(cu_seqlens_q, Tq, q.device).tolist()
    bk = seq_bounds(cu_seqlens_k, Tk, q.device).tolist()
    width = max([hi - lo for lo, hi in zip(bk[:-1], bk[1:])] + [0])
    out = qf.new_full((Tq, width), float("-inf"))
    for b in range(len(bq) - 1):
        q0, q1, k0, k1 = bq[b], bq[b + 1], bk[b], bk[b + 1]
        if q1 > q0:
            out[q0:q1] = _scores(qf[q0:q1], kf[k0:k1], w[q0:q1], q_positions[q0:q1], k1 - k0, width, causal,
                                 compress_rate)
    return out


def _select(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Best ``top_k`` columns per row, -1 for non-candidates, padded with -1 (valid ones first)."""
    k = min(top_k, scores.shape[-1])
    vals, idx = scores.topk(k, dim=-1, sorted=True)
    idx = torch.where(vals == float("-inf"), -1, idx)
    if k < top_k:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], top_k - k), -1)], dim=-1)
    return idx.to(torch.int32)


@BACKEND.implement("indexer_topk")
def indexer_topk(q, k, weights, top_k, **kw):
    return _select(indexer_logits(q, k, weights, **kw), top_k)


def _paged_rows(block_table_row: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Rows of the flattened cache holding logical ``positions`` of one sequence."""
    return block_table_row.long()[positions // block_size] * block_size + positions % block_size


@BACKEND.implement("indexer_topk_paged")
def indexer_topk_paged(q, k_cache, block_table, context_lens, weights, top_k, *, compress_rate, q_positions,
                       q_scale, k_scale):
    B, Sq = q.shape[:2]
    dt = wide_dtype(q, k_cache, weights)
    bs = k_cache.shape[1]
    kf = _dequant(k_cache, k_scale, dt).flatten(0, 1)
    out = torch.full((B, Sq, top_k), -1, dtype=torch.int32, device=q.device)
    for b, L in enumerate(context_lens.tolist()):
        pos = q_positions[b] if q_positions is not None else \
            torch.arange(Sq, device=q.device, dtype=torch.int32) + (L - Sq)
        keys = kf[_paged_rows(block_table[b], torch.arange(L, device=q.device), bs)]
        qb = _dequant(q[b], None if q_scale is None else q_scale[b], dt)
        out[b] = _select(_scores(qb, keys, weights[b].to(dt), pos, L, L, True, compress_rate), top_k)
    return out


@BACKEND.implement("kv_compress")
def kv_compress(kv, gate, position_bias, rate, *, overlap, prev_kv, prev_gate):
    dt = wide_dtype(kv, gate, position_bias)
    W, Dc = kv.shape[0] // rate, kv.shape[1]
    x = kv[: W * rate].to(dt).view(W, rate, Dc)
    g = (gate[: W * rate].to(dt).view(W, rate, Dc) + position_bias.to(dt))
    if overlap:
        D = Dc // 2
        if prev_kv is not None:
            first_kv, first_g = prev_kv.to(dt)[None, :, :D], prev_gate.to(dt)[None, :, :D]
        else:  # no previous window: those slots are empty (softmax weight 0)
            first_kv = x.new_zeros((1, rate, D))
            first_g = x.new_full((1, rate, D), float("-inf"))
        # [:W] keeps W = 0 (fewer than rate tokens) an empty result instead of a shape error.
        x = torch.cat([torch.cat([first_kv, x[:-1, :, :D]])[:W], x[:, :, D:]], dim=1)  # [W, 2*rate, D]
        g = torch.cat([torch.cat([first_g, g[:-1, :, :D]])[:W], g[:, :, D:]], dim=1)
    return (g.softmax(dim=1) * x).sum(1).to(kv.dtype)


def _attend(qf, key_sets, scale: float, d_v: int, sink) -> tuple[torch.Tensor, torch.Tensor]:
    """qf ``[N, Hq, Dqk]``; key_sets: list of (keys ``[N, J, Dqk]``, valid ``[N, J]``). Returns out, lse."""
    keys = torch.cat([k for k, _ in key_sets], dim=1)
    valid = torch.cat([v for _, v in key_sets], dim=1)
    s = torch.einsum("nhd,njd->nhj", qf, keys) * scale
    has = valid.any(-1, keepdim=True).unsqueeze(1)  # [N, 1, 1]
    v3 = valid.unsqueeze(1)
    # Rows with no valid key are computed on zeros and masked out, so gradients stay finite.
    s = torch.where(has, s.masked_fill(~v3, float("-inf")), s.new_zeros(()))
    lse0 = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse0.unsqueeze(-1)) * v3
    out = torch.einsum("nhj,njd->nhd", p, keys[..., :d_v])
    lse = torch.where(has.squeeze(-1), lse0, float("-inf"))
    if sink is not None:
        out = out * torch.sigmoid(lse - sink.to(lse.dtype)).unsqueeze(-1)
    return out, lse


def _chunks(n: int, per_row: int):
    step = max(1, _CHUNK_ELEMS // max(per_row, 1))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def _gather(kv_flat, base, idx, dt):
    valid = idx >= 0
    # -1 entries read row 0, not base: base is past the end when the query's sequence has no keys.
    rows = torch.where(valid, base.unsqueeze(-1) + idx.long(), 0)
    if kv_flat.shape[0] == 0:  # no keys at all (e.g. every sequence shorter than a compression window)
        return kv_flat.new_zeros((*rows.shape, kv_flat.shape[1]), dtype=dt), valid
    return kv_flat[rows].to(dt), valid


@BACKEND.implement("sparse_attention")
def sparse_attention(q, kv, indices, *, scale, d_v, cu_seqlens_q, cu_seqlens_k, sink, extra_kv, extra_indices,
                     extra_cu_seqlens_k):
    dt = wide_dtype(q, kv)
    Tq, Hq, Dqk = q.shape
    d_v = d_v or Dqk
    b = seq_ids(cu_seqlens_q, Tq, q.device)
    base = seq_bounds(cu_seqlens_k, kv.shape[0], q.device)[b]
    ebase = seq_bounds(extra_cu_seqlens_k, extra_kv.shape[0], q.device)[b] if extra_kv is not None else None
    width = indices.shape[1] + (extra_indices.shape[1] if extra_indices is not None else 0)
    outs, lses = [], []
    for lo, hi in _chunks(Tq, width * Dqk):
        sets = [_gather(kv, base[lo:hi], indices[lo:hi], dt)]
        if extra_kv is not None:
            sets.append(_gather(extra_kv, ebase[lo:hi], extra_indices[lo:hi], dt))
        o, l = _attend(q[lo:hi].to(dt), sets, scale, d_v, sink)
        outs.append(o)
        lses.append(l)
    out = torch.cat(outs) if outs else q.new_zeros((0, Hq, d_v), dtype=dt)
    lse = torch.cat(lses) if lses else q.new_zeros((0, Hq), dtype=dt)
    return out.to(q.dtype), lse if dt == torch.float64 else lse.float()


@BACKEND.implement("sparse_attention_paged")
def sparse_attention_paged(q, kv_cache, block_table, indices, *, scale, d_v, sink, extra_kv_cache,
                           extra_block_table, extra_indices, kv_cache_layout="", extra_kv_cache_layout=""):
    dt = wide_dtype(q, kv_cache)
    B, Sq, Hq, Dqk = q.shape
    d_v = d_v or Dqk

    def paged(cache, table, idx, layout):
        bs = cache.shape[1]
        p = idx.long().clamp_min(0)
        rows = table.long().gather(1, (p // bs).flatten(1)).view_as(p) * bs + p % bs
        keys = cache.flatten(0, 1)[rows]
        if packed_layout(layout) is not None:  # only the gathered tokens are unpacked
            keys = dequantize_kv_cache(keys, layout=layout)
        return keys.to(dt).flatten(0, 1), (idx >= 0).flatten(0, 1)

    sets = [paged(kv_cache, block_table, indices, kv_cache_layout)]
    if extra_kv_cache is not None:
        sets.append(paged(extra_kv_cache, extra_block_table, extra_indices, extra_kv_cache_layout))
    out, lse = _attend(q.to(dt).flatten(0, 1), sets, scale, d_v, sink)
    lse = lse if dt == torch.float64 else lse.float()
    return out.view(B, Sq, Hq, d_v).to(q.dtype), lse.view(B, Sq, Hq)


@BACKEND.implement("window_indices")
def window_indices(cu_seqlens_q, cu_seqlens_k, window):
    Tq, Tk = int(cu_seqlens_q[-1]), int(cu_seqlens_k[-1])
    p = query_positions(cu_seqlens_q, cu_seqlens_k, Tq, Tk, cu_seqlens_q.device).long()
    idx = p.unsqueeze(1) - window + 1 + torch.arange(window, device=p.device)
    return torch.where(idx < 0, -1, idx).to(torch.int32)
