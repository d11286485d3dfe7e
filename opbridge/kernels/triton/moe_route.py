"""MoE routing kernels (OPS.md 2.1, 2.1b): scoring, correction bias, group limit and top-k in one pass.

One program owns ``BT`` tokens and their whole expert row in registers, so scoring, the group
limit and the ``k`` selections are reductions over a row that never leaves the chip. Top-k is ``k``
rounds of (max, lowest id reaching it), which gives the contract's "ties to the lower id" exactly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

SCORING_CODES = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}


@triton.jit
def _log1p(x):
    # log(1 + x) without losing x when x is tiny (Goldberg's trick); libdevice is not under the interpreter.
    u = 1.0 + x
    one = u == 1.0
    return tl.where(one, x, tl.log(u) * (x / tl.where(one, 1.0, u - 1.0)))


@triton.jit
def _score(x, mx, den, SCORING: tl.constexpr):
    """fp32 score of fp32 logits (``mx``, ``den``: the row max and exp-sum, used by softmax only)."""
    if SCORING == 0:
        return tl.exp(x - mx) / den
    elif SCORING == 1:
        return 1.0 / (1.0 + tl.exp(-x))
    else:
        # softplus with torch's threshold (x > 20 -> x), log1p form elsewhere so tiny values keep their digits.
        return tl.sqrt(tl.where(x > 20.0, x, tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))))


@triton.jit
def _row_stats(x, cmask, SCORING: tl.constexpr):
    """Row max and exp-sum of the logits for softmax (ones otherwise), as [BT] vectors."""
    if SCORING == 0:
        xm = tl.where(cmask, x, float("-inf"))
        mx = tl.max(xm, axis=1)
        mx = tl.where(mx == float("-inf"), 0.0, mx)  # rows past T are all masked
        den = tl.sum(tl.where(cmask, tl.exp(xm - mx[:, None]), 0.0), axis=1)
        den = tl.where(den == 0.0, 1.0, den)
    else:
        mx = tl.max(tl.zeros_like(x), axis=1)
        den = mx + 1.0
    return mx, den


@triton.jit
def _finish(W, RENORM: tl.constexpr, scaling):
    if RENORM:
        W = W / (tl.sum(W, axis=1)[:, None] + 1e-20)
    return W * scaling


@triton.jit
def _moe_route_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, T, E, s_lt, s_le, scaling,
                      TOPK: tl.constexpr, SCORING: tl.constexpr, HAS_BIAS: tl.constexpr,
                      NUM_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, GS: tl.constexpr,
                      GROUP_3D: tl.constexpr, RENORM: tl.constexpr,
                      BT: tl.constexpr, EP: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    rmask = rows < T
    row_ptr = logits_ptr + rows.to(tl.int64) * s_lt
    cols = tl.arange(0, EP)
    cm1 = cols < E
    cmask = cm1[None, :] & rmask[:, None]
    x = tl.load(row_ptr[:, None] + cols[None, :] * s_le, mask=cmask, other=0.0).to(tl.float32)
    mx, den = _row_stats(x, cmask, SCORING)
    s = tl.where(cmask, _score(x, mx[:, None], den[:, None], SCORING), 0.0)
    q = s
    if HAS_BIAS:
        q = q + tl.load(bias_ptr + cols, mask=cm1, other=0.0)[None, :]
    q = tl.where(q != q, float("inf"), q)  # NaN ranks first, as in torch's descending sort
    avail = cmask
    if NUM_GROUPS > 1:
        # group score = sum of the group's two largest q; keep the TOPK_GROUPS best groups (ties: lower group)
        gidx = tl.arange(0, GP)
        if GROUP_3D:  # E = NUM_GROUPS * GS, both powers of two: all groups in one [BT, G, GS] reduction
            q3 = tl.reshape(tl.where(cmask, q, float("-inf")), (BT, NUM_GROUPS, GS))
            j3 = tl.arange(0, GS)[None, None, :]
            m1 = tl.max(q3, axis=2)
            i1 = tl.min(tl.where(q3 == m1[:, :, None], j3, GS), axis=2)
            m2 = tl.max(tl.where(j3 == i1[:, :, None], float("-inf"), q3), axis=2)
            if GS > 1:
                gscore = m1 + m2
            else:
                gscore = m1
        else:
            grp = cols // GS
            gscore = tl.full((BT, GP), float("-inf"), tl.float32)
            for g in tl.static_range(NUM_GROUPS):
                inb = ((grp == g) & cm1)[None, :]
                qq = tl.where(inb, q, float("-inf"))
                g1 = tl.max(qq, axis=1)
                gi = tl.min(tl.where(inb & (qq == g1[:, None]), cols[None, :], EP), axis=1)
                g2 = tl.max(tl.where(cols[None, :] == gi[:, None], float("-inf"), qq), axis=1)
                if GS > 1:
                    sc = g1 + g2
                else:
                    sc = g1
                gscore = tl.where(gidx[None, :] == g, sc[:, None], gscore)
        gav = (gidx < NUM_GROUPS)[None, :] & rmask[:, None]
        keepg = gav & (gidx[None, :] < 0)
        for j in tl.static_range(TOPK_GROUPS):
            gq = tl.where(gav, gscore, float("-inf"))
            gm = tl.max(gq, axis=1)
            gi = tl.min(tl.where(gav & (gq == gm[:, None]), gidx[None, :], GP), axis=1)
            hitg = gidx[None, :] == gi[:, None]
            gav = gav & ~hitg
            keepg = keepg | hitg
        if GROUP_3D:
            keep = tl.reshape(tl.broadcast_to(keepg[:, :, None], (BT, NUM_GROUPS, GS)), (BT, EP))
        else:
            keep = cmask & (cols[None, :] < 0)
            for g in tl.static_range(NUM_GROUPS):
                kg = tl.sum(tl.where(gidx[None, :] == g, keepg.to(tl.int32), 0), axis=1) > 0
                keep = keep | (((cols // GS) == g)[None, :] & kg[:, None])
        avail = avail & keep
    kidx = tl.arange(0, KP)
    ID = tl.full((BT, KP), -1, tl.int32)
    for j in tl.static_range(TOPK):
        qm = tl.where(avail, q, float("-inf"))
        m = tl.max(qm, axis=1)
        i = tl.min(tl.where(avail & (qm == m[:, None]), cols[None, :], EP), axis=1)
        avail = avail & (cols[None, :] != i[:, None])
        ID = tl.where(kidx[None, :] == j, tl.where(i < E, i, -1)[:, None], ID)
    # Weights: the scores at the chosen ids, recomputed from their logits (same fp32 arithmetic as s).
    ok = rmask[:, None] & (kidx < TOPK)[None, :] & (ID >= 0)
    xi = tl.load(row_ptr[:, None] + tl.where(ok, ID, 0) * s_le, mask=ok, other=0.0).to(tl.float32)
    W = tl.where(ok, _score(xi, mx[:, None], den[:, None], SCORING), 0.0)
    W = _finish(W, RENORM, scaling)
    omask = rmask[:, None] & (kidx < TOPK)[None, :]
    o = rows[:, None].to(tl.int64) * TOPK + kidx[None, :]
    tl.store(w_ptr + o, W, mask=omask)
    tl.store(ids_ptr + o, ID, mask=omask)


@triton.jit
def _moe_route_hash_kernel(logits_ptr, tok_ptr, t2e_ptr, w_ptr, ids_ptr, T, E, V, s_lt, s_le, s_tv, s_tk, scaling,
                           TOPK: tl.constexpr, SCORING: tl.constexpr, RENORM: tl.constexpr,
                           BT: tl.constexpr, EP: tl.constexpr, KP: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    rmask = rows < T
    cols = tl.arange(0, EP)
    cmask = (cols < E)[None, :] & rmask[:, None]
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * s_lt + cols[None, :] * s_le, mask=cmask,
                other=0.0).to(tl.float32)
    mx, den = _row_stats(x, cmask, SCORING)
    s = tl.where(cmask, _score(x, mx[:, None], den[:, None], SCORING), 0.0)
    tok = tl.load(tok_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    tok_ok = (tok >= 0) & (tok < V)  # a bad token id reads nothing: its ids stay -1, weights 0
    kidx = tl.arange(0, KP)
    kmask = (kidx < TOPK)[None, :]
    ID = tl.load(t2e_ptr + tl.where(tok_ok, tok, 0)[:, None] * s_tv + kidx[None, :] * s_tk,
                 mask=tok_ok[:, None] & kmask, other=-1).to(tl.int32)
    W = tl.zeros((BT, KP), tl.float32)
    for j in tl.static_range(TOPK):
        idj = tl.sum(tl.where(kidx[None, :] == j, ID, 0), axis=1)
        wj = tl.sum(tl.where(cols[None, :] == idj[:, None], s, 0.0), axis=1)  # 0 for ids outside [0, E)
        W = tl.where(kidx[None, :] == j, wj[:, None], W)
    W = _finish(W, RENORM, scaling)
    omask = rmask[:, None] & kmask
    o = rows[:, None].to(tl.int64) * TOPK + kidx[None, :]
    tl.store(w_ptr + o, W, mask=omask)
    tl.store(ids_ptr + o, ID, mask=omask)


def _block_tokens(E: int, cfg: dict | None) -> tuple[int, int]:
    cfg = cfg or {}
    bt = int(cfg.get("BT", 4 if E <= 256 else 2))
    return bt, int(cfg.get("num_warps", 4))


def moe_route(logits: torch.Tensor, top_k: int, scoring: str, correction_bias, num_groups: int, topk_groups: int,
              renormalize: bool, scaling_factor: float, cfg: dict | None = None):
    T, E = logits.shape
    w = torch.empty((T, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=logits.device)
    if T == 0:
        return w, ids
    bt, nw = _block_tokens(E, cfg)
    bias = correction_bias if correction_bias is not None else w  # dummy pointer when absent
    ep = triton.next_power_of_2(E)
    gs = E // num_groups
    gp = triton.next_power_of_2(max(num_groups, 2))
    # one [BT, G, GS] reduction for all group scores when the expert row splits evenly in registers
    group_3d = num_groups > 1 and ep == E and gp == num_groups and (gs & (gs - 1)) == 0
    _moe_route_kernel[(triton.cdiv(T, bt),)](
        logits, bias, w, ids, T, E, logits.stride(0), logits.stride(1), float(scaling_factor),
        TOPK=top_k, SCORING=SCORING_CODES[scoring], HAS_BIAS=correction_bias is not None,
        NUM_GROUPS=num_groups, TOPK_GROUPS=topk_groups, GS=gs, GROUP_3D=group_3d, RENORM=bool(renormalize),
        BT=bt, EP=ep, GP=gp,
        KP=triton.next_power_of_2(max(top_k, 2)), num_warps=nw)
    return w, ids


def moe_route_hash(logits: torch.Tensor, token_ids: torch.Tensor, tid2eid: torch.Tensor, scoring: str,
                   renormalize: bool, scaling_factor: float, cfg: dict | None = None):
    T, E = logits.shape
    V, k = tid2eid.shape
    w = torch.empty((T, k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((T, k), dtype=torch.int32, device=logits.device)
    if T == 0 or k == 0:
        return w, ids
    bt, nw = _block_tokens(E, cfg)
    _moe_route_hash_kernel[(triton.cdiv(T, bt),)](
        logits, token_ids, tid2eid, w, ids, T, E, V, logits.stride(0), logits.stride(1),
        tid2eid.stride(0), tid2eid.stride(1), float(scaling_factor),
        TOPK=k, SCORING=SCORING_CODES[scoring], RENORM=bool(renormalize),
        BT=bt, EP=triton.next_power_of_2(E), KP=triton.next_power_of_2(max(k, 2)), num_warps=nw)
    return w, ids
