"""Mixture of experts in standard ONNX ops (OPS.md section 2).

Routing uses TopK, whose ties go to the lower index, exactly the contract's tie rule. The MoE
layer is computed densely: every expert on every token (``[E, T, 2I]``), then combined with a
``[T, E]`` weight matrix built from ``topk_ids`` (``-1`` ids match no expert, repeated ids add up).
That is ``E/k`` times the FLOPs of a routed MoE and meant for portability and checking, not speed;
mode ``ort`` runs MoE on onnxruntime's routed kernel instead.
"""
from __future__ import annotations

from typing import Any, Optional

import onnx_ir as ir

from .builder import Args, Builder, sdim
from .schema import onnx_dtype
from .translations import decomposition, plain


def scores(g: Builder, logits: Any, scoring: str, dt) -> Any:
    op = g.op
    x = g.cast(logits, dt)
    if scoring == "softmax":
        return op.Softmax(x, axis=-1)
    if scoring == "sigmoid":
        return op.Sigmoid(x)
    return op.Sqrt(op.Softplus(x))  # sqrtsoftplus


def finish_weights(g: Builder, w: Any, renormalize: bool, scaling_factor: float, dt) -> Any:
    op = g.op
    if renormalize:
        w = op.Div(w, op.Add(g.sum(w, -1, keepdims=True), g.f(1e-20, dt)))
    if scaling_factor != 1.0:
        w = op.Mul(w, g.f(scaling_factor, dt))
    return w


def _weights_dtype(dt):
    return dt if dt == ir.DataType.DOUBLE else ir.DataType.FLOAT


@decomposition("moe_route")
def moe_route(g: Builder, a: Args) -> tuple[Any, Any]:
    op = g.op
    dt = g.wide(a.logits, a.correction_bias)
    s = scores(g, a.logits, a.scoring, dt)
    q = s if a.correction_bias is None else op.Add(s, g.cast(a.correction_bias, dt))
    E = sdim(a.logits, 1)
    if a.num_groups > 1:
        G, per = a.num_groups, E // a.num_groups
        grouped = g.reshape(q, -1, G, per)
        best2, _ = op.TopK(grouped, g.i64(min(2, per)), axis=-1, largest=1, sorted=1)
        group_score = g.sum(best2, -1)  # [T, G]: the sum of each group's two largest q
        _, keep_ids = op.TopK(group_score, g.i64(a.topk_groups), axis=-1, largest=1, sorted=1)
        # allowed[t, e] = group(e) is among the kept groups of token t
        group_of = g.const([e // per for e in range(E)], ir.DataType.INT64)
        allowed = g.sum(g.cast(op.Equal(g.unsq(keep_ids, -1), group_of), ir.DataType.INT64), 1)
        q = op.Where(op.Greater(allowed, g.s64(0)), q, g.neg_inf_like(dt))
    _, ids = op.TopK(q, g.i64(a.top_k), axis=-1, largest=1, sorted=1)
    w = finish_weights(g, op.GatherElements(s, ids, axis=1), a.renormalize, a.scaling_factor, dt)
    return g.cast(w, _weights_dtype(dt)), g.cast(ids, ir.DataType.INT32)


@decomposition("moe_route_hash")
def moe_route_hash(g: Builder, a: Args) -> tuple[Any, Any]:
    op = g.op
    dt = g.wide(a.logits)
    ids = g.cast(op.Gather(a.tid2eid, a.token_ids, axis=0), ir.DataType.INT64)
    s = scores(g, a.logits, a.scoring, dt)
    w = finish_weights(g, op.GatherElements(s, ids, axis=1), a.renormalize, a.scaling_factor, dt)
    return g.cast(w, _weights_dtype(dt)), g.cast(ids, ir.DataType.INT32)


def dense_routing(g: Builder, topk_weights: Any, topk_ids: Any, E: int, dt) -> Any:
    """``[T, E]``: the summed weight of each expert per token; ``-1`` ids match no expert."""
    op = g.op
    experts = g.const(list(range(E)), ir.DataType.INT64)
    hit = g.cast(op.Equal(g.unsq(g.cast(topk_ids, ir.DataType.INT64), -1), experts), dt)  # [T, k, E]
    return g.sum(op.Mul(hit, g.unsq(g.cast(topk_weights, dt), -1)), 1)


def swiglu(g: Builder, h: Any, inter: int, limit: Optional[float], dt) -> Any:
    op = g.op
    gate, up = g.slice(h, 0, inter, -1), g.slice(h, inter, 2 * inter, -1)
    if limit is not None:
        gate = op.Min(gate, g.f(limit, dt))
        up = op.Clip(up, g.f(-limit, dt), g.f(limit, dt))
    return op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)


@decomposition("moe", why_not=plain("w13", "w2"))
def moe(g: Builder, a: Args) -> Any:
    op = g.op
    dt = g.wide(a.x, a.w13, a.w2)
    E, two_i = sdim(a.w13, 0), sdim(a.w13, 1)
    x = g.cast(a.x, dt)
    w13 = op.Transpose(g.cast(a.w13, dt), perm=[0, 2, 1])  # [E, H, 2I]
    w2 = op.Transpose(g.cast(a.w2, dt), perm=[0, 2, 1])  # [E, I, H]
    h = op.MatMul(g.unsq(x, 0), w13)  # [E, T, 2I]
    y = op.MatMul(swiglu(g, h, two_i // 2, a.swiglu_limit, dt), w2)  # [E, T, H]
    wd = dense_routing(g, a.topk_weights, a.topk_ids, E, dt)  # [T, E]
    out = g.sum(op.Mul(g.unsq(op.Transpose(wd, perm=[1, 0]), -1), y), 0)
    return g.cast(out, a.x.dtype)


def _expert_of_rows(g: Builder, offsets: Any, rows: Any) -> Any:
    """Group of each row for contiguous groups: ``#{e >= 1 : rows >= offsets[e]}`` (searchsorted, right)."""
    op = g.op
    bounds = op.Slice(g.cast(offsets, ir.DataType.INT64), g.i64(1), g.i64(2**62), g.i64(0))
    return g.sum(g.cast(op.GreaterOrEqual(g.unsq(rows, -1), bounds), ir.DataType.INT64), -1)


@decomposition("grouped_gemm", why_not=plain("a", "b"))
def grouped_gemm(g: Builder, a: Args) -> Any:
    op = g.op
    dt = g.wide(a.a, a.b)
    E = sdim(a.b, 0)
    A = g.cast(a.a, dt)
    full = op.MatMul(g.unsq(A, 0), op.Transpose(g.cast(a.b, dt), perm=[0, 2, 1]))  # [E, M, N]
    rows = g.arange(g.scalar_dim(A, 0))
    e = _expert_of_rows(g, a.offsets, rows)  # [M]; M (past the last group) for rows beyond offsets[E]
    mask = g.cast(op.Equal(g.unsq(e, 0), g.unsq(g.const(list(range(E)), ir.DataType.INT64), 1)), dt)  # [E, M]
    out = g.sum(op.Mul(full, g.unsq(mask, -1)), 0)
    return _out_cast(g, out, a)


def _out_cast(g: Builder, out: Any, a: Args) -> Any:
    return g.cast(out, ir.DataType(onnx_dtype(a.out_dtype)))


@decomposition("grouped_gemm_masked", why_not=plain("a", "b"))
def grouped_gemm_masked(g: Builder, a: Args) -> Any:
    op = g.op
    dt = g.wide(a.a, a.b)
    out = op.MatMul(g.cast(a.a, dt), op.Transpose(g.cast(a.b, dt), perm=[0, 2, 1]))  # [E, M_max, N]
    rows = g.arange(g.scalar_dim(a.a, 1))
    keep = op.Less(g.unsq(rows, 0), g.unsq(g.cast(a.masked_m, ir.DataType.INT64), 1))  # [E, M_max]
    out = op.Where(g.unsq(keep, -1), out, g.f(0.0, dt))
    return _out_cast(g, out, a)


@decomposition("moe_permute")
def moe_permute(g: Builder, a: Args) -> tuple[Any, Any, Any]:
    op = g.op
    E = a.num_experts
    flat = g.reshape(g.cast(a.topk_ids, ir.DataType.INT64), -1)  # [T*k], position = token*k + slot
    n = g.scalar_dim(flat, 0)
    valid = op.GreaterOrEqual(flat, g.s64(0))
    pos = op.Compress(g.arange(n), valid)  # [M]
    ids = op.Compress(flat, valid)
    # sort by (expert, position): the keys are distinct, so an ascending TopK is a stable sort
    keys = op.Add(op.Mul(ids, n), pos)
    ordered, _ = op.TopK(keys, g.dim(keys, 0), axis=0, largest=0, sorted=1)
    src_index = op.Mod(ordered, n)
    k = sdim(a.topk_ids, 1)
    x_sorted = op.Gather(a.x, op.Div(src_index, g.s64(k)), axis=0)
    counts = g.sum(g.cast(op.Equal(g.unsq(ids, 1), g.const(list(range(E)), ir.DataType.INT64)), ir.DataType.INT64), 0)
    offsets = op.Concat(g.i64(0), op.CumSum(counts, g.s64(0)), axis=0)
    return x_sorted, g.cast(offsets, ir.DataType.INT32), src_index


@decomposition("moe_combine")
def moe_combine(g: Builder, a: Args) -> Any:
    op = g.op
    dt = g.wide(a.y_sorted, a.topk_weights)
    k = sdim(a.topk_weights, 1)
    src = g.cast(a.src_index, ir.DataType.INT64)
    w = op.Gather(g.reshape(g.cast(a.topk_weights, dt), -1), src, axis=0)
    upd = op.Mul(g.cast(a.y_sorted, dt), g.unsq(w, -1))
    zeros = op.Expand(g.f(0.0, dt), op.Concat(g.dim(a.topk_weights, 0), g.dim(a.y_sorted, 1), axis=0))
    out = op.ScatterND(zeros, g.unsq(op.Div(src, g.s64(k)), -1), upd, reduction="add")
    return g.cast(out, a.y_sorted.dtype)
