"""FLOP and byte counts per op, from the call itself.

Bytes are the fewest an implementation must move: each input read once (for expert weights,
only the experts that receive rows), each output written once. FLOPs count multiply-adds as 2
and only the matrix work that dominates each op (elementwise work is ignored).
"""
from __future__ import annotations

from typing import Sequence

import torch

import opbridge

from ..call import Call


def _nbytes(x) -> int:
    if isinstance(x, opbridge.QuantTensor):
        return _nbytes(x.data) + _nbytes(x.scale)
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return 0


def _expert_bytes(w, used: int) -> int:
    """Bytes of ``used`` of the ``E`` experts of weight ``w``."""
    E = w.shape[0]
    return _nbytes(w) * used // max(E, 1)


def _out_bytes(out: Sequence) -> int:
    return sum(_nbytes(o) for o in out)


def _seq_lengths(cu, total: int) -> list[int]:
    if cu is None:
        return [total]
    c = cu.tolist()
    return [b - a for a, b in zip(c[:-1], c[1:])]


def _indexer_pairs(a: dict) -> int:
    """Query-key pairs scored: every candidate of every query."""
    m = a.get("compress_rate", 1)
    Lq = _seq_lengths(a.get("cu_seqlens_q"), a["q"].shape[0])
    Lk = _seq_lengths(a.get("cu_seqlens_k"), a["k"].shape[0])
    if not a.get("causal", True):
        return sum(x * y for x, y in zip(Lq, Lk))
    pos = a.get("q_positions")
    total, start = 0, 0
    for lq, lk in zip(Lq, Lk):
        if pos is not None:
            p = pos[start:start + lq].long()
        else:
            p = torch.arange(lk - lq, lk)
        total += int(((p + 1) // m).clamp(0, lk).sum())
        start += lq
    return total


def cost(call: Call, out: Sequence) -> tuple[float, float]:
    """(FLOPs, bytes) of one call of ``call.op``."""
    a, op = call.named, call.op
    read = call.nbytes()
    written = _out_bytes(out)
    if op == "grouped_gemm":
        M, K = a["a"].shape
        N = a["b"].shape[1]
        used = int((a["offsets"][1:] > a["offsets"][:-1]).sum())
        return 2.0 * M * N * K, _nbytes(a["a"]) + _expert_bytes(a["b"], used) + written
    if op == "grouped_gemm_masked":
        E, _, K = a["a"].shape
        N = a["b"].shape[1]
        rows = int(a["masked_m"].sum())
        used = int((a["masked_m"] > 0).sum())
        return 2.0 * rows * N * K, _nbytes(a["a"]) + _expert_bytes(a["b"], used) + written
    if op == "moe":
        ids = a["topk_ids"]
        H, I = a["x"].shape[1], a["w2"].shape[2]
        valid = int((ids >= 0).sum())
        used = int(ids[ids >= 0].unique().numel())
        weights = _expert_bytes(a["w13"], used) + _expert_bytes(a["w2"], used)
        return 6.0 * valid * H * I, _nbytes(a["x"]) + _nbytes(ids) + _nbytes(a["topk_weights"]) + weights + written
    if op in ("indexer_topk", "indexer_logits"):
        Hi, D = a["q"].shape[1], a["q"].shape[2]
        return 2.0 * _indexer_pairs(a) * Hi * D, read + written
    if op == "indexer_topk_paged":
        B, Sq, Hi, D = a["q"].shape
        pairs = int(a["context_lens"].sum()) * Sq
        return 2.0 * pairs * Hi * D, read + written
    if op in ("sparse_attention", "sparse_attention_paged"):
        q = a["q"]
        Hq, Dqk = q.shape[-2], q.shape[-1]
        d_v = a.get("d_v") or Dqk
        valid = int((a["indices"] >= 0).sum())
        if a.get("extra_indices") is not None:
            valid += int((a["extra_indices"] >= 0).sum())
        return 2.0 * valid * Hq * (Dqk + d_v), read + written
    if op in ("mhc_pre", "mhc_post_pre"):
        x = a["x"] if op == "mhc_pre" else a["residual"]
        n, C = x.shape[-2], x.shape[-1]
        T = x.numel() // (n * C)
        flops = 2.0 * T * n * C * n * (n + 2) + 2.0 * T * n * C
        if op == "mhc_post_pre":
            flops += 2.0 * T * n * n * C + 2.0 * T * n * C
        return flops, read + written
    if op == "mhc_post":
        r = a["residual"]
        n, C = r.shape[-2], r.shape[-1]
        T = r.numel() // (n * C)
        return 2.0 * T * n * n * C + 2.0 * T * n * C, read + written
    return 0.0, read + written  # routing, permute/combine, kv_compress, sinkhorn, window_indices: memory-bound
