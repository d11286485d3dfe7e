"""Reference manifold-constrained hyper-connections (OPS.md section 4)."""
from __future__ import annotations

import torch

from ...core.checks import wide_dtype
from . import BACKEND


@BACKEND.implement("sinkhorn")
def sinkhorn(logits, *, iters, eps):
    M = logits.to(wide_dtype(logits)).softmax(-1) + eps
    M = M / (M.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        M = M / (M.sum(-1, keepdim=True) + eps)
        M = M / (M.sum(-2, keepdim=True) + eps)
    return M


@BACKEND.implement("mhc_pre")
def mhc_pre(x, phi, alpha, bias, *, sinkhorn_iters, eps, norm_eps, post_scale):
    dt = wide_dtype(x)
    n = x.shape[-2]
    xs = x.to(dt)
    xf = xs.flatten(-2)
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    m = (xf @ phi.to(dt).T) * r
    a, b = alpha.to(dt), bias.to(dt)
    pre = torch.sigmoid(a[0] * m[..., :n] + b[:n]) + eps
    post = post_scale * torch.sigmoid(a[1] * m[..., n:2 * n] + b[n:2 * n])
    comb = sinkhorn((a[2] * m[..., 2 * n:] + b[2 * n:]).unflatten(-1, (n, n)), iters=sinkhorn_iters, eps=eps)
    y = (pre.unsqueeze(-1) * xs).sum(-2)
    return y.to(x.dtype), post, comb


@BACKEND.implement("mhc_post")
def mhc_post(f, residual, post, comb):
    dt = wide_dtype(f, residual, post, comb)
    mixed = torch.einsum("...jk,...jc->...kc", comb.to(dt), residual.to(dt))  # column k of comb feeds stream k
    return (post.to(dt).unsqueeze(-1) * f.to(dt).unsqueeze(-2) + mixed).to(residual.dtype)


@BACKEND.implement("mhc_post_pre")
def mhc_post_pre(f, residual, post, comb, phi, alpha, bias, **kw):
    new_residual = mhc_post(f, residual, post, comb)
    return (new_residual,) + mhc_pre(new_residual, phi, alpha, bias, **kw)
