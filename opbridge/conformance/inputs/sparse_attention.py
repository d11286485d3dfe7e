"""Generators for the sparse-attention ops (OPS.md section 3).

Sequences are given as ``seqs = [[Lq, L], ...]``: ``Lq`` queries that are the last tokens of a
sequence of ``L`` raw tokens (query ``i`` sits at position ``L - Lq + i``). With a compress rate
``m`` the keys are the ``L // m`` compressed entries of that sequence.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch

import opbridge

from .common import Rand, causal_selection, cu_seqlens, dtype, fp8_rows, noncontiguous, paged_layout

P = Mapping[str, Any]


def _positions(seqs: Sequence[Sequence[int]], device: torch.device) -> list[torch.Tensor]:
    return [torch.arange(L - Lq, L, device=device, dtype=torch.int32) for Lq, L in seqs]


def _varlen(p: P, seqs) -> bool:
    return len(seqs) > 1 or bool(p.get("varlen"))


def _indexer(p: P, rng: Rand, with_top_k: bool) -> dict:
    seqs, Hi, D, m = p["seqs"], p["Hi"], p["D"], p.get("compress_rate", 1)
    Lqs, Lks = [s[0] for s in seqs], [s[1] // m for s in seqs]
    Tq, Tk = sum(Lqs), sum(Lks)
    q, k = rng.normal(Tq, Hi, D), rng.normal(Tk, D)
    lo = -1.0 if p.get("negative_weights") else 0.0
    weights = rng.uniform(Tq, Hi, lo=lo, hi=1.0) / math.sqrt(Hi * D)
    out = dict(q=q, k=k, weights=weights)
    if with_top_k:
        out["top_k"] = p["top_k"]
    name = p.get("dtype", "bf16")
    q_scale = k_scale = None
    if name == "fp8":
        q, q_scale = fp8_rows(q)
        k, k_scale = fp8_rows(k)
    else:
        q, k = q.to(dtype(name)), k.to(dtype(name))
    if p.get("noncontig"):
        q = noncontiguous(q)
    out.update(q=q, k=k)
    varlen = _varlen(p, seqs)
    positions = None
    if m > 1 or p.get("explicit_positions"):
        positions = torch.cat(_positions(seqs, rng.device))
    out.update(cu_seqlens_q=cu_seqlens(Lqs, rng.device) if varlen else None,
               cu_seqlens_k=cu_seqlens(Lks, rng.device) if varlen else None,
               causal=p.get("causal", True), compress_rate=m, q_positions=positions, q_scale=q_scale, k_scale=k_scale)
    return out


def indexer_topk(p: P, rng: Rand) -> dict:
    return _indexer(p, rng, with_top_k=True)


def indexer_logits(p: P, rng: Rand) -> dict:
    return _indexer(p, rng, with_top_k=False)


def indexer_topk_paged(p: P, rng: Rand) -> dict:
    """Decode: ``raw_lens[b]`` tokens per sequence, ``Sq`` queries at the end of each; keys are
    ``raw_lens[b] // compress_rate`` entries in a paged cache."""
    raw, Sq, Hi, D, bs = p["raw_lens"], p["Sq"], p["Hi"], p["D"], p["block_size"]
    m, B = p.get("compress_rate", 1), len(p["raw_lens"])
    lens = [n // m for n in raw]
    table, num_blocks = paged_layout(rng, lens, bs)
    q, cache = rng.normal(B, Sq, Hi, D), rng.normal(num_blocks, bs, D)
    weights = rng.uniform(B, Sq, Hi) / math.sqrt(Hi * D)
    q_scale = k_scale = None
    if p.get("dtype", "bf16") == "fp8":
        q, q_scale = fp8_rows(q)
        cache, k_scale = fp8_rows(cache)
    else:
        q, cache = q.to(dtype(p.get("dtype", "bf16"))), cache.to(dtype(p.get("dtype", "bf16")))
    positions = None
    if m > 1:
        positions = torch.stack([torch.arange(n - Sq, n, device=rng.device, dtype=torch.int32) for n in raw])
    return dict(q=q, k_cache=cache, block_table=table,
                context_lens=torch.tensor(lens, dtype=torch.int32, device=rng.device), weights=weights,
                top_k=p["top_k"], compress_rate=m, q_positions=positions, q_scale=q_scale, k_scale=k_scale)


def kv_compress(p: P, rng: Rand) -> dict:
    Tk, D, rate, overlap = p["Tk"], p["D"], p["rate"], p.get("overlap", False)
    Dc = 2 * D if overlap else D
    dt = dtype(p.get("dtype", "bf16"))
    gate_scale = p.get("gate_scale", 1.0)
    out = dict(kv=rng.normal(Tk, Dc, dtype=dt), gate=rng.normal(Tk, Dc, scale=gate_scale, dtype=dt),
               position_bias=rng.normal(rate, Dc), rate=rate, overlap=overlap, prev_kv=None, prev_gate=None)
    if overlap and p.get("prev"):
        out.update(prev_kv=rng.normal(rate, Dc, dtype=dt), prev_gate=rng.normal(rate, Dc, scale=gate_scale))
    return out


def _sink(p: P, rng: Rand, Hq: int, typical_keys: int) -> Optional[torch.Tensor]:
    if not p.get("sink"):
        return None
    # Centred on log(number of keys) so exp(sink) is comparable to exp(lse): the sink matters.
    return rng.normal(Hq) + math.log(max(typical_keys, 2))


def _select(p: P, rng: Rand, positions: torch.Tensor, num_keys: int, top_k: int, rate: int = 1) -> torch.Tensor:
    idx = causal_selection(rng, positions, num_keys, top_k, rate=rate, shuffle=p.get("shuffle", True))
    frac = p.get("invalid_frac", 0.0)
    if frac:
        idx = torch.where(rng.uniform(*idx.shape) < frac, -1, idx)
    return idx


def _window(positions: torch.Tensor, window: int) -> torch.Tensor:
    idx = positions.long().unsqueeze(1) - window + 1 + torch.arange(window, device=positions.device)
    return torch.where(idx < 0, -1, idx).to(torch.int32)


def sparse_attention(p: P, rng: Rand) -> dict:
    """V3.2: ``indices`` are a random causal top-k of the raw keys. V4 (``window`` given): ``indices``
    are the causal sliding window over the raw keys and ``extra_*`` a random causal top-k of the
    ``rate``-compressed entries, joined in one softmax."""
    seqs, Hq, Dqk = p["seqs"], p["Hq"], p["Dqk"]
    dt = dtype(p.get("dtype", "bf16"))
    Lqs, Lks = [s[0] for s in seqs], [s[1] for s in seqs]
    Tq, Tk = sum(Lqs), sum(Lks)
    pos = _positions(seqs, rng.device)
    window, rate = p.get("window"), p.get("rate", 1)
    if window:
        indices = torch.cat([_window(ps, window) for ps in pos])
    else:
        indices = torch.cat([_select(p, rng, ps, L, p["top_k"]) for ps, L in zip(pos, Lks)])
    empty = p.get("empty_rows", 0)
    if empty:
        indices[rng.perm(Tq)[:empty]] = -1
    q = rng.normal(Tq, Hq, Dqk, dtype=dt)
    if p.get("noncontig"):
        q = noncontiguous(q)
    varlen = _varlen(p, seqs)
    out = dict(q=q, kv=rng.normal(Tk, Dqk, dtype=dt), indices=indices, scale=1 / math.sqrt(Dqk), d_v=p.get("d_v"),
               cu_seqlens_q=cu_seqlens(Lqs, rng.device) if varlen else None,
               cu_seqlens_k=cu_seqlens(Lks, rng.device) if varlen else None,
               sink=_sink(p, rng, Hq, p.get("top_k") or window), extra_kv=None, extra_indices=None,
               extra_cu_seqlens_k=None, return_lse=p.get("return_lse", True))
    if window:
        Lcs = [L // rate for L in Lks]
        extra = torch.cat([_select(p, rng, ps, Lc, p["extra_top_k"], rate) for ps, Lc in zip(pos, Lcs)])
        out.update(extra_kv=rng.normal(sum(Lcs), Dqk, dtype=dt), extra_indices=extra,
                   extra_cu_seqlens_k=cu_seqlens(Lcs, rng.device) if varlen else None)
    return out


def sparse_attention_paged(p: P, rng: Rand) -> dict:
    """Decode over paged caches; same V3.2 / V4 structure as :func:`sparse_attention`."""
    raw, Sq, Hq, Dqk, bs = p["raw_lens"], p["Sq"], p["Hq"], p["Dqk"], p["block_size"]
    B, dt = len(raw), dtype(p.get("dtype", "bf16"))
    window, rate = p.get("window"), p.get("rate", 1)
    table, num_blocks = paged_layout(rng, raw, bs)
    pos = [torch.arange(n - Sq, n, device=rng.device, dtype=torch.int32) for n in raw]
    if window:
        indices = torch.stack([_window(ps, window) for ps in pos])
    else:
        indices = torch.stack([_select(p, rng, ps, n, p["top_k"]) for ps, n in zip(pos, raw)])
    out = dict(q=rng.normal(B, Sq, Hq, Dqk, dtype=dt), kv_cache=rng.normal(num_blocks, bs, Dqk, dtype=dt),
               block_table=table, indices=indices, scale=1 / math.sqrt(Dqk), d_v=p.get("d_v"),
               sink=_sink(p, rng, Hq, p.get("top_k") or window), extra_kv_cache=None, extra_block_table=None,
               extra_indices=None, return_lse=p.get("return_lse", True))
    if window:
        comp = [n // rate for n in raw]
        etable, eblocks = paged_layout(rng, comp, bs)
        extra = torch.stack([_select(p, rng, ps, c, p["extra_top_k"], rate) for ps, c in zip(pos, comp)])
        out.update(extra_kv_cache=rng.normal(eblocks, bs, Dqk, dtype=dt), extra_block_table=etable,
                   extra_indices=extra)
    layout = p.get("kv_cache_layout")
    if layout:  # packed FP8 caches (opbridge.quantize_kv_cache); the oracle dequantizes them
        out["kv_cache"] = opbridge.quantize_kv_cache(out["kv_cache"], layout=layout)
        out["kv_cache_layout"] = layout
        if out["extra_kv_cache"] is not None:
            out["extra_kv_cache"] = opbridge.quantize_kv_cache(out["extra_kv_cache"], layout=layout)
            out["extra_kv_cache_layout"] = layout
    return out


def window_indices(p: P, rng: Rand) -> dict:
    seqs = p["seqs"]
    return dict(cu_seqlens_q=cu_seqlens([s[0] for s in seqs], rng.device),
                cu_seqlens_k=cu_seqlens([s[1] for s in seqs], rng.device), window=p["window"])


GENERATORS = {
    "indexer_topk": indexer_topk, "indexer_logits": indexer_logits, "indexer_topk_paged": indexer_topk_paged,
    "kv_compress": kv_compress, "sparse_attention": sparse_attention,
    "sparse_attention_paged": sparse_attention_paged, "window_indices": window_indices,
}
