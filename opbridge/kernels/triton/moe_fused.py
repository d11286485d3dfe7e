"""The fused MoE layer (OPS.md 2.4), DeepSeek's "Mega MoE" on one device, and its bf16 backward.

Forward, in five launches (six with fp8 weights), none of which waits on the host:

1. ``_count_kernel`` + 2. ``_scatter_kernel`` (moe_permute.py): routing metadata: expert offsets,
   and per sorted row its token, its flat slot ``t*k+s`` and its top-k weight.
   (fp8 weights: a row-quantisation kernel turns ``x`` into fp8 with (1,128) scales.)
3. GEMM1 (``_gg_kernel``): gathers token rows of ``x`` straight from ``x`` (no permuted copy),
   multiplies by the gate and up halves of ``w13[e]`` into two accumulators of one tile, applies
   the ``swiglu_limit`` clamp and SwiGLU in the epilogue, and writes ``act`` (bf16, or fp8 with its
   (1,128) scales when ``w2`` is fp8).
4. GEMM2: ``act @ w2[e].T``, times the top-k weight in the epilogue, written to row ``t*k+s``.
5. combine: per token, the sum of its ``k`` rows in fp32 (no atomics: deterministic).

What separates this from a single persistent kernel is documented in docs/triton-moe.md.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .grouped_gemm import B_FP8, B_MXFP4, FP8, Operand, cast_out, launch, launch_wgrad
from .moe_configs import gemm_config, kind_of
from .moe_permute import combine, routing


@triton.jit
def _quant_fp8_rows_kernel(x_ptr, q_ptr, s_ptr, R, K, s_xr, s_qr, s_sr, BR: tl.constexpr, INTERP: tl.constexpr):
    """fp8 e4m3 with one fp32 scale per (row, 128 columns): s = max(amax, 1e-4) / 448 (OPS.md 1)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    kb = tl.program_id(1)
    cols = kb * 128 + tl.arange(0, 128)
    rm = rows < R
    m = rm[:, None] & (cols < K)[None, :]
    r64 = rows.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * s_xr + cols[None, :], mask=m, other=0.0).to(tl.float32)
    sc = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4) / 448.0
    q = tl.minimum(tl.maximum(x / sc[:, None], -448.0), 448.0)
    tl.store(q_ptr + r64[:, None] * s_qr + cols[None, :], cast_out(q, q_ptr.dtype.element_ty, INTERP), mask=m)
    tl.store(s_ptr + r64 * s_sr + kb, sc, mask=rm)


def quantize_fp8_rows(x: torch.Tensor) -> Operand:
    R, K = x.shape
    q = torch.empty((R, K), dtype=FP8, device=x.device)
    s = torch.empty((R, triton.cdiv(K, 128)), dtype=torch.float32, device=x.device)
    if R and K:
        x = x if x.stride(1) == 1 else x.contiguous()
        _quant_fp8_rows_kernel[(triton.cdiv(R, 8), triton.cdiv(K, 128))](
            x, q, s, R, K, x.stride(0), q.stride(0), s.stride(0), BR=8, INTERP=x.device.type != "cuda", num_warps=4)
    return Operand(q, s, B_FP8)


def gemm1_config(dev: torch.device, a1: Operand, w13: Operand, quant_act: bool, expected_m: float) -> dict:
    return gemm_config(dev, "gemm1", kind_of(a1.kind == B_FP8, w13.kind), expected_m,
                       fp8_blocks=B_FP8 in (a1.kind, w13.kind), quant_out=quant_act, mxfp4=w13.kind == B_MXFP4)


def gemm2_config(dev: torch.device, a2: Operand, w2: Operand, expected_m: float) -> dict:
    return gemm_config(dev, "gemm2", kind_of(a2.kind == B_FP8, w2.kind), expected_m,
                       fp8_blocks=B_FP8 in (a2.kind, w2.kind), mxfp4=w2.kind == B_MXFP4)


def gemm1(r, a1: Operand, w13: Operand, T: int, swiglu_limit: Optional[float], quant_act: bool, cfg: dict,
          dtype: torch.dtype) -> Operand:
    """act = SwiGLU(x[tok] @ w13[e].T) for every sorted row (fp8 + (1,128) scales when ``quant_act``)."""
    N = r.tok.shape[0]
    I = w13.data.shape[1] // 2
    dev = a1.data.device
    if quant_act:
        act = torch.empty((N, I), dtype=FP8, device=dev)
        act_s = torch.empty((N, triton.cdiv(I, 128)), dtype=torch.float32, device=dev)
    else:
        act = torch.empty((N, I), dtype=dtype, device=dev)
        act_s = None
    launch(a1, w13, act, r.offsets, cfg, m_rows=N, gather_rows=r.tok, num_a_rows=T, swiglu=True,
           limit=swiglu_limit, c_scale=act_s, interpret=dev.type != "cuda")
    return Operand(act, act_s, B_FP8 if quant_act else 0)


def gemm2(r, a2: Operand, w2: Operand, cfg: dict, dtype: torch.dtype) -> torch.Tensor:
    """y[t*k+s] = topk_weight * (act @ w2[e].T) for every sorted row."""
    N = r.tok.shape[0]
    y = torch.empty((N, w2.data.shape[1]), dtype=dtype, device=a2.data.device)
    launch(a2, w2, y, r.offsets, cfg, m_rows=N, scatter_rows=r.pos, row_weight=r.weight,
           interpret=a2.data.device.type != "cuda")
    return y


def moe_forward(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: Operand, w2: Operand,
                swiglu_limit: Optional[float]) -> torch.Tensor:
    T = x.shape[0]
    k = topk_ids.shape[1]
    E = w13.data.shape[0]
    dev = x.device
    r = routing(topk_ids, E, topk_weights)
    exp_m = T * k / max(E, 1)
    # Activations that feed an fp8 weight are fp8 (1,128) (the DeepSeek-V3 recipe); otherwise 16-bit.
    a1 = quantize_fp8_rows(x) if w13.kind == B_FP8 else Operand(x)
    quant_act = w2.kind == B_FP8
    a2 = gemm1(r, a1, w13, T, swiglu_limit, quant_act, gemm1_config(dev, a1, w13, quant_act, exp_m), x.dtype)
    y = gemm2(r, a2, w2, gemm2_config(dev, a2, w2, exp_m), x.dtype)
    return combine(y, topk_ids, None, T, k, E, x.dtype, by_map=False)


def moe_backward(g: torch.Tensor, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 w13: torch.Tensor, w2: torch.Tensor, swiglu_limit: Optional[float]):
    """Grads of the bf16/fp16 MoE layer wrt (x, topk_weights, w13, w2), with the forward's GEMM kernels.

    Recomputes ``h = x w13^T`` in fp32, then: ``d tw = <g, act w2^T>``; ``d act = (tw g) w2``;
    ``dh`` through the clamped SwiGLU; ``dx = combine(dh w13)``; ``dw2 = (tw g)^T act``; ``dw13 = dh^T x``.
    """
    T, H = x.shape
    k = topk_ids.shape[1]
    E = w13.shape[0]
    I = w13.shape[1] // 2
    dev = x.device
    interp = dev.type != "cuda"
    N = T * k
    dt = x.dtype
    g = g.to(dt)
    r = routing(topk_ids, E, topk_weights.float())
    exp_m = N / max(E, 1)
    cfg = gemm_config(dev, "gemm", "bf16", exp_m)
    wcfg = gemm_config(dev, "wgrad", "bf16", exp_m)
    valid = torch.arange(N, device=dev) < r.offsets[E]  # sorted rows in use (no host sync)

    h = torch.empty((N, 2 * I), dtype=torch.float32, device=dev)
    launch(Operand(x), Operand(w13), h, r.offsets, cfg, m_rows=N, gather_rows=r.tok, num_a_rows=T, interpret=interp)
    h = torch.where(valid[:, None], h, 0.0)
    gate, upv = h[:, :I], h[:, I:]
    if swiglu_limit is not None:
        c = float(swiglu_limit)
        g_pass = gate <= c
        u_pass = (upv >= -c) & (upv <= c)
        gate, upv = gate.clamp(max=c), upv.clamp(-c, c)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    act = (silu * upv).to(dt)

    # d topk_weights[t, s] = <g[t], act_m @ w2[e]^T> for the sorted row m of (t, s).
    y = torch.empty((N, H), dtype=torch.float32, device=dev)
    launch(Operand(act), Operand(w2), y, r.offsets, cfg, m_rows=N, interpret=interp)
    tok = torch.where(valid, r.tok, 0).long()
    dw_rows = torch.where(valid, (y * g[tok].float()).sum(-1), 0.0)
    dtw = torch.zeros(N + 1, dtype=torch.float32, device=dev)
    dtw.index_copy_(0, torch.where(valid, r.pos.long(), N), dw_rows)
    dtw = dtw[:N].view(T, k)
    del y

    dact = torch.empty((N, I), dtype=torch.float32, device=dev)
    launch(Operand(g), Operand(w2.transpose(1, 2)), dact, r.offsets, cfg, m_rows=N, gather_rows=r.tok,
           num_a_rows=T, row_weight=r.weight, interpret=interp)
    dact = torch.where(valid[:, None], dact, 0.0)
    dgate = dact * upv * sig * (1.0 + gate * (1.0 - sig))
    dup = dact * silu
    if swiglu_limit is not None:
        dgate = dgate * g_pass
        dup = dup * u_pass
    dh = torch.cat([dgate, dup], dim=1).to(dt)

    dxs = torch.empty((N, H), dtype=torch.float32, device=dev)
    launch(Operand(dh), Operand(w13.transpose(1, 2)), dxs, r.offsets, cfg, m_rows=N, scatter_rows=r.pos,
           interpret=interp)
    dx = combine(dxs, topk_ids, None, T, k, E, dt, by_map=False)

    dw2 = torch.empty((E, H, I), dtype=torch.float32, device=dev)
    launch_wgrad(g, act, dw2, r.offsets, wcfg, p_rows=r.tok, p_weight=r.weight, m_rows=N, interpret=interp)
    dw13 = torch.empty((E, 2 * I, H), dtype=torch.float32, device=dev)
    launch_wgrad(dh, x, dw13, r.offsets, wcfg, q_rows=r.tok, m_rows=N, interpret=interp)
    return dx, dtw.to(topk_weights.dtype), dw13.to(w13.dtype), dw2.to(w2.dtype)
