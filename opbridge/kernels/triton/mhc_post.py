"""mHC after a sub-layer (``mhc_post``, OPS.md 4.3), forward and backward, one pass over the streams each.

Forward: ``out[k] = post[k] * f + sum_j comb[j, k] * residual[j]``: a program owns a ``[BT, n, CC]`` tile,
reads ``f`` and the ``n`` residual streams once and writes the ``n`` output streams once.

Backward, for ``g = d out``: ``df = sum_k post_k g_k``, ``dres_j = sum_k comb[j, k] g_k``,
``dpost_k = <g_k, f>``, ``dcomb[j, k] = <g_k, res_j>``. A program owns ``BT`` tokens and walks all of
``C``, so the per-token reductions stay in registers (no partials, deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mhc_common import post_tile
from .mhc_configs import config, next_pow2


@triton.jit
def _mhc_post_kernel(f_ptr, res_ptr, pin_ptr, cin_ptr, out_ptr, T, C,
                     N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, CC: tl.constexpr):
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    rmask = rows < T
    kidx = tl.arange(0, NP)
    km = kidx < N
    c = tl.program_id(1) * CC + tl.arange(0, CC)
    cm = c < C
    pin = tl.load(pin_ptr + rows[:, None] * N + kidx[None, :], mask=rmask[:, None] & km[None, :],
                  other=0.0).to(tl.float32)
    out = post_tile(f_ptr, res_ptr, cin_ptr, pin, rows, rmask, kidx, c, cm, C, N)
    tl.store(out_ptr + rows[:, None, None] * (N * C) + kidx[None, :, None] * C + c[None, None, :],
             out.to(out_ptr.dtype.element_ty), mask=rmask[:, None, None] & km[None, :, None] & cm[None, None, :])


@triton.jit
def _mhc_post_bwd_kernel(g_ptr, f_ptr, res_ptr, pin_ptr, cin_ptr, df_ptr, dres_ptr, dpost_ptr, dcomb_ptr, T, C,
                         N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, CC: tl.constexpr):
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    rmask = rows < T
    kidx = tl.arange(0, NP)
    km = kidx < N
    m2k = rmask[:, None] & km[None, :]
    cidx = tl.arange(0, CC)
    pin = tl.load(pin_ptr + rows[:, None] * N + kidx[None, :], mask=m2k, other=0.0).to(tl.float32)
    dpost = tl.zeros([BT, NP], dtype=tl.float32)
    dcomb = tl.zeros([BT, NP, NP], dtype=tl.float32)
    for c0 in range(0, C, CC):
        c = c0 + cidx
        cm = c < C
        m2 = rmask[:, None] & cm[None, :]
        m3 = m2k[:, :, None] & cm[None, None, :]
        g = tl.load(g_ptr + rows[:, None, None] * (N * C) + kidx[None, :, None] * C + c[None, None, :], mask=m3,
                    other=0.0).to(tl.float32)
        fv = tl.load(f_ptr + rows[:, None] * C + c[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(df_ptr + rows[:, None] * C + c[None, :], tl.sum(pin[:, :, None] * g, axis=1).to(
            df_ptr.dtype.element_ty), mask=m2)
        dpost += tl.sum(g * fv[:, None, :], axis=2)
        for j in tl.static_range(N):
            rj = tl.load(res_ptr + rows[:, None] * (N * C) + j * C + c[None, :], mask=m2, other=0.0).to(tl.float32)
            cj = tl.load(cin_ptr + rows[:, None] * (N * N) + j * N + kidx[None, :], mask=m2k,
                         other=0.0).to(tl.float32)
            tl.store(dres_ptr + rows[:, None] * (N * C) + j * C + c[None, :],
                     tl.sum(cj[:, :, None] * g, axis=1).to(dres_ptr.dtype.element_ty), mask=m2)
            dcj = tl.sum(g * rj[:, None, :], axis=2)  # dcomb[t, j, k] = <g_k, res_j>
            dcomb += tl.where((kidx == j)[None, :, None], dcj[:, None, :], 0.0)
    tl.store(dpost_ptr + rows[:, None] * N + kidx[None, :], dpost.to(dpost_ptr.dtype.element_ty), mask=m2k)
    tl.store(dcomb_ptr + rows[:, None, None] * (N * N) + kidx[None, :, None] * N + kidx[None, None, :],
             dcomb.to(dcomb_ptr.dtype.element_ty), mask=m2k[:, :, None] & km[None, None, :])


def _flat(f, residual, post, comb):
    n, C = residual.shape[-2], residual.shape[-1]
    return (f.reshape(-1, C).contiguous(), residual.reshape(-1, n, C).contiguous(),
            post.reshape(-1, n).contiguous(), comb.reshape(-1, n, n).contiguous())


def mhc_post(f, residual, post, comb, cfg=None, out_dtype=None):
    """``[..., n, C]`` in the dtype of ``residual`` (or ``out_dtype``: the fused op's backward recomputes
    the new residual in float32)."""
    n, C = residual.shape[-2], residual.shape[-1]
    fs, res, pin, cin = _flat(f, residual, post, comb)
    T = res.shape[0]
    out = torch.empty(res.shape, dtype=out_dtype or res.dtype, device=res.device)
    if T and C:
        c = config("mhc_post", n, residual.device, cfg)
        grid = (triton.cdiv(T, c["BT"]), triton.cdiv(C, c["CC"]))
        _mhc_post_kernel[grid](fs, res, pin, cin, out, T, C, N=n, NP=next_pow2(n), BT=c["BT"], CC=c["CC"],
                               num_warps=c["num_warps"])
    return out.view(residual.shape)


def mhc_post_backward(grad, f, residual, post, comb, cfg=None):
    """``(df, dresidual, dpost, dcomb)``, each in the dtype of its input."""
    n, C = residual.shape[-2], residual.shape[-1]
    fs, res, pin, cin = _flat(f, residual, post, comb)
    T = res.shape[0]
    g = grad.reshape(res.shape).contiguous()
    df = torch.empty(fs.shape, dtype=f.dtype, device=f.device)
    dres = torch.empty_like(res)
    dpost = torch.empty(pin.shape, dtype=post.dtype, device=post.device)
    dcomb = torch.empty(cin.shape, dtype=comb.dtype, device=comb.device)
    if T:
        c = config("mhc_post_backward", n, residual.device, cfg)
        _mhc_post_bwd_kernel[(triton.cdiv(T, c["BT"]),)](
            g, fs, res, pin, cin, df, dres, dpost, dcomb, T, C, N=n, NP=next_pow2(n), BT=c["BT"], CC=c["CC"],
            num_warps=c["num_warps"])
    return df.view(f.shape), dres.view(residual.shape), dpost.view(post.shape), dcomb.view(comb.shape)
