"""Backward of sparse MQA attention (grad wrt q, kv, extra_kv; the sink's grad is a per-head sum).

Same program shape as the forward: one query x ``BLOCK_H`` heads, walking the gathered key tiles.
With ``P = exp(S - lse)`` recomputed from the forward's lse, ``dP = dO' V^T`` and
``dS = P * (dP - Delta + g_lse)`` (``Delta = rowsum(dO' * O)``, ``dO'`` = the gradient of the
output before the sink factor): ``dq = scale * dS K`` accumulates in registers, while each
tile's ``dK = scale * dS^T q`` and ``dV = P^T dO'`` are summed over the block's heads by the dot
and scattered with fp32 atomic adds into the rows the tile gathered (so ``dkv`` is deterministic
only up to the order of those adds).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .sparse_attention import CONFIG_FILE, LOG2E, KeySet, sparse_attention_fwd
from .sparse_attention_common import config, dot, fit_tiles, key_part, key_rows, pow2, smem_limit


@triton.jit
def _bwd_set(q_main, q_tail, do, lse2, coef, has, dq_main, dq_tail, kv_ptr, dkv_ptr, stride_kv, stride_dkv,
             idx_ptr, idx_off, n_idx, kstart, klen, d_v: tl.constexpr, d_t: tl.constexpr, qk_scale, scale,
             BLOCK_N: tl.constexpr, DV: tl.constexpr, DT: tl.constexpr, HAS_TAIL: tl.constexpr,
             UPCAST: tl.constexpr, IEEE: tl.constexpr):
    offs_v = tl.arange(0, DV)
    offs_t = tl.arange(0, DT)
    for j0 in range(0, n_idx, BLOCK_N):
        rows, valid = key_rows(idx_ptr, idx_off, j0, n_idx, kstart, klen, BLOCK_N)
        base = kv_ptr + rows[:, None] * stride_kv
        dbase = dkv_ptr + rows[:, None] * stride_dkv
        k_main = key_part(base, valid, d_v, DV, UPCAST)
        s = dot(q_main, tl.trans(k_main), IEEE)
        dp = dot(do, tl.trans(k_main), IEEE)
        k_tail = k_main  # placeholder without a tail
        if HAS_TAIL:
            k_tail = key_part(base + d_v, valid, d_t, DT, UPCAST)
            s += dot(q_tail, tl.trans(k_tail), IEEE)
        ok = valid[None, :] & has[:, None]
        p = tl.where(ok, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        ds = p * (dp + coef[:, None])
        ds_c = ds.to(k_main.dtype)
        p_c = p.to(k_main.dtype)
        dq_main += dot(ds_c, k_main, IEEE)
        dk = dot(tl.trans(ds_c), q_main, IEEE) * scale + dot(tl.trans(p_c), do, IEEE)
        vmask = valid[:, None] if d_v == DV else valid[:, None] & (offs_v[None, :] < d_v)
        tl.atomic_add(dbase + offs_v[None, :], dk, mask=vmask)
        if HAS_TAIL:
            dq_tail += dot(ds_c, k_tail, IEEE)
            dkt = dot(tl.trans(ds_c), q_tail, IEEE) * scale
            tmask = valid[:, None] if d_t == DT else valid[:, None] & (offs_t[None, :] < d_t)
            tl.atomic_add(dbase + d_v + offs_t[None, :], dkt, mask=tmask)
    return dq_main, dq_tail


@triton.jit
def sparse_attn_bwd_kernel(
        q_ptr, stride_qt, stride_qh, do_ptr, stride_dot, stride_doh, lse_ptr, coef_ptr, stride_lt,
        dq_ptr, stride_dqt, stride_dqh,
        kv_ptr, dkv_ptr, stride_kv, stride_dkv, idx_ptr, stride_it, n_idx, kstart_ptr, klen_ptr,
        ekv_ptr, edkv_ptr, stride_ekv, stride_edkv, eidx_ptr, stride_eit, n_eidx, ekstart_ptr, eklen_ptr,
        Hq, qk_scale, scale,
        d_v: tl.constexpr, d_t: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, DV: tl.constexpr,
        DT: tl.constexpr, HAS_TAIL: tl.constexpr,
        HAS_EXTRA: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < Hq
    offs_v = tl.arange(0, DV)
    offs_t = tl.arange(0, DT)
    hoff = heads[:, None].to(tl.int64)
    vm = hmask[:, None] if d_v == DV else hmask[:, None] & (offs_v[None, :] < d_v)
    tm = hmask[:, None] if d_t == DT else hmask[:, None] & (offs_t[None, :] < d_t)
    q_main = tl.load(q_ptr + t * stride_qt + hoff * stride_qh + offs_v[None, :], mask=vm, other=0.0)
    do = tl.load(do_ptr + t * stride_dot + hoff * stride_doh + offs_v[None, :], mask=vm, other=0.0)
    q_tail = q_main
    if HAS_TAIL:
        q_tail = tl.load(q_ptr + t * stride_qt + hoff * stride_qh + d_v + offs_t[None, :], mask=tm, other=0.0)
    if UPCAST:
        q_main = q_main.to(tl.float32)
        q_tail = q_tail.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_ptr + t * stride_lt + heads, mask=hmask, other=float("-inf"))
    coef = tl.load(coef_ptr + t * stride_lt + heads, mask=hmask, other=0.0)
    has = lse > float("-inf")
    lse2 = tl.where(has, lse * 1.4426950408889634, 0.0)
    dq_main = tl.zeros([BLOCK_H, DV], tl.float32)
    dq_tail = tl.zeros([BLOCK_H, DT], tl.float32)
    dq_main, dq_tail = _bwd_set(q_main, q_tail, do, lse2, coef, has, dq_main, dq_tail, kv_ptr, dkv_ptr, stride_kv,
                                stride_dkv, idx_ptr, t * stride_it, n_idx, tl.load(kstart_ptr + t),
                                tl.load(klen_ptr + t), d_v, d_t, qk_scale, scale,
                                BLOCK_N, DV, DT, HAS_TAIL, UPCAST, IEEE)
    if HAS_EXTRA:
        dq_main, dq_tail = _bwd_set(q_main, q_tail, do, lse2, coef, has, dq_main, dq_tail, ekv_ptr, edkv_ptr,
                                    stride_ekv, stride_edkv, eidx_ptr, t * stride_eit, n_eidx,
                                    tl.load(ekstart_ptr + t), tl.load(eklen_ptr + t), d_v, d_t, qk_scale, scale,
                                    BLOCK_N, DV, DT, HAS_TAIL, UPCAST, IEEE)
    dq_base = dq_ptr + t * stride_dqt + hoff * stride_dqh
    tl.store(dq_base + offs_v[None, :], (dq_main * scale).to(dq_ptr.dtype.element_ty), mask=vm)
    if HAS_TAIL:
        tl.store(dq_base + d_v + offs_t[None, :], (dq_tail * scale).to(dq_ptr.dtype.element_ty), mask=tm)


def sparse_attention_bwd(grad_out: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor], q: torch.Tensor,
                         sets: list[KeySet], *, scale: float, d_v: int, sink: Optional[torch.Tensor],
                         interpret: bool = False, **override):
    """Gradients ``(dq, [dkv per set], dsink)`` of out (and lse) for the varlen (non-paged) layout."""
    T, Hq, Dqk = q.shape
    o, lse = sparse_attention_fwd(q, sets, scale=scale, d_v=d_v, sink=sink, apply_sink=False,
                                  interpret=interpret)
    of = o.float()
    a = torch.sigmoid(lse - sink.float()) if sink is not None else torch.ones_like(lse)
    g = grad_out.float() if grad_out is not None else torch.zeros_like(of)
    do = g * a.unsqueeze(-1)  # gradient wrt the output before the sink factor
    coef = -(do * of).sum(-1)  # -Delta
    if grad_lse is not None:
        coef = coef + torch.where(lse > float("-inf"), grad_lse.float(), 0.0)
    dsink = None
    if sink is not None:
        # d out / d lse through the sink factor a = sigmoid(lse - sink): a (1 - a) * sum(g * o).
        da = (g * of).sum(-1) * a * (1 - a)
        coef = coef + da
        dsink = (-da).sum(0).to(sink.dtype)
    dq = torch.empty_like(q)
    dkvs = [torch.zeros(s.kv.shape, dtype=torch.float32, device=q.device) for s in sets]
    if T > 0:
        cfg = config(CONFIG_FILE, "bwd", q.device, interpret, **override)
        block_h = min(cfg["BLOCK_H"], pow2(Hq))
        d_t = Dqk - d_v
        width = (pow2(d_v) + (pow2(d_t) if d_t > 0 else 0)) * q.element_size()
        # q, dO and the KV tile in shared memory (the sm90 table measured 135 KB at 32 x 32, 576 dims).
        cfg = fit_tiles(cfg, lambda bn, st: (2 * block_h + 2 * st * bn) * width, smem_limit(q.device))
        do_c = do.to(q.dtype).contiguous()
        coef = coef.contiguous()
        qc = q if q.stride(-1) == 1 else q.contiguous()

        def set_args(i):
            s = sets[min(i, len(sets) - 1)]
            d = dkvs[min(i, len(sets) - 1)]
            return [s.kv, d, s.kv.stride(0), d.stride(0), s.indices, s.indices.stride(0), s.indices.shape[1],
                    s.kstart, s.klen]

        grid = (T, triton.cdiv(Hq, block_h))
        sparse_attn_bwd_kernel[grid](
            qc, qc.stride(0), qc.stride(1), do_c, do_c.stride(0), do_c.stride(1), lse, coef, lse.stride(0),
            dq, dq.stride(0), dq.stride(1), *set_args(0), *set_args(1), Hq, float(scale) * LOG2E,
            float(scale), d_v=d_v, d_t=d_t, BLOCK_H=block_h, BLOCK_N=cfg["BLOCK_N"], DV=pow2(d_v), DT=pow2(d_t),
            HAS_TAIL=d_t > 0,
            HAS_EXTRA=len(sets) > 1, UPCAST=interpret and q.dtype == torch.bfloat16, IEEE=q.dtype == torch.float32,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    else:
        dq.zero_()
    return dq, dkvs, dsink
