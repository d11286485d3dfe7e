"""Routing metadata, permute and combine kernels for MoE (OPS.md 2.5).

Sorting token copies by expert is a counting sort in two launches, with no atomics (so it is
deterministic) and no host round trip:

1. ``_count_kernel``: each program histograms ``BLK`` consecutive flat ids ``t*k + slot``.
2. ``_scatter_kernel``: each program sums the histograms of the blocks before it (its base per
   expert) and of all blocks (the expert offsets), ranks its ids among equal ids of its own block,
   and writes each valid copy to ``offsets[e] + base[e] + rank``. Flat order is (token, slot), so
   rows of one expert stay in (token, slot) order, as the contract asks.

Ids outside ``[0, E)`` (``-1`` = no expert, or anything invalid) are skipped, never dereferenced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .grouped_gemm import cast_out

BLK = 128  # flat ids per program in the counting sort


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, N, E, BLK: tl.constexpr, EP: tl.constexpr):
    pid = tl.program_id(0)
    i = pid * BLK + tl.arange(0, BLK)
    m = i < N
    e = tl.load(ids_ptr + i, mask=m, other=-1)
    valid = m & (e >= 0) & (e < E)
    eo = tl.arange(0, EP)
    hit = (e.to(tl.int32)[:, None] == eo[None, :]) & valid[:, None]
    tl.store(counts_ptr + pid * EP + eo, tl.sum(hit.to(tl.int32), axis=0))


@triton.jit
def _scatter_kernel(ids_ptr, w_ptr, counts_ptr, offsets_ptr, tok_ptr, sw_ptr, pos_ptr, N, E, K, NB,
                    HAS_W: tl.constexpr, BLK: tl.constexpr, EP: tl.constexpr, CH: tl.constexpr):
    pid = tl.program_id(0)
    eo = tl.arange(0, EP)
    base = tl.zeros((EP,), tl.int32)
    total = tl.zeros((EP,), tl.int32)
    for c0 in range(0, NB, CH):
        b = c0 + tl.arange(0, CH)
        cnt = tl.load(counts_ptr + b[:, None] * EP + eo[None, :], mask=(b < NB)[:, None], other=0)
        total += tl.sum(cnt, axis=0)
        base += tl.sum(tl.where((b < pid)[:, None], cnt, 0), axis=0)
    incl = tl.cumsum(total, axis=0)
    start = incl - total + base
    if pid == 0:
        tl.store(offsets_ptr + eo + 1, incl, mask=eo < E)
        tl.store(offsets_ptr + eo, incl * 0, mask=eo == 0)
    i = pid * BLK + tl.arange(0, BLK)
    m = i < N
    e = tl.load(ids_ptr + i, mask=m, other=-1)
    valid = m & (e >= 0) & (e < E)
    e = tl.where(valid, e, -1).to(tl.int32)
    jj = tl.arange(0, BLK)
    earlier = (e[:, None] == e[None, :]) & (jj[None, :] < jj[:, None])
    rank = tl.sum(earlier.to(tl.int32), axis=1)
    dest = tl.sum(tl.where(e[:, None] == eo[None, :], start[None, :], 0), axis=1) + rank
    tl.store(tok_ptr + dest, (i // K).to(tl.int32), mask=valid)
    tl.store(pos_ptr + dest, i.to(pos_ptr.dtype.element_ty), mask=valid)
    if HAS_W:
        tl.store(sw_ptr + dest, tl.load(w_ptr + i, mask=valid, other=0.0).to(tl.float32), mask=valid)


@triton.jit
def _gather_rows_kernel(x_ptr, tok_ptr, out_ptr, M, H, T, s_xt, s_xh, s_om,
                        BR: tl.constexpr, BH: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    rm = rows < M
    t = tl.load(tok_ptr + rows, mask=rm, other=-1).to(tl.int64)
    ok = rm & (t >= 0) & (t < T)
    cm = cols < H
    v = tl.load(x_ptr + tl.where(ok, t, 0)[:, None] * s_xt + cols[None, :] * s_xh, mask=ok[:, None] & cm[None, :],
                other=0.0)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * s_om + cols[None, :], v, mask=rm[:, None] & cm[None, :])


@triton.jit
def _invert_kernel(src_ptr, inv_ptr, M, NK, BR: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    rm = r < M
    s = tl.load(src_ptr + r, mask=rm, other=-1).to(tl.int64)
    ok = rm & (s >= 0) & (s < NK)
    tl.store(inv_ptr + tl.where(ok, s, 0), r.to(tl.int32), mask=ok)


@triton.jit
def _combine_kernel(y_ptr, map_ptr, w_ptr, out_ptr, T, H, K, E, NY, s_ym, s_ot,
                    BY_MAP: tl.constexpr, WEIGHTED: tl.constexpr, KP: tl.constexpr, BH: tl.constexpr,
                    INTERP: tl.constexpr):
    """out[t] = sum over valid slots s of (w[t, s] *) y[row(t, s)], fp32 accumulate.

    BY_MAP: row = map[t*k + s] (an inverse permutation, -1 = none); else row = t*k + s and the slot
    is valid when map (the expert ids) is in [0, E).
    """
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    cm = cols < H
    s = tl.arange(0, KP)
    sm = s < K
    v = tl.load(map_ptr + t * K + s, mask=sm, other=-1).to(tl.int64)
    if BY_MAP:
        ok = sm & (v >= 0) & (v < NY)
        row = tl.where(ok, v, 0)
    else:
        ok = sm & (v >= 0) & (v < E)
        row = t * K + s
    y = tl.load(y_ptr + row[:, None] * s_ym + cols[None, :], mask=ok[:, None] & cm[None, :], other=0.0).to(tl.float32)
    if WEIGHTED:
        y = y * tl.load(w_ptr + t * K + s, mask=ok, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + t * s_ot + cols, cast_out(tl.sum(y, axis=0), out_ptr.dtype.element_ty, INTERP), mask=cm)


@dataclass(frozen=True)
class Routing:
    """Token copies sorted by expert. Arrays have T*k slots; the first ``offsets[E]`` are used."""

    offsets: torch.Tensor  # int32 [E+1]
    tok: torch.Tensor  # int32 [T*k]: token of each sorted row
    pos: torch.Tensor  # int32/int64 [T*k]: flat slot t*k + s of each sorted row
    weight: Optional[torch.Tensor]  # float32 [T*k]: topk weight of each sorted row
    num_tokens: int
    top_k: int


def routing(topk_ids: torch.Tensor, num_experts: int, topk_weights: Optional[torch.Tensor] = None,
            pos_dtype: torch.dtype = torch.int32) -> Routing:
    T, k = topk_ids.shape
    N = T * k
    dev = topk_ids.device
    ids = topk_ids.contiguous().view(-1)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    tok = torch.empty(N, dtype=torch.int32, device=dev)
    pos = torch.empty(N, dtype=pos_dtype, device=dev)
    sw = torch.empty(N, dtype=torch.float32, device=dev) if topk_weights is not None else None
    if N == 0:
        offsets.zero_()
        return Routing(offsets, tok, pos, sw, T, k)
    ep = triton.next_power_of_2(num_experts + 1)
    nb = triton.cdiv(N, BLK)
    counts = torch.empty((nb, ep), dtype=torch.int32, device=dev)
    _count_kernel[(nb,)](ids, counts, N, num_experts, BLK=BLK, EP=ep, num_warps=4)
    w = topk_weights.contiguous().view(-1) if topk_weights is not None else ids
    _scatter_kernel[(nb,)](ids, w, counts, offsets, tok, sw if sw is not None else tok, pos, N, num_experts, k, nb,
                           HAS_W=sw is not None, BLK=BLK, EP=ep, CH=8 if ep >= 256 else 16, num_warps=4)
    return Routing(offsets, tok, pos, sw, T, k)


def gather_rows(x: torch.Tensor, tok: torch.Tensor, M: int) -> torch.Tensor:
    T, H = x.shape
    out = torch.empty((M, H), dtype=x.dtype, device=x.device)
    if M and H:
        bh = min(1024, triton.next_power_of_2(H))
        _gather_rows_kernel[(triton.cdiv(M, 4), triton.cdiv(H, bh))](
            x, tok, out, M, H, T, x.stride(0), x.stride(1), out.stride(0), BR=4, BH=bh, num_warps=4)
    return out


def moe_permute(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int):
    r = routing(topk_ids, num_experts, pos_dtype=torch.int64)
    M = int(r.offsets[-1].item())  # the output size depends on the data: one host sync, as in the contract
    return gather_rows(x, r.tok, M), r.offsets, r.pos[:M]


def combine(y: torch.Tensor, rowmap: torch.Tensor, weights: Optional[torch.Tensor], T: int, k: int, E: int,
            out_dtype: torch.dtype, by_map: bool) -> torch.Tensor:
    H = y.shape[1]
    out = torch.empty((T, H), dtype=out_dtype, device=y.device)
    if T == 0 or H == 0:
        return out
    bh = min(1024, triton.next_power_of_2(H))
    _combine_kernel[(T, triton.cdiv(H, bh))](
        y, rowmap, weights if weights is not None else y, out, T, H, k, E, y.shape[0], y.stride(0), out.stride(0),
        BY_MAP=by_map, WEIGHTED=weights is not None, KP=triton.next_power_of_2(max(k, 2)), BH=bh,
        INTERP=y.device.type != "cuda", num_warps=4)
    return out


def moe_combine(y_sorted: torch.Tensor, src_index: torch.Tensor, topk_weights: torch.Tensor,
                num_tokens: int) -> torch.Tensor:
    T, k = topk_weights.shape
    M = y_sorted.shape[0]
    inv = torch.full((T * k,), -1, dtype=torch.int32, device=y_sorted.device)
    if M:
        _invert_kernel[(triton.cdiv(M, 256),)](src_index, inv, M, T * k, BR=256, num_warps=4)
    return combine(y_sorted, inv, topk_weights.contiguous(), T, k, 0, y_sorted.dtype, by_map=True)
