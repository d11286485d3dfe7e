"""Emulated mHC operators: npu_mhc_pre, npu_mhc_sinkhorn, npu_mhc_post.

Written from the torch-npu 2.13.0 docstrings (shapes, dtypes, the npu_mhc_post formula
x_{l+1} = H_res^T x_l + h_out (x) h_post) and the op-plugin goldens summarised in
shared/research/ascend-ops.md 5.1 (h_post = 2 * sigmoid(...), h_res returned as raw logits).
Plain torch on CPU; nothing here knows opbridge.
"""
from __future__ import annotations

import torch

from .contract import HALF, need, need_kernel, undefined

STREAMS = (4, 6, 8)


def _streams(op: str, x: torch.Tensor) -> tuple[int, int]:
    need(x.dim() in (3, 4), op, f"x must be [T, n, D] or [B, S, n, D], got {x.dim()}-D")
    need(x.dtype in HALF, op, "x must be bfloat16/float16")
    return x.shape[-2], x.shape[-1]


def npu_mhc_pre(x, phi, alpha, bias, *, gamma=None, norm_eps=1e-6, hc_eps=1e-6, out_flag=0, inner_precise=0):
    op = "npu_mhc_pre"
    need_kernel(op)
    n, D = _streams(op, x)
    need(n in STREAMS, op, f"n must be 4, 6 or 8, got {n}")
    need(1 <= D <= 16384 and D % 16 == 0, op, f"D must be a multiple of 16 in [16, 16384], got {D}")
    need(alpha.dtype == torch.float32 and alpha.shape == (3,), op, "alpha must be float32 [3] (pre, post, res)")
    rows = n * n + 2 * n
    need(phi.dtype == torch.float32 and phi.shape == (rows, n * D), op,
         f"phi must be float32 [n^2 + 2n, nD] = [{rows}, {n * D}]")
    need(bias.dtype == torch.float32 and bias.shape == (rows,), op, f"bias must be float32 [n^2 + 2n] = [{rows}]")
    if gamma is not None:
        need(gamma.dtype == torch.float32 and gamma.shape == (n, D), op, "gamma must be float32 [n, D]")
    need(out_flag in (0, 1) and inner_precise in (0, 1), op, "out_flag and inner_precise are 0 or 1")
    lead = x.shape[:-2]
    xf = x.float().reshape(-1, n * D)
    inv_rms = torch.rsqrt(xf.pow(2).mean(-1) + norm_eps)
    h_mix = (xf if gamma is None else xf * gamma.reshape(-1)) @ phi.T
    w = h_mix * inv_rms.unsqueeze(-1)
    h_pre = torch.sigmoid(w[:, :n] * alpha[0] + bias[:n]) + hc_eps
    h_post = 2.0 * torch.sigmoid(w[:, n:2 * n] * alpha[1] + bias[n:2 * n])
    h_res = (w[:, 2 * n:] * alpha[2] + bias[2 * n:]).view(-1, n, n)  # raw logits: Sinkhorn is a separate op
    h_in = (h_pre.unsqueeze(-1) * x.float().reshape(-1, n, D)).sum(1)
    extra = (inv_rms, h_mix, h_pre) if out_flag else (undefined(inv_rms.shape, torch.float32),
                                                      undefined(h_mix.shape, torch.float32),
                                                      undefined(h_pre.shape, torch.float32))
    return (h_in.to(x.dtype).view(*lead, D), h_post.view(*lead, n), h_res.view(*lead, n, n),
            extra[0].view(lead), extra[1].view(*lead, rows), extra[2].view(*lead, n))


def npu_mhc_sinkhorn(x, *, eps=1e-6, num_iters=20, out_flag=0):
    op = "npu_mhc_sinkhorn"
    need_kernel(op)
    need(x.dtype == torch.float32, op, "x must be float32")
    need(x.dim() in (3, 4) and x.shape[-1] == x.shape[-2] and x.shape[-1] in STREAMS, op,
         f"x must be [T, n, n] or [B, S, n, n] with n in 4/6/8, got {tuple(x.shape)}")
    need(1 <= num_iters <= 100, op, f"num_iters must be in [1, 100], got {num_iters}")
    need(out_flag == 0, op, "emulator: only out_flag=0 is emulated")
    y = torch.softmax(x, -1) + eps
    y = y / (y.sum(-2, keepdim=True) + eps)
    for _ in range(num_iters - 1):
        y = y / (y.sum(-1, keepdim=True) + eps)
        y = y / (y.sum(-2, keepdim=True) + eps)
    return y, torch.empty(0), torch.empty(0)


def npu_mhc_post(x, h_res, h_out, h_post):
    op = "npu_mhc_post"
    need_kernel(op)
    n, D = _streams(op, x)
    lead = x.shape[:-2]
    need(h_out.dtype == x.dtype and h_out.shape == (*lead, D), op, "h_out must be [..., D] in x's dtype")
    need(h_post.dtype == torch.float32 and h_post.shape == (*lead, n), op, "h_post must be float32 [..., n]")
    xf = x.float()
    if h_res is None:
        y = xf + h_post.unsqueeze(-1) * h_out.float().unsqueeze(-2)
    else:
        need(h_res.dtype == torch.float32 and h_res.shape == (*lead, n, n), op, "h_res must be float32 [..., n, n]")
        # y[i] = sum_j H_res[j, i] x[j] + h_post[i] h_out: the transpose of H_res mixes the streams
        y = h_res.transpose(-1, -2) @ xf + h_post.unsqueeze(-1) * h_out.float().unsqueeze(-2)
    return y.to(x.dtype)
