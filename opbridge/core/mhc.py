"""Manifold-constrained hyper-connections (OPS.md section 4): Sinkhorn, mhc_pre, mhc_post, mhc_post_pre.

One mHC site has ``phi`` float32 ``[n*(n+2), n*C]`` (rows: n pre, n post, n*n res, row-major),
``alpha`` float32 ``[3]`` and ``bias`` float32 ``[n*(n+2)]``.
"""
from __future__ import annotations

import torch

from . import checks as C
from .errors import OpError
from .opdef import OpDef

PARAM_DTYPES = (torch.float32, torch.float64)


def _sinkhorn_fake(logits, *, iters, eps):
    return torch.empty_like(logits, dtype=C.wide_dtype(logits))


_SINKHORN = OpDef("sinkhorn", "Tensor logits, *, int iters, float eps", "Tensor", _sinkhorn_fake,
                  differentiable=("logits",))


def sinkhorn(logits: torch.Tensor, *, iters: int = 20, eps: float = 1e-6) -> torch.Tensor:
    """Sinkhorn normalisation of ``[..., n, n]`` logits (OPS.md 4.1).

    ``M = softmax_rows(logits) + eps``; ``M = M / (colsum(M) + eps)``; then ``iters - 1`` times
    ``M = M / (rowsum(M) + eps)``; ``M = M / (colsum(M) + eps)``. Returns float32 (float64 for float64 logits).
    """
    op = "sinkhorn"
    C.tensor(op, "logits", logits, C.FLOAT_DTYPES)
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise OpError(op, "logits", "shape [..., n, n]", f"shape {tuple(logits.shape)}")
    C.positive_int(op, "iters", iters)
    return _SINKHORN.call(logits, iters=iters, eps=float(eps))


def _check_site(op: str, S: C.Shapes, n: int, C_: int, phi, alpha, bias, prefix: str = "") -> None:
    C.tensor(op, f"{prefix}phi", phi, PARAM_DTYPES)
    C.tensor(op, f"{prefix}alpha", alpha, PARAM_DTYPES)
    C.tensor(op, f"{prefix}bias", bias, PARAM_DTYPES)
    S.check(f"{prefix}phi", phi.shape, (n * (n + 2), n * C_))
    S.check(f"{prefix}alpha", alpha.shape, (3,))
    S.check(f"{prefix}bias", bias.shape, (n * (n + 2),))


def _streams(op: str, arg: str, x) -> tuple[int, int]:
    C.tensor(op, arg, x, C.FLOAT_DTYPES)
    if x.dim() < 2:
        raise OpError(op, arg, "shape [..., n, C]", f"shape {tuple(x.shape)}")
    n, C_ = x.shape[-2], x.shape[-1]
    if n < 1:
        raise OpError(op, arg, "at least one stream (n >= 1)", f"shape {tuple(x.shape)}")
    return n, C_


def _pre_fake(x, phi, alpha, bias, *, sinkhorn_iters, eps, norm_eps, post_scale):
    lead, n, dt = x.shape[:-2], x.shape[-2], C.wide_dtype(x)
    return (x.new_empty((*lead, x.shape[-1])), x.new_empty((*lead, n), dtype=dt), x.new_empty((*lead, n, n), dtype=dt))


_PRE_KW = "*, int sinkhorn_iters, float eps, float norm_eps, float post_scale"
_PRE = OpDef("mhc_pre", f"Tensor x, Tensor phi, Tensor alpha, Tensor bias, {_PRE_KW}", "(Tensor, Tensor, Tensor)",
             _pre_fake, differentiable=("x", "phi", "alpha", "bias"))


def mhc_pre(x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, *,
            sinkhorn_iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6,
            post_scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC before a sub-layer (OPS.md 4.2): mixing coefficients and the collapsed input.

    With ``xf = x.flatten(-2)`` in fp32: ``r = rsqrt(mean(xf^2) + norm_eps)``; ``m = (xf @ phi.T) * r``;
    ``pre = sigmoid(alpha[0]*m[:n] + bias[:n]) + eps``; ``post = post_scale * sigmoid(alpha[1]*m[n:2n] + bias[n:2n])``;
    ``comb = sinkhorn((alpha[2]*m[2n:] + bias[2n:]).view(n, n))``; ``y = sum_j pre_j * x[j]``.

    Args: x ``[..., n, C]`` streams; phi float32 ``[n*(n+2), n*C]``; alpha float32 ``[3]``;
    bias float32 ``[n*(n+2)]``. Returns y ``[..., C]`` (dtype of x), post float32 ``[..., n]``,
    comb float32 ``[..., n, n]`` (float64 for float64 streams).
    """
    op = "mhc_pre"
    n, C_ = _streams(op, "x", x)
    S = C.Shapes(op)
    _check_site(op, S, n, C_, phi, alpha, bias)
    C.positive_int(op, "sinkhorn_iters", sinkhorn_iters)
    C.same_device(op, x=x, phi=phi, alpha=alpha, bias=bias)
    return _PRE.call(x, phi, alpha, bias, sinkhorn_iters=sinkhorn_iters, eps=float(eps), norm_eps=float(norm_eps),
                     post_scale=float(post_scale))


def _post_fake(f, residual, post, comb):
    return torch.empty_like(residual)


_POST = OpDef("mhc_post", "Tensor f, Tensor residual, Tensor post, Tensor comb", "Tensor", _post_fake,
              differentiable=("f", "residual", "post", "comb"))


def _check_post(op: str, f, residual, post, comb) -> tuple[int, int]:
    n, C_ = _streams(op, "residual", residual)
    lead = tuple(residual.shape[:-2])
    S = C.Shapes(op)
    C.tensor(op, "f", f, C.FLOAT_DTYPES)
    S.check("f", f.shape, lead + (C_,))
    C.tensor(op, "post", post, C.FLOAT_DTYPES)
    S.check("post", post.shape, lead + (n,))
    C.tensor(op, "comb", comb, C.FLOAT_DTYPES)
    S.check("comb", comb.shape, lead + (n, n))
    return n, C_


def mhc_post(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """mHC after a sub-layer (OPS.md 4.3): ``out[k] = post[k] * f + sum_j comb[j, k] * residual[j]``.

    Note the transpose: column ``k`` of ``comb`` feeds stream ``k``. f ``[..., C]``; residual
    ``[..., n, C]``; post ``[..., n]``; comb ``[..., n, n]``. fp32 accumulate; dtype of residual.
    """
    op = "mhc_post"
    _check_post(op, f, residual, post, comb)
    C.same_device(op, f=f, residual=residual, post=post, comb=comb)
    return _POST.call(f, residual, post, comb)


def _post_pre_fake(f, residual, post, comb, phi, alpha, bias, **kw):
    return (torch.empty_like(residual),) + _pre_fake(residual, phi, alpha, bias, **kw)


_POST_PRE = OpDef("mhc_post_pre", f"Tensor f, Tensor residual, Tensor post, Tensor comb, Tensor phi, Tensor alpha, "
                  f"Tensor bias, {_PRE_KW}", "(Tensor, Tensor, Tensor, Tensor)", _post_pre_fake,
                  differentiable=("f", "residual", "post", "comb", "phi", "alpha", "bias"))


def mhc_post_pre(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, phi: torch.Tensor,
                 alpha: torch.Tensor, bias: torch.Tensor, *, sinkhorn_iters: int = 20, eps: float = 1e-6,
                 norm_eps: float = 1e-6, post_scale: float = 2.0):
    """``mhc_post`` of one site fused with ``mhc_pre`` of the next ("Mega mHC", OPS.md 4.5).

    Returns ``(new_residual, y, post_next, comb_next)`` where ``new_residual = mhc_post(f, residual,
    post, comb)`` and ``(y, post_next, comb_next) = mhc_pre(new_residual, phi, alpha, bias, ...)``.
    """
    op = "mhc_post_pre"
    n, C_ = _check_post(op, f, residual, post, comb)
    S = C.Shapes(op)
    _check_site(op, S, n, C_, phi, alpha, bias)
    C.positive_int(op, "sinkhorn_iters", sinkhorn_iters)
    C.same_device(op, f=f, residual=residual, post=post, comb=comb, phi=phi, alpha=alpha, bias=bias)
    return _POST_PRE.call(f, residual, post, comb, phi, alpha, bias, sinkhorn_iters=sinkhorn_iters, eps=float(eps),
                          norm_eps=float(norm_eps), post_scale=float(post_scale))
