"""Sinkhorn normalisation of many small ``n x n`` matrices (OPS.md 4.1), forward and backward.

A program holds ``BM`` matrices as one ``[BM, NP, NP]`` register tile (``NP`` = ``n`` rounded up to a
power of two; the padding stays exactly zero). The tile helpers are shared with the mHC kernels,
which run the same iterations on the coefficients of a token block.

The backward recomputes the iterations on chip instead of storing them, in segments (see
``sk_backward``): about 270 normalisations of an ``n x n`` tile for 20 iterations, and no memory
traffic beyond the logits and the gradients.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mhc_configs import config, next_pow2


# ---- tile helpers (also used by mhc_pre / mhc_pre_backward) -----------------------------------------

@triton.jit
def _row_norm(M, valid, eps):
    """``M / (rowsum(M) + eps)``, keeping the padding at zero even for eps == 0. One division per row,
    then products: the iterations are a serial chain, and n divisions per row were most of its latency."""
    return tl.where(valid, M * (1.0 / (tl.sum(M, axis=2) + eps))[:, :, None], 0.0)


@triton.jit
def _col_norm(M, valid, eps):
    return tl.where(valid, M * (1.0 / (tl.sum(M, axis=1) + eps))[:, None, :], 0.0)


@triton.jit
def sk_start(L, valid, row_valid):
    """Row softmax of the logits tile. Padded rows get 0 (not NaN); real rows behave like torch.softmax."""
    L = tl.where(valid, L, -float("inf"))
    mx = tl.max(L, axis=2)
    mx = tl.where(row_valid, mx, 0.0)
    e = tl.exp(L - mx[:, :, None])
    den = tl.sum(e, axis=2)
    den = tl.where(row_valid, den, 1.0)
    return e / den[:, :, None]


@triton.jit
def sk_forward(L, valid, row_valid, iters, eps):
    """The whole forward: ``softmax + eps``, a column step, then ``iters - 1`` (row, column) pairs."""
    M = tl.where(valid, sk_start(L, valid, row_valid) + eps, 0.0)
    M = _col_norm(M, valid, eps)
    for _ in range(iters - 1):
        M = _row_norm(M, valid, eps)
        M = _col_norm(M, valid, eps)
    return M


@triton.jit
def _sk_advance(M, valid, t0, t1, eps):
    """The iterate after step ``t1``, from ``M``, the iterate after step ``t0`` (step 1 is a column step,
    then row and column steps alternate: odd steps are column steps)."""
    for k in range(t0 + 1, t1 + 1):
        if k % 2 == 1:
            M = _col_norm(M, valid, eps)
        else:
            M = _row_norm(M, valid, eps)
    return M


@triton.jit
def sk_backward(L, G, valid, row_valid, iters, eps, SEG: tl.constexpr = 6):
    """dL from dM through the whole forward, recomputing each step's input on chip.

    A normalisation ``y = M / (s + eps)`` with ``s`` summed along an axis reverses as
    ``dM = (g - sum_axis(g * y)) / (s + eps)``; the softmax as ``dL = (g - rowsum(g * P)) * P``.
    The ``2 iters - 1`` steps are reversed in segments of ``SEG``: the segment's first input is
    recomputed from the softmax once, each step's input from there. No iterate is stored; for 20
    iterations that is about 270 normalisations instead of the 780 of recomputing every input
    from the softmax.
    """
    P = sk_start(L, valid, row_valid)
    M0 = tl.where(valid, P + eps, 0.0)
    G = tl.where(valid, G, 0.0)
    nsteps = 2 * iters - 1
    nseg = tl.cdiv(nsteps, SEG)
    for gg in range(nseg):
        lo = (nseg - 1 - gg) * SEG  # this segment reverses steps lo + 1 .. hi
        hi = tl.minimum(lo + SEG, nsteps)
        Ms = _sk_advance(M0, valid, 0, lo, eps)
        for kk in range(hi - lo):
            k = hi - kk
            M = _sk_advance(Ms, valid, lo, k - 1, eps)
            if k % 2 == 1:  # column step
                sc = tl.sum(M, axis=1)[:, None, :] + eps
                G = tl.where(valid, (G - tl.sum(G * (M / sc), axis=1)[:, None, :]) / sc, 0.0)
            else:
                sr = tl.sum(M, axis=2)[:, :, None] + eps
                G = tl.where(valid, (G - tl.sum(G * (M / sr), axis=2)[:, :, None]) / sr, 0.0)
    return tl.where(valid, (G - tl.sum(G * P, axis=2)[:, :, None]) * P, 0.0)


# ---- kernels -------------------------------------------------------------------------------------------

@triton.jit
def _mat_tile(M, N: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr):
    """This program's ``BM`` n x n matrices (padded to NP x NP): element offsets, element mask, row mask."""
    mats = tl.program_id(0) * BM + tl.arange(0, BM)
    i = tl.arange(0, NP)
    valid = (mats < M)[:, None, None] & (i < N)[None, :, None] & (i < N)[None, None, :]
    row_valid = (mats < M)[:, None] & (i < N)[None, :]
    offs = mats.to(tl.int64)[:, None, None] * (N * N) + i[None, :, None] * N + i[None, None, :]
    return offs, valid, row_valid


@triton.jit
def _sinkhorn_fwd_kernel(l_ptr, out_ptr, M, iters, eps, N: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr):
    offs, valid, row_valid = _mat_tile(M, N, NP, BM)
    L = tl.load(l_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    out = sk_forward(L, valid, row_valid, iters, eps)
    tl.store(out_ptr + offs, out, mask=valid)


@triton.jit
def _sinkhorn_bwd_kernel(l_ptr, g_ptr, dl_ptr, M, iters, eps, N: tl.constexpr, NP: tl.constexpr,
                         BM: tl.constexpr):
    offs, valid, row_valid = _mat_tile(M, N, NP, BM)
    L = tl.load(l_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    G = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    dL = sk_backward(L, G, valid, row_valid, iters, eps)
    tl.store(dl_ptr + offs, dL.to(dl_ptr.dtype.element_ty), mask=valid)


# ---- launchers -----------------------------------------------------------------------------------------

def _flat(logits: torch.Tensor) -> tuple[torch.Tensor, int]:
    n = logits.shape[-1]
    return logits.reshape(-1, n, n).contiguous(), n


def _block(cfg: dict, n: int) -> int:
    """Matrices per program: the configured count, fewer for large n (the tile lives in registers)."""
    return max(1, min(cfg["BM"], 4096 // next_pow2(n) ** 2))


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """float32 Sinkhorn of ``[..., n, n]`` logits (any float dtype but float64)."""
    flat, n = _flat(logits)
    out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    if flat.shape[0]:
        cfg = config("mhc_sinkhorn", n, flat.device)
        bm = _block(cfg, n)
        _sinkhorn_fwd_kernel[(triton.cdiv(flat.shape[0], bm),)](
            flat, out, flat.shape[0], iters, eps, N=n, NP=next_pow2(n), BM=bm, num_warps=cfg["num_warps"])
    return out.view(logits.shape)


def sinkhorn_backward(logits: torch.Tensor, grad: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """d logits (dtype of logits) from d out, by on-chip recomputation of the forward."""
    flat, n = _flat(logits)
    g = grad.reshape(flat.shape).contiguous()
    dl = torch.empty(flat.shape, dtype=logits.dtype, device=flat.device)
    if flat.shape[0]:
        cfg = config("mhc_sinkhorn", n, flat.device)
        bm = _block(cfg, n)
        _sinkhorn_bwd_kernel[(triton.cdiv(flat.shape[0], bm),)](
            flat, g, dl, flat.shape[0], iters, eps, N=n, NP=next_pow2(n), BM=bm, num_warps=cfg["num_warps"])
    return dl.view(logits.shape)


def sinkhorn_ref(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """The same math in PyTorch (float64), for kernel tests."""
    M = logits.double().softmax(-1) + eps
    M = M / (M.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        M = M / (M.sum(-1, keepdim=True) + eps)
        M = M / (M.sum(-2, keepdim=True) + eps)
    return M
