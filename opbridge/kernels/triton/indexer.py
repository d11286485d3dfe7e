"""The lightning indexer (DeepSeek V3.2 / V4): scores and top-k, varlen and paged, bf16/fp16 and FP8.

``score[t, s] = sum_h w[t,h] * relu(q_scale[t,h] * k_scale[s] * (q[t,h] . k[s]))``

Kernels run over chunks of queries, so that memory stays bounded at any context length:

* :func:`indexer_logits_kernel`: one program = ``BLOCK_Q`` queries of one sequence (all their
  ``Hi`` heads stacked into the rows of one matrix product) x ``TILES * BLOCK_N`` consecutive keys.
  Each key tile is loaded once for all those queries and heads; the per-head ReLU and weighted
  head sum happen on the tile in registers, so only ``[BLOCK_Q, BLOCK_N]`` fp32 scores leave the
  chip. Tiles past every query's causal limit are skipped.
* top-k per row, without sorting: :func:`topk_threshold_kernel` picks a key threshold from a
  stratified sample held in registers (about 1.25 ``top_k`` scores reach it); :func:`topk_filter_kernel`
  streams the row once, in parallel segments, appending the scores that reach it to a short
  candidate list (one atomic counter per row); :func:`topk_select_kernel` runs an exact radix select
  (8 bits per round on the order-preserving 32-bit keys of the fp32 scores, one ``tl.histogram``
  per round, stopping once the threshold bucket is used up) over the candidates, or over the whole
  row when the sample missed (fewer than ``top_k`` candidates) or ties overflow the list. Ties at
  the threshold go to whichever candidate came first.

The scores of a chunk (``[chunk, max_Lk]`` fp32) and its candidate lists are the only
intermediates; the chunk size comes from the config's workspace budget, so a 1M-token context
never builds a ``[Tq, Tk]`` tensor.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .sparse_attention_common import config, pow2

CONFIG_FILE = "attn_indexer.json"
LOGITS_KEYS = ("BLOCK_Q", "BLOCK_N", "TILES", "TRANS", "lnum_warps", "lnum_stages")


@triton.jit
def indexer_logits_kernel(
        q_ptr, stride_qt, stride_qh, k_ptr, stride_k, w_ptr, stride_wt, qs_ptr, stride_qst, ks_ptr,
        out_ptr, stride_ot, row0, blk_q0_ptr, blk_q1_ptr, kstart_ptr, limit_ptr,
        bt_ptr, stride_bt, page, max_blocks, num_blocks, q_per_batch, Hi, width,
        D: tl.constexpr, BLOCK_Q: tl.constexpr, HI: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        TILES: tl.constexpr,
        HAS_QS: tl.constexpr, HAS_KS: tl.constexpr, PAGED: tl.constexpr, UPCAST: tl.constexpr,
        IEEE: tl.constexpr, WRITE_MASKED: tl.constexpr, TRANS: tl.constexpr):
    pid_q = tl.program_id(0)
    pid_k = tl.program_id(1)
    q0 = tl.load(blk_q0_ptr + pid_q)
    q1 = tl.load(blk_q1_ptr + pid_q)  # an empty block (q0 == q1) masks every query: limit 0, nothing runs
    M: tl.constexpr = BLOCK_Q * HI
    r = tl.arange(0, M)
    rq = q0 + r // HI  # query of each stacked row
    rh = r % HI
    rmask = (rq < q1) & (rh < Hi)
    qq = q0 + tl.arange(0, BLOCK_Q)
    qmask = qq < q1
    lim = tl.load(limit_ptr + qq, mask=qmask, other=0)
    maxlim = tl.max(lim)
    s_begin = pid_k * (TILES * BLOCK_N)
    out_rows = out_ptr + (qq - row0).to(tl.int64)[:, None] * stride_ot
    offs_n = tl.arange(0, BLOCK_N)

    if s_begin < maxlim:
        offs_d = tl.arange(0, BLOCK_D)
        qrow = rq.to(tl.int64) * stride_qt + rh * stride_qh
        # Column masks only for a padded head dim, so the loads stay 16-byte vectors.
        qmask2 = rmask[:, None] if D == BLOCK_D else rmask[:, None] & (offs_d[None, :] < D)
        q = tl.load(q_ptr + qrow[:, None] + offs_d[None, :], mask=qmask2, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        w = tl.load(w_ptr + rq.to(tl.int64) * stride_wt + rh, mask=rmask, other=0.0)
        if HAS_QS:
            qs = tl.load(qs_ptr + rq.to(tl.int64) * stride_qst + rh, mask=rmask, other=0.0)
        if PAGED:
            bt_off = (q0 // q_per_batch).to(tl.int64) * stride_bt
        else:
            kstart = tl.load(kstart_ptr + q0).to(tl.int64)
        # Only tiles below the block's largest limit are computed; a plain loop bound keeps the
        # loads software-pipelined (no branch around them).
        n_it = tl.minimum(TILES, tl.cdiv(maxlim - s_begin, BLOCK_N))
        for it in range(0, n_it):
            s = s_begin + it * BLOCK_N + offs_n
            kval = s < maxlim
            if PAGED:
                kval = kval & (s < max_blocks * page)
                ss = tl.where(kval, s, 0)
                blk = tl.load(bt_ptr + bt_off + ss // page, mask=kval, other=0)
                kval = kval & (blk >= 0) & (blk < num_blocks)
                rows = tl.where(kval, blk.to(tl.int64) * page + ss % page, 0)
            else:
                rows = tl.where(kval, kstart + s, 0)
            kmask2 = kval[:, None] if D == BLOCK_D else kval[:, None] & (offs_d[None, :] < D)
            k = tl.load(k_ptr + rows[:, None] * stride_k + offs_d[None, :], mask=kmask2, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            if TRANS:
                # Keys as the rows of the product: the head sum becomes a reduction along the
                # product's columns, which stay inside a thread quad on tensor-core layouts.
                if IEEE:
                    d = tl.dot(k, tl.trans(q), input_precision="ieee")
                else:
                    d = tl.dot(k, tl.trans(q))
                if HAS_KS:
                    d = d * tl.load(ks_ptr + rows, mask=kval, other=0.0)[:, None]
                if HAS_QS:
                    d = tl.maximum(d * qs[None, :], 0.0)
                else:
                    d = tl.maximum(d, 0.0)
                sc = tl.trans(tl.sum(tl.reshape(d * w[None, :], [BLOCK_N, BLOCK_Q, HI]), 2))
            else:
                if IEEE:
                    d = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    d = tl.dot(q, tl.trans(k))
                if HAS_KS:
                    d = d * tl.load(ks_ptr + rows, mask=kval, other=0.0)[None, :]
                if HAS_QS:
                    # relu(qs * ks * dot) exactly, whatever the scales' signs.
                    d = tl.maximum(d * qs[:, None], 0.0)
                else:
                    d = tl.maximum(d, 0.0)
                sc = tl.sum(tl.reshape(d * w[:, None], [BLOCK_Q, HI, BLOCK_N]), 1)
            ok = s[None, :] < lim[:, None]
            sc = tl.where(ok, sc, float("-inf"))
            smask = qmask[:, None] & (s[None, :] < width)
            if not WRITE_MASKED:
                smask = smask & ok
            tl.store(out_rows + s[None, :], sc, mask=smask)
        if WRITE_MASKED:
            for it in range(n_it, TILES):
                s = s_begin + it * BLOCK_N + offs_n
                tl.store(out_rows + s[None, :], tl.full([BLOCK_Q, BLOCK_N], float("-inf"), tl.float32),
                         mask=qmask[:, None] & (s[None, :] < width))
    elif WRITE_MASKED:
        for it in range(TILES):
            s = s_begin + it * BLOCK_N + offs_n
            tl.store(out_rows + s[None, :], tl.full([BLOCK_Q, BLOCK_N], float("-inf"), tl.float32),
                     mask=qmask[:, None] & (s[None, :] < width))


@triton.jit
def _ordered(x):
    """fp32 -> uint32 whose unsigned order is the float order (negatives flipped, sign bit set on positives)."""
    i = x.to(tl.int32, bitcast=True)
    return tl.where(i < 0, ~i, i ^ -2147483648).to(tl.uint32, bitcast=True)


@triton.jit
def _radix_rounds(val_ptr, L, k_rem, BLOCK: tl.constexpr, BITS: tl.constexpr):
    """Radix select over ``val_ptr[0:L]`` (most significant digit first, one histogram per round).

    Returns ``(prefix, pmask, k_rem)``: the top ``k`` are every element whose masked key is above
    ``prefix`` plus the first ``k_rem`` equal to it. Stops early once the threshold bucket is used up.
    """
    NB: tl.constexpr = 1 << BITS
    bins = tl.arange(0, NB)
    ar = tl.arange(0, BLOCK)
    prefix = tl.zeros([], tl.int32).to(tl.uint32, bitcast=True)
    pmask = prefix
    done = ((k_rem == 0) | (k_rem == L)).to(tl.int32)
    for rnd in tl.static_range(32 // BITS):
        shift = 32 - BITS * (rnd + 1)
        if done == 0:
            hist = tl.zeros([NB], tl.int32)
            for off in range(0, L, BLOCK):
                inb = off + ar < L
                key = _ordered(tl.load(val_ptr + off + ar, mask=inb, other=0.0))
                m = inb & ((key & pmask) == prefix)
                digit = ((key >> shift) & (NB - 1)).to(tl.int32)
                # histogram has no mask argument on older Triton: count the masked ones in bin 0, then remove.
                hist += tl.histogram(tl.where(m, digit, 0), NB)
                hist -= tl.where(bins == 0, BLOCK - tl.sum(m.to(tl.int32)), 0)
            gt = tl.sum(hist) - tl.cumsum(hist, 0)  # matched elements with a larger digit
            dstar = tl.min(tl.where(gt < k_rem, bins, NB))
            above = tl.sum(tl.where(bins == dstar, gt, 0))
            cnt = tl.sum(tl.where(bins == dstar, hist, 0))
            k_rem -= above
            prefix = prefix | (dstar.to(tl.uint32) << shift)
            pmask = (tl.full([], -1, tl.int32) << shift).to(tl.uint32, bitcast=True)
            done = (cnt == k_rem).to(tl.int32)
    return prefix, pmask, k_rem


@triton.jit
def _emit(val_ptr, idx_ptr, L, prefix, pmask, k_rem, out_row, BLOCK: tl.constexpr, INDIRECT: tl.constexpr):
    """Write the selected positions of ``val_ptr[0:L]`` (or ``idx_ptr[pos]`` with ``INDIRECT``) to ``out_row``."""
    ar = tl.arange(0, BLOCK)
    n_out = tl.zeros([], tl.int32)
    eq_seen = tl.zeros([], tl.int32)
    for off in range(0, L, BLOCK):
        inb = off + ar < L
        key = _ordered(tl.load(val_ptr + off + ar, mask=inb, other=0.0)) & pmask
        eq_m = inb & (key == prefix)
        eq_rank = eq_seen + tl.cumsum(eq_m.to(tl.int32), 0) - 1
        sel = (inb & (key > prefix)) | (eq_m & (eq_rank < k_rem))
        pos = n_out + tl.cumsum(sel.to(tl.int32), 0) - 1
        if INDIRECT:
            ids = tl.load(idx_ptr + off + ar, mask=sel, other=-1)
        else:
            ids = (off + ar).to(tl.int32)
        tl.store(out_row + pos, ids, mask=sel)
        n_out += tl.sum(sel.to(tl.int32))
        eq_seen += tl.sum(eq_m.to(tl.int32))
    return n_out


@triton.jit
def topk_threshold_kernel(logits_ptr, stride_lt, row0, limit_ptr, theta_ptr, count_ptr, top_k,
                          NS: tl.constexpr, CH: tl.constexpr, BITS: tl.constexpr):
    """Per row: a key threshold that about 1.25 ``top_k`` scores reach, from a stratified sample.

    The sample is ``NS`` evenly spaced runs of ``CH`` scores (the whole row when it is that short),
    held in registers; its rank-``r`` key is found by the same radix rounds, without memory passes.
    """
    r = tl.program_id(0)
    row = logits_ptr + r.to(tl.int64) * stride_lt
    L = tl.load(limit_ptr + row0 + r)
    S: tl.constexpr = NS * CH
    NB: tl.constexpr = 1 << BITS
    i = tl.arange(0, S)
    strided = (i // CH).to(tl.int64) * L // NS + i % CH
    pos = tl.where(L <= S, i.to(tl.int64), strided)
    valid = pos < L
    key = _ordered(tl.load(row + pos, mask=valid, other=0.0))
    n_s = tl.minimum(L, S)
    # Rank in the sample for ~1.25 top_k hits in the row (+16 against sampling noise); exact when whole.
    rank = tl.where(L <= S, top_k, (n_s.to(tl.int64) * top_k * 5 // (4 * tl.maximum(L, 1))).to(tl.int32) + 16)
    rank = tl.minimum(rank, n_s)
    bins = tl.arange(0, NB)
    prefix = tl.zeros([], tl.int32).to(tl.uint32, bitcast=True)
    pmask = prefix
    k_rem = rank
    for rnd in tl.static_range(32 // BITS):
        shift = 32 - BITS * (rnd + 1)
        m = valid & ((key & pmask) == prefix)
        digit = ((key >> shift) & (NB - 1)).to(tl.int32)
        hist = tl.histogram(tl.where(m, digit, 0), NB) - tl.where(bins == 0, S - tl.sum(m.to(tl.int32)), 0)
        gt = tl.sum(hist) - tl.cumsum(hist, 0)
        dstar = tl.min(tl.where(gt < k_rem, bins, NB - 1))
        k_rem -= tl.sum(tl.where(bins == dstar, gt, 0))
        prefix = prefix | (dstar.to(tl.uint32) << shift)
        pmask = (tl.full([], -1, tl.int32) << shift).to(tl.uint32, bitcast=True)
    theta = tl.where(rank >= n_s, tl.zeros([], tl.int32).to(tl.uint32, bitcast=True), prefix)
    tl.store(theta_ptr + r, theta.to(tl.int32, bitcast=True))
    tl.store(count_ptr + r, 0)


@triton.jit
def topk_filter_kernel(logits_ptr, stride_lt, row0, limit_ptr, theta_ptr, count_ptr, cval_ptr, cidx_ptr, stride_c,
                       cap, top_k, seg_len, BLOCK: tl.constexpr):
    """Candidates: every score whose key reaches the row's threshold, appended (value, position) to the
    row's candidate list through one atomic counter per row; ``count`` ends exact even past ``cap``."""
    r = tl.program_id(0)
    L = tl.load(limit_ptr + row0 + r)
    if L > top_k:
        row = logits_ptr + r.to(tl.int64) * stride_lt
        crow = r.to(tl.int64) * stride_c
        theta = tl.load(theta_ptr + r).to(tl.uint32, bitcast=True)
        s0 = tl.program_id(1) * seg_len
        s1 = tl.minimum(s0 + seg_len, L)
        ar = tl.arange(0, BLOCK)
        for off in range(s0, s1, BLOCK):
            inb = off + ar < s1
            x = tl.load(row + off + ar, mask=inb, other=0.0)
            sel = inb & (_ordered(x) >= theta)
            n = tl.sum(sel.to(tl.int32))
            if n > 0:
                base = tl.atomic_add(count_ptr + r, n)
                pos = base + tl.cumsum(sel.to(tl.int32), 0) - 1
                ok = sel & (pos < cap)
                tl.store(cval_ptr + crow + pos, x, mask=ok)
                tl.store(cidx_ptr + crow + pos, (off + ar).to(tl.int32), mask=ok)


@triton.jit
def topk_select_kernel(logits_ptr, stride_lt, row0, limit_ptr, count_ptr, cval_ptr, cidx_ptr, stride_c, cap,
                       out_ptr, stride_ot, top_k, BLOCK: tl.constexpr, BITS: tl.constexpr):
    """Exact top ``top_k`` per row: among the candidates when they are complete (``top_k <= count <= cap``),
    else (the sample missed, or heavy ties) a radix select over the whole row."""
    r = tl.program_id(0)
    L = tl.load(limit_ptr + row0 + r)
    out_row = out_ptr + (row0 + r).to(tl.int64) * stride_ot
    ar = tl.arange(0, BLOCK)
    n_take = tl.minimum(top_k, L)
    if L <= top_k:
        for off in range(0, L, BLOCK):
            tl.store(out_row + off + ar, (off + ar).to(tl.int32), mask=off + ar < L)
    else:
        c = tl.load(count_ptr + r)
        if (c >= top_k) & (c <= cap):
            crow = r.to(tl.int64) * stride_c
            prefix, pmask, k_rem = _radix_rounds(cval_ptr + crow, c, top_k, BLOCK, BITS)
            _emit(cval_ptr + crow, cidx_ptr + crow, c, prefix, pmask, k_rem, out_row, BLOCK, True)
        else:
            row = logits_ptr + r.to(tl.int64) * stride_lt
            prefix, pmask, k_rem = _radix_rounds(row, L, top_k, BLOCK, BITS)
            _emit(row, row, L, prefix, pmask, k_rem, out_row, BLOCK, False)
    for off in range(n_take, top_k, BLOCK):
        tl.store(out_row + off + ar, tl.full([BLOCK], -1, tl.int32), mask=off + ar < top_k)


# ---- launchers -----------------------------------------------------------------------------------

def block_schedule(cu: torch.Tensor, n_rows: int, block_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query blocks that never straddle sequences: int32 ``(q0, q1)`` per program, built on the device.

    ``cu`` (int64 ``[B+1]``) are row boundaries inside ``[0, n_rows]``. The grid is the upper bound
    ``n_rows // block_q + B + 1`` (no host sync); programs past the last block get ``q0 = q1``.
    """
    B = cu.shape[0] - 1
    L = cu[1:] - cu[:-1]
    nb = (L + block_q - 1) // block_q
    cum = torch.cumsum(nb, 0)
    n_prog = n_rows // block_q + B + 1
    pid = torch.arange(n_prog, device=cu.device)
    b = torch.searchsorted(cum, pid, right=True)
    valid = b < B
    bc = b.clamp_max(B - 1)
    q0 = cu[bc] + (pid - (cum[bc] - nb[bc])) * block_q
    q1 = torch.minimum(q0 + block_q, cu[bc + 1])
    q0 = torch.where(valid, q0, 0)
    q1 = torch.where(valid, q1, 0)
    return q0.to(torch.int32), q1.to(torch.int32)


class Keys:
    """The key side: contiguous rows with a per-query start (varlen) or a paged cache with its block table."""

    def __init__(self, k: torch.Tensor, k_scale: Optional[torch.Tensor], kstart: Optional[torch.Tensor] = None,
                 block_table: Optional[torch.Tensor] = None, page: int = 1, q_per_batch: int = 1):
        self.k = k if k.stride(-1) == 1 else k.contiguous()
        self.k_scale = None if k_scale is None else k_scale.reshape(-1).contiguous()
        self.kstart, self.block_table, self.page, self.q_per_batch = kstart, block_table, page, q_per_batch


def indexer_scores(q: torch.Tensor, keys: Keys, weights: torch.Tensor, q_scale: Optional[torch.Tensor],
                   limit: torch.Tensor, cu_q: torch.Tensor, out: torch.Tensor, row0: int, row1: int, *,
                   write_masked: bool, interpret: bool, **override) -> None:
    """Scores of queries ``row0 .. row1`` into ``out[0 : row1-row0, :]`` (``-inf`` past each ``limit``
    only when ``write_masked``; otherwise those columns are left untouched)."""
    T, Hi, D = q.shape
    q, weights = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, weights))
    if q_scale is not None and q_scale.stride(-1) != 1:
        q_scale = q_scale.contiguous()
    override = {("num_warps" if k == "lnum_warps" else "num_stages" if k == "lnum_stages" else k): v
                for k, v in override.items()}
    cfg = config(CONFIG_FILE, "logits", q.device, interpret, **override)
    bq = cfg["BLOCK_Q"]
    HI = max(pow2(Hi, 1), triton.cdiv(16, bq))  # the product needs >= 16 stacked rows
    cu = cu_q.clamp(row0, row1) - row0
    q0, q1 = block_schedule(cu, row1 - row0, bq)
    q0, q1 = q0 + row0, q1 + row0
    width = out.shape[1]
    span = cfg["TILES"] * cfg["BLOCK_N"]
    grid = (q0.shape[0], triton.cdiv(max(width, 1), span))
    bt = keys.block_table
    qs = q_scale
    fp = q.dtype
    indexer_logits_kernel[grid](
        q, q.stride(0), q.stride(1), keys.k, keys.k.stride(0), weights, weights.stride(0),
        qs if qs is not None else weights, qs.stride(0) if qs is not None else 0,
        keys.k_scale if keys.k_scale is not None else weights, out, out.stride(0), row0, q0, q1,
        keys.kstart if keys.kstart is not None else limit, limit,
        bt if bt is not None else limit, bt.stride(0) if bt is not None else 0, keys.page,
        bt.shape[1] if bt is not None else 0, keys.k.shape[0] // max(keys.page, 1), keys.q_per_batch, Hi, width, D=D,
        BLOCK_Q=bq, HI=HI, BLOCK_D=pow2(D), BLOCK_N=cfg["BLOCK_N"],
        TILES=cfg["TILES"], HAS_QS=qs is not None, HAS_KS=keys.k_scale is not None, PAGED=bt is not None,
        UPCAST=interpret and fp == torch.bfloat16, IEEE=fp == torch.float32, WRITE_MASKED=write_masked,
        TRANS=cfg["TRANS"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def indexer_topk(q: torch.Tensor, keys: Keys, weights: torch.Tensor, q_scale: Optional[torch.Tensor],
                 limit: torch.Tensor, cu_q: torch.Tensor, width: int, top_k: int, *, interpret: bool,
                 **override) -> torch.Tensor:
    """int32 ``[T, top_k]``: per query the ``top_k`` best of keys ``0 .. limit-1``, ``-1`` padded."""
    T = q.shape[0]
    out = torch.empty((T, top_k), dtype=torch.int32, device=q.device)
    if T == 0:
        return out
    cfg = config(CONFIG_FILE, "topk", q.device, interpret, **{k: v for k, v in override.items()
                                                                if k not in LOGITS_KEYS})
    width = max(width, 1)
    cap = max(1, min(width, max(2 * top_k, top_k + cfg["cap_extra"])))
    chunk = max(1, min(T, cfg["workspace_bytes"] // (4 * width + 8 * cap)))
    ws = torch.empty((chunk, width), dtype=torch.float32, device=q.device)
    cval = torch.empty((chunk, cap), dtype=torch.float32, device=q.device)
    cidx = torch.empty((chunk, cap), dtype=torch.int32, device=q.device)
    theta = torch.empty(chunk, dtype=torch.int32, device=q.device)
    count = torch.empty(chunk, dtype=torch.int32, device=q.device)
    seg = cfg["SEG"]
    for row0 in range(0, T, chunk):
        n = min(T, row0 + chunk) - row0
        indexer_scores(q, keys, weights, q_scale, limit, cu_q, ws, row0, row0 + n, write_masked=False,
                       interpret=interpret, **{k: override.get(k) for k in LOGITS_KEYS})
        select_topk(ws, row0, n, limit, out, top_k, cval, cidx, theta, count, cfg)
    return out


def select_topk(ws: torch.Tensor, row0: int, n: int, limit: torch.Tensor, out: torch.Tensor, top_k: int,
                cval: torch.Tensor, cidx: torch.Tensor, theta: torch.Tensor, count: torch.Tensor, cfg: dict) -> None:
    """Rows ``0..n`` of the score workspace -> ``out[row0 : row0+n]``: threshold, filter, exact select."""
    cap = cval.shape[1]
    topk_threshold_kernel[(n,)](ws, ws.stride(0), row0, limit, theta, count, top_k, NS=cfg["NS"], CH=cfg["CH"],
                                BITS=cfg["BITS"], num_warps=cfg["num_warps"])
    topk_filter_kernel[(n, triton.cdiv(ws.shape[1], cfg["SEG"]))](
        ws, ws.stride(0), row0, limit, theta, count, cval, cidx, cval.stride(0), cap, top_k, cfg["SEG"],
        BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    topk_select_kernel[(n,)](ws, ws.stride(0), row0, limit, count, cval, cidx, cval.stride(0), cap, out,
                             out.stride(0), top_k, BLOCK=cfg["BLOCK"], BITS=cfg["BITS"], num_warps=cfg["num_warps"])
