"""mHC before a sub-layer (``mhc_pre``) and the fused ``mhc_post_pre`` ("Mega mHC"), forward.

Three launches, no waiting between programs of one launch:

1. **Split-K prenorm GEMM** (``_prenorm_gemm_kernel``). Program ``(b, s)`` owns token block ``b``
   (``BT`` tokens) and split ``s`` of the ``n*C`` reduction, and writes its partial of ``z = x @ phi^T``
   and of ``sum(x^2)``. With ``CONTIG`` (the default for ``mhc_pre``) a split is a contiguous range of
   the flattened ``n*C`` axis; otherwise it is ``NSUB * CC`` columns of *every* stream, the layout
   ``FUSE_POST`` needs: the tile is then first made on chip from the previous site's ``(f, residual,
   post, comb)``, rounded to the residual dtype and written out as the new residual, and the GEMM reads
   that rounded value, so the result equals ``mhc_post`` followed by ``mhc_pre`` (OPS.md 4.5) while the
   streams are read once for both.
2. **Coefficients** (``_coeff_kernel``), one program per token block: sums the partials in a fixed
   order (deterministic), applies the RMS scale, the sigmoid gates and the Sinkhorn iterations in
   registers, writes ``post``, ``comb`` and the ``pre`` weights.
3. **Collapse** (``_collapse_kernel``): ``y = sum_j pre_j x_j``, a streaming pass over ``[BT, n, CC]``
   tiles. Token blocks run last-first: the GEMM launch finished with the last blocks, whose streams are
   still in L2.

The earlier single-launch design (GEMM, last-arriver epilogue and a lagged collapse tied together by
spin-waits on flags) streamed its GEMM phase at 0.9 TB/s on the H100 (1 CTA per SM at 174 registers
and 168 KB shared memory); the plain split-K launch streams at about 2.5 TB/s.

``PHI2`` reads ``phi`` pre-split into bf16 hi/lo (one small kernel per call) instead of splitting
each tile in registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mhc_common import gates, phi_split_kernel, post_tile, reduce_partials, split_dot, split_dot_pre
from .mhc_configs import config, next_pow2
from .sinkhorn import sk_forward


@triton.jit
def _prenorm_gemm_kernel(
        x_ptr, f_ptr, res_ptr, pin_ptr, cin_ptr, phi_ptr, part_ptr, sq_ptr, T, C, S,
        N: tl.constexpr, NP: tl.constexpr, NPHI: tl.constexpr, BT: tl.constexpr, CC: tl.constexpr,
        NSUB: tl.constexpr, PHI2: tl.constexpr, FUSE_POST: tl.constexpr, X_BF16: tl.constexpr,
        FP32_DOT: tl.constexpr, CONTIG: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // S  # the S splits of one token block are adjacent in launch order
    s = pid % S
    kidx = tl.arange(0, NP)
    km = kidx < N
    kk = tl.arange(0, NP * CC)
    kj = kk // CC
    icol = tl.arange(0, NPHI)
    imask = icol < N * (N + 2)
    rows = (b * BT + tl.arange(0, BT)).to(tl.int64)
    rmask = rows < T
    acc = tl.zeros([BT, NPHI], dtype=tl.float32)
    sq = tl.zeros([BT], dtype=tl.float32)
    if FUSE_POST:
        pin = tl.load(pin_ptr + rows[:, None] * N + kidx[None, :], mask=rmask[:, None] & km[None, :],
                      other=0.0).to(tl.float32)
    for u in range(NSUB):
        c0 = (s * NSUB + u) * CC
        if CONTIG:  # split s owns a contiguous range of the flattened n*C axis (no post mix to feed)
            koff = (s * NSUB + u) * (NP * CC) + kk
            kmask = koff < N * C
        else:  # split s owns columns [c0, c0 + CC) of every stream, as the post mix needs
            kc = c0 + kk % CC
            kmask = (kj < N) & (kc < C)
            koff = kj * C + kc
        wm = kmask[:, None] & imask[None, :]
        w = tl.load(phi_ptr + icol[None, :] * (N * C) + koff[:, None], mask=wm, other=0.0)
        if PHI2:  # phi pre-split into bf16 hi / lo, [2, NPHI, n*C]
            w2 = tl.load(phi_ptr + (NPHI + icol[None, :]) * (N * C) + koff[:, None], mask=wm, other=0.0)
        if FUSE_POST:
            c = c0 + tl.arange(0, CC)
            cm = c < C
            nr = post_tile(f_ptr, res_ptr, cin_ptr, pin, rows, rmask, kidx, c, cm, C, N)
            xt = tl.reshape(nr.to(x_ptr.dtype.element_ty), [BT, NP * CC])
            tl.store(x_ptr + rows[:, None] * (N * C) + koff[None, :], xt, mask=rmask[:, None] & kmask[None, :])
        else:
            xt = tl.load(x_ptr + rows[:, None] * (N * C) + koff[None, :], mask=rmask[:, None] & kmask[None, :],
                         other=0.0)
        xf = xt.to(tl.float32)
        sq += tl.sum(xf * xf, axis=1)
        if PHI2:
            acc = split_dot_pre(xt, w, w2, acc, X_BF16, FP32_DOT)
        else:
            acc = split_dot(xt, w, acc, X_BF16, False, FP32_DOT)
    tl.store(part_ptr + (s * T + rows)[:, None] * NPHI + icol[None, :], acc, mask=rmask[:, None])
    tl.store(sq_ptr + s * T + rows, sq, mask=rmask)


@triton.jit
def _coeff_kernel(part_ptr, sq_ptr, alpha_ptr, bias_ptr, pre_ptr, post_ptr, comb_ptr, T, C, S, iters, eps,
                  norm_eps, post_scale, N: tl.constexpr, NP: tl.constexpr, NPHI: tl.constexpr, BT: tl.constexpr,
                  SB: tl.constexpr):
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    rmask = rows < T
    kidx = tl.arange(0, NP)
    km = kidx < N
    zp, zq, zr, sqs = reduce_partials(part_ptr, sq_ptr, rows, rmask, T, S, N, NP, NPHI, BT, SB)
    r, mp, mq, mr, sp, sg, L = gates(zp, zq, zr, sqs, alpha_ptr, bias_ptr, C, norm_eps, N, NP)
    m2 = rmask[:, None] & km[None, :]
    valid = m2[:, :, None] & km[None, None, :]
    comb = sk_forward(L, valid, m2, iters, eps)
    tl.store(pre_ptr + rows[:, None] * NP + kidx[None, :], tl.where(m2, sp + eps, 0.0), mask=rmask[:, None])
    tl.store(post_ptr + rows[:, None] * N + kidx[None, :], post_scale * sg, mask=m2)
    tl.store(comb_ptr + rows[:, None, None] * (N * N) + kidx[None, :, None] * N + kidx[None, None, :], comb,
             mask=valid)


@triton.jit
def _collapse_kernel(x_ptr, pre_ptr, y_ptr, T, C, NCB, N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr,
                     CC: tl.constexpr, STEPS: tl.constexpr):
    pid = tl.program_id(0)
    NB = tl.cdiv(T, BT)
    b = NB - 1 - pid // NCB  # last token blocks first: their streams are the freshest in L2
    cb = pid % NCB
    rows = (b * BT + tl.arange(0, BT)).to(tl.int64)
    rmask = rows < T
    kidx = tl.arange(0, NP)
    km = kidx < N
    prew = tl.load(pre_ptr + rows[:, None] * NP + kidx[None, :], mask=rmask[:, None], other=0.0)
    for u in range(STEPS):
        c = (cb * STEPS + u) * CC + tl.arange(0, CC)
        cm = c < C
        xv = tl.load(x_ptr + rows[:, None, None] * (N * C) + kidx[None, :, None] * C + c[None, None, :],
                     mask=rmask[:, None, None] & km[None, :, None] & cm[None, None, :], other=0.0).to(tl.float32)
        yv = tl.sum(prew[:, :, None] * xv, axis=1)
        tl.store(y_ptr + rows[:, None] * C + c[None, :], yv.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cm[None, :])


def _launch(x, f, res, pin, cin, phi, alpha, bias, iters, eps, norm_eps, post_scale, fuse, cfg):
    """x: streams [T, n, C] (input, or the output buffer of the new residual when ``fuse``)."""
    T, n, C = x.shape
    dev = x.device
    y = torch.empty((T, C), dtype=x.dtype, device=dev)
    post = torch.empty((T, n), dtype=torch.float32, device=dev)
    comb = torch.empty((T, n, n), dtype=torch.float32, device=dev)
    if T == 0:
        return y, post, comb
    np2, nphi = next_pow2(n), max(16, next_pow2(n * (n + 2)))
    bt, cc, nsub = cfg["BT"], cfg["CC"], cfg["NSUB"]
    contig = not fuse and bool(cfg.get("CONTIG", 1))
    S = triton.cdiv(n * C, np2 * cc * nsub) if contig else triton.cdiv(C, cc * nsub)
    part = torch.empty((S, T, nphi), dtype=torch.float32, device=dev)
    sq = torch.empty((S, T), dtype=torch.float32, device=dev)
    pre = torch.empty((T, np2), dtype=torch.float32, device=dev)
    phi2 = bool(cfg.get("PHI2", 0))
    if phi2:  # split phi once per call (2.75 MB for n=4, C=7168) rather than once per tile
        split = torch.empty((2, nphi, n * C), dtype=torch.bfloat16, device=dev)
        phi_split_kernel[(triton.cdiv(n * C, 256),)](phi, split, n * C, NR=n * (n + 2), NPHI=nphi, BK=256)
        phi = split
    _prenorm_gemm_kernel[(triton.cdiv(T, bt) * S,)](
        x, f if fuse else x, res if fuse else x, pin if fuse else x, cin if fuse else x, phi, part, sq, T, C, S,
        N=n, NP=np2, NPHI=nphi, BT=bt, CC=cc, NSUB=nsub, PHI2=phi2, FUSE_POST=fuse,
        X_BF16=x.dtype == torch.bfloat16, FP32_DOT=dev.type != "cuda", CONTIG=contig,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    bt2 = cfg["BT2"]
    _coeff_kernel[(triton.cdiv(T, bt2),)](
        part, sq, alpha, bias, pre, post, comb, T, C, S, iters, eps, norm_eps, post_scale,
        N=n, NP=np2, NPHI=nphi, BT=bt2, SB=min(cfg["SB"], next_pow2(S)), num_warps=cfg["warps2"])
    bt3, cc3, steps = cfg["BT3"], cfg["CC3"], cfg["STEPS3"]
    ncb = triton.cdiv(C, cc3 * steps)
    _collapse_kernel[(triton.cdiv(T, bt3) * ncb,)](
        x, pre, y, T, C, ncb, N=n, NP=np2, BT=bt3, CC=cc3, STEPS=steps, num_warps=cfg["warps3"])
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
    """``(new_residual, y, post_next, comb_next)`` of OPS.md 4.5: the new residual is written once, in the
    residual dtype, and the next site's coefficients and ``y`` are computed from that rounded value."""
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
