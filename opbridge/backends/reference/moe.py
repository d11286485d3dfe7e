"""Reference MoE: routing, grouped GEMMs, the MoE layer, permute/combine (OPS.md section 2)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...core.checks import wide_dtype
from ...core.formats import dequantize_if
from . import BACKEND


def scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    if scoring == "softmax":
        return logits.softmax(-1)
    if scoring == "sigmoid":
        return logits.sigmoid()
    return F.softplus(logits).sqrt()  # sqrtsoftplus


def _finish_weights(w: torch.Tensor, renormalize: bool, scaling_factor: float) -> torch.Tensor:
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scaling_factor


def _top(q: torch.Tensor, k: int) -> torch.Tensor:
    # Stable descending sort: equal scores keep the lower index first (OPS.md: ties to the lower id).
    return q.sort(dim=-1, descending=True, stable=True).indices[..., :k]


@BACKEND.implement("moe_route")
def moe_route(logits, top_k, *, scoring, correction_bias, num_groups, topk_groups, renormalize, scaling_factor):
    dt = wide_dtype(logits, correction_bias)
    s = scores(logits.to(dt), scoring)
    q = s if correction_bias is None else s + correction_bias.to(dt)
    if num_groups > 1:
        T, E = q.shape
        grouped = q.view(T, num_groups, E // num_groups)
        group_score = grouped.sort(-1, descending=True).values[..., :2].sum(-1)
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, _top(group_score, topk_groups), True)
        q = q.masked_fill(~keep.repeat_interleave(E // num_groups, dim=1), float("-inf"))
    ids = _top(q, top_k)
    w = _finish_weights(s.gather(1, ids), renormalize, scaling_factor)
    return w.float() if dt != torch.float64 else w, ids.to(torch.int32)


@BACKEND.implement("moe_route_hash")
def moe_route_hash(logits, token_ids, tid2eid, *, scoring, renormalize, scaling_factor):
    dt = wide_dtype(logits)
    ids = tid2eid[token_ids.long()].long()
    w = _finish_weights(scores(logits.to(dt), scoring).gather(1, ids), renormalize, scaling_factor)
    return w.float() if dt != torch.float64 else w, ids.to(torch.int32)


def _operands(*xs):
    """De-quantized operands in the reference precision."""
    dt = wide_dtype(*xs)
    return dt, [dequantize_if(x).to(dt) for x in xs]


@BACKEND.implement("grouped_gemm")
def grouped_gemm(a, b, offsets, *, out_dtype):
    dt, (a_, b_) = _operands(a, b)
    bounds = offsets.tolist()
    out = a_.new_zeros((a_.shape[0], b_.shape[1]))
    for e in range(b_.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = a_[lo:hi] @ b_[e].T
    return out.to(out_dtype)


@BACKEND.implement("grouped_gemm_masked")
def grouped_gemm_masked(a, b, masked_m, *, out_dtype):
    dt, (a_, b_) = _operands(a, b)
    out = a_.new_zeros((a_.shape[0], a_.shape[1], b_.shape[1]))
    for e, m in enumerate(masked_m.tolist()):
        if m:
            out[e, :m] = a_[e, :m] @ b_[e].T
    return out.to(out_dtype)


def swiglu(h: torch.Tensor, swiglu_limit: Optional[float]) -> torch.Tensor:
    g, u = h.chunk(2, dim=-1)
    if swiglu_limit is not None:
        g = g.clamp(max=swiglu_limit)
        u = u.clamp(-swiglu_limit, swiglu_limit)
    return F.silu(g) * u


@BACKEND.implement("moe")
def moe(x, topk_weights, topk_ids, w13, w2, *, activation, swiglu_limit):
    dt, (x_, w13_, w2_) = _operands(x, w13, w2)
    tw = topk_weights.to(dt)
    out = x_.new_zeros(x_.shape)
    ids = topk_ids.long()
    for e in ids[ids >= 0].unique().tolist():
        rows, slots = (ids == e).nonzero(as_tuple=True)
        act = swiglu(x_[rows] @ w13_[e].T, swiglu_limit)
        out = out.index_add(0, rows, (act @ w2_[e].T) * tw[rows, slots].unsqueeze(-1))
    return out.to(x.dtype)


@BACKEND.implement("moe_permute")
def moe_permute(x, topk_ids, num_experts):
    T, k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    valid = (flat >= 0).nonzero().squeeze(-1)
    src_index = valid[flat[valid].sort(stable=True).indices]
    counts = torch.bincount(flat[valid], minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return x[src_index // k], offsets, src_index


@BACKEND.implement("moe_combine")
def moe_combine(y_sorted, src_index, topk_weights, num_tokens):
    dt = wide_dtype(y_sorted, topk_weights)
    k = topk_weights.shape[1]
    w = topk_weights.reshape(-1).to(dt)[src_index]
    out = y_sorted.new_zeros((num_tokens, y_sorted.shape[1]), dtype=dt)
    out = out.index_add(0, src_index // k, y_sorted.to(dt) * w.unsqueeze(-1))
    return out.to(y_sorted.dtype)

