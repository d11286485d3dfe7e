"""Grouped GEMM kernels for MoE (OPS.md 2.2, 2.3): bf16/fp16, FP8 block-scaled, MXFP4 weights.

One kernel, ``_gg_kernel``, serves every forward GEMM of the MoE family; constexpr switches pick
the operand formats, the row layout and the epilogue, so each specialisation compiles to a
straight-line kernel:

* layout: contiguous (rows grouped by ``offsets[E+1]``, empty groups allowed) or masked
  (``[E, M_max, K]`` with ``masked_m[E]``);
* A rows read directly or gathered through a row index (the fused MoE reads token rows of ``x``
  in expert order without a permuted copy), C rows written directly or scattered;
* A: bf16/fp16, or fp8 e4m3 with (1,128) fp32 scales; B ``[E, N, K]``: bf16/fp16, fp8 e4m3 with
  (128,128) fp32 scales, or MXFP4 (e2m1 pairs, E8M0 per 32) dequantised in registers;
* epilogue: SwiGLU with the ``swiglu_limit`` clamp (gate rows ``[0, I)`` and up rows ``[I, 2I)``
  of B are two accumulators of the same tile), a per-row weight (the top-k weight), and fp8
  (1,128) quantisation of the output.

Tile scheduler (contiguous layout): every program reads the ``E+1`` offsets, turns them into a
prefix sum of per-expert M tiles in registers and finds its expert, so no host sync and no
separate scheduling launch is needed; the grid is launched for the upper bound
``cdiv(M, BM) + E`` M tiles and programs past the real count exit at once. Tiles are ordered in
GROUP_M bands for L2 reuse of both operands.

Under ``TRITON_INTERPRET=1`` (CI on CPU), ``INTERP`` works around two interpreter gaps: its bf16
``tl.dot`` is wrong (PLATFORM.md), so both dot operands go to fp32; and its fp32 -> bf16 / fp8
casts truncate (the fp8 one also loses the carry into the exponent), so values are first rounded
to nearest-even on the target grid with integer arithmetic, after which the cast is exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
B_NATIVE, B_FP8, B_MXFP4 = 0, 1, 2
MX_DEFAULT = 2  # MXFP4 path: 1 tl.dot_scaled, 2 fp16-bit decode in registers (see _mxfp4_tile)


@triton.jit
def rne_bf16(x):
    """fp32 -> fp32 holding the nearest-even bf16 value (interpreter only: its casts truncate)."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def rne_e4m3(x):
    """fp32 in [-448, 448] -> fp32 holding the nearest-even e4m3 value (interpreter only)."""
    b = x.to(tl.uint32, bitcast=True)
    normal = ((b + 0x7FFFF + ((b >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    sub = (x + 24576.0) - 24576.0  # multiples of 2**-9, the e4m3 subnormal step
    return tl.where(tl.abs(x) < 0.015625, sub, normal)


@triton.jit
def cast_out(x, ty: tl.constexpr, INTERP: tl.constexpr):
    """x (fp32) -> ty with round-to-nearest-even on the device and under the interpreter."""
    if INTERP:
        if ty == tl.bfloat16:
            x = rne_bf16(x)
        elif ty == tl.float8e4nv:
            x = rne_e4m3(x)
    return x.to(ty)



@triton.jit
def _to_cd(x, CD_F16: tl.constexpr, INTERP: tl.constexpr):
    """fp32 -> the 16-bit compute type of the MMA (round to nearest even)."""
    if CD_F16:
        return x.to(tl.float16)
    if INTERP:
        x = rne_bf16(x)
    return x.to(tl.bfloat16)

@triton.jit
def _mxfp4_tile(b_ptrs, bs_ptrs, mask, smask, BN: tl.constexpr, BK: tl.constexpr):
    """Load a packed [BN, BK/2] MXFP4 tile and its [BN, BK/32] scales; return fp32 [BN, BK].

    The 3 magnitude bits and the sign of each e2m1 code go straight into fp16 bits: that fp16 is
    the value times 2**-14, exactly (code 1 = 0.5 lands on an fp16 subnormal), so the decode is two
    shifts, two masks and a conversion; the 2**14 is folded into the E8M0 scale (built from its
    exponent bits). Measured 1.8x faster than decoding magnitudes with integer and float arithmetic.
    """
    packed = tl.load(b_ptrs, mask=mask, other=0).to(tl.uint16)
    codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BN, BK))  # even element in the low nibble
    h = ((codes & 7) << 9) | ((codes & 8) << 12)
    vals = h.to(tl.float16, bitcast=True).to(tl.float32)
    sc = ((tl.load(bs_ptrs, mask=smask, other=0).to(tl.int32) + 14) << 23).to(tl.float32, bitcast=True)
    v = tl.reshape(vals, (BN, BK // 32, 32)) * sc[:, :, None]
    return tl.reshape(v, (BN, BK))


@triton.jit
def _dot(a, b, acc, INTERP: tl.constexpr):
    """acc + a @ b.T with b given as [BN, BK]."""
    if INTERP:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(b), acc)


@triton.jit
def _gg_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, cs_ptr, grp_ptr, arow_ptr, crow_ptr, rw_ptr,
               M_ROWS, M_A, M_C, N, K, E, M_MAX, N_UP, limit, NUM_M_TILES,
               s_ae, s_am, s_ak, s_ase, s_asm, s_ask,
               s_be, s_bn, s_bk, s_bse, s_bsn, s_bsk,
               s_ce, s_cm, s_cn, s_csm, s_csk,
               A_FP8: tl.constexpr, B_KIND: tl.constexpr, CD_F16: tl.constexpr, MASKED: tl.constexpr,
               GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr, ROW_W: tl.constexpr, SWIGLU: tl.constexpr,
               HAS_LIMIT: tl.constexpr, QUANT_C: tl.constexpr, INTERP: tl.constexpr, EVEN_K: tl.constexpr,
               SCALAR_BS: tl.constexpr, MX: tl.constexpr, SWAP: tl.constexpr,
               EP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # ---- which tile: banded order over (M tiles, N tiles) for L2 reuse ----------------------
    pid = tl.program_id(0)
    if SWIGLU:
        n_out = N_UP
    else:
        n_out = N
    num_pid_n = tl.cdiv(n_out, BN)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    gsz = tl.minimum(NUM_M_TILES - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsz
    pid_n = (pid % width) // gsz

    # ---- which expert and rows -----------------------------------------------------------------
    if MASKED:
        tpe = tl.cdiv(M_MAX, BM)
        e = pid_m // tpe
        mt = pid_m - e * tpe
        cnt = tl.minimum(tl.maximum(tl.load(grp_ptr + e), 0), M_MAX)
        rm = mt * BM + tl.arange(0, BM)
        row_ok = rm < cnt
        store_rows = rm < M_MAX  # rows past masked_m are written as zeros
        k_tiles = tl.where(mt * BM < cnt, tl.cdiv(K, BK), 0)
    else:
        eo = tl.arange(0, EP)
        lo = tl.load(grp_ptr + eo, mask=eo < E, other=0)
        hi = tl.load(grp_ptr + eo + 1, mask=eo < E, other=0)
        cnt = tl.maximum(hi - lo, 0)
        tiles = (cnt + BM - 1) // BM
        incl = tl.cumsum(tiles, axis=0)
        if pid_m >= tl.sum(tiles, axis=0):
            return
        e = tl.sum((incl <= pid_m).to(tl.int32), axis=0)
        sel = eo == e
        r0 = tl.sum(tl.where(sel, lo, 0), axis=0)
        r1 = r0 + tl.sum(tl.where(sel, cnt, 0), axis=0)
        rm = r0 + (pid_m - tl.sum(tl.where(sel, incl - tiles, 0), axis=0)) * BM + tl.arange(0, BM)
        row_ok = (rm >= 0) & (rm < r1) & (rm < M_ROWS)  # bad offsets never index outside
        store_rows = row_ok
        k_tiles = tl.cdiv(K, BK)
    e64 = e.to(tl.int64)
    rm_safe = tl.where(row_ok, rm, 0)
    if GATHER_A:
        t = tl.load(arow_ptr + rm_safe, mask=row_ok, other=-1)
        a_ok = row_ok & (t >= 0) & (t < M_A)
        a_row = tl.where(a_ok, t, 0).to(tl.int64)
    else:
        a_ok = row_ok
        a_row = rm_safe.to(tl.int64)
    if SCATTER_C:
        t2 = tl.load(crow_ptr + rm_safe, mask=row_ok, other=-1)
        c_ok = store_rows & (t2 >= 0) & (t2 < M_C)
        c_row = tl.where(c_ok, t2, 0).to(tl.int64)
    else:
        c_ok = store_rows
        c_row = tl.where(store_rows, rm, 0).to(tl.int64)

    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < n_out
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + e64 * s_ae + a_row[:, None] * s_am + offs_k[None, :] * s_ak
    if B_KIND == 2:
        offs_kb = tl.arange(0, BK // 2)
        offs_ks = tl.arange(0, BK // 32)
        b_ptrs = b_ptr + e64 * s_be + rn[:, None].to(tl.int64) * s_bn + offs_kb[None, :] * s_bk
        bs_ptrs = bs_ptr + e64 * s_bse + rn[:, None].to(tl.int64) * s_bsn + offs_ks[None, :] * s_bsk
    else:
        b_ptrs = b_ptr + e64 * s_be + rn[:, None].to(tl.int64) * s_bn + offs_k[None, :] * s_bk
        if SCALAR_BS:  # the tile's BN rows lie in one 128-row scale block: one scale per K step
            bs_ptrs = bs_ptr + e64 * s_bse + ((pid_n * BN) // 128) * s_bsn
            bsu_ptrs = bs_ptr + e64 * s_bse + ((pid_n * BN + N_UP) // 128) * s_bsn
        else:
            bs_ptrs = bs_ptr + e64 * s_bse + (rn // 128) * s_bsn
            bsu_ptrs = bs_ptr + e64 * s_bse + ((rn + N_UP) // 128) * s_bsn
    up = N_UP * s_bn  # the up half of w13 starts I rows below the gate half
    as_ptrs = as_ptr + e64 * s_ase + a_row * s_asm

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    # SWAP (MXFP4): accumulate out^T = W x^T, so the weight decoded in registers is the MMA's left
    # operand (which wgmma may take from registers) and the activation tile the right one.
    acc_t = tl.zeros((BN, BM), dtype=tl.float32)
    acc_ut = tl.zeros((BN, BM), dtype=tl.float32)
    for kt in range(0, k_tiles):
        k0 = kt * BK
        if EVEN_K:
            a = tl.load(a_ptrs, mask=a_ok[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=a_ok[:, None] & (offs_k[None, :] < K - k0), other=0.0)
        if A_FP8:
            a_s = tl.load(as_ptrs + (k0 // 128) * s_ask, mask=a_ok, other=0.0)
            if B_KIND != 1:  # meets a 16-bit or MXFP4 weight: dequantise the activation
                a = _to_cd(a.to(tl.float32) * a_s[:, None], CD_F16, INTERP)
        if B_KIND == 2:
            if EVEN_K:
                bm = n_ok[:, None]
                sm = n_ok[:, None]
            else:
                bm = n_ok[:, None] & (offs_kb[None, :] < (K - k0) // 2)
                sm = n_ok[:, None] & (offs_ks[None, :] < (K - k0) // 32)
            bsk = bs_ptrs + (k0 // 32) * s_bsk
            if MX == 1:
                # tl.dot_scaled: e2m1 weights with E8M0 scales, decoded by Triton's own lowering.
                pb = tl.load(b_ptrs, mask=bm, other=0)
                sb = tl.load(bsk, mask=sm, other=0)
                if CD_F16:
                    acc = tl.dot_scaled(a, None, "fp16", tl.trans(pb), sb, "e2m1", acc)
                else:
                    acc = tl.dot_scaled(a, None, "bf16", tl.trans(pb), sb, "e2m1", acc)
                if SWIGLU:
                    pu = tl.load(b_ptrs + up, mask=bm, other=0)
                    su = tl.load(bsk + N_UP * s_bsn, mask=sm, other=0)
                    if CD_F16:
                        acc_u = tl.dot_scaled(a, None, "fp16", tl.trans(pu), su, "e2m1", acc_u)
                    else:
                        acc_u = tl.dot_scaled(a, None, "bf16", tl.trans(pu), su, "e2m1", acc_u)
            else:
                # e2m1 times a power of two is exact in bf16 / fp16 (within range)
                b = _to_cd(_mxfp4_tile(b_ptrs, bsk, bm, sm, BN, BK), CD_F16, INTERP)
                if SWAP:
                    acc_t = _dot(b, a, acc_t, INTERP)
                else:
                    acc = _dot(a, b, acc, INTERP)
                if SWIGLU:
                    bu = _to_cd(_mxfp4_tile(b_ptrs + up, bsk + N_UP * s_bsn, bm, sm, BN, BK), CD_F16, INTERP)
                    if SWAP:
                        acc_ut = _dot(bu, a, acc_ut, INTERP)
                    else:
                        acc_u = _dot(a, bu, acc_u, INTERP)
        else:
            if EVEN_K:
                bm = n_ok[:, None]
            else:
                bm = n_ok[:, None] & (offs_k[None, :] < K - k0)
            b = tl.load(b_ptrs, mask=bm, other=0.0)
            if SWIGLU:
                bu = tl.load(b_ptrs + up, mask=bm, other=0.0)
            if B_KIND == 1:
                if SCALAR_BS:
                    b_s = tl.load(bs_ptrs + (k0 // 128) * s_bsk)
                    if SWIGLU:
                        bu_s = tl.load(bsu_ptrs + (k0 // 128) * s_bsk)
                else:
                    b_s = tl.load(bs_ptrs + (k0 // 128) * s_bsk, mask=n_ok, other=0.0)
                    if SWIGLU:
                        bu_s = tl.load(bsu_ptrs + (k0 // 128) * s_bsk, mask=n_ok, other=0.0)
            if A_FP8 and B_KIND == 1:
                # FP8 x FP8: one K block (<= 128) per step, its fp32 partial product scaled into acc.
                zero = tl.zeros((BM, BN), dtype=tl.float32)
                d = _dot(a, b, zero, INTERP)
                if SWIGLU:
                    du = _dot(a, bu, zero, INTERP)
                if SCALAR_BS:  # one FMA per element: the scale is a row vector times a scalar
                    acc += d * (a_s * b_s)[:, None]
                    if SWIGLU:
                        acc_u += du * (a_s * bu_s)[:, None]
                else:
                    acc += d * (a_s[:, None] * b_s[None, :])
                    if SWIGLU:
                        acc_u += du * (a_s[:, None] * bu_s[None, :])
            else:
                if B_KIND == 1:  # 16-bit activations meet an fp8 weight: dequantise the weight
                    if SCALAR_BS:
                        b = _to_cd(b.to(tl.float32) * b_s, CD_F16, INTERP)
                        if SWIGLU:
                            bu = _to_cd(bu.to(tl.float32) * bu_s, CD_F16, INTERP)
                    else:
                        b = _to_cd(b.to(tl.float32) * b_s[:, None], CD_F16, INTERP)
                        if SWIGLU:
                            bu = _to_cd(bu.to(tl.float32) * bu_s[:, None], CD_F16, INTERP)
                acc = _dot(a, b, acc, INTERP)
                if SWIGLU:
                    acc_u = _dot(a, bu, acc_u, INTERP)
        a_ptrs += BK * s_ak
        if B_KIND == 2:
            b_ptrs += (BK // 2) * s_bk
        else:
            b_ptrs += BK * s_bk

    if SWAP:
        acc = tl.trans(acc_t)
        if SWIGLU:
            acc_u = tl.trans(acc_ut)

    # ---- epilogue ------------------------------------------------------------------------------
    if SWIGLU:
        g = acc
        u = acc_u
        if HAS_LIMIT:
            g = tl.minimum(g, limit)
            u = tl.minimum(tl.maximum(u, -limit), limit)
        acc = g / (1.0 + tl.exp(-g)) * u
    if ROW_W:
        acc = acc * tl.load(rw_ptr + rm_safe, mask=row_ok, other=0.0)[:, None]
    c_ptrs = c_ptr + e64 * s_ce + c_row[:, None] * s_cm + rn[None, :] * s_cn
    cmask = c_ok[:, None] & n_ok[None, :]
    if QUANT_C:
        # fp8 (1,128) activation quantisation of this tile's 128 columns (BN == 128, tiles aligned).
        sc = tl.maximum(tl.max(tl.abs(acc), axis=1), 1e-4) / 448.0
        q = tl.minimum(tl.maximum(acc / sc[:, None], -448.0), 448.0)
        tl.store(c_ptrs, cast_out(q, c_ptr.dtype.element_ty, INTERP), mask=cmask)
        tl.store(cs_ptr + c_row * s_csm + pid_n * s_csk, sc, mask=c_ok)
    else:
        tl.store(c_ptrs, cast_out(acc, c_ptr.dtype.element_ty, INTERP), mask=cmask)


@triton.jit
def _gg_wgrad_kernel(p_ptr, q_ptr, o_ptr, grp_ptr, prow_ptr, qrow_ptr, pw_ptr,
                     M_ROWS, M_P, M_Q, N, K, M_MAX,
                     s_pe, s_pm, s_pn, s_qe, s_qm, s_qk, s_oe, s_on, s_ok,
                     MASKED: tl.constexpr, GATHER_P: tl.constexpr, GATHER_Q: tl.constexpr, P_W: tl.constexpr,
                     INTERP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Weight gradient per group: out[e] [N, K] = sum over rows r of group e of P[r]^T Q[r] (fp32)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    e = tl.program_id(2)
    e64 = e.to(tl.int64)
    if MASKED:
        r0 = 0
        cnt = tl.minimum(tl.maximum(tl.load(grp_ptr + e), 0), M_MAX)
        lim = M_MAX
    else:
        r0 = tl.load(grp_ptr + e)
        cnt = tl.maximum(tl.load(grp_ptr + e + 1) - r0, 0)
        lim = M_ROWS
    rn = pid_n * BN + tl.arange(0, BN)
    rk = pid_k * BK + tl.arange(0, BK)
    n_ok = rn < N
    k_ok = rk < K
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for m0 in range(0, cnt, BM):
        rr = m0 + tl.arange(0, BM)
        rm = r0 + rr
        ok = (rr < cnt) & (rm >= 0) & (rm < lim)
        rms = tl.where(ok, rm, 0)
        if GATHER_P:
            tp = tl.load(prow_ptr + rms, mask=ok, other=-1)
            p_ok = ok & (tp >= 0) & (tp < M_P)
            prow = tl.where(p_ok, tp, 0).to(tl.int64)
        else:
            p_ok = ok
            prow = rms.to(tl.int64)
        if GATHER_Q:
            tq = tl.load(qrow_ptr + rms, mask=ok, other=-1)
            q_ok = ok & (tq >= 0) & (tq < M_Q)
            qrow = tl.where(q_ok, tq, 0).to(tl.int64)
        else:
            q_ok = ok
            qrow = rms.to(tl.int64)
        p = tl.load(p_ptr + e64 * s_pe + prow[:, None] * s_pm + rn[None, :] * s_pn,
                    mask=p_ok[:, None] & n_ok[None, :], other=0.0)
        if P_W:
            w = tl.load(pw_ptr + rms, mask=ok, other=0.0)
            p = cast_out(p.to(tl.float32) * w[:, None], p_ptr.dtype.element_ty, INTERP)
        q = tl.load(q_ptr + e64 * s_qe + qrow[:, None] * s_qm + rk[None, :] * s_qk,
                    mask=q_ok[:, None] & k_ok[None, :], other=0.0)
        if INTERP:
            acc = tl.dot(tl.trans(p.to(tl.float32)), q.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(p), q, acc)
    tl.store(o_ptr + e64 * s_oe + rn[:, None].to(tl.int64) * s_on + rk[None, :] * s_ok, acc,
             mask=n_ok[:, None] & k_ok[None, :])


# ---- launchers --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Operand:
    """A GEMM operand as the kernel reads it: data, optional scales, and its kind."""

    data: torch.Tensor
    scale: Optional[torch.Tensor] = None
    kind: int = B_NATIVE  # B_NATIVE, B_FP8 or B_MXFP4 (A uses NATIVE or FP8)


def _strides(t: Optional[torch.Tensor], n: int) -> tuple[int, ...]:
    if t is None:
        return (0,) * n
    s = tuple(t.stride())
    return (0,) * (n - len(s)) + s


def launch(a: Operand, b: Operand, c: torch.Tensor, groups: torch.Tensor, cfg: dict, *, masked: bool = False,
           m_rows: int = 0, gather_rows: Optional[torch.Tensor] = None, num_a_rows: int = 0,
           scatter_rows: Optional[torch.Tensor] = None, row_weight: Optional[torch.Tensor] = None,
           swiglu: bool = False, limit: Optional[float] = None, c_scale: Optional[torch.Tensor] = None,
           interpret: bool = False) -> None:
    """Run ``_gg_kernel``. ``b.data`` is [E, N, K] ([E, N, K/2] for MXFP4); for ``swiglu`` its N is 2I and
    ``c`` gets I columns. Contiguous: a [rows, K], c [rows_c, n_out], groups = offsets [E+1];
    masked: a [E, M_max, K], c [E, M_max, n_out], groups = masked_m [E]."""
    E = b.data.shape[0]
    N = b.data.shape[1]
    K = a.data.shape[-1]
    n_out = N // 2 if swiglu else N
    BM, BN, BK, GM = cfg["BM"], cfg["BN"], cfg["BK"], cfg.get("GROUP_M", 8)
    if masked:
        M_MAX = a.data.shape[1]
        num_m_tiles = E * triton.cdiv(M_MAX, BM)
        m_rows = E * M_MAX
        s_ae, s_am, s_ak = a.data.stride()
        s_ce, s_cm, s_cn = c.stride()
    else:
        M_MAX = 0
        num_m_tiles = triton.cdiv(m_rows, BM) + E
        s_ae, (s_am, s_ak) = 0, a.data.stride()
        s_ce, (s_cm, s_cn) = 0, c.stride()
    if c_scale is not None and BN != 128:
        raise ValueError(f"fp8 output quantisation needs BN == 128 (one (1,128) scale per tile row), got BN={BN}")
    if m_rows == 0 or n_out == 0 or num_m_tiles == 0:
        return
    if a.kind == B_FP8:
        s_ase, s_asm, s_ask = _strides(a.scale, 3)
        if not masked:
            s_ase = 0
    else:
        s_ase = s_asm = s_ask = 0
    s_bse, s_bsn, s_bsk = _strides(b.scale, 3)
    s_csm, s_csk = _strides(c_scale, 2)
    cd_f16 = a.data.dtype == torch.float16 or (a.kind == B_FP8 and b.data.dtype == torch.float16)
    # one fp8 weight scale per K step when the tile's rows (and the up half's) sit in one 128-row block
    scalar_bs = b.kind == B_FP8 and 128 % BN == 0 and (not swiglu or n_out % BN == 0)
    mx = int(cfg.get("MX", MX_DEFAULT)) if b.kind == B_MXFP4 else 0
    if interpret and mx == 1:
        mx = 2  # the interpreter's dot_scaled is not what the CI should vouch for; the GPU run checks it
    swap = bool(cfg.get("SWAP", False)) and b.kind == B_MXFP4 and mx != 1  # decoded weight as left operand
    dummy = groups
    grid = (num_m_tiles * triton.cdiv(n_out, BN),)
    _gg_kernel[grid](
        a.data, a.scale if a.scale is not None else dummy, b.data, b.scale if b.scale is not None else dummy,
        c, c_scale if c_scale is not None else dummy, groups,
        gather_rows if gather_rows is not None else dummy, scatter_rows if scatter_rows is not None else dummy,
        row_weight if row_weight is not None else dummy,
        m_rows, num_a_rows if gather_rows is not None else m_rows, c.shape[-2], N, K, E, M_MAX, n_out,
        float(limit) if limit is not None else 0.0, num_m_tiles,
        s_ae, s_am, s_ak, s_ase, s_asm, s_ask,
        *b.data.stride(), s_bse, s_bsn, s_bsk,
        s_ce, s_cm, s_cn, s_csm, s_csk,
        A_FP8=a.kind == B_FP8, B_KIND=b.kind, CD_F16=cd_f16, MASKED=masked,
        GATHER_A=gather_rows is not None, SCATTER_C=scatter_rows is not None, ROW_W=row_weight is not None,
        SWIGLU=swiglu, HAS_LIMIT=limit is not None, QUANT_C=c_scale is not None, INTERP=interpret,
        EVEN_K=K % BK == 0, SCALAR_BS=scalar_bs, MX=mx, SWAP=swap,
        EP=triton.next_power_of_2(E + 1), BM=BM, BN=BN, BK=BK, GROUP_M=GM,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))


def launch_wgrad(p: torch.Tensor, q: torch.Tensor, out: torch.Tensor, groups: torch.Tensor, cfg: dict, *,
                 masked: bool = False, p_rows: Optional[torch.Tensor] = None, q_rows: Optional[torch.Tensor] = None,
                 p_weight: Optional[torch.Tensor] = None, m_rows: int = 0, interpret: bool = False) -> None:
    """out[e] = P_e^T Q_e. Contiguous: P [*, N], Q [*, K] (optionally gathered), groups = offsets;
    masked: P [E, M_max, N], Q [E, M_max, K], groups = masked_m."""
    E, N, K = out.shape
    if E == 0 or N == 0 or K == 0:
        return
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    if masked:
        s_pe, s_pm, s_pn = p.stride()
        s_qe, s_qm, s_qk = q.stride()
        M_MAX = p.shape[1]
    else:
        s_pe, (s_pm, s_pn) = 0, p.stride()
        s_qe, (s_qm, s_qk) = 0, q.stride()
        M_MAX = 0
    dummy = groups
    _gg_wgrad_kernel[(triton.cdiv(N, BN), triton.cdiv(K, BK), E)](
        p, q, out, groups, p_rows if p_rows is not None else dummy, q_rows if q_rows is not None else dummy,
        p_weight if p_weight is not None else dummy,
        m_rows, p.shape[-2], q.shape[-2], N, K, M_MAX,
        s_pe, s_pm, s_pn, s_qe, s_qm, s_qk, *out.stride(),
        MASKED=masked, GATHER_P=p_rows is not None, GATHER_Q=q_rows is not None, P_W=p_weight is not None,
        INTERP=interpret, BM=BM, BN=BN, BK=BK, num_warps=cfg.get("num_warps", 4),
        num_stages=cfg.get("num_stages", 3))
