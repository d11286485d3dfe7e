"""Sparse MQA / absorbed-MLA attention over gathered keys (DeepSeek V3.2 DSA and V4), forward.

One program = one query token x ``BLOCK_H`` heads. It walks the query's index list in tiles of
``BLOCK_N`` keys; every tile of gathered KV rows is loaded once and used by all ``BLOCK_H`` heads
(the MQA sharing that makes sparse attention compute-bound rather than gather-bound), first as
keys (``S = Q K^T``) then as values (``P V``, ``V = K[:, :d_v]``: same rows, no second gather).
The online softmax runs in base 2 and spans the main index list and the optional extra one, so
V4's sliding window and compressed entries share one softmax. Keys are split into the value part
``[0, d_v)`` and the key-only tail ``[d_v, Dqk)`` (the 64 RoPE dims of V3.2's 576).

Rows resting on fewer than ``EXACT_BELOW`` valid keys are redone by a second launch that splits the
softmax weights into two 16-bit parts for ``P V`` (see :func:`sparse_attention_fwd`): one 16-bit ``p``
is exact enough when many keys share a row, not when a handful carry it.

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

from .sparse_attention_common import config, dot, fit_tiles, key_part, key_rows, pow2, smem_limit

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
CONFIG_FILE = "attn_sparse.json"


@triton.jit
def _tile(q_main, q_tail, m_i, l_i, acc, base, valid, d_v: tl.constexpr, d_t: tl.constexpr, qk_scale,
          DV: tl.constexpr, DT: tl.constexpr,
          HAS_TAIL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, LAZY: tl.constexpr,
          SPLIT_P: tl.constexpr):
    """One gathered tile of keys (rows at ``base``, ``valid`` per key) into the online softmax."""
    k_main = key_part(base, valid, d_v, DV, UPCAST)
    s = dot(q_main, tl.trans(k_main), IEEE)
    if HAS_TAIL:
        s += dot(q_tail, tl.trans(key_part(base + d_v, valid, d_t, DT, UPCAST)), IEEE)
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
    if SPLIT_P and not IEEE:
        # p = hi + lo in two 16-bit products: ~16 significant bits instead of 8 (see EXACT_BELOW).
        p_hi = p.to(k_main.dtype)
        acc += tl.dot(p_hi, k_main)
        acc += tl.dot((p - p_hi.to(tl.float32)).to(k_main.dtype), k_main)
    else:
        acc += dot(p.to(k_main.dtype), k_main, IEEE)
    m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _attend_set(q_main, q_tail, m_i, l_i, acc, kv_ptr, stride_kv, idx_ptr, idx_off, n_idx, n_need, kstart, klen,
                d_v, d_t, qk_scale, BLOCK_N: tl.constexpr, DV: tl.constexpr, DT: tl.constexpr, HAS_TAIL: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr, LAZY: tl.constexpr, SPLIT_P: tl.constexpr):
    if SPLIT_P:
        # The few-key rows: stop once all n_need valid keys are seen, skip tiles without one (causal
        # rows hold their keys first, then -1 to the list's end).
        seen = tl.zeros((), tl.int32)
        j0 = tl.zeros((), tl.int32)
        while (j0 < n_idx) & (seen < n_need):
            rows, valid = key_rows(idx_ptr, idx_off, j0, n_idx, kstart, klen, BLOCK_N)
            nv = tl.sum(valid.to(tl.int32))
            if nv > 0:
                m_i, l_i, acc = _tile(q_main, q_tail, m_i, l_i, acc, kv_ptr + rows[:, None] * stride_kv, valid, d_v,
                                      d_t, qk_scale, DV, DT, HAS_TAIL, UPCAST, IEEE, LAZY, True)
            seen += nv
            j0 += BLOCK_N
    else:
        for j0 in range(0, n_idx, BLOCK_N):
            rows, valid = key_rows(idx_ptr, idx_off, j0, n_idx, kstart, klen, BLOCK_N)
            m_i, l_i, acc = _tile(q_main, q_tail, m_i, l_i, acc, kv_ptr + rows[:, None] * stride_kv, valid, d_v, d_t,
                                  qk_scale, DV, DT, HAS_TAIL, UPCAST, IEEE, LAZY, False)
    return m_i, l_i, acc


@triton.jit
def _count_valid(idx_ptr, idx_off, n_idx, klen, cap, CB: tl.constexpr):
    """Valid indices of one query's list, counted in chunks of ``CB`` until ``cap`` is reached: a row with
    ``cap`` valid ones among its first ``CB`` entries costs one load (the count sits before the main
    loop, so its latency is paid once per program)."""
    cnt = tl.zeros((), tl.int32)
    j0 = tl.zeros((), tl.int32)
    while (j0 < n_idx) & (cnt < cap):
        _, valid = key_rows(idx_ptr, idx_off, j0, n_idx, klen * 0, klen, CB)  # validity only: no start row
        cnt += tl.sum(valid.to(tl.int32))
        j0 += CB
    return cnt


@triton.jit
def _empty_state(BLOCK_H: tl.constexpr, DV: tl.constexpr):
    """The online-softmax state before any key: running max -inf, sum 0, accumulator 0."""
    return (tl.full([BLOCK_H], float("-inf"), tl.float32), tl.zeros([BLOCK_H], tl.float32),
            tl.zeros([BLOCK_H, DV], tl.float32))


@triton.jit
def _attend(q_base, hmask, vmask, kv_ptr, stride_kv, idx_ptr, idx_off, n_idx, n_need, kstart, klen,
            ekv_ptr, stride_ekv, eidx_ptr, eidx_off, n_eidx, n_eneed, ekstart, eklen, d_v, d_t, qk_scale,
            BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, DV: tl.constexpr, DT: tl.constexpr, HAS_TAIL: tl.constexpr,
            HAS_EXTRA: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, LAZY: tl.constexpr,
            SPLIT_P: tl.constexpr):
    """One query's heads: online softmax over the main key set, then the extra one; ``(m, l, acc)`` in base 2.
    ``n_need`` / ``n_eneed``: the sets' valid-key counts (read only by the ``SPLIT_P`` loop)."""
    offs_v = tl.arange(0, DV)
    offs_t = tl.arange(0, DT)
    q_main = tl.load(q_base + offs_v[None, :], mask=vmask, other=0.0)
    q_tail = q_main  # placeholder when there is no key-only tail
    if HAS_TAIL:
        tmask = hmask[:, None] if d_t == DT else hmask[:, None] & (offs_t[None, :] < d_t)
        q_tail = tl.load(q_base + d_v + offs_t[None, :], mask=tmask, other=0.0)
    if UPCAST:
        q_main = q_main.to(tl.float32)
        q_tail = q_tail.to(tl.float32)
    m_i, l_i, acc = _empty_state(BLOCK_H, DV)
    m_i, l_i, acc = _attend_set(q_main, q_tail, m_i, l_i, acc, kv_ptr, stride_kv, idx_ptr, idx_off, n_idx, n_need,
                                kstart, klen, d_v, d_t, qk_scale, BLOCK_N, DV, DT, HAS_TAIL, UPCAST, IEEE, LAZY,
                                SPLIT_P)
    if HAS_EXTRA:
        m_i, l_i, acc = _attend_set(q_main, q_tail, m_i, l_i, acc, ekv_ptr, stride_ekv, eidx_ptr, eidx_off, n_eidx,
                                    n_eneed, ekstart, eklen, d_v, d_t, qk_scale, BLOCK_N, DV, DT, HAS_TAIL, UPCAST,
                                    IEEE, LAZY, SPLIT_P)
    return m_i, l_i, acc


@triton.jit
def _head_block(q_ptr, stride_qt, stride_qh, out_ptr, stride_ot, stride_oh, lse_ptr, stride_lt, sink_ptr, t, hb,
                kv_ptr, stride_kv, idx_ptr, stride_it, n_idx, n_main, kstart, klen,
                ekv_ptr, stride_ekv, eidx_ptr, stride_eit, n_eidx, n_extra, ekstart, eklen, Hq, qk_scale,
                d_v: tl.constexpr, d_t: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, DV: tl.constexpr,
                DT: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_SINK: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr, LAZY: tl.constexpr, SPLIT_P: tl.constexpr):
    """Heads ``hb * BLOCK_H ...`` of query row ``t``: attend, normalise, apply the sink, store out and lse."""
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < Hq
    offs_v = tl.arange(0, DV)
    q_base = q_ptr + t * stride_qt + heads[:, None].to(tl.int64) * stride_qh
    vmask = hmask[:, None] if d_v == DV else hmask[:, None] & (offs_v[None, :] < d_v)
    m_i, l_i, acc = _attend(q_base, hmask, vmask, kv_ptr, stride_kv, idx_ptr, t * stride_it, n_idx, n_main,
                            kstart, klen, ekv_ptr, stride_ekv, eidx_ptr, t * stride_eit, n_eidx, n_extra, ekstart,
                            eklen, d_v, d_t, qk_scale, BLOCK_H, BLOCK_N, DV, DT, HAS_TAIL, HAS_EXTRA, UPCAST, IEEE,
                            LAZY, SPLIT_P)
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


@triton.jit
def sparse_attn_fwd_kernel(
        q_ptr, stride_qt, stride_qh, out_ptr, stride_ot, stride_oh, lse_ptr, stride_lt, sink_ptr,
        kv_ptr, stride_kv, idx_ptr, stride_it, n_idx, kstart_ptr, klen_ptr,
        ekv_ptr, stride_ekv, eidx_ptr, stride_eit, n_eidx, ekstart_ptr, eklen_ptr,
        Hq, qk_scale,
        d_v: tl.constexpr, d_t: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, DV: tl.constexpr,
        DT: tl.constexpr, HAS_TAIL: tl.constexpr,
        HAS_EXTRA: tl.constexpr, HAS_SINK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
        LAZY: tl.constexpr, EXACT_BELOW: tl.constexpr, COUNT_BLOCK: tl.constexpr, EXACT_ROWS: tl.constexpr):
    n_hb = tl.cdiv(Hq, BLOCK_H)
    pid = tl.program_id(0)
    if EXACT_ROWS:
        # The second launch (see EXACT_BELOW in the launcher): one program per query row; a row with
        # fewer than EXACT_BELOW valid keys is redone head block by head block with p split into two
        # 16-bit parts, any other row costs one index load and writes nothing.
        t = pid.to(tl.int64)
        kstart, klen = tl.load(kstart_ptr + t), tl.load(klen_ptr + t)
        ekstart, eklen = kstart, klen
        n_main = _count_valid(idx_ptr, t * stride_it, n_idx, klen, EXACT_BELOW, COUNT_BLOCK)
        n_extra = n_main * 0
        if HAS_EXTRA:
            ekstart, eklen = tl.load(ekstart_ptr + t), tl.load(eklen_ptr + t)
            if n_main < EXACT_BELOW:
                n_extra = _count_valid(eidx_ptr, t * stride_eit, n_eidx, eklen, EXACT_BELOW - n_main, COUNT_BLOCK)
        # The counts stop at EXACT_BELOW, so they are exact for the rows below it.
        for hb in range(0, tl.where(n_main + n_extra < EXACT_BELOW, n_hb, 0)):
            _head_block(q_ptr, stride_qt, stride_qh, out_ptr, stride_ot, stride_oh, lse_ptr, stride_lt, sink_ptr, t,
                        hb, kv_ptr, stride_kv, idx_ptr, stride_it, n_idx, n_main, kstart, klen, ekv_ptr, stride_ekv,
                        eidx_ptr, stride_eit, n_eidx, n_extra, ekstart, eklen, Hq, qk_scale, d_v, d_t, BLOCK_H,
                        BLOCK_N, DV, DT, HAS_TAIL, HAS_EXTRA, HAS_SINK, UPCAST, IEEE, LAZY, True)
    else:
        # One flat grid axis (the y axis stops at 65535): head blocks of one query are adjacent in
        # launch order, so they gather the same rows while those are still in L2.
        t = (pid // n_hb).to(tl.int64)
        kstart, klen = tl.load(kstart_ptr + t), tl.load(klen_ptr + t)
        ekstart, eklen = kstart, klen
        if HAS_EXTRA:
            ekstart, eklen = tl.load(ekstart_ptr + t), tl.load(eklen_ptr + t)
        _head_block(q_ptr, stride_qt, stride_qh, out_ptr, stride_ot, stride_oh, lse_ptr, stride_lt, sink_ptr, t,
                    pid % n_hb, kv_ptr, stride_kv, idx_ptr, stride_it, n_idx, n_idx, kstart, klen, ekv_ptr, stride_ekv,
                    eidx_ptr, stride_eit, n_eidx, n_eidx, ekstart, eklen, Hq, qk_scale, d_v, d_t, BLOCK_H, BLOCK_N,
                    DV, DT, HAS_TAIL, HAS_EXTRA, HAS_SINK, UPCAST, IEEE, LAZY, False)


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


def _launch(q, out, lse, sink, sets, scale, d_v, cfg, upcast, ieee, apply_sink, exact_rows, exact_below):
    T, Hq, Dqk = q.shape
    block_h = min(cfg["BLOCK_H"], pow2(Hq))
    d_t = Dqk - d_v
    width = (pow2(d_v) + (pow2(d_t) if d_t > 0 else 0)) * q.element_size()
    # Q stays in shared memory next to num_stages gathered KV tiles.
    cfg = fit_tiles(cfg, lambda bn, st: (block_h + st * bn) * width, smem_limit(q.device))
    a = sets[0].args()
    e = sets[1].args() if len(sets) > 1 else a
    sparse_attn_fwd_kernel[(T if exact_rows else triton.cdiv(Hq, block_h) * T,)](
        q, q.stride(0), q.stride(1), out, out.stride(0), out.stride(1), lse, lse.stride(0),
        sink if sink is not None else lse, *a, *e, Hq, float(scale) * LOG2E, d_v=d_v, d_t=d_t,
        BLOCK_H=block_h, BLOCK_N=cfg["BLOCK_N"], DV=pow2(d_v), DT=pow2(d_t), HAS_TAIL=d_t > 0,
        HAS_EXTRA=len(sets) > 1, HAS_SINK=sink is not None and apply_sink, UPCAST=upcast, IEEE=ieee,
        LAZY=cfg.get("LAZY", False), EXACT_BELOW=exact_below, COUNT_BLOCK=pow2(exact_below), EXACT_ROWS=exact_rows,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


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
    upcast = interpret and q.dtype == torch.bfloat16
    ieee = q.dtype == torch.float32
    cfg = config(CONFIG_FILE, "fwd", q.device, interpret, **override)
    _launch(q, out, lse, sink, sets, scale, d_v, cfg, upcast, ieee, apply_sink, exact_rows=False, exact_below=0)
    # Then the rows resting on fewer than EXACT_BELOW valid keys are redone with p split into two
    # 16-bit parts for P V: one 16-bit p carries 2^-9 relative error, and when a few weights make up a
    # row's whole output, outputs near zero miss OPS.md's per-element bound. Longer rows average those
    # errors out and keep the single product (FlashMLA's rounding); the second launch costs them one
    # index load. p is rounded only on the tensor-core path, not for fp32 inputs or bf16 in the interpreter.
    exact_below = 0 if (upcast or ieee) else int(cfg.get("EXACT_BELOW", 0))
    if exact_below:
        cfg_x = config(CONFIG_FILE, "fwd_exact", q.device, interpret)
        _launch(q, out, lse, sink, sets, scale, d_v, cfg_x, upcast, ieee, apply_sink, exact_rows=True,
                exact_below=exact_below)
    return out, lse
