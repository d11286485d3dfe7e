"""Triton implementations of the mHC ops (OPS.md section 4), forward and backward.

Kernels live in :mod:`opbridge.kernels.triton` (``sinkhorn``, ``mhc_pre``, ``mhc_post``,
``mhc_pre_backward``); this module says which calls they run and composes the fused op's backward.
Streams may be bfloat16, float16 or float32, with 1 to 8 of them (n = 4 is tuned); the site parameters
are float32; ``post``/``comb`` come back float32 and ``y`` in the dtype of the streams, as in the
reference. Float64 calls are the reference backend's (the oracle), not this one's.

``mhc_post_pre`` runs the ``mhc_post`` kernel, then the ``mhc_pre`` kernels on its output (in the
residual's dtype, as OPS.md 4.5 defines it). The fused launch (``kernels.triton.mhc_pre.mhc_post_pre``,
the post mix made on chip inside the prenorm GEMM, same results bit for bit with strided splits)
measured slower on the H100 (its GEMM launch alone 0.89 ms against 0.40 + 0.19 ms), so it is not
registered; see docs/triton-mhc.md.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...kernels.triton import mhc_post as K_post
from ...kernels.triton import mhc_pre as K_pre
from ...kernels.triton import mhc_pre_backward as K_pre_bwd
from ...kernels.triton import sinkhorn as K_sk
from . import BACKEND, devices

STREAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_STREAMS = 8  # the [BT, NP, NP] coefficient tiles and the n*(n+2) <= 128 GEMM columns live in registers
MAX_SINKHORN_N = 32
_DEVICES = devices()


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _float_reason(**tensors: Optional[torch.Tensor]) -> Optional[str]:
    for name, t in tensors.items():
        if t is not None and t.dtype not in STREAM_DTYPES:
            return f"{name} dtype {_dt(t)} not supported (float16, bfloat16, float32)"
    return None


def _site_reason(n: int, phi, alpha, bias) -> Optional[str]:
    if n > MAX_STREAMS:
        return f"n={n} streams not supported (1 to {MAX_STREAMS})"
    for name, t in (("phi", phi), ("alpha", alpha), ("bias", bias)):
        if t.dtype != torch.float32:
            return f"{name} dtype {_dt(t)} not supported (float32)"
    return None


def _grads_reason(grads) -> Optional[str]:
    for i, g in enumerate(grads):
        if g is not None and g.dtype not in STREAM_DTYPES:
            return f"gradient {i} dtype {_dt(g)} not supported (float16, bfloat16, float32)"
    return None


# ---- sinkhorn ------------------------------------------------------------------------------------------

def _sinkhorn_supports(logits, *, iters, eps) -> Optional[str]:
    if logits.shape[-1] > MAX_SINKHORN_N:
        return f"n={logits.shape[-1]} not supported (at most {MAX_SINKHORN_N})"
    return _float_reason(logits=logits)


@BACKEND.implement("sinkhorn", supports=_sinkhorn_supports, devices=_DEVICES)
def sinkhorn(logits, *, iters, eps):
    return K_sk.sinkhorn(logits, iters, eps)


@BACKEND.implement("sinkhorn_backward", supports=lambda grads, logits, **kw: _grads_reason(grads)
                   or _sinkhorn_supports(logits, **kw), devices=_DEVICES)
def sinkhorn_backward(grads, logits, *, iters, eps):
    (g,) = grads
    if g is None:
        return [None]
    return [K_sk.sinkhorn_backward(logits, g, iters, eps)]


# ---- mhc_pre -------------------------------------------------------------------------------------------

def _pre_supports(x, phi, alpha, bias, **kw) -> Optional[str]:
    return _float_reason(x=x) or _site_reason(x.shape[-2], phi, alpha, bias)


@BACKEND.implement("mhc_pre", supports=_pre_supports, devices=_DEVICES)
def mhc_pre(x, phi, alpha, bias, *, sinkhorn_iters, eps, norm_eps, post_scale):
    return K_pre.mhc_pre(x, phi, alpha, bias, sinkhorn_iters, eps, norm_eps, post_scale)


@BACKEND.implement("mhc_pre_backward", supports=lambda grads, *a, **kw: _grads_reason(grads)
                   or _pre_supports(*a, **kw), devices=_DEVICES)
def mhc_pre_backward(grads, x, phi, alpha, bias, *, sinkhorn_iters, eps, norm_eps, post_scale):
    return K_pre_bwd.mhc_pre_backward(list(grads), x, phi, alpha, bias, sinkhorn_iters, eps, norm_eps, post_scale)


# ---- mhc_post ------------------------------------------------------------------------------------------

def _post_supports(f, residual, post, comb) -> Optional[str]:
    if residual.shape[-2] > MAX_STREAMS:
        return f"n={residual.shape[-2]} streams not supported (1 to {MAX_STREAMS})"
    return _float_reason(f=f, residual=residual, post=post, comb=comb)


@BACKEND.implement("mhc_post", supports=_post_supports, devices=_DEVICES)
def mhc_post(f, residual, post, comb):
    return K_post.mhc_post(f, residual, post, comb)


@BACKEND.implement("mhc_post_backward", supports=lambda grads, *a: _grads_reason(grads) or _post_supports(*a),
                   devices=_DEVICES)
def mhc_post_backward(grads, f, residual, post, comb):
    (g,) = grads
    if g is None:
        return [None] * 4
    return list(K_post.mhc_post_backward(g, f, residual, post, comb))


# ---- mhc_post_pre --------------------------------------------------------------------------------------

def _post_pre_supports(f, residual, post, comb, phi, alpha, bias, **kw) -> Optional[str]:
    return _post_supports(f, residual, post, comb) or _site_reason(residual.shape[-2], phi, alpha, bias)


@BACKEND.implement("mhc_post_pre", supports=_post_pre_supports, devices=_DEVICES)
def mhc_post_pre(f, residual, post, comb, phi, alpha, bias, *, sinkhorn_iters, eps, norm_eps, post_scale):
    new = K_post.mhc_post(f, residual, post, comb)
    return (new,) + tuple(K_pre.mhc_pre(new, phi, alpha, bias, sinkhorn_iters, eps, norm_eps, post_scale))


@BACKEND.implement("mhc_post_pre_backward", supports=lambda grads, *a, **kw: _grads_reason(grads)
                   or _post_pre_supports(*a, **kw), devices=_DEVICES)
def mhc_post_pre_backward(grads, f, residual, post, comb, phi, alpha, bias, *, sinkhorn_iters, eps, norm_eps,
                          post_scale):
    """Composed from the kernels: recompute the new residual (in the residual's dtype, as the forward
    used it), run the pre backward on it, adding the new residual's own gradient inside the dx kernel
    and keeping that sum in fp32, then the post backward."""
    d_new, dy, dpost_next, dcomb_next = grads
    dphi = dalpha = dbias = None
    if dy is not None or dpost_next is not None or dcomb_next is not None:
        new = K_post.mhc_post(f, residual, post, comb)
        d_new, dphi, dalpha, dbias = K_pre_bwd.mhc_pre_backward(
            [dy, dpost_next, dcomb_next], new, phi, alpha, bias, sinkhorn_iters, eps, norm_eps, post_scale,
            dx_add=d_new, dx_dtype=torch.float32)
    if d_new is None:
        return [None, None, None, None, dphi, dalpha, dbias]
    df, dres, dpost, dcomb = K_post.mhc_post_backward(d_new, f, residual, post, comb)
    return [df, dres, dpost, dcomb, dphi, dalpha, dbias]
