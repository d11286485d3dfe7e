"""mhc_pre backward (OPS.md 4.4): gradients of x, phi, alpha and bias from those of (y, post, comb).

Per token (x = vec X, D = n*C; research note A.4):

    r = (mean(x^2) + norm_eps)^-1/2,  z = phi x,  m = r z
    da_pre = dpre * s_p (1 - s_p)                 dpre_j = <dy, X_j>
    da_post = dpost * post_scale * s_q (1 - s_q)
    dL = Sinkhorn backward of dcomb (recomputed on chip)
    dm = [alpha0 da_pre, alpha1 da_post, alpha2 dL]
    dz = r dm,  dr = <dm, z>
    dX_j = pre_j dy + (phi^T dz)_j - r^3 dr / D * X_j
    dphi = sum_t dz x^T,  dalpha, dbias = per-token sums

Three kernels, two passes over the streams:
1. ``_gemm``: split-K recompute of ``z`` and ``sum(x^2)`` (as the forward) plus the partials of ``dpre``.
2. ``_coef``: per token block, sums the partials and runs the coefficient backward above (Sinkhorn
   included); writes ``dz``, the ``r^3 dr / D`` factor, ``pre``, and per-block partial sums of
   ``dalpha``/``dbias`` (summed on the host in a fixed order: deterministic).
3. ``_dx``: a program owns ``CW`` columns of every stream and walks its share of the tokens, writing
   ``dX`` tiles and accumulating its ``dphi`` columns in registers (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mhc_common import gates, reduce_partials, split_dot
from .mhc_configs import config, next_pow2
from .sinkhorn import sk_backward


@triton.jit
def _gemm_kernel(x_ptr, dy_ptr, phi_ptr, part_ptr, sq_ptr, dpre_ptr, T, C,
                 N: tl.constexpr, NP: tl.constexpr, NPHI: tl.constexpr, BT: tl.constexpr, CC: tl.constexpr,
                 NSUB: tl.constexpr, HAS_DY: tl.constexpr, X_BF16: tl.constexpr, FP32_DOT: tl.constexpr):
    s = tl.program_id(1)
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    rmask = rows < T
    kk = tl.arange(0, NP * CC)
    kj = kk // CC
    icol = tl.arange(0, NPHI)
    imask = icol < N * (N + 2)
    acc = tl.zeros([BT, NPHI], dtype=tl.float32)
    sq = tl.zeros([BT], dtype=tl.float32)
    dpre = tl.zeros([BT, NP], dtype=tl.float32)
    for u in range(NSUB):
        kc = (s * NSUB + u) * CC + kk % CC
        kmask = (kj < N) & (kc < C)
        koff = kj * C + kc
        m2 = rmask[:, None] & kmask[None, :]
        xt = tl.load(x_ptr + rows[:, None] * (N * C) + koff[None, :], mask=m2, other=0.0)
        xf = xt.to(tl.float32)
        sq += tl.sum(xf * xf, axis=1)
        w = tl.load(phi_ptr + icol[None, :] * (N * C) + koff[:, None], mask=kmask[:, None] & imask[None, :], other=0.0)
        acc = split_dot(xt, w, acc, X_BF16, False, FP32_DOT)
        if HAS_DY:
            dyt = tl.load(dy_ptr + rows[:, None] * C + kc[None, :], mask=m2, other=0.0).to(tl.float32)
            dpre += tl.sum(tl.reshape(xf * dyt, [BT, NP, CC]), axis=2)
    tl.store(part_ptr + (s * T + rows)[:, None] * NPHI + icol[None, :], acc, mask=rmask[:, None])
    tl.store(sq_ptr + s * T + rows, sq, mask=rmask)
    if HAS_DY:
        tl.store(dpre_ptr + (s * T + rows)[:, None] * NP + tl.arange(0, NP)[None, :], dpre, mask=rmask[:, None])


@triton.jit
def _coef_kernel(part_ptr, sq_ptr, dprep_ptr, gpost_ptr, gcomb_ptr, alpha_ptr, bias_ptr,
                 dz_ptr, coef_ptr, pre_ptr, dab_ptr, T, C, S, iters, eps, norm_eps, post_scale,
                 N: tl.constexpr, NP: tl.constexpr, NPHI: tl.constexpr, BT: tl.constexpr, SB: tl.constexpr,
                 HAS_DY: tl.constexpr, HAS_DPOST: tl.constexpr, HAS_DCOMB: tl.constexpr):
    blk = tl.program_id(0)
    rows = (blk * BT + tl.arange(0, BT)).to(tl.int64)
    rmask = rows < T
    kidx = tl.arange(0, NP)
    km = kidx < N
    m2 = rmask[:, None] & km[None, :]
    valid = m2[:, :, None] & km[None, None, :]
    zp, zq, zr, sqs = reduce_partials(part_ptr, sq_ptr, rows, rmask, T, S, N, NP, NPHI, BT, SB)
    r, mp, mq, mr, sp, sg, L = gates(zp, zq, zr, sqs, alpha_ptr, bias_ptr, C, norm_eps, N, NP)
    dap = tl.zeros([BT, NP], dtype=tl.float32)
    daq = tl.zeros([BT, NP], dtype=tl.float32)
    dL = tl.zeros([BT, NP, NP], dtype=tl.float32)
    if HAS_DY:
        dpre = tl.zeros([BT, NP], dtype=tl.float32)
        sidx = tl.arange(0, SB)
        for s0 in range(0, S, SB):
            sv = s0 + sidx
            dpre += tl.sum(tl.load(dprep_ptr + (sv[:, None] * T + rows[None, :])[:, :, None] * NP + kidx[None, None, :],
                                   mask=(sv < S)[:, None, None] & m2[None, :, :], other=0.0), axis=0)
        dap = tl.where(m2, dpre * sp * (1.0 - sp), 0.0)
    if HAS_DPOST:
        gq = tl.load(gpost_ptr + rows[:, None] * N + kidx[None, :], mask=m2, other=0.0).to(tl.float32)
        daq = tl.where(m2, gq * post_scale * sg * (1.0 - sg), 0.0)
    if HAS_DCOMB:
        offs3 = rows[:, None, None] * (N * N) + kidx[None, :, None] * N + kidx[None, None, :]
        G = tl.load(gcomb_ptr + offs3, mask=valid, other=0.0).to(tl.float32)
        dL = sk_backward(L, G, valid, m2, iters, eps)
    a0 = tl.load(alpha_ptr)
    a1 = tl.load(alpha_ptr + 1)
    a2 = tl.load(alpha_ptr + 2)
    dmp = a0 * dap
    dmq = a1 * daq
    dmr = a2 * dL
    dr = tl.sum(dmp * zp, axis=1) + tl.sum(dmq * zq, axis=1) + tl.sum(tl.sum(dmr * zr, axis=2), axis=1)
    zrow = dz_ptr + rows * NPHI
    tl.store(zrow[:, None] + kidx[None, :], r[:, None] * dmp, mask=m2)
    tl.store(zrow[:, None] + N + kidx[None, :], r[:, None] * dmq, mask=m2)
    tl.store(zrow[:, None, None] + 2 * N + kidx[None, :, None] * N + kidx[None, None, :], r[:, None, None] * dmr,
             mask=valid)
    tl.store(coef_ptr + rows, r * r * r * dr / (N * C), mask=rmask)
    tl.store(pre_ptr + rows[:, None] * NP + kidx[None, :], tl.where(m2, sp + eps, 0.0), mask=rmask[:, None])
    # Per-block partial sums: [dalpha (3) | dbias (n*(n+2))], summed over blocks on the host.
    drow = dab_ptr + blk * (3 + N * (N + 2))
    tl.store(drow, tl.sum(tl.sum(dap * mp, axis=1), axis=0))
    tl.store(drow + 1, tl.sum(tl.sum(daq * mq, axis=1), axis=0))
    tl.store(drow + 2, tl.sum(tl.sum(tl.sum(dL * mr, axis=2), axis=1), axis=0))
    tl.store(drow + 3 + kidx, tl.sum(dap, axis=0), mask=km)
    tl.store(drow + 3 + N + kidx, tl.sum(daq, axis=0), mask=km)
    tl.store(drow + 3 + 2 * N + kidx[:, None] * N + kidx[None, :], tl.sum(dL, axis=0), mask=km[:, None] & km[None, :])


@triton.jit
def _dx_kernel(x_ptr, dy_ptr, dz_ptr, coef_ptr, pre_ptr, phi_ptr, add_ptr, dx_ptr, dphi_ptr, T, C, TT,
               N: tl.constexpr, NP: tl.constexpr, NPHI: tl.constexpr, BT: tl.constexpr, CW: tl.constexpr,
               HAS_DY: tl.constexpr, HAS_ADD: tl.constexpr, X_BF16: tl.constexpr, FP32_DOT: tl.constexpr):
    ts = tl.program_id(1)
    kk = tl.arange(0, NP * CW)
    kj = kk // CW
    kc = tl.program_id(0) * CW + kk % CW
    kmask = (kj < N) & (kc < C)
    koff = kj * C + kc
    icol = tl.arange(0, NPHI)
    imask = icol < N * (N + 2)
    W = tl.load(phi_ptr + icol[:, None] * (N * C) + koff[None, :], mask=imask[:, None] & kmask[None, :], other=0.0)
    dphi = tl.zeros([NPHI, NP * CW], dtype=tl.float32)
    t_lo = ts * TT
    t_hi = tl.minimum(t_lo + TT, T)
    for t0 in range(t_lo, t_hi, BT):
        rows = (t0 + tl.arange(0, BT)).to(tl.int64)
        rmask = rows < t_hi
        m2 = rmask[:, None] & kmask[None, :]
        xt = tl.load(x_ptr + rows[:, None] * (N * C) + koff[None, :], mask=m2, other=0.0)
        xf = xt.to(tl.float32)
        dzt = tl.load(dz_ptr + rows[:, None] * NPHI + icol[None, :], mask=rmask[:, None], other=0.0)
        coef = tl.load(coef_ptr + rows, mask=rmask, other=0.0)
        acc = -coef[:, None] * xf
        acc = split_dot(dzt, W, acc, False, False, FP32_DOT)
        if HAS_DY:
            prew = tl.load(pre_ptr + rows[:, None] * NP + kj[None, :], mask=m2, other=0.0)
            dyt = tl.load(dy_ptr + rows[:, None] * C + kc[None, :], mask=m2, other=0.0).to(tl.float32)
            acc += prew * dyt
        if HAS_ADD:
            acc += tl.load(add_ptr + rows[:, None] * (N * C) + koff[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * (N * C) + koff[None, :], acc.to(dx_ptr.dtype.element_ty), mask=m2)
        dphi = split_dot(tl.trans(dzt), xt, dphi, False, X_BF16, FP32_DOT)
    tl.store(dphi_ptr + (ts * (N * (N + 2)) + icol[:, None]).to(tl.int64) * (N * C) + koff[None, :], dphi,
             mask=imask[:, None] & kmask[None, :])


def mhc_pre_backward(grads, x, phi, alpha, bias, iters, eps, norm_eps, post_scale, dx_add=None, dx_dtype=None,
                     cfg=None):
    """``[dx, dphi, dalpha, dbias]`` for ``grads = [dy, dpost, dcomb]`` (any may be None).

    ``dx_add`` (same shape as x, optional) is added to dx in fp32 before the cast to ``dx_dtype``
    (default: x's): the fused ``mhc_post_pre`` backward passes the new residual's own gradient this way
    and keeps the sum in float32 for the post backward that follows.
    """
    dx_dtype = dx_dtype or x.dtype
    dy, dpost, dcomb = grads
    lead, n, C = x.shape[:-2], x.shape[-2], x.shape[-1]
    xs = x.reshape(-1, n, C).contiguous()
    T, dev = xs.shape[0], x.device
    phi, alpha, bias = phi.contiguous(), alpha.contiguous(), bias.contiguous()
    nphi_real = n * (n + 2)
    dphi = torch.zeros((nphi_real, n * C), dtype=phi.dtype, device=dev)
    dalpha = torch.zeros_like(alpha)
    dbias = torch.zeros_like(bias)
    if T == 0 or (dy is None and dpost is None and dcomb is None):
        dx = (torch.zeros(xs.shape, dtype=dx_dtype, device=dev) if dx_add is None
              else dx_add.reshape(xs.shape).to(dx_dtype, copy=True))
        return [dx.view(x.shape), dphi, dalpha, dbias]
    np2, nphi = next_pow2(n), max(16, next_pow2(nphi_real))
    c = config("mhc_pre_backward", n, dev, cfg)
    fp32_dot, x_bf16 = dev.type != "cuda", x.dtype == torch.bfloat16
    dummy = xs
    dys = dy.reshape(-1, C).contiguous() if dy is not None else dummy
    gpost = dpost.reshape(-1, n).contiguous() if dpost is not None else dummy
    gcomb = dcomb.reshape(-1, n, n).contiguous() if dcomb is not None else dummy
    add = dx_add.reshape(xs.shape).contiguous() if dx_add is not None else dummy

    bt, cc, nsub = c["BT"], c["CC"], c["NSUB"]
    S = triton.cdiv(C, cc * nsub)
    part = torch.empty((S, T, nphi), dtype=torch.float32, device=dev)
    sq = torch.empty((S, T), dtype=torch.float32, device=dev)
    dprep = torch.empty((S, T, np2), dtype=torch.float32, device=dev) if dy is not None else part
    _gemm_kernel[(triton.cdiv(T, bt), S)](
        xs, dys, phi, part, sq, dprep, T, C, N=n, NP=np2, NPHI=nphi, BT=bt, CC=cc, NSUB=nsub,
        HAS_DY=dy is not None, X_BF16=x_bf16, FP32_DOT=fp32_dot, num_warps=c["num_warps"],
        num_stages=c["num_stages"])

    bt2 = c["BT2"]
    nb2 = triton.cdiv(T, bt2)
    dz = torch.zeros((T, nphi), dtype=torch.float32, device=dev)
    coef = torch.empty((T,), dtype=torch.float32, device=dev)
    pre = torch.empty((T, np2), dtype=torch.float32, device=dev)
    dab = torch.empty((nb2, 3 + nphi_real), dtype=torch.float32, device=dev)
    _coef_kernel[(nb2,)](
        part, sq, dprep, gpost, gcomb, alpha, bias, dz, coef, pre, dab, T, C, S, iters, eps, norm_eps, post_scale,
        N=n, NP=np2, NPHI=nphi, BT=bt2, SB=min(8, next_pow2(S)), HAS_DY=dy is not None, HAS_DPOST=dpost is not None,
        HAS_DCOMB=dcomb is not None, num_warps=c.get("warps2", 4))
    sums = dab.sum(0)
    dalpha = sums[:3].to(alpha.dtype)
    dbias = sums[3:].to(bias.dtype)

    cw, bt3, ts = c["CW"], c["BT3"], max(1, min(c["TS"], triton.cdiv(T, c["BT3"])))
    tt = triton.cdiv(triton.cdiv(T, ts), bt3) * bt3
    ts = triton.cdiv(T, tt)
    dx = torch.empty(xs.shape, dtype=dx_dtype, device=dev)
    dphi_part = torch.empty((ts, nphi_real, n * C), dtype=torch.float32, device=dev)
    _dx_kernel[(triton.cdiv(C, cw), ts)](
        xs, dys, dz, coef, pre, phi, add, dx, dphi_part, T, C, tt, N=n, NP=np2, NPHI=nphi, BT=bt3, CW=cw,
        HAS_DY=dy is not None, HAS_ADD=dx_add is not None, X_BF16=x_bf16, FP32_DOT=fp32_dot,
        num_warps=c["num_warps"], num_stages=c["num_stages"])
    dphi = (dphi_part[0] if ts == 1 else dphi_part.sum(0)).to(phi.dtype)
    return [dx.view(x.shape), dphi, dalpha, dbias]
