"""Sparse MQA / absorbed-MLA attention over gathered keys (DeepSeek V3.2 DSA and V4), forward.

One program = one query token x ``BLOCK_H`` heads. It walks the query's index list in tiles of
``BLOCK_N`` keys; every tile of gathered KV rows is loaded once and used by all ``BLOCK_H`` heads
(the MQA sharing that makes sparse attention compute-bound rather than gather-bound), first as
keys (``S = Q K^T``) then as values (``P V``, ``V = K[:, :d_v]``: same rows, no second gather).
The online softmax runs in base 2 and spans the main index list and the optional extra one, so
V4's sliding window and compressed entries share one softmax. Keys are split into the value part
``[0, d_v)`` and the key-only tail ``[d_v, Dqk)`` (the 64 RoPE dims of V3.2's 576).

Index validity is decided per key by :func:`key_rows`: ``-1`` and out-of-range indices never
reach memory. The paged decode path runs the same kernel: its logical positions are first
translated to physical cache rows (:meth:`KeySet.paged`, with block numbers checked against the
cache size), which measured faster than walking the block table inside the loop.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .sparse_attention_common import config, fit_tiles, key_rows, pow2, smem_limit

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
CONFIG_FILE = "attn_sparse.json"


@triton.jit
def _attend_set(q_main, q_tail, m_i, l_i, acc, kv_ptr, stride_kv, idx_ptr, idx_off, n_idx, kstart, klen, d_v, d_t,
                qk_scale, BLOCK_N: tl.constexpr, DV: tl.constexpr, DT: tl.constexpr, HAS_TAIL: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr, LAZY: tl.constexpr):
    offs_v = tl.arange(0, DV)
    offs_t = tl.arange(0, DT)
    for j0 in range(0, n_idx, BLOCK_N):
        rows, valid = key_rows(idx_ptr, idx_off, j0, n_idx, kstart, klen, BLOCK_N)
        base = kv_ptr + rows[:, None] * stride_kv
        # Column masks only for padded head dims: with d_v == DV the loads stay 16-byte vectors.
        if d_v == DV:
            k_main = tl.load(base + offs_v[None, :], mask=valid[:, None], other=0.0)
        else:
            k_main = tl.load(base + offs_v[None, :], mask=valid[:, None] & (offs_v[None, :] < d_v), other=0.0)
        if UPCAST:
            k_main = k_main.to(tl.float32)
        if IEEE:
            s = tl.dot(q_main, tl.trans(k_main), input_precision="ieee")
        else:
            s = tl.dot(q_main, tl.trans(k_main))
        if HAS_TAIL:
            if d_t == DT:
                k_tail = tl.load(base + d_v + offs_t[None, :], mask=valid[:, None], other=0.0)
            else:
                k_tail = tl.load(base + d_v + offs_t[None, :], mask=valid[:, None] & (offs_t[None, :] < d_t),
                                 other=0.0)
            if UPCAST:
                k_tail = k_tail.to(tl.float32)
            if IEEE:
                s += tl.dot(q_tail, tl.trans(k_tail), input_precision="ieee")
            else:
                s += tl.dot(q_tail, tl.trans(k_tail))
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if LAZY:
            # Move a row's running max only when it grows by more than 2^8: p stays <= 256 (exact
            # enough in fp32 sums and bf16), and most tiles then skip rescaling the accumulator.
            m_new = tl.where(m_new > m_i + 8.0, m_new, m_i)
        # A row with no valid key so far keeps m = -inf; shift by 0 there so exp2 never sees inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        if LAZY:
            if tl.max((m_new > m_i).to(tl.int32)) > 0:  # some row moved (always on its first valid tile)
                alpha = tl.exp2(m_i - m_safe)
                l_i = l_i * alpha
                acc = acc * alpha[:, None]
        else:
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
        l_i = l_i + tl.sum(p, 1)
        if IEEE:
            acc += tl.dot(p.to(k_main.dtype), k_main, input_precision="ieee")
        else:
            acc += tl.dot(p.to(k_main.dtype), k_main)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def sparse_attn_fwd_kernel(
        q_ptr, stride_qt, stride_qh, out_ptr, stride_ot, stride_oh, lse_ptr, stride_lt, sink_ptr,
        kv_ptr, stride_kv, idx_ptr, stride_it, n_idx, kstart_ptr, klen_ptr,
        ekv_ptr, stride_ekv, eidx_ptr, stride_eit, n_eidx, ekstart_ptr, eklen_ptr,
        Hq, qk_scale,
        d_v: tl.constexpr, d_t: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, DV: tl.constexpr,
        DT: tl.constexpr, HAS_TAIL: tl.constexpr,
        HAS_EXTRA: tl.constexpr, HAS_SINK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
        LAZY: tl.constexpr):
    # One flat grid axis (the y axis stops at 65535): head blocks of one query are adjacent in
    # launch order, so they gather the same rows while those are still in L2.
    n_hb = tl.cdiv(Hq, BLOCK_H)
    pid = tl.program_id(0)
    t = (pid // n_hb).to(tl.int64)
    heads = (pid % n_hb) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < Hq
    offs_v = tl.arange(0, DV)
    offs_t = tl.arange(0, DT)
    q_base = q_ptr + t * stride_qt + heads[:, None].to(tl.int64) * stride_qh
    vmask = hmask[:, None] if d_v == DV else hmask[:, None] & (offs_v[None, :] < d_v)
    q_main = tl.load(q_base + offs_v[None, :], mask=vmask, other=0.0)
    q_tail = q_main  # placeholder when there is no key-only tail
    if HAS_TAIL:
        tmask = hmask[:, None] if d_t == DT else hmask[:, None] & (offs_t[None, :] < d_t)
        q_tail = tl.load(q_base + d_v + offs_t[None, :], mask=tmask, other=0.0)
    if UPCAST:
        q_main = q_main.to(tl.float32)
        q_tail = q_tail.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, DV], tl.float32)

    m_i, l_i, acc = _attend_set(q_main, q_tail, m_i, l_i, acc, kv_ptr, stride_kv, idx_ptr, t * stride_it, n_idx,
                                tl.load(kstart_ptr + t), tl.load(klen_ptr + t), d_v, d_t, qk_scale,
                                BLOCK_N, DV, DT, HAS_TAIL, UPCAST, IEEE, LAZY)
    if HAS_EXTRA:
        m_i, l_i, acc = _attend_set(q_main, q_tail, m_i, l_i, acc, ekv_ptr, stride_ekv, eidx_ptr, t * stride_eit,
                                    n_eidx, tl.load(ekstart_ptr + t), tl.load(eklen_ptr + t), d_v, d_t, qk_scale,
                                    BLOCK_N, DV, DT, HAS_TAIL, UPCAST, IEEE, LAZY)

    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o = acc / l_safe[:, None]
    if HAS_SINK:
        sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0).to(tl.float32)
        # exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink); 0 where there is no valid key.
        o = o * (1.0 / (1.0 + tl.exp(sink - lse)))[:, None]
    tl.store(out_ptr + t * stride_ot + heads[:, None].to(tl.int64) * stride_oh + offs_v[None, :],
             o.to(out_ptr.dtype.element_ty), mask=vmask)
    tl.store(lse_ptr + t * stride_lt + heads, lse, mask=hmask)


# ---- launcher ------------------------------------------------------------------------------------

class KeySet:
    """One gathered key set as the kernel sees it: KV rows, the index list, and per query the start
    row and length of its own key sequence (int32 ``[T]``)."""

    def __init__(self, kv: torch.Tensor, indices: torch.Tensor, kstart: torch.Tensor, klen: torch.Tensor):
        self.kv = kv if kv.stride(-1) == 1 else kv.contiguous()
        self.indices = indices if indices.stride(-1) == 1 else indices.contiguous()
        self.kstart, self.klen = kstart, klen

    def args(self) -> list:
        return [self.kv, self.kv.stride(0), self.indices, self.indices.stride(0), self.indices.shape[1],
                self.kstart, self.klen]

    @staticmethod
    def paged(cache: torch.Tensor, block_table: torch.Tensor, indices: torch.Tensor, q_per_batch: int) -> "KeySet":
        """A paged cache ``[num_blocks, block_size, D]`` addressed by logical positions ``[T, k]``:
        translated once to physical rows (one device gather) so the kernel's inner loop does a
        single dependent load per key instead of two."""
        nb, bs, D = cache.shape
        flat = cache.reshape(nb * bs, D)
        phys = physical_rows(indices, block_table, bs, nb, q_per_batch)
        T = indices.shape[0]
        return KeySet(flat, phys, torch.zeros(T, dtype=torch.int32, device=indices.device),
                      torch.full((T,), nb * bs, dtype=torch.int32, device=indices.device))


def physical_rows(indices: torch.Tensor, block_table: torch.Tensor, page: int, num_blocks: int,
                  q_per_batch: int) -> torch.Tensor:
    """Paged logical positions ``[T, k]`` -> rows of the flattened cache, ``-1`` where invalid (device ops).

    Valid: ``0 <= idx < max_blocks * page`` and a block number inside ``[0, num_blocks)``; query row
    ``t`` reads block-table row ``t // q_per_batch``.
    """
    T = indices.shape[0]
    b = (torch.arange(T, device=indices.device) // q_per_batch).unsqueeze(1)
    valid = (indices >= 0) & (indices < block_table.shape[1] * page)
    safe = torch.where(valid, indices, 0).long()
    blk = block_table[b, safe // page].long()
    valid &= (blk >= 0) & (blk < num_blocks)
    return torch.where(valid, blk * page + safe % page, -1).to(torch.int32)


def varlen_bounds(cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor], Tq: int, Tk: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query start row and length (int32 ``[Tq]``) of its key sequence, computed on the device."""
    if cu_seqlens_k is None:
        return (torch.zeros(Tq, dtype=torch.int32, device=device), torch.full((Tq,), Tk, dtype=torch.int32,
                                                                               device=device))
    if cu_seqlens_q is None:
        b = torch.zeros(Tq, dtype=torch.int64, device=device)
    else:
        b = torch.searchsorted(cu_seqlens_q[1:].long(), torch.arange(Tq, device=device), right=True)
    b = b.clamp_max(cu_seqlens_k.shape[0] - 2)
    ck = cu_seqlens_k.long()
    return ck[b].to(torch.int32), (ck[b + 1] - ck[b]).to(torch.int32)


def sparse_attention_fwd(q: torch.Tensor, sets: list[KeySet], *, scale: float, d_v: int,
                         sink: Optional[torch.Tensor], apply_sink: bool = True, interpret: bool = False,
                         **override) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[T, Hq, Dqk]`` (rows are query tokens). Returns out ``[T, Hq, d_v]`` and lse fp32 ``[T, Hq]``.

    ``apply_sink=False`` returns the output before the sink factor (the backward needs it).
    """
    T, Hq, Dqk = q.shape
    q = q if q.stride(-1) == 1 else q.contiguous()
    sink = None if sink is None else sink.contiguous()
    out = torch.empty((T, Hq, d_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((T, Hq), dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    cfg = config(CONFIG_FILE, "fwd", q.device, interpret, **override)
    block_h = min(cfg["BLOCK_H"], pow2(Hq))
    d_t = Dqk - d_v
    width = (pow2(d_v) + (pow2(d_t) if d_t > 0 else 0)) * q.element_size()
    # Q stays in shared memory next to num_stages gathered KV tiles.
    cfg = fit_tiles(cfg, lambda bn, st: (block_h + st * bn) * width, smem_limit(q.device))
    upcast = interpret and q.dtype == torch.bfloat16
    ieee = q.dtype == torch.float32
    a = sets[0].args()
    e = sets[1].args() if len(sets) > 1 else a
    grid = (triton.cdiv(Hq, block_h) * T,)
    sparse_attn_fwd_kernel[grid](
        q, q.stride(0), q.stride(1), out, out.stride(0), out.stride(1), lse, lse.stride(0),
        sink if sink is not None else lse, *a, *e, Hq, float(scale) * LOG2E, d_v=d_v, d_t=d_t,
        BLOCK_H=block_h, BLOCK_N=cfg["BLOCK_N"], DV=pow2(d_v), DT=pow2(d_t), HAS_TAIL=d_t > 0,
        HAS_EXTRA=len(sets) > 1, HAS_SINK=sink is not None and apply_sink, UPCAST=upcast, IEEE=ieee,
        LAZY=cfg.get("LAZY", False),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, lse
