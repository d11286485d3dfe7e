"""Device helpers shared by the mHC kernels: the accurate bf16 tensor-core product, the post mix of one
tile, and the coefficient math of one token block (partials -> RMS scale -> gates -> Sinkhorn logits).

Layout conventions (OPS.md 4): streams ``[T, n, C]`` row-major; ``phi`` ``[n*(n+2), n*C]`` with rows
``[pre (n) | post (n) | res (n*n, row-major)]``; ``comb[j, k]`` at ``2n + j*n + k``. ``NP`` is ``n``
rounded up to a power of two, ``NPHI`` is ``n*(n+2)`` rounded up (at least 16, the smallest dot).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def split_dot(a, b, acc, A_BF16: tl.constexpr, B_BF16: tl.constexpr, FP32_DOT: tl.constexpr):
    """``acc + a @ b`` to about fp32 accuracy on bf16 tensor cores.

    Each fp32 operand is split into ``hi = bf16(v)`` and ``lo = bf16(v - hi)`` (16 significant bits
    together) and the product is ``hi*hi + hi*lo + lo*hi``; an operand that is already bf16 has no
    ``lo`` part, so bf16 streams times fp32 ``phi`` costs two bf16 products, the price of one TF32
    product, with a relative error near 1e-5 instead of TF32's 1e-3. ``FP32_DOT`` (the interpreter,
    whose bf16 dots are wrong) takes one fp32 product instead.
    """
    if FP32_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        if A_BF16:
            ah = a.to(tl.bfloat16)
        else:
            af = a.to(tl.float32)
            ah = af.to(tl.bfloat16)
        if B_BF16:
            bh = b.to(tl.bfloat16)
        else:
            bf = b.to(tl.float32)
            bh = bf.to(tl.bfloat16)
        acc = tl.dot(ah, bh, acc)
        if not B_BF16:
            acc = tl.dot(ah, (bf - bh.to(tl.float32)).to(tl.bfloat16), acc)
        if not A_BF16:
            acc = tl.dot((af - ah.to(tl.float32)).to(tl.bfloat16), bh, acc)
    return acc


@triton.jit
def split_dot_pre(a, bh, bl, acc, A_BF16: tl.constexpr, FP32_DOT: tl.constexpr):
    """``split_dot`` with ``b`` already split on the host side into bf16 ``hi``/``lo`` tiles (see
    ``phi_split``): both go from global memory straight to shared memory, no per-tile conversion."""
    if FP32_DOT:
        acc = tl.dot(a.to(tl.float32), bh.to(tl.float32) + bl.to(tl.float32), acc, input_precision="ieee")
    else:
        if A_BF16:
            ah = a.to(tl.bfloat16)
        else:
            af = a.to(tl.float32)
            ah = af.to(tl.bfloat16)
        acc = tl.dot(ah, bh, acc)
        acc = tl.dot(ah, bl, acc)
        if not A_BF16:
            acc = tl.dot((af - ah.to(tl.float32)).to(tl.bfloat16), bh, acc)
    return acc


@triton.jit
def phi_split_kernel(phi_ptr, out_ptr, K, NR: tl.constexpr, NPHI: tl.constexpr, BK: tl.constexpr):
    """``out[0] = bf16(phi)``, ``out[1] = bf16(phi - out[0])``, rows padded to NPHI with zeros: the
    ``[2, NPHI, K]`` bf16 form of ``phi`` that ``split_dot_pre`` consumes (same bytes as fp32 ``phi``)."""
    k = tl.program_id(0) * BK + tl.arange(0, BK)
    i = tl.arange(0, NPHI)
    offs = i[:, None] * K + k[None, :]
    km = (k < K)[None, :]
    v = tl.load(phi_ptr + offs, mask=km & (i < NR)[:, None], other=0.0)
    hi = v.to(tl.bfloat16)
    tl.store(out_ptr + offs, hi, mask=km)
    tl.store(out_ptr + NPHI * K + offs, (v - hi.to(tl.float32)).to(tl.bfloat16), mask=km)


@triton.jit
def post_tile(f_ptr, res_ptr, cin_ptr, pin, rows, rmask, kidx, c, cmask, C, N: tl.constexpr):
    """``out[t, k, c] = post[t, k] * f[t, c] + sum_j comb[t, j, k] * res[t, j, c]`` for one tile, fp32.

    ``pin`` is the ``[BT, NP]`` post tile (loaded once by the caller); the result is ``[BT, NP, CC]``
    with zeros in padded streams.
    """
    m2 = rmask[:, None] & cmask[None, :]
    km = kidx < N
    fv = tl.load(f_ptr + rows[:, None] * C + c[None, :], mask=m2, other=0.0).to(tl.float32)
    acc = pin[:, :, None] * fv[:, None, :]
    for j in tl.static_range(N):
        rj = tl.load(res_ptr + rows[:, None] * (N * C) + j * C + c[None, :], mask=m2, other=0.0).to(tl.float32)
        cj = tl.load(cin_ptr + rows[:, None] * (N * N) + j * N + kidx[None, :], mask=rmask[:, None] & km[None, :],
                     other=0.0).to(tl.float32)
        acc += cj[:, :, None] * rj[:, None, :]  # row j of comb feeds every stream k (the transpose)
    return acc


@triton.jit
def reduce_partials(part_ptr, sq_ptr, rows, rmask, T, S, N: tl.constexpr, NP: tl.constexpr, NPHI: tl.constexpr,
                    BT: tl.constexpr, SB: tl.constexpr):
    """Sum the split-K partials of one token block in a fixed order (deterministic).

    Returns ``z`` split into its pre ``[BT, NP]``, post ``[BT, NP]`` and res ``[BT, NP, NP]`` parts, and
    the sum of squares ``[BT]``. ``SB`` splits are loaded per step, so that a block's reduction costs
    ``S / SB`` L2 round trips, not ``S`` (it sits on the critical path of small batches). Loads bypass
    L1 (``.cg``): other programs wrote the partials during this launch.
    """
    kidx = tl.arange(0, NP)
    km = kidx < N
    k2 = tl.arange(0, NP * NP)
    k2m = (k2 // NP < N) & (k2 % NP < N)
    sidx = tl.arange(0, SB)
    zp = tl.zeros([BT, NP], dtype=tl.float32)
    zq = tl.zeros([BT, NP], dtype=tl.float32)
    zr = tl.zeros([BT, NP * NP], dtype=tl.float32)
    sq = tl.zeros([BT], dtype=tl.float32)
    for s0 in range(0, S, SB):
        sv = s0 + sidx
        m2 = (sv < S)[:, None] & rmask[None, :]
        base = (sv[:, None] * T + rows[None, :]) * NPHI
        mk = m2[:, :, None] & km[None, None, :]
        zp += tl.sum(tl.load(part_ptr + base[:, :, None] + kidx[None, None, :], mask=mk, other=0.0,
                             cache_modifier=".cg"), axis=0)
        zq += tl.sum(tl.load(part_ptr + base[:, :, None] + N + kidx[None, None, :], mask=mk, other=0.0,
                             cache_modifier=".cg"), axis=0)
        zr += tl.sum(tl.load(part_ptr + base[:, :, None] + 2 * N + (k2 // NP * N + k2 % NP)[None, None, :],
                             mask=m2[:, :, None] & k2m[None, None, :], other=0.0, cache_modifier=".cg"), axis=0)
        sq += tl.sum(tl.load(sq_ptr + sv[:, None] * T + rows[None, :], mask=m2, other=0.0, cache_modifier=".cg"),
                     axis=0)
    return zp, zq, tl.reshape(zr, [BT, NP, NP]), sq


@triton.jit
def gates(zp, zq, zr, sq, alpha_ptr, bias_ptr, C, norm_eps, N: tl.constexpr, NP: tl.constexpr):
    """RMS scale and the pre-activations: ``r``, ``m`` (pre, post, res parts), ``sigmoid`` of the pre and
    post parts, and the Sinkhorn logits ``L = alpha2 * m_res + b_res`` (OPS.md 4.2)."""
    kidx = tl.arange(0, NP)
    km = kidx < N
    r = 1.0 / tl.sqrt_rn(sq / (N * C) + norm_eps)
    a0 = tl.load(alpha_ptr)
    a1 = tl.load(alpha_ptr + 1)
    a2 = tl.load(alpha_ptr + 2)
    bp = tl.load(bias_ptr + kidx, mask=km, other=0.0)
    bq = tl.load(bias_ptr + N + kidx, mask=km, other=0.0)
    br = tl.load(bias_ptr + 2 * N + kidx[:, None] * N + kidx[None, :], mask=km[:, None] & km[None, :], other=0.0)
    mp = zp * r[:, None]
    mq = zq * r[:, None]
    mr = zr * r[:, None, None]
    sp = tl.sigmoid(a0 * mp + bp[None, :])
    sg = tl.sigmoid(a1 * mq + bq[None, :])
    L = a2 * mr + br[None, :, :]
    return r, mp, mq, mr, sp, sg, L
