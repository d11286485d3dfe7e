"""DeepSeek-V4 KV compression: gated softmax pooling of ``rate`` tokens per entry, per channel, fp32 softmax.

One program = ``BLOCK_W`` consecutive compressed entries x ``BLOCK_D`` channels; it walks the
window's ``rate`` slots in chunks of ``RC`` with an online softmax, so any rate (CSA's 4, HCA's
128) runs with the same small register tile. With overlap it also pools the first channel half of
the previous window (``prev_kv``/``prev_gate`` for entry 0, nothing when those are absent), so
every input element is read exactly once. Slot choice is by masked loads, no branches.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .sparse_attention_common import config, pow2

CONFIG_FILE = "attn_kv_compress.json"


@triton.jit
def _pool(mx, num, den, x, g):
    """Online-softmax update of ``[BW, BD]`` running max / numerator / denominator with a ``[BW, RC, BD]`` chunk."""
    m_new = tl.maximum(mx, tl.max(g, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-empty so far: keep exp() NaN-free
    a = tl.exp(mx - m_safe)
    e = tl.exp(g - m_safe[:, None, :])
    return m_new, num * a + tl.sum(e * x, 1), den * a + tl.sum(e, 1)


@triton.jit
def kv_compress_kernel(kv_ptr, gate_ptr, bias_ptr, pkv_ptr, pgate_ptr, out_ptr,
                       stride_kv, stride_g, stride_b, stride_pkv, stride_pg, stride_o, W, rate, D,
                       BLOCK_W: tl.constexpr, RC: tl.constexpr, BLOCK_D: tl.constexpr, OVERLAP: tl.constexpr,
                       HAS_PREV: tl.constexpr):
    w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    wm = w < W
    cm = cols < D
    c3 = cols[None, None, :]
    off = D if OVERLAP else 0  # own window: second channel half with overlap
    mx = tl.full([BLOCK_W, BLOCK_D], float("-inf"), tl.float32)
    num = tl.zeros([BLOCK_W, BLOCK_D], tl.float32)
    den = tl.zeros([BLOCK_W, BLOCK_D], tl.float32)
    for j0 in range(0, rate, RC):
        j = j0 + tl.arange(0, RC)
        jm = j < rate
        row = (w.to(tl.int64)[:, None] * rate + j[None, :])[:, :, None]  # [BW, RC, 1]
        m3 = (wm[:, None] & jm[None, :])[:, :, None] & cm[None, None, :]
        bmask = jm[:, None] & cm[None, :]
        x = tl.load(kv_ptr + row * stride_kv + off + c3, mask=m3, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + row * stride_g + off + c3, mask=m3, other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + j[:, None] * stride_b + off + cols[None, :], mask=bmask, other=0.0).to(tl.float32)
        g = tl.where(m3, g + b[None, :, :], float("-inf"))
        mx, num, den = _pool(mx, num, den, x, g)
        if OVERLAP:
            prow = row - rate  # the previous window; negative exactly for entry 0
            mp = m3 & (prow >= 0)
            xp = tl.load(kv_ptr + prow * stride_kv + c3, mask=mp, other=0.0).to(tl.float32)
            gp = tl.load(gate_ptr + prow * stride_g + c3, mask=mp, other=0.0).to(tl.float32)
            bp = tl.load(bias_ptr + j[:, None] * stride_b + cols[None, :], mask=bmask, other=0.0).to(tl.float32)
            gp = gp + bp[None, :, :]
            if HAS_PREV:
                # Entry 0 pools the previous call's last window (bias already added there).
                mf = m3 & (prow < 0)
                jj = j[None, :, None]
                xp += tl.load(pkv_ptr + jj * stride_pkv + c3, mask=mf, other=0.0).to(tl.float32)
                gp = tl.where(mf, tl.load(pgate_ptr + jj * stride_pg + c3, mask=mf, other=0.0).to(tl.float32), gp)
                mp = mp | mf
            gp = tl.where(mp, gp, float("-inf"))
            mx, num, den = _pool(mx, num, den, xp, gp)
    om = wm[:, None] & cm[None, :]
    den = tl.where(om, den, 1.0)
    tl.store(out_ptr + w.to(tl.int64)[:, None] * stride_o + cols[None, :], (num / den).to(out_ptr.dtype.element_ty),
             mask=om)


def kv_compress(kv: torch.Tensor, gate: torch.Tensor, position_bias: torch.Tensor, rate: int, *, overlap: bool,
                prev_kv: Optional[torch.Tensor], prev_gate: Optional[torch.Tensor], interpret: bool = False,
                **override) -> torch.Tensor:
    T, Dc = kv.shape
    W = T // rate
    D = Dc // 2 if overlap else Dc
    out = torch.empty((W, D), dtype=kv.dtype, device=kv.device)
    if W == 0 or D == 0:
        return out
    kv, gate, position_bias = (t if t.stride(-1) == 1 else t.contiguous() for t in (kv, gate, position_bias))
    has_prev = prev_kv is not None
    if has_prev:
        prev_kv, prev_gate = prev_kv.contiguous(), prev_gate.contiguous()
    cfg = config(CONFIG_FILE, "small_rate" if rate <= 16 else "large_rate", kv.device, interpret, **override)
    bd = min(cfg["BLOCK_D"], pow2(D, 1))
    rc = min(cfg["RC"], pow2(rate, 1))
    bw = min(cfg["BLOCK_W"], pow2(W, 1))
    grid = (triton.cdiv(W, bw), triton.cdiv(D, bd))
    kv_compress_kernel[grid](
        kv, gate, position_bias, prev_kv if has_prev else kv, prev_gate if has_prev else gate, out,
        kv.stride(0), gate.stride(0), position_bias.stride(0), prev_kv.stride(0) if has_prev else 0,
        prev_gate.stride(0) if has_prev else 0, out.stride(0), W, rate, D,
        BLOCK_W=bw, RC=rc, BLOCK_D=bd, OVERLAP=overlap, HAS_PREV=has_prev, num_warps=cfg["num_warps"])
    return out
