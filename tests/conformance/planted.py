"""Copies of reference implementations, each with one planted bug, and a temporary backend for them.

Each copy below is the reference backend's code for one op with exactly one line changed (marked
``BUG``). :func:`planted_backend` registers a backend named ``planted`` holding the reference
implementations of every op except the one replaced, so the conformance suite runs the buggy op
through the public API while its oracle stays the untouched reference backend.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch

from opbridge.backends.reference import moe as ref_moe
from opbridge.backends.reference import sparse_attention as ref_sa
from opbridge.core import registry, settings
from opbridge.core.checks import wide_dtype
from opbridge.core.formats import QuantTensor, dequantize_if
from opbridge.core.registry import Availability, Backend, OpImpl
from opbridge.core.sparse_attention import query_positions, seq_bounds

NAME = "planted"


@contextlib.contextmanager
def planted_backend(op: Optional[str] = None, fn: Optional[Callable] = None) -> Iterator[str]:
    """A backend ``planted``: the reference's implementations, with ``op`` replaced by ``fn``."""
    reference = registry.get_backend("reference")
    backend = Backend(NAME, lambda: Availability(True), deterministic=True)
    backend.impls.update({k: v for k, v in reference.impls.items() if not k.endswith("_backward")})
    if op is not None:
        backend.impls[op] = OpImpl(fn)
    old_names = settings.BACKEND_NAMES
    settings.BACKEND_NAMES = old_names + (NAME,)  # so use_backend('planted') is a valid choice
    registry.register_backend(backend)
    try:
        yield NAME
    finally:
        registry._backends.pop(NAME, None)
        settings.BACKEND_NAMES = old_names


# ---- mhc_post: comb used untransposed ----------------------------------------------------------

def mhc_post_untransposed(f, residual, post, comb):
    dt = wide_dtype(f, residual, post, comb)
    mixed = torch.einsum("...kj,...jc->...kc", comb.to(dt), residual.to(dt))  # BUG: row k of comb feeds stream k
    return (post.to(dt).unsqueeze(-1) * f.to(dt).unsqueeze(-2) + mixed).to(residual.dtype)


# ---- indexer_topk: causal boundary off by one; compress_rate ignored ---------------------------

def _indexer_topk_with(allowed: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]):
    def scores(qf, kf, w, pos, Lk, width, causal, rate):
        s = torch.einsum("thd,sd->ths", qf, kf).relu()
        s = (s * w.unsqueeze(-1)).sum(1)
        cols = torch.arange(Lk, device=qf.device)
        ok = torch.ones_like(s, dtype=torch.bool)
        if causal:
            ok = allowed(cols, pos, rate)
        out = s.new_full((qf.shape[0], width), float("-inf"))
        out[:, :Lk] = s.masked_fill(~ok, float("-inf"))
        return out

    def indexer_topk(q, k, weights, top_k, *, cu_seqlens_q, cu_seqlens_k, causal, compress_rate, q_positions,
                     q_scale, k_scale):
        dt = wide_dtype(q, k, weights)
        Tq, Tk = q.shape[0], k.shape[0]
        qf, kf, w = ref_sa._dequant(q, q_scale, dt), ref_sa._dequant(k, k_scale, dt), weights.to(dt)
        if q_positions is None:
            q_positions = query_positions(cu_seqlens_q, cu_seqlens_k, Tq, Tk, q.device)
        bq = seq_bounds(cu_seqlens_q, Tq, q.device).tolist()
        bk = seq_bounds(cu_seqlens_k, Tk, q.device).tolist()
        width = max([hi - lo for lo, hi in zip(bk[:-1], bk[1:])] + [0])
        out = qf.new_full((Tq, width), float("-inf"))
        for b in range(len(bq) - 1):
            q0, q1, k0, k1 = bq[b], bq[b + 1], bk[b], bk[b + 1]
            if q1 > q0:
                out[q0:q1] = scores(qf[q0:q1], kf[k0:k1], w[q0:q1], q_positions[q0:q1], k1 - k0, width, causal,
                                    compress_rate)
        return ref_sa._select(out, top_k)

    return indexer_topk


# BUG: s <= (p+1)//m lets the query see one key past its causal boundary.
indexer_topk_off_by_one = _indexer_topk_with(
    lambda cols, pos, rate: cols.unsqueeze(0) <= ((pos.long() + 1) // rate).unsqueeze(1))
# BUG: the compress rate is ignored: s < p+1 counts raw positions, not compressed entries.
indexer_topk_rate_ignored = _indexer_topk_with(
    lambda cols, pos, rate: cols.unsqueeze(0) < (pos.long() + 1).unsqueeze(1))


# ---- moe_route: weights renormalised before choosing ids ---------------------------------------

def moe_route_renormalised_first(logits, top_k, *, scoring, correction_bias, num_groups, topk_groups, renormalize,
                                 scaling_factor):
    dt = wide_dtype(logits, correction_bias)
    s = ref_moe.scores(logits.to(dt), scoring)
    s = s / s.sum(-1, keepdim=True)  # BUG: renormalised over all experts before the selection
    q = s if correction_bias is None else s + correction_bias.to(dt)
    if num_groups > 1:
        T, E = q.shape
        grouped = q.view(T, num_groups, E // num_groups)
        group_score = grouped.sort(-1, descending=True).values[..., :2].sum(-1)
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, ref_moe._top(group_score, topk_groups), True)
        q = q.masked_fill(~keep.repeat_interleave(E // num_groups, dim=1), float("-inf"))
    ids = ref_moe._top(q, top_k)
    w = ref_moe._finish_weights(s.gather(1, ids), renormalize, scaling_factor)
    return w.float() if dt != torch.float64 else w, ids.to(torch.int32)


# ---- grouped_gemm: offsets shifted by one row; fp8 scale applied twice -------------------------

def grouped_gemm_shifted(a, b, offsets, *, out_dtype):
    dt, (a_, b_) = ref_moe._operands(a, b)
    M = a_.shape[0]
    bounds = [min(o + 1, M) for o in offsets.tolist()]  # BUG: every group starts one row late
    out = a_.new_zeros((M, b_.shape[1]))
    for e in range(b_.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = a_[lo:hi] @ b_[e].T
    return out.to(out_dtype)


def _scale_twice(x):
    if isinstance(x, QuantTensor) and x.fmt == "fp8":
        return QuantTensor(x.data, x.scale * x.scale, x.fmt, x.block)  # BUG: value = fp8 * s * s
    return x


def grouped_gemm_scale_twice(a, b, offsets, *, out_dtype):
    return ref_moe.grouped_gemm(_scale_twice(a), _scale_twice(b), offsets, out_dtype=out_dtype)


# ---- moe: -1 ids treated as expert 0 -----------------------------------------------------------

def moe_minus_one_as_zero(x, topk_weights, topk_ids, w13, w2, *, activation, swiglu_limit):
    dt = wide_dtype(x, w13, w2)
    x_, w13_, w2_ = (dequantize_if(t).to(dt) for t in (x, w13, w2))
    tw = topk_weights.to(dt)
    out = x_.new_zeros(x_.shape)
    ids = topk_ids.long().clamp_min(0)  # BUG: "no expert" becomes expert 0
    for e in ids.unique().tolist():
        rows, slots = (ids == e).nonzero(as_tuple=True)
        act = ref_moe.swiglu(x_[rows] @ w13_[e].T, swiglu_limit)
        out = out.index_add(0, rows, (act @ w2_[e].T) * tw[rows, slots].unsqueeze(-1))
    return out.to(x.dtype)


# ---- sparse_attention: sink ignored ------------------------------------------------------------

def sparse_attention_sink_ignored(q, kv, indices, *, sink, **kw):
    return ref_sa.sparse_attention(q, kv, indices, sink=None, **kw)  # BUG: the per-head sink is dropped


# ---- kv_compress: overlap halves swapped -------------------------------------------------------

def kv_compress_halves_swapped(kv, gate, position_bias, rate, *, overlap, prev_kv, prev_gate):
    dt = wide_dtype(kv, gate, position_bias)
    W, Dc = kv.shape[0] // rate, kv.shape[1]
    x = kv[: W * rate].to(dt).view(W, rate, Dc)
    g = gate[: W * rate].to(dt).view(W, rate, Dc) + position_bias.to(dt)
    if overlap:
        D = Dc // 2
        if prev_kv is not None:
            first_kv, first_g = prev_kv.to(dt)[None, :, D:], prev_gate.to(dt)[None, :, D:]
        else:
            first_kv = x.new_zeros((1, rate, D))
            first_g = x.new_full((1, rate, D), float("-inf"))
        # BUG: the previous window contributes its second half and the own window its first half.
        x = torch.cat([torch.cat([first_kv, x[:-1, :, D:]]), x[:, :, :D]], dim=1)
        g = torch.cat([torch.cat([first_g, g[:-1, :, D:]]), g[:, :, :D]], dim=1)
    return (g.softmax(dim=1) * x).sum(1).to(kv.dtype)


# name -> (op, buggy implementation, case ids that must fail)
BUGS = {
    "mhc_post comb untransposed": ("mhc_post", mhc_post_untransposed, ["mhc_post/v4-pro", "mhc_post/n6"]),
    "indexer_topk causal off by one": ("indexer_topk", indexer_topk_off_by_one,
                                       ["indexer_topk/v32-prefill", "indexer_topk/causal-boundary"]),
    "indexer_topk compress_rate ignored": ("indexer_topk", indexer_topk_rate_ignored,
                                           ["indexer_topk/v4-csa", "indexer_topk/hca-rate128"]),
    "moe_route weights renormalised before choosing ids": ("moe_route", moe_route_renormalised_first,
                                                           ["moe_route/v3", "moe_route/v4-pro"]),
    "grouped_gemm offsets shifted by one row": ("grouped_gemm", grouped_gemm_shifted,
                                                ["grouped_gemm/v3-w13-bf16", "grouped_gemm/empty-experts"]),
    "moe -1 ids treated as expert 0": ("moe", moe_minus_one_as_zero, ["moe/ids-minus-one", "moe/one-expert"]),
    "grouped_gemm fp8 scale applied twice": ("grouped_gemm", grouped_gemm_scale_twice,
                                             ["grouped_gemm/v3-fp8", "grouped_gemm/v4-fp8-mxfp4"]),
    "sparse_attention sink ignored": ("sparse_attention", sparse_attention_sink_ignored,
                                      ["sparse_attention/v4-csa-window-sink", "sparse_attention/v4-hca-window-sink"]),
    "kv_compress overlap halves swapped": ("kv_compress", kv_compress_halves_swapped,
                                           ["kv_compress/v4-csa", "kv_compress/v4-csa-first"]),
}
