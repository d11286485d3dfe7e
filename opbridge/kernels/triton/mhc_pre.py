"""mHC before a sub-layer (``mhc_pre``) and the fused ``mhc_post_pre`` ("Mega mHC"), forward.

One kernel, three phases per program, tied together by counters in a small int32 workspace:

1. **Split-K prenorm GEMM.** Program ``(b, s)`` owns token block ``b`` (``BT`` tokens) and column
   split ``s`` (``NSUB * CC`` columns of *every* stream, i.e. ``n`` strided pieces of the ``n*C``
   reduction). It computes its partial of ``z = x @ phi^T`` and of ``sum(x^2)`` in one pass over its
   tile. With ``FUSE_POST`` the tile is first made on chip from the previous site's ``(f, residual,
   post, comb)`` and written out as the new residual, so the streams are read once for both ops; the
   coefficients and ``y`` use its fp32 value, before rounding to the residual dtype (phase 3 recomputes
   it from the inputs rather than reading the rounded copy back).
2. **Epilogue, once per token block.** Each program bumps the block's arrival counter; the last to
   arrive (no one waits for it) sums the partials in a fixed order (deterministic), applies the RMS
   scale, the sigmoid gates and the Sinkhorn iterations in registers, writes ``post``/``comb`` and the
   ``pre`` weights, then raises the block's ready flag.
3. **Collapse, lagged.** The same program then computes ``y = sum_j pre_j x_j`` for its columns of block
   ``b - LAG``: the tile it (or a neighbour) read ``LAG`` blocks ago, still in L2, so the second read of
   the streams mostly costs L2 bandwidth, not DRAM. ``LAG`` trailing blocks of programs only collapse.

Options (constexpr, from the config): ``PHI2`` reads ``phi`` pre-split into bf16 hi/lo (a small kernel
per call) instead of splitting each tile; ``INTERLEAVE`` runs phase 3 inside phase 1's loop (it then
waits before its GEMM); ``COLLAPSE=0`` skips phase 3 (a benchmark diagnostic: no ``y``).

Progress: programs take a ticket from an atomic counter and use it as their logical id, so every
program a ticket waits on (same split, ``LAG >= 1`` blocks earlier) took an earlier ticket and is
already running; no wait is ever on a program that might not have started.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mhc_common import gates, phi_split_kernel, post_mix, post_tile, reduce_partials, split_dot, split_dot_pre
from .mhc_configs import config, next_pow2
from .sinkhorn import sk_forward


@triton.jit
def _mhc_pre_kernel(
        x_ptr, f_ptr, res_ptr, pin_ptr, cin_ptr,
        phi_ptr, alpha_ptr, bias_ptr,
        part_ptr, sq_ptr, pre_ptr, post_ptr, comb_ptr, y_ptr, sync_ptr,
        T, C, S, iters, eps, norm_eps, post_scale,
        N: tl.constexpr, NP: tl.constexpr, NPHI: tl.constexpr,
        BT: tl.constexpr, CC: tl.constexpr, NSUB: tl.constexpr, LAG: tl.constexpr, SB: tl.constexpr,
        INTERLEAVE: tl.constexpr, COLLAPSE: tl.constexpr, PHI2: tl.constexpr,
        FUSE_POST: tl.constexpr, X_BF16: tl.constexpr, FP32_DOT: tl.constexpr):
    NB = tl.cdiv(T, BT)
    ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed")
    b = ticket // S
    s = ticket % S
    bc = b - LAG
    kidx = tl.arange(0, NP)
    km = kidx < N
    cidx = tl.arange(0, CC)
    kk = tl.arange(0, NP * CC)
    kj = kk // CC
    icol = tl.arange(0, NPHI)
    # Row masks from tensor comparisons only: rows of a block past the end (b >= NB, the tail) are >= T,
    # rows of a block before the start (b - LAG < 0) are negative.
    rows = (b * BT + tl.arange(0, BT)).to(tl.int64)  # block b: the GEMM (phase 1)
    rmask = rows < T
    rows_c = (bc * BT + tl.arange(0, BT)).to(tl.int64)  # block b - LAG: the collapse (phase 3)
    cmask_r = (rows_c >= 0) & (rows_c < T)
    imask_g = icol < N * (N + 2) * (b < NB).to(tl.int32)  # tail programs load no phi

    if INTERLEAVE and COLLAPSE:
        # Phase 3 runs inside phase 1's loop (twice the loads in flight): wait for block b - LAG first.
        if bc >= 0:
            while tl.atomic_add(sync_ptr + 1 + NB + bc, 0, sem="acquire") == 0:
                pass
        prew = tl.load(pre_ptr + rows_c[:, None] * NP + kidx[None, :], mask=cmask_r[:, None], other=0.0,
                       cache_modifier=".cg")
        # The collapse tiles are loaded one step ahead (the compiler pipelines only the GEMM's loads).
        c_end = tl.minimum(C, (s * NSUB + NSUB) * CC)
        cn = s * NSUB * CC + cidx
        m3 = cmask_r[:, None, None] & km[None, :, None] & (cn < c_end)[None, None, :]
        if FUSE_POST:
            pin_c = tl.load(pin_ptr + rows_c[:, None] * N + kidx[None, :], mask=cmask_r[:, None] & km[None, :],
                            other=0.0).to(tl.float32)
            cin_c = tl.load(cin_ptr + rows_c[:, None, None] * (N * N) + kidx[None, :, None] * N + kidx[None, None, :],
                            mask=cmask_r[:, None, None] & km[None, :, None] & km[None, None, :],
                            other=0.0).to(tl.float32)
            f_nx = tl.load(f_ptr + rows_c[:, None] * C + cn[None, :], mask=cmask_r[:, None] & (cn < c_end)[None, :],
                           other=0.0)
            x_nx = tl.load(res_ptr + rows_c[:, None, None] * (N * C) + kidx[None, :, None] * C + cn[None, None, :],
                           mask=m3, other=0.0)
        else:
            x_nx = tl.load(x_ptr + rows_c[:, None, None] * (N * C) + kidx[None, :, None] * C + cn[None, None, :],
                           mask=m3, other=0.0, cache_modifier=".cg")

    # ---- phase 1: partial GEMM of block b over split s ------------------------------------------------
    acc = tl.zeros([BT, NPHI], dtype=tl.float32)
    sq = tl.zeros([BT], dtype=tl.float32)
    if FUSE_POST:
        pin = tl.load(pin_ptr + rows[:, None] * N + kidx[None, :], mask=rmask[:, None] & km[None, :],
                      other=0.0).to(tl.float32)
    for u in range(NSUB):
        c0 = (s * NSUB + u) * CC
        kc = c0 + kk % CC
        kmask = (kj < N) & (kc < C)
        koff = kj * C + kc
        c = c0 + cidx
        cm = c < C
        wm = kmask[:, None] & imask_g[None, :]
        if PHI2:  # phi pre-split into bf16 hi / lo, [2, NPHI, n*C]
            w = tl.load(phi_ptr + icol[None, :] * (N * C) + koff[:, None], mask=wm, other=0.0)
            w2 = tl.load(phi_ptr + (NPHI + icol[None, :]) * (N * C) + koff[:, None], mask=wm, other=0.0)
        else:
            w = tl.load(phi_ptr + icol[None, :] * (N * C) + koff[:, None], mask=wm, other=0.0)
        if FUSE_POST:
            # The new residual is stored in the residual dtype, but the next site's coefficients use
            # its fp32 value (no rounding in between: closer to the exact math than post-then-pre).
            nr = post_tile(f_ptr, res_ptr, cin_ptr, pin, rows, rmask, kidx, c, cm, C, N)
            tl.store(x_ptr + rows[:, None, None] * (N * C) + kidx[None, :, None] * C + c[None, None, :],
                     nr.to(x_ptr.dtype.element_ty), mask=rmask[:, None, None] & km[None, :, None] & cm[None, None, :])
            xf = tl.reshape(nr, [BT, NP * CC])
            if PHI2:
                acc = split_dot_pre(xf, w, w2, acc, False, FP32_DOT)
            else:
                acc = split_dot(xf, w, acc, False, False, FP32_DOT)
        else:
            xt = tl.load(x_ptr + rows[:, None] * (N * C) + koff[None, :], mask=rmask[:, None] & kmask[None, :],
                         other=0.0)
            xf = xt.to(tl.float32)
            if PHI2:
                acc = split_dot_pre(xt, w, w2, acc, X_BF16, FP32_DOT)
            else:
                acc = split_dot(xt, w, acc, X_BF16, False, FP32_DOT)
        sq += tl.sum(xf * xf, axis=1)
        if INTERLEAVE and COLLAPSE:
            x_cur = x_nx
            cn = c + CC
            m3 = cmask_r[:, None, None] & km[None, :, None] & (cn < c_end)[None, None, :]
            if FUSE_POST:  # recompute the fp32 new residual of block b - LAG from its (L2-resident) inputs
                f_cur = f_nx
                f_nx = tl.load(f_ptr + rows_c[:, None] * C + cn[None, :],
                               mask=cmask_r[:, None] & (cn < c_end)[None, :], other=0.0)
                x_nx = tl.load(res_ptr + rows_c[:, None, None] * (N * C) + kidx[None, :, None] * C + cn[None, None, :],
                               mask=m3, other=0.0)
                xc = post_mix(pin_c, cin_c, f_cur.to(tl.float32), x_cur.to(tl.float32), kidx, N)
            else:
                x_nx = tl.load(x_ptr + rows_c[:, None, None] * (N * C) + kidx[None, :, None] * C + cn[None, None, :],
                               mask=m3, other=0.0, cache_modifier=".cg")
                xc = x_cur.to(tl.float32)
            yv = tl.sum(prew[:, :, None] * xc, axis=1)
            tl.store(y_ptr + rows_c[:, None] * C + c[None, :], yv.to(y_ptr.dtype.element_ty),
                     mask=cmask_r[:, None] & cm[None, :])

    if b < NB:
        tl.store(part_ptr + (s * T + rows)[:, None] * NPHI + icol[None, :], acc, mask=rmask[:, None])
        tl.store(sq_ptr + s * T + rows, sq, mask=rmask)
        tl.debug_barrier()  # every thread's partial is written before the (single-thread) release below
        arrived = tl.atomic_add(sync_ptr + 1 + b, 1, sem="acq_rel")
        if arrived == S - 1:
            # ---- phase 2: the last program of block b turns its partials into coefficients ----------
            zp, zq, zr, sqs = reduce_partials(part_ptr, sq_ptr, rows, rmask, T, S, N, NP, NPHI, BT, SB)
            r, mp, mq, mr, sp, sg, L = gates(zp, zq, zr, sqs, alpha_ptr, bias_ptr, C, norm_eps, N, NP)
            m2 = rmask[:, None] & km[None, :]
            valid = m2[:, :, None] & km[None, None, :]
            comb = sk_forward(L, valid, m2, iters, eps)
            tl.store(pre_ptr + rows[:, None] * NP + kidx[None, :], tl.where(m2, sp + eps, 0.0), mask=rmask[:, None])
            tl.store(post_ptr + rows[:, None] * N + kidx[None, :], post_scale * sg, mask=m2)
            tl.store(comb_ptr + rows[:, None, None] * (N * N) + kidx[None, :, None] * N + kidx[None, None, :], comb,
                     mask=valid)
            tl.debug_barrier()
            tl.atomic_xchg(sync_ptr + 1 + NB + b, 1, sem="release")

    if (not INTERLEAVE) and COLLAPSE:
        if bc >= 0:
            # ---- phase 3 after phase 1: collapse block b - LAG over the columns of split s ------------
            while tl.atomic_add(sync_ptr + 1 + NB + bc, 0, sem="acquire") == 0:
                pass
            prew = tl.load(pre_ptr + rows_c[:, None] * NP + kidx[None, :], mask=cmask_r[:, None], other=0.0,
                           cache_modifier=".cg")
            if FUSE_POST:
                pin_c = tl.load(pin_ptr + rows_c[:, None] * N + kidx[None, :], mask=cmask_r[:, None] & km[None, :],
                                other=0.0).to(tl.float32)
            for u in range(NSUB):
                c = (s * NSUB + u) * CC + cidx
                cm = c < C
                if FUSE_POST:
                    xv = post_tile(f_ptr, res_ptr, cin_ptr, pin_c, rows_c, cmask_r, kidx, c, cm, C, N)
                else:
                    xv = tl.load(x_ptr + rows_c[:, None, None] * (N * C) + kidx[None, :, None] * C + c[None, None, :],
                                 mask=cmask_r[:, None, None] & km[None, :, None] & cm[None, None, :], other=0.0,
                                 cache_modifier=".cg").to(tl.float32)
                yv = tl.sum(prew[:, :, None] * xv, axis=1)
                tl.store(y_ptr + rows_c[:, None] * C + c[None, :], yv.to(y_ptr.dtype.element_ty),
                         mask=cmask_r[:, None] & cm[None, :])


def _launch(x, f, res, pin, cin, phi, alpha, bias, iters, eps, norm_eps, post_scale, fuse, cfg):
    """x: streams [T, n, C] (input, or the output buffer of the new residual when ``fuse``)."""
    T, n, C = x.shape
    y = torch.empty((T, C), dtype=x.dtype, device=x.device)
    post = torch.empty((T, n), dtype=torch.float32, device=x.device)
    comb = torch.empty((T, n, n), dtype=torch.float32, device=x.device)
    if T == 0:
        return y, post, comb
    np2, nphi = next_pow2(n), max(16, next_pow2(n * (n + 2)))
    bt, cc, nsub, lag = cfg["BT"], cfg["CC"], cfg["NSUB"], cfg["LAG"]
    if lag < 1:
        raise ValueError("mhc_pre kernel: LAG must be >= 1 (a collapse may only wait on earlier tickets)")
    S = triton.cdiv(C, cc * nsub)
    NB = triton.cdiv(T, bt)
    lag = min(lag, NB)  # a longer lag only adds programs with nothing to do
    dev = x.device
    part = torch.empty((S, T, nphi), dtype=torch.float32, device=dev)
    sq = torch.empty((S, T), dtype=torch.float32, device=dev)
    pre = torch.empty((T, np2), dtype=torch.float32, device=dev)
    sync = torch.zeros(1 + 2 * NB, dtype=torch.int32, device=dev)
    dummy = x
    phi2 = bool(cfg.get("PHI2", 0))
    if phi2:  # split phi once per call (2.75 MB for n=4, C=7168) rather than once per tile
        split = torch.empty((2, nphi, n * C), dtype=torch.bfloat16, device=dev)
        phi_split_kernel[(triton.cdiv(n * C, 256),)](phi, split, n * C, NR=n * (n + 2), NPHI=nphi, BK=256)
        phi = split
    _mhc_pre_kernel[((NB + lag) * S,)](
        x, f if fuse else dummy, res if fuse else dummy, pin if fuse else dummy, cin if fuse else dummy,
        phi, alpha, bias, part, sq, pre, post, comb, y, sync,
        T, C, S, iters, eps, norm_eps, post_scale,
        N=n, NP=np2, NPHI=nphi, BT=bt, CC=cc, NSUB=nsub, LAG=lag, SB=min(cfg.get("SB", 8), next_pow2(S)),
        INTERLEAVE=bool(cfg.get("INTERLEAVE", 0)), COLLAPSE=bool(cfg.get("COLLAPSE", 1)), PHI2=phi2,
        FUSE_POST=fuse, X_BF16=x.dtype == torch.bfloat16, FP32_DOT=dev.type != "cuda",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y, post, comb


def _params(phi, alpha, bias):
    return phi.contiguous(), alpha.contiguous(), bias.contiguous()


def mhc_pre(x, phi, alpha, bias, iters, eps, norm_eps, post_scale, cfg=None):
    """``(y, post, comb)`` of OPS.md 4.2 for streams ``x [..., n, C]`` (bf16/fp16/fp32), fp32 params."""
    lead, n, C = x.shape[:-2], x.shape[-2], x.shape[-1]
    xs = x.reshape(-1, n, C).contiguous()
    c = config("mhc_pre", n, x.device, cfg, tokens=xs.shape[0])
    y, post, comb = _launch(xs, None, None, None, None, *_params(phi, alpha, bias), iters, eps, norm_eps,
                            post_scale, False, c)
    return y.view(*lead, C), post.view(*lead, n), comb.view(*lead, n, n)


def mhc_post_pre(f, residual, post, comb, phi, alpha, bias, iters, eps, norm_eps, post_scale, cfg=None):
    """``(new_residual, y, post_next, comb_next)`` of OPS.md 4.5 in one kernel."""
    lead, n, C = residual.shape[:-2], residual.shape[-2], residual.shape[-1]
    res = residual.reshape(-1, n, C).contiguous()
    fs = f.reshape(-1, C).contiguous()
    pin = post.reshape(-1, n).contiguous()
    cin = comb.reshape(-1, n, n).contiguous()
    new = torch.empty_like(res)
    c = config("mhc_post_pre", n, residual.device, cfg, tokens=res.shape[0])
    y, pn, cn = _launch(new, fs, res, pin, cin, *_params(phi, alpha, bias), iters, eps, norm_eps, post_scale,
                        True, c)
    return new.view(*lead, n, C), y.view(*lead, C), pn.view(*lead, n), cn.view(*lead, n, n)
