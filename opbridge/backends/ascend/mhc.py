"""mHC on CANN: npu_mhc_pre + npu_mhc_sinkhorn (mhc_pre), npu_mhc_post (mhc_post), npu_mhc_sinkhorn (sinkhorn).

OPS.md takes streams as [..., n, C]; the vendor ops take [T, n, D] (or [B, S, n, D]), so leading
dimensions are flattened to T and restored. Two conventions are stated once, below.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import BACKEND
from . import capabilities as caps
from .capabilities import Platform
from .runtime import call, supports

PRE, SINKHORN, POST = "npu_mhc_pre", "npu_mhc_sinkhorn", "npu_mhc_post"
HALF = (torch.float16, torch.bfloat16)
VENDOR_POST_SCALE = 2.0  # npu_mhc_pre returns h_post = 2 * sigmoid(...): the factor is fixed, not an argument


# ---- conventions -------------------------------------------------------------------------------

def post_from_vendor(h_post: torch.Tensor, post_scale: float) -> torch.Tensor:
    """OPS post = post_scale * sigmoid(...); the vendor's h_post carries a fixed factor 2."""
    return h_post if post_scale == VENDOR_POST_SCALE else h_post * (post_scale / VENDOR_POST_SCALE)


def h_res_from_comb(comb: torch.Tensor) -> torch.Tensor:
    """OPS mhc_post: out[k] = post[k] f + sum_j comb[j, k] residual[j] (column k of comb feeds stream k).
    npu_mhc_post: y = H_res^T x + h_out (x) h_post, i.e. y[i] = sum_j H_res[j, i] x[j]. Same
    convention: comb is passed as H_res as it is. (DeepSeek's code also stores comb this way.)"""
    return comb.float().contiguous()


def _rows(t: torch.Tensor, trailing: int) -> torch.Tensor:
    """Flatten the leading dimensions to one token axis T (the vendor's 3-D form)."""
    return t.reshape(-1, *t.shape[t.dim() - trailing:])


# ---- checks ------------------------------------------------------------------------------------

def _streams_reason(op: str, n: int, C: Optional[int] = None) -> Optional[str]:
    lim = caps.LIMITS[PRE]
    if n not in lim["streams"]:
        return f"{op} supports n in {lim['streams']} streams; got n={n}"
    if C is not None and (C % lim["dim_multiple"] or C > lim["max_dim"]):
        return (f"{op} needs a stream width D that is a multiple of {lim['dim_multiple']} and <= {lim['max_dim']}; "
                f"got C={C}")
    return None


def _iters_reason(iters: int) -> Optional[str]:
    most = caps.limit(SINKHORN, "max_iters")
    return None if iters <= most else f"{SINKHORN} supports num_iters in [1, {most}]; got {iters}"


def _half_reason(op: str, **tensors) -> Optional[str]:
    for name, t in tensors.items():
        if t.dtype not in HALF:
            return f"{op} takes bfloat16/float16 streams; '{name}' is {t.dtype}"
    return None


def _params_reason(phi, alpha, bias) -> Optional[str]:
    for name, t in (("phi", phi), ("alpha", alpha), ("bias", bias)):
        if t.dtype != torch.float32:
            return f"{PRE} takes float32 {name}; got {t.dtype}"
    return None


def _sinkhorn_check(p: Platform, logits, *, iters, eps):
    if logits.dtype == torch.float64:
        return f"{SINKHORN} computes in float32; float64 logits would lose the precision OPS promises them"
    return _streams_reason(SINKHORN, logits.shape[-1]) or _iters_reason(iters)


@BACKEND.implement("sinkhorn", supports=supports(SINKHORN, check=_sinkhorn_check))
def sinkhorn(logits, *, iters, eps):
    if logits.numel() == 0:
        return logits.float()
    m = call("sinkhorn", SINKHORN, _rows(logits.float(), 2).contiguous(), eps=eps, num_iters=iters)[0]
    return m.view(logits.shape)


def _pre_reason(p: Platform, x, phi, alpha, bias, sinkhorn_iters) -> Optional[str]:
    return (_half_reason(PRE, x=x) or _streams_reason(PRE, x.shape[-2], x.shape[-1])
            or _params_reason(phi, alpha, bias) or _iters_reason(sinkhorn_iters))


def _pre_check(p, x, phi, alpha, bias, *, sinkhorn_iters, eps, norm_eps, post_scale):
    return _pre_reason(p, x, phi, alpha, bias, sinkhorn_iters)


def _pre(op: str, x, phi, alpha, bias, sinkhorn_iters, eps, norm_eps, post_scale):
    lead, (n, C) = x.shape[:-2], x.shape[-2:]
    if x.numel() == 0:
        return x.new_zeros((*lead, C)), x.new_zeros((*lead, n), dtype=torch.float32), \
            x.new_zeros((*lead, n, n), dtype=torch.float32)
    # hc_eps is OPS's eps on pre (sigmoid + eps); h_res comes back as raw logits (no Sinkhorn).
    y, h_post, h_res = call(op, PRE, _rows(x, 2).contiguous(), phi.contiguous(), alpha.contiguous(),
                            bias.contiguous(), norm_eps=norm_eps, hc_eps=eps, out_flag=0)[:3]
    comb = call(op, SINKHORN, h_res.contiguous(), eps=eps, num_iters=sinkhorn_iters)[0]
    return (y.view(*lead, C), post_from_vendor(h_post, post_scale).view(*lead, n), comb.view(*lead, n, n))


@BACKEND.implement("mhc_pre", supports=supports(PRE, SINKHORN, check=_pre_check))
def mhc_pre(x, phi, alpha, bias, *, sinkhorn_iters, eps, norm_eps, post_scale):
    return _pre("mhc_pre", x, phi, alpha, bias, sinkhorn_iters, eps, norm_eps, post_scale)


def _post_reason(p: Platform, f, residual) -> Optional[str]:
    reason = _half_reason(POST, residual=residual) or _streams_reason(POST, residual.shape[-2])
    if reason is None and f.dtype != residual.dtype:
        reason = f"{POST} takes h_out (f) in the dtype of x (residual); got {f.dtype} and {residual.dtype}"
    return reason


def _post_check(p, f, residual, post, comb):
    return _post_reason(p, f, residual)


def _post(op: str, f, residual, post, comb):
    if residual.numel() == 0:
        return torch.zeros_like(residual)
    n, C = residual.shape[-2:]
    out = call(op, POST, _rows(residual, 2).contiguous(), _rows(h_res_from_comb(comb), 2),
               _rows(f, 1).contiguous(), _rows(post.float(), 1).contiguous())
    return out.view(residual.shape)


@BACKEND.implement("mhc_post", supports=supports(POST, check=_post_check))
def mhc_post(f, residual, post, comb):
    return _post("mhc_post", f, residual, post, comb)


def _post_pre_check(p, f, residual, post, comb, phi, alpha, bias, *, sinkhorn_iters, eps, norm_eps, post_scale):
    return _post_reason(p, f, residual) or _pre_reason(p, residual, phi, alpha, bias, sinkhorn_iters)


@BACKEND.implement("mhc_post_pre", supports=supports(POST, PRE, SINKHORN, check=_post_pre_check))
def mhc_post_pre(f, residual, post, comb, phi, alpha, bias, *, sinkhorn_iters, eps, norm_eps, post_scale):
    # Two passes (CANN has no fused post + pre operator in torch_npu 2.13.0).
    new_residual = _post("mhc_post_pre", f, residual, post, comb)
    return (new_residual,) + _pre("mhc_post_pre", new_residual, phi, alpha, bias, sinkhorn_iters, eps, norm_eps,
                                  post_scale)
