"""DeepSeek sparse attention in standard ONNX ops (OPS.md section 3).

Packed (varlen) batches are handled without loops: each query row learns its sequence from
``cu_seqlens_q`` (a comparison count, i.e. searchsorted), keys are addressed as
``cu_seqlens_k[b] + logical index``. The indexer scores every query against every packed key and
masks what is not a candidate, then takes ``TopK`` over the row padded with ``top_k`` columns of
``-inf`` so rows with fewer candidates (or fewer keys than ``top_k``) end in ``-1`` as the
contract says. Sparse attention gathers its keys with ``Gather`` and runs a masked softmax that
gives ``out = 0, lse = -inf`` for rows with no valid index.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import onnx_ir as ir
import torch

from .builder import Args, Builder, sdim
from .translations import decomposition

I64 = ir.DataType.INT64


def _no_fp8(*names: str):
    def why_not(a: Args) -> Optional[str]:
        for n in names:
            t = getattr(a, n)
            if t is not None and t.dtype == torch.float8_e4m3fn:
                return f"argument '{n}' is float8_e4m3fn; the decomposition takes float inputs (use mode 'custom')"
        return None
    return why_not


@dataclass
class Rows:
    """Per query row: sequence id ``b``, its key base/length and query base/length (all int64 ``[Tq]``)."""

    b: Any
    kbase: Any
    klen: Any
    qbase: Any
    qlen: Any


def seq_rows(g: Builder, cu_q: Any, cu_k: Any, Tq: Any, Tk: Any, rows: Any) -> Rows:
    """``Tq``/``Tk``: 0-D int64 sizes; ``rows``: ``arange(Tq)``. Without cu_seqlens: one sequence."""
    op = g.op
    if cu_q is None:
        zero = op.Mul(rows, g.s64(0))
        return Rows(zero, zero, op.Add(zero, Tk), zero, op.Add(zero, Tq))
    cq, ck = g.cast(cu_q, I64), g.cast(cu_k, I64)
    upper = op.Slice(cq, g.i64(1), g.i64(2**62), g.i64(0))
    b = g.sum(g.cast(op.GreaterOrEqual(g.unsq(rows, -1), upper), I64), -1)  # searchsorted(cu_q[1:], t, right)
    b1 = op.Add(b, g.s64(1))
    kbase, qbase = op.Gather(ck, b, axis=0), op.Gather(cq, b, axis=0)
    return Rows(b, kbase, op.Sub(op.Gather(ck, b1, axis=0), kbase), qbase, op.Sub(op.Gather(cq, b1, axis=0), qbase))


def _dequant(g: Builder, x: Any, scale: Any, dt) -> Any:
    x = g.cast(x, dt)
    return x if scale is None else g.op.Mul(x, g.unsq(g.cast(scale, dt), -1))


def index_scores(g: Builder, q: Any, kt: Any, w: Any, dt) -> Any:
    """``sum_h w[..., h] * relu(q[..., h, :] . k)``: q ``[..., Hi, D]``, kt ``[..., D, S]`` -> ``[..., S]``."""
    dots = g.op.Relu(g.op.MatMul(q, kt))  # [..., Hi, S]
    return g.sum(g.op.Mul(dots, g.unsq(g.cast(w, dt), -1)), -2)


def _positions(g: Builder, a: Args, rows: Any, R: Rows) -> Any:
    if a.q_positions is not None:
        return g.cast(a.q_positions, I64)
    op = g.op
    return op.Add(op.Sub(R.klen, R.qlen), op.Sub(rows, R.qbase))  # Lk_b - Lq_b + i


def _masked_logits(g: Builder, a: Args) -> tuple[Any, Any, Rows, Any]:
    """Scores ``[Tq, Tk]`` over the packed keys, -inf for non-candidates; also the logical column index."""
    op = g.op
    dt = g.wide(a.q, a.k, a.weights)
    qf, kf = _dequant(g, a.q, a.q_scale, dt), _dequant(g, a.k, a.k_scale, dt)
    s = index_scores(g, qf, op.Transpose(kf, perm=[1, 0]), a.weights, dt)
    Tq, Tk = g.scalar_dim(a.q, 0), g.scalar_dim(a.k, 0)
    rows = g.arange(Tq)
    R = seq_rows(g, a.cu_seqlens_q, a.cu_seqlens_k, Tq, Tk, rows)
    logical = op.Sub(g.unsq(g.arange(Tk), 0), g.unsq(R.kbase, 1))  # [Tq, Tk]
    ok = op.And(op.GreaterOrEqual(logical, g.s64(0)), op.Less(logical, g.unsq(R.klen, 1)))
    if a.causal:
        limit = op.Div(op.Add(_positions(g, a, rows, R), g.s64(1)), g.s64(a.compress_rate))
        ok = op.And(ok, op.Less(logical, g.unsq(limit, 1)))
    return op.Where(ok, s, g.neg_inf_like(dt)), logical, R, dt


def select_topk(g: Builder, scores: Any, top_k: int, base: Optional[Any], dt) -> Any:
    """The ``top_k`` best columns of each row as int32, ``-1`` where the score is -inf; ``base`` is subtracted."""
    op = g.op
    lead = op.Shape(scores, start=0, end=-1)
    pad = op.Expand(g.neg_inf_like(dt), op.Concat(lead, g.i64(top_k), axis=0))
    vals, cols = op.TopK(op.Concat(scores, pad, axis=-1), g.i64(top_k), axis=-1, largest=1, sorted=1)
    if base is not None:
        cols = op.Sub(cols, base)
    return g.cast(op.Where(op.IsInf(vals, detect_positive=0), g.s64(-1), cols), ir.DataType.INT32)


@decomposition("indexer_topk", why_not=_no_fp8("q", "k"))
def indexer_topk(g: Builder, a: Args) -> Any:
    s, _, R, dt = _masked_logits(g, a)
    return select_topk(g, s, a.top_k, g.unsq(R.kbase, 1) if a.cu_seqlens_q is not None else None, dt)


@decomposition("indexer_logits", why_not=_no_fp8("q", "k"))
def indexer_logits(g: Builder, a: Args) -> Any:
    s, _, R, dt = _masked_logits(g, a)
    if a.cu_seqlens_q is None:
        return s  # one sequence: column = logical key
    op = g.op
    ck = g.cast(a.cu_seqlens_k, I64)
    lens = op.Sub(op.Slice(ck, g.i64(1), g.i64(2**62), g.i64(0)), op.Slice(ck, g.i64(0), g.i64(-1), g.i64(0)))
    width = g.max(op.Concat(lens, g.i64(0), axis=0), 0)  # max_Lk (0 with no sequences)
    j = g.unsq(g.arange(width), 0)  # [1, W]
    Tk = g.scalar_dim(a.k, 0)
    cols = op.Min(op.Add(g.unsq(R.kbase, 1), j), op.Max(op.Sub(Tk, g.s64(1)), g.s64(0)))  # [Tq, W]
    picked = op.GatherElements(s, cols, axis=1)
    return op.Where(op.Less(j, g.unsq(R.klen, 1)), picked, g.neg_inf_like(dt))


@decomposition("indexer_topk_paged", why_not=_no_fp8("q", "k_cache"))
def indexer_topk_paged(g: Builder, a: Args) -> Any:
    op = g.op
    dt = g.wide(a.q, a.k_cache, a.weights)
    bs = g.dim(a.k_cache, 1)
    L = op.Squeeze(op.Mul(g.dim(a.block_table, 1), bs), g.i64(0))  # positions a table can hold
    pos = g.arange(L)  # [L]
    bs0 = op.Squeeze(bs, g.i64(0))
    blocks = op.Gather(g.cast(a.block_table, I64), op.Div(pos, bs0), axis=1)  # [B, L]
    rows = op.Add(op.Mul(blocks, bs0), op.Mod(pos, bs0))
    kflat = g.reshape(_dequant(g, a.k_cache, a.k_scale, dt), -1, g.dim(a.k_cache, 2))
    keys = op.Gather(kflat, rows, axis=0)  # [B, L, D]
    kt = g.unsq(op.Transpose(keys, perm=[0, 2, 1]), 1)  # [B, 1, D, L]: one key set for all queries and heads
    s = index_scores(g, _dequant(g, a.q, a.q_scale, dt), kt, a.weights, dt)  # [B, Sq, L]
    ctx = g.cast(a.context_lens, I64)
    if a.q_positions is not None:
        qpos = g.cast(a.q_positions, I64)
    else:
        Sq = g.scalar_dim(a.q, 1)
        qpos = op.Add(op.Sub(g.unsq(ctx, 1), Sq), g.unsq(g.arange(Sq), 0))  # [B, Sq]
    limit = op.Div(op.Add(qpos, g.s64(1)), g.s64(a.compress_rate))
    ok = op.And(op.Less(pos, g.unsq(ctx, 1, 2)), op.Less(pos, g.unsq(limit, -1)))
    return select_topk(g, op.Where(ok, s, g.neg_inf_like(dt)), a.top_k, None, dt)


# ---- kv_compress -------------------------------------------------------------------------------

@decomposition("kv_compress")
def kv_compress(g: Builder, a: Args) -> Any:
    op = g.op
    rate = a.rate
    dt = g.wide(a.kv, a.gate, a.position_bias)
    Dc = sdim(a.kv, 1)
    n = op.Mul(op.Div(g.dim(a.kv, 0), g.i64(rate)), g.i64(rate))  # complete windows only
    W = op.Div(n, g.i64(rate))

    def windows(t: Any) -> Any:
        return g.reshape(op.Slice(g.cast(t, dt), g.i64(0), n, g.i64(0)), -1, rate, Dc)

    x = windows(a.kv)
    gt = op.Add(windows(a.gate), g.cast(a.position_bias, dt))
    if a.overlap:
        D = Dc // 2
        if a.prev_kv is not None:
            first_kv = g.unsq(g.slice(g.cast(a.prev_kv, dt), 0, D, 1), 0)
            first_g = g.unsq(g.slice(g.cast(a.prev_gate, dt), 0, D, 1), 0)  # bias already added by the caller
        else:  # no previous window: empty slots (softmax weight 0)
            first_kv = g.const([[[0.0] * D] * rate], dt)
            first_g = op.Expand(g.neg_inf_like(dt), g.i64(1, rate, D))

        def join(first: Any, t: Any) -> Any:
            prev = op.Slice(op.Concat(first, g.slice(t, 0, D, 2), axis=0), g.i64(0), W, g.i64(0))  # window w-1
            return op.Concat(prev, g.slice(t, D, Dc, 2), axis=1)  # [W, 2*rate, D]

        x, gt = join(first_kv, x), join(first_g, gt)
    out = g.sum(op.Mul(op.Softmax(gt, axis=1), x), 1)
    return g.cast(out, a.kv.dtype)


# ---- sparse attention --------------------------------------------------------------------------

def attend(g: Builder, q: Any, keys: Any, valid: Any, scale: float, d_v: int, sink: Any, dt) -> tuple[Any, Any]:
    """q ``[N, Hq, Dqk]``, keys ``[N, J, Dqk]``, valid bool ``[N, J]`` -> out ``[N, Hq, d_v]``, lse ``[N, Hq]``."""
    op = g.op
    s = op.Mul(op.MatMul(q, op.Transpose(keys, perm=[0, 2, 1])), g.f(scale, dt))  # [N, Hq, J]
    v3 = g.unsq(valid, 1)
    s = op.Where(v3, s, g.neg_inf_like(dt))
    m = g.max(s, -1, keepdims=True)
    has = op.Not(op.IsInf(m, detect_positive=0))  # a row with no valid key has max -inf
    m = op.Where(has, m, g.f(0.0, dt))
    e = op.Exp(op.Sub(s, m))  # exp(-inf) = 0 at masked keys
    tot = g.sum(e, -1, keepdims=True)
    lse = op.Squeeze(op.Add(op.Log(tot), m), g.i64(-1))  # log(0) = -inf for rows with no key
    p = op.Div(e, op.Where(has, tot, g.f(1.0, dt)))
    out = op.MatMul(p, g.slice(keys, 0, d_v, -1))
    if sink is not None:
        out = op.Mul(out, g.unsq(op.Sigmoid(op.Sub(lse, g.cast(sink, dt))), -1))
    return out, lse


def _gather_set(g: Builder, kv: Any, idx: Any, base: Optional[Any], dt) -> tuple[Any, Any]:
    """Keys ``[Tq, K, Dqk]`` at ``base + idx`` and their validity. ``-1`` entries read an appended zero row,
    so no gather goes out of bounds, even for a sequence without keys or an empty ``kv``."""
    op = g.op
    i = g.cast(idx, I64)
    valid = op.GreaterOrEqual(i, g.s64(0))
    rows = i if base is None else op.Add(i, g.unsq(base, 1))
    kvf = g.cast(kv, dt)
    padded = op.Concat(kvf, op.Expand(g.f(0.0, dt), op.Concat(g.i64(1), g.dim(kvf, 1), axis=0)), axis=0)
    rows = op.Where(valid, rows, g.scalar_dim(kvf, 0))
    return op.Gather(padded, rows, axis=0), valid


def _lse_dtype(dt):
    return ir.DataType.DOUBLE if dt == ir.DataType.DOUBLE else ir.DataType.FLOAT


@decomposition("sparse_attention")
def sparse_attention(g: Builder, a: Args) -> tuple[Any, Any]:
    op = g.op
    dt = g.wide(a.q, a.kv)
    Dqk = sdim(a.q, 2)
    d_v = a.d_v or Dqk
    base = ebase = None
    if a.cu_seqlens_q is not None:
        Tq = g.scalar_dim(a.q, 0)
        rows = g.arange(Tq)
        base = seq_rows(g, a.cu_seqlens_q, a.cu_seqlens_k, Tq, g.scalar_dim(a.kv, 0), rows).kbase
        if a.extra_kv is not None:
            ebase = seq_rows(g, a.cu_seqlens_q, a.extra_cu_seqlens_k, Tq, g.scalar_dim(a.extra_kv, 0), rows).kbase
    keys, valid = _gather_set(g, a.kv, a.indices, base, dt)
    if a.extra_kv is not None:
        k2, v2 = _gather_set(g, a.extra_kv, a.extra_indices, ebase, dt)
        keys, valid = op.Concat(keys, k2, axis=1), op.Concat(valid, v2, axis=1)
    out, lse = attend(g, g.cast(a.q, dt), keys, valid, a.scale, d_v, a.sink, dt)
    return g.cast(out, a.q.dtype), g.cast(lse, _lse_dtype(dt))


def _float_caches(a: Args) -> Optional[str]:
    for arg in ("kv_cache_layout", "extra_kv_cache_layout"):
        layout = getattr(a, arg)
        if layout not in ("", "native"):
            return (f"argument '{arg}' is the packed '{layout}' cache; standard-op decompositions read float "
                    f"caches (dequantize_kv_cache first, or use mode 'custom')")
    return None


@decomposition("sparse_attention_paged", why_not=_float_caches)
def sparse_attention_paged(g: Builder, a: Args) -> tuple[Any, Any]:
    op = g.op
    dt = g.wide(a.q, a.kv_cache)
    Hq, Dqk = sdim(a.q, 2), sdim(a.q, 3)
    d_v = a.d_v or Dqk

    def paged(cache: Any, table: Any, idx: Any) -> tuple[Any, Any]:
        bs = op.Squeeze(g.dim(cache, 1), g.i64(0))
        i = g.cast(idx, I64)  # [B, Sq, K]
        p = op.Max(i, g.s64(0))
        blk_of = g.reshape(op.Div(p, bs), 0, -1)  # [B, Sq*K]
        blocks = g.reshape(op.GatherElements(g.cast(table, I64), blk_of, axis=1), op.Shape(i))
        rows = op.Add(op.Mul(blocks, bs), op.Mod(p, bs))
        flat = g.reshape(g.cast(cache, dt), -1, g.dim(cache, 2))
        keys = op.Gather(flat, rows, axis=0)  # [B, Sq, K, Dqk]
        return g.reshape(keys, -1, g.dim(i, 2), Dqk), g.reshape(op.GreaterOrEqual(i, g.s64(0)), -1, g.dim(i, 2))

    keys, valid = paged(a.kv_cache, a.block_table, a.indices)
    if a.extra_kv_cache is not None:
        k2, v2 = paged(a.extra_kv_cache, a.extra_block_table, a.extra_indices)
        keys, valid = op.Concat(keys, k2, axis=1), op.Concat(valid, v2, axis=1)
    lead = op.Shape(a.q, start=0, end=2)
    out, lse = attend(g, g.reshape(g.cast(a.q, dt), -1, Hq, Dqk), keys, valid, a.scale, d_v, a.sink, dt)
    out = g.reshape(out, lead, Hq, d_v)
    lse = g.reshape(lse, lead, Hq)
    return g.cast(out, a.q.dtype), g.cast(lse, _lse_dtype(dt))


@decomposition("window_indices")
def window_indices(g: Builder, a: Args) -> Any:
    op = g.op
    cq = g.cast(a.cu_seqlens_q, I64)
    Tq = op.Squeeze(op.Slice(cq, g.i64(-1), g.i64(2**62), g.i64(0)), g.i64(0))
    Tk = op.Squeeze(op.Slice(g.cast(a.cu_seqlens_k, I64), g.i64(-1), g.i64(2**62), g.i64(0)), g.i64(0))
    rows = g.arange(Tq)
    R = seq_rows(g, a.cu_seqlens_q, a.cu_seqlens_k, Tq, Tk, rows)
    p = op.Add(op.Sub(R.klen, R.qlen), op.Sub(rows, R.qbase))
    idx = op.Add(g.unsq(op.Sub(p, g.s64(a.window - 1)), 1), g.unsq(g.arange(g.s64(a.window)), 0))
    return g.cast(op.Where(op.Less(idx, g.s64(0)), g.s64(-1), idx), ir.DataType.INT32)
