"""DeepSeek sparse attention ops (OPS.md section 3): lightning indexer, KV compression, sparse MQA.

Sequences are packed (varlen) with int32 ``cu_seqlens``; indices are logical positions inside
the query's own sequence of keys, ``-1`` = none.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import checks as C
from .errors import OpError
from .kv_cache import get_layout
from .opdef import OpDef
from .registry import register_data_check

INDEXER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn)
FP8 = torch.float8_e4m3fn


def seq_ids(cu_seqlens: Optional[torch.Tensor], total: int, device: torch.device) -> torch.Tensor:
    """Sequence index of each packed row (int64 [total])."""
    if cu_seqlens is None:
        return torch.zeros(total, dtype=torch.int64, device=device)
    rows = torch.arange(total, device=device)
    return torch.searchsorted(cu_seqlens[1:].long(), rows, right=True)


def seq_bounds(cu_seqlens: Optional[torch.Tensor], total: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens as int64, defaulting to one sequence of ``total`` rows."""
    if cu_seqlens is None:
        return torch.tensor([0, total], dtype=torch.int64, device=device)
    return cu_seqlens.long()


def query_positions(cu_q: Optional[torch.Tensor], cu_k: Optional[torch.Tensor], Tq: int, Tk: int,
                    device: torch.device) -> torch.Tensor:
    """Default query positions with compress_rate=1: ``Lk_b - Lq_b + i`` (queries end their sequence)."""
    bq, bk = seq_bounds(cu_q, Tq, device), seq_bounds(cu_k, Tk, device)
    b = seq_ids(cu_q, Tq, device)
    i = torch.arange(Tq, device=device) - bq[b]
    Lq, Lk = bq[1:] - bq[:-1], bk[1:] - bk[:-1]
    return (Lk[b] - Lq[b] + i).to(torch.int32)


def _check_varlen(op: str, S: C.Shapes, q_rows: str, cu_seqlens_q, cu_seqlens_k) -> None:
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise OpError(op, "cu_seqlens_k" if cu_seqlens_q is not None else "cu_seqlens_q",
                      "given together with the other cu_seqlens (varlen needs both)", "only one of them")
    C.cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, 0, S)
    C.cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, 0, S)


def _cu_data_check(op: str, arg: str, cu: Optional[torch.Tensor], total: int) -> None:
    if cu is None:
        return
    c = cu.long()
    if int(c[0]) != 0 or int(c[-1]) != total or bool((c[1:] < c[:-1]).any()):
        raise OpError(op, arg, f"non-decreasing from 0 to {total}", str(cu.tolist()[:16]))


# ---- indexer -----------------------------------------------------------------------------------

def _indexer_common(op: str, q, k, weights, cu_seqlens_q, cu_seqlens_k, compress_rate, q_positions,
                    q_scale, k_scale) -> C.Shapes:
    C.tensor(op, "q", q, INDEXER_DTYPES)
    C.tensor(op, "k", k, INDEXER_DTYPES)
    C.tensor(op, "weights", weights, (torch.float32, torch.float64))
    S = C.Shapes(op)
    S.check("q", q.shape, ("Tq", "Hi", "D"))
    S.check("k", k.shape, ("Tk", "D"))
    S.check("weights", weights.shape, ("Tq", "Hi"))
    _check_varlen(op, S, "Tq", cu_seqlens_q, cu_seqlens_k)
    C.positive_int(op, "compress_rate", compress_rate)
    if compress_rate > 1 and q_positions is None:
        raise OpError(op, "q_positions", "an int32 [Tq] tensor when compress_rate > 1 "
                      "(raw query positions cannot be recovered from compressed keys)", "None")
    if C.optional(op, "q_positions", q_positions, (torch.int32,)) is not None:
        S.check("q_positions", q_positions.shape, ("Tq",))
    _scales(op, S, q, k, q_scale, k_scale, ("Tq", "Hi"), ("Tk",))
    C.same_device(op, q=q, k=k, weights=weights, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                  q_positions=q_positions, q_scale=q_scale, k_scale=k_scale)
    return S


def _scales(op, S, q, k, q_scale, k_scale, q_names, k_names) -> None:
    for arg, x, scale, names in (("q_scale", q, q_scale, q_names), ("k_scale", k, k_scale, k_names)):
        if x.dtype == FP8 and scale is None:
            raise OpError(op, arg, f"a float32 scale tensor because '{arg[0]}' is float8_e4m3fn", "None")
        if scale is not None:
            C.tensor(op, arg, scale, (torch.float32,))
            S.check(arg, scale.shape, names)


def _indexer_data_check(op, q, k, weights, *rest, cu_seqlens_q=None, cu_seqlens_k=None, **_) -> None:
    _cu_data_check(op, "cu_seqlens_q", cu_seqlens_q, q.shape[0])
    _cu_data_check(op, "cu_seqlens_k", cu_seqlens_k, k.shape[0])


def _topk_fake(q, k, weights, top_k, **_):
    return q.new_empty((q.shape[0], top_k), dtype=torch.int32)


_INDEXER_KW = ("*, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, bool causal, int compress_rate, Tensor? q_positions, "
               "Tensor? q_scale, Tensor? k_scale")
_TOPK = OpDef("indexer_topk", f"Tensor q, Tensor k, Tensor weights, int top_k, {_INDEXER_KW}", "Tensor", _topk_fake)
register_data_check("indexer_topk", lambda *a, **kw: _indexer_data_check("indexer_topk", *a, **kw))


def indexer_topk(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, top_k: int, *,
                 cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
                 causal: bool = True, compress_rate: int = 1, q_positions: Optional[torch.Tensor] = None,
                 q_scale: Optional[torch.Tensor] = None, k_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The lightning indexer's top-k (OPS.md 3.1).

    ``score[t, s] = sum_h weights[t,h] * relu(q[t,h] . k[s])`` (scales applied to the dot). Query
    ``t`` of sequence ``b`` at position ``p`` may pick ``s < Lk_b`` and, with ``causal``,
    ``s < (p + 1) // compress_rate``. Returns int32 ``[Tq, top_k]``: the best candidates (order
    unspecified), ``-1`` padding at the end of a row with fewer candidates.

    Args: q ``[Tq, Hi, D]`` and k ``[Tk, D]`` bf16/fp16 or float8_e4m3fn with q_scale float32
    ``[Tq, Hi]`` / k_scale float32 ``[Tk]``; weights float32 ``[Tq, Hi]``; cu_seqlens int32 ``[B+1]``;
    q_positions int32 ``[Tq]`` (required when compress_rate > 1).
    """
    op = "indexer_topk"
    _indexer_common(op, q, k, weights, cu_seqlens_q, cu_seqlens_k, compress_rate, q_positions, q_scale, k_scale)
    C.positive_int(op, "top_k", top_k)
    return _TOPK.call(q, k, weights, top_k, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                      causal=bool(causal), compress_rate=compress_rate, q_positions=q_positions,
                      q_scale=q_scale, k_scale=k_scale)


def _logits_fake(q, k, weights, *, cu_seqlens_k=None, **_):
    n = k.shape[0] if cu_seqlens_k is None else torch.library.get_ctx().new_dynamic_size()
    return q.new_empty((q.shape[0], n), dtype=C.wide_dtype(q, weights))


_LOGITS = OpDef("indexer_logits", f"Tensor q, Tensor k, Tensor weights, {_INDEXER_KW}", "Tensor", _logits_fake)
register_data_check("indexer_logits", lambda *a, **kw: _indexer_data_check("indexer_logits", *a, **kw))


def indexer_logits(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, *,
                   cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
                   causal: bool = True, compress_rate: int = 1, q_positions: Optional[torch.Tensor] = None,
                   q_scale: Optional[torch.Tensor] = None, k_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The indexer scores of :func:`indexer_topk` as float32 ``[Tq, max_Lk]``; ``-inf`` for non-candidates.

    Column ``s`` is logical key ``s`` of the query's own sequence.
    """
    _indexer_common("indexer_logits", q, k, weights, cu_seqlens_q, cu_seqlens_k, compress_rate, q_positions,
                    q_scale, k_scale)
    return _LOGITS.call(q, k, weights, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, causal=bool(causal),
                        compress_rate=compress_rate, q_positions=q_positions, q_scale=q_scale, k_scale=k_scale)


def _paged_topk_fake(q, k_cache, block_table, context_lens, weights, top_k, **_):
    return q.new_empty((q.shape[0], q.shape[1], top_k), dtype=torch.int32)


_TOPK_PAGED = OpDef(
    "indexer_topk_paged",
    "Tensor q, Tensor k_cache, Tensor block_table, Tensor context_lens, Tensor weights, int top_k, *, "
    "int compress_rate, Tensor? q_positions, Tensor? q_scale, Tensor? k_scale", "Tensor", _paged_topk_fake)


def _paged_tables_check(op: str, block_table, num_blocks: int, context_lens=None, block_size: int = 0) -> None:
    C.in_range(op, "block_table", block_table, 0, num_blocks, "block numbers")
    if context_lens is not None:
        C.in_range(op, "context_lens", context_lens, 0, block_table.shape[1] * block_size + 1, "lengths")


register_data_check("indexer_topk_paged", lambda q, kc, bt, cl, *a, **kw: _paged_tables_check(
    "indexer_topk_paged", bt, kc.shape[0], cl, kc.shape[1]))


def indexer_topk_paged(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                       context_lens: torch.Tensor, weights: torch.Tensor, top_k: int, *, compress_rate: int = 1,
                       q_positions: Optional[torch.Tensor] = None, q_scale: Optional[torch.Tensor] = None,
                       k_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decode-time indexer over a paged key cache (OPS.md 3.4).

    q ``[B, Sq, Hi, D]``; k_cache ``[num_blocks, block_size, D]`` (k_scale float32
    ``[num_blocks, block_size]`` for fp8); block_table int32 ``[B, max_blocks]``; context_lens int32
    ``[B]``; weights float32 ``[B, Sq, Hi]``. Query ``i`` of sequence ``b`` sits at position
    ``context_lens[b] - Sq + i`` (or ``q_positions[b, i]``, required when compress_rate > 1).
    Returns int32 ``[B, Sq, top_k]`` logical key positions, ``-1`` padded.
    """
    op = "indexer_topk_paged"
    C.tensor(op, "q", q, INDEXER_DTYPES)
    C.tensor(op, "k_cache", k_cache, INDEXER_DTYPES)
    C.tensor(op, "block_table", block_table, (torch.int32,))
    C.tensor(op, "context_lens", context_lens, (torch.int32,))
    C.tensor(op, "weights", weights, (torch.float32, torch.float64))
    S = C.Shapes(op)
    S.check("q", q.shape, ("B", "Sq", "Hi", "D"))
    S.check("k_cache", k_cache.shape, ("num_blocks", "block_size", "D"))
    S.check("block_table", block_table.shape, ("B", "max_blocks"))
    S.check("context_lens", context_lens.shape, ("B",))
    S.check("weights", weights.shape, ("B", "Sq", "Hi"))
    C.positive_int(op, "top_k", top_k)
    C.positive_int(op, "compress_rate", compress_rate)
    if compress_rate > 1 and q_positions is None:
        raise OpError(op, "q_positions", "an int32 [B, Sq] tensor when compress_rate > 1", "None")
    if C.optional(op, "q_positions", q_positions, (torch.int32,)) is not None:
        S.check("q_positions", q_positions.shape, ("B", "Sq"))
    _scales(op, S, q, k_cache, q_scale, k_scale, ("B", "Sq", "Hi"), ("num_blocks", "block_size"))
    C.same_device(op, q=q, k_cache=k_cache, block_table=block_table, context_lens=context_lens, weights=weights,
                  q_positions=q_positions, q_scale=q_scale, k_scale=k_scale)
    return _TOPK_PAGED.call(q, k_cache, block_table, context_lens, weights, top_k, compress_rate=compress_rate,
                            q_positions=q_positions, q_scale=q_scale, k_scale=k_scale)


# ---- kv_compress -------------------------------------------------------------------------------

def _compress_fake(kv, gate, position_bias, rate, *, overlap, prev_kv, prev_gate):
    D = kv.shape[1] // 2 if overlap else kv.shape[1]
    return kv.new_empty((kv.shape[0] // rate, D))


_COMPRESS = OpDef("kv_compress", "Tensor kv, Tensor gate, Tensor position_bias, int rate, *, bool overlap, "
                  "Tensor? prev_kv, Tensor? prev_gate", "Tensor", _compress_fake,
                  differentiable=("kv", "gate", "position_bias", "prev_kv", "prev_gate"))


def kv_compress(kv: torch.Tensor, gate: torch.Tensor, position_bias: torch.Tensor, rate: int, *,
                overlap: bool = False, prev_kv: Optional[torch.Tensor] = None,
                prev_gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DeepSeek-V4 KV compression, gated softmax pooling of ``rate`` tokens per entry (OPS.md 3.2).

    ``g[t] = gate[t] + position_bias[t % rate]`` (fp32). Without overlap (HCA): entry
    ``w = sum_j softmax_j(g[w*rate+j]) * kv[w*rate+j]`` per channel. With overlap (CSA) the inputs
    have ``2D`` channels and entry ``w`` pools ``2*rate`` slots: the first halves ``[:D]`` of window
    ``w-1`` and the second halves ``[D:]`` of window ``w``; for ``w = 0`` the previous window comes
    from ``prev_kv``/``prev_gate`` ``[rate, 2D]`` (bias already added) or is empty.
    Returns ``[Tk // rate, D]`` in the dtype of kv; an incomplete last window is dropped.
    """
    op = "kv_compress"
    C.tensor(op, "kv", kv, C.FLOAT_DTYPES)
    C.tensor(op, "gate", gate, C.FLOAT_DTYPES)
    C.tensor(op, "position_bias", position_bias, C.FLOAT_DTYPES)
    C.positive_int(op, "rate", rate)
    S = C.Shapes(op)
    S.check("kv", kv.shape, ("Tk", "Dc"))
    S.check("gate", gate.shape, ("Tk", "Dc"))
    S.check("position_bias", position_bias.shape, (rate, "Dc"))
    if overlap and S["Dc"] % 2:
        raise OpError(op, "kv", "an even channel count 2D with overlap=True", f"shape {tuple(kv.shape)}")
    for arg, t in (("prev_kv", prev_kv), ("prev_gate", prev_gate)):
        if t is not None:
            if not overlap:
                raise OpError(op, arg, "None unless overlap=True", "a tensor")
            C.tensor(op, arg, t, C.FLOAT_DTYPES)
            S.check(arg, t.shape, (rate, "Dc"))
    if (prev_kv is None) != (prev_gate is None):
        raise OpError(op, "prev_gate" if prev_gate is None else "prev_kv", "given together with its pair", "None")
    C.same_device(op, kv=kv, gate=gate, position_bias=position_bias, prev_kv=prev_kv, prev_gate=prev_gate)
    return _COMPRESS.call(kv, gate, position_bias, rate, overlap=bool(overlap), prev_kv=prev_kv, prev_gate=prev_gate)


# ---- sparse attention --------------------------------------------------------------------------

def _sa_fake(q, kv, indices, *, scale, d_v, cu_seqlens_q, cu_seqlens_k, sink, extra_kv, extra_indices,
             extra_cu_seqlens_k):
    dv = d_v or q.shape[-1]
    return q.new_empty((*q.shape[:-1], dv)), q.new_empty(q.shape[:-1], dtype=C.wide_dtype(q))


_SA = OpDef("sparse_attention",
            "Tensor q, Tensor kv, Tensor indices, *, float scale, int? d_v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
            "Tensor? sink, Tensor? extra_kv, Tensor? extra_indices, Tensor? extra_cu_seqlens_k",
            "(Tensor, Tensor)", _sa_fake, differentiable=("q", "kv", "sink", "extra_kv"))


def _indices_check(op: str, arg: str, idx: torch.Tensor, limit: torch.Tensor) -> None:
    """Data-dependent: -1 <= idx < limit (per row), no duplicates among valid ones."""
    if idx.numel() == 0:
        return
    bad = (idx < -1) | (idx >= limit.unsqueeze(-1))
    if bool(bad.any()):
        r = int(bad.flatten(0, -2).any(-1).nonzero()[0])
        raise OpError(op, arg, "-1 or a key position inside the query's own sequence",
                      f"out-of-range values in row {r}")
    s = idx.sort(-1).values
    if bool(((s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)).any()):
        raise OpError(op, arg, "no duplicate indices within a row", "duplicates")


def _sa_data_check(q, kv, indices, *, cu_seqlens_q=None, cu_seqlens_k=None, extra_kv=None, extra_indices=None,
                   extra_cu_seqlens_k=None, **_) -> None:
    op = "sparse_attention"
    Tq = q.shape[0]
    _cu_data_check(op, "cu_seqlens_q", cu_seqlens_q, Tq)
    _cu_data_check(op, "cu_seqlens_k", cu_seqlens_k, kv.shape[0])
    b = seq_ids(cu_seqlens_q, Tq, q.device)
    bk = seq_bounds(cu_seqlens_k, kv.shape[0], q.device)
    _indices_check(op, "indices", indices, (bk[1:] - bk[:-1])[b])
    if extra_kv is not None:
        _cu_data_check(op, "extra_cu_seqlens_k", extra_cu_seqlens_k, extra_kv.shape[0])
        be = seq_bounds(extra_cu_seqlens_k, extra_kv.shape[0], q.device)
        _indices_check(op, "extra_indices", extra_indices, (be[1:] - be[:-1])[b])


register_data_check("sparse_attention", _sa_data_check)


def _sa_common(op: str, S: C.Shapes, q, q_names, scale, d_v, sink) -> int:
    C.tensor(op, "q", q, C.FLOAT_DTYPES)
    S.check("q", q.shape, q_names)  # before sink, so a wrong sink is blamed on 'sink', not 'q'
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise OpError(op, "scale", "a float", type(scale).__name__)
    Dqk = q.shape[-1]
    if d_v is not None:
        C.positive_int(op, "d_v", d_v, high=Dqk)
    if C.optional(op, "sink", sink, (torch.float32, torch.float64)) is not None:
        S.check("sink", sink.shape, ("Hq",))
    return Dqk


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, *, scale: float,
                     d_v: Optional[int] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
                     cu_seqlens_k: Optional[torch.Tensor] = None, sink: Optional[torch.Tensor] = None,
                     extra_kv: Optional[torch.Tensor] = None, extra_indices: Optional[torch.Tensor] = None,
                     extra_cu_seqlens_k: Optional[torch.Tensor] = None, return_lse: bool = False):
    """Sparse MQA / absorbed-MLA attention over gathered keys (OPS.md 3.3).

    One shared KV head: keys ``kv[:, :Dqk]``, values ``kv[:, :d_v]``. For query ``t`` (sequence
    ``b``) and head ``h``: ``p = softmax_j(scale * q[t,h] . K[j])`` over the valid ``indices[t]`` and
    ``extra_indices[t]`` (into ``extra_kv``, same softmax); ``out = sum_j p_j V[j]``;
    ``lse = logsumexp_j(scale * q . K)`` float32. No valid index: out 0, lse -inf. With
    ``sink [Hq]``: ``out *= exp(lse) / (exp(lse) + exp(sink[h]))``.

    Args: q ``[Tq, Hq, Dqk]`` bf16/fp16; kv ``[Tk, Dqk]``; indices int32 ``[Tq, top_k]`` logical
    positions in the query's sequence (``-1`` ignored, no duplicates); cu_seqlens_q / cu_seqlens_k
    int32 ``[B+1]`` (opbridge adds ``cu_seqlens_q``: it maps queries to sequences);
    extra_kv ``[Tk2, Dqk]`` with extra_indices ``[Tq, top_k2]`` and extra_cu_seqlens_k.
    Returns out ``[Tq, Hq, d_v]`` (dtype of q), and lse float32 ``[Tq, Hq]`` if ``return_lse``.
    """
    op = "sparse_attention"
    S = C.Shapes(op)
    Dqk = _sa_common(op, S, q, ("Tq", "Hq", "Dqk"), scale, d_v, sink)
    C.tensor(op, "kv", kv, C.FLOAT_DTYPES)
    S.check("kv", kv.shape, ("Tk", "Dqk"))
    C.tensor(op, "indices", indices, (torch.int32,))
    S.check("indices", indices.shape, ("Tq", "top_k"))
    _check_varlen(op, S, "Tq", cu_seqlens_q, cu_seqlens_k)
    if (extra_kv is None) != (extra_indices is None):
        raise OpError(op, "extra_indices" if extra_kv is not None else "extra_kv", "given together with its pair", "None")
    if extra_kv is not None:
        C.tensor(op, "extra_kv", extra_kv, C.FLOAT_DTYPES)
        S.check("extra_kv", extra_kv.shape, ("Tk2", "Dqk"))
        C.tensor(op, "extra_indices", extra_indices, (torch.int32,))
        S.check("extra_indices", extra_indices.shape, ("Tq", "top_k2"))
        if (extra_cu_seqlens_k is None) != (cu_seqlens_q is None):
            raise OpError(op, "extra_cu_seqlens_k", "given exactly when cu_seqlens_q is (varlen)",
                          "None" if extra_cu_seqlens_k is None else "a tensor")
        C.cu_seqlens(op, "extra_cu_seqlens_k", extra_cu_seqlens_k, 0, S)
    elif extra_cu_seqlens_k is not None:
        raise OpError(op, "extra_cu_seqlens_k", "None without extra_kv", "a tensor")
    C.same_device(op, q=q, kv=kv, indices=indices, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, sink=sink,
                  extra_kv=extra_kv, extra_indices=extra_indices, extra_cu_seqlens_k=extra_cu_seqlens_k)
    out, lse = _SA.call(q, kv, indices, scale=float(scale), d_v=d_v, cu_seqlens_q=cu_seqlens_q,
                        cu_seqlens_k=cu_seqlens_k, sink=sink, extra_kv=extra_kv, extra_indices=extra_indices,
                        extra_cu_seqlens_k=extra_cu_seqlens_k)
    return (out, lse) if return_lse else out


def _sap_fake(q, kv_cache, block_table, indices, *, scale, d_v, sink, extra_kv_cache, extra_block_table,
              extra_indices, kv_cache_layout="", extra_kv_cache_layout=""):
    dv = d_v or q.shape[-1]  # q's last dim is Dqk for every cache layout
    return q.new_empty((*q.shape[:-1], dv)), q.new_empty(q.shape[:-1], dtype=C.wide_dtype(q))


_SAP = OpDef("sparse_attention_paged",
             "Tensor q, Tensor kv_cache, Tensor block_table, Tensor indices, *, float scale, int? d_v, Tensor? sink, "
             "Tensor? extra_kv_cache, Tensor? extra_block_table, Tensor? extra_indices, str kv_cache_layout, "
             "str extra_kv_cache_layout", "(Tensor, Tensor)", _sap_fake)


def _sap_data_check(q, kv_cache, block_table, indices, *, extra_kv_cache=None, extra_block_table=None,
                    extra_indices=None, **_) -> None:
    op = "sparse_attention_paged"
    _paged_tables_check(op, block_table, kv_cache.shape[0])
    cap = torch.full(indices.shape[:-1], block_table.shape[1] * kv_cache.shape[1], device=q.device)
    _indices_check(op, "indices", indices, cap)
    if extra_kv_cache is not None:
        _paged_tables_check(op, extra_block_table, extra_kv_cache.shape[0])
        cap = torch.full(extra_indices.shape[:-1], extra_block_table.shape[1] * extra_kv_cache.shape[1], device=q.device)
        _indices_check(op, "extra_indices", extra_indices, cap)


register_data_check("sparse_attention_paged", _sap_data_check)


def sparse_attention_paged(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                           indices: torch.Tensor, *, scale: float, d_v: Optional[int] = None,
                           sink: Optional[torch.Tensor] = None, extra_kv_cache: Optional[torch.Tensor] = None,
                           extra_block_table: Optional[torch.Tensor] = None,
                           extra_indices: Optional[torch.Tensor] = None, return_lse: bool = False,
                           kv_cache_layout: str = "native", extra_kv_cache_layout: str = "native"):
    """Sparse attention for decode over a paged KV cache (OPS.md 3.4); same math as :func:`sparse_attention`.

    q ``[B, Sq, Hq, Dqk]``; kv_cache ``[num_blocks, block_size, Dqk]``; block_table int32
    ``[B, max_blocks]``; indices int32 ``[B, Sq, top_k]`` logical positions of sequence ``b``
    (position ``p`` lives in block ``block_table[b, p // block_size]``, slot ``p % block_size``).
    Returns out ``[B, Sq, Hq, d_v]`` and, if ``return_lse``, lse float32 ``[B, Sq, Hq]``.

    ``kv_cache_layout`` (``extra_kv_cache_layout`` for ``extra_kv_cache``): ``"native"`` (a float
    cache as above) or a packed FP8 cache of :mod:`opbridge.core.kv_cache`, uint8
    ``[num_blocks, block_size, bytes_per_token]`` made by ``quantize_kv_cache``:
    ``"fp8_ds_mla"`` (656 bytes per token, Dqk = 576, V3.2) or ``"fp8_ds_v4"`` (528 bytes, Dqk = 512).
    The attention then runs on the dequantized tokens (``dequantize_kv_cache``); q's last dim must
    be the layout's Dqk.
    """

    op = "sparse_attention_paged"
    S = C.Shapes(op)
    _sa_common(op, S, q, ("B", "Sq", "Hq", "Dqk"), scale, d_v, sink)
    layout = get_layout(op, "kv_cache_layout", kv_cache_layout)
    extra_layout = get_layout(op, "extra_kv_cache_layout", extra_kv_cache_layout)

    def cache(arg: str, t: torch.Tensor, L, names: tuple) -> None:
        if L is None:
            C.tensor(op, arg, t, C.FLOAT_DTYPES)
            S.check(arg, t.shape, (*names, "Dqk"))
            return
        C.tensor(op, arg, t, (torch.uint8,))
        S.check(arg, t.shape, (*names, L.bytes_per_token))
        if q.shape[-1] != L.dqk:
            raise OpError(op, "q", f"last dim {L.dqk} (Dqk of {arg}_layout='{L.name}')", f"shape {tuple(q.shape)}")

    cache("kv_cache", kv_cache, layout, ("num_blocks", "block_size"))
    C.tensor(op, "block_table", block_table, (torch.int32,))
    S.check("block_table", block_table.shape, ("B", "max_blocks"))
    C.tensor(op, "indices", indices, (torch.int32,))
    S.check("indices", indices.shape, ("B", "Sq", "top_k"))
    given = [extra_kv_cache is not None, extra_block_table is not None, extra_indices is not None]
    if any(given) and not all(given):
        raise OpError(op, "extra_kv_cache", "extra_kv_cache, extra_block_table and extra_indices given together",
                      f"only {sum(given)} of them")
    if extra_kv_cache is not None:
        cache("extra_kv_cache", extra_kv_cache, extra_layout, ("num_blocks2", "block_size2"))
        C.tensor(op, "extra_block_table", extra_block_table, (torch.int32,))
        S.check("extra_block_table", extra_block_table.shape, ("B", "max_blocks2"))
        C.tensor(op, "extra_indices", extra_indices, (torch.int32,))
        S.check("extra_indices", extra_indices.shape, ("B", "Sq", "top_k2"))
    elif extra_layout is not None:
        raise OpError(op, "extra_kv_cache_layout", "'native' without extra_kv_cache", repr(extra_kv_cache_layout))
    C.same_device(op, q=q, kv_cache=kv_cache, block_table=block_table, indices=indices, sink=sink,
                  extra_kv_cache=extra_kv_cache, extra_block_table=extra_block_table, extra_indices=extra_indices)
    # "native" travels as "" so a float-cache call looks as it did before packed layouts existed
    # (same exported ONNX node, no attribute); backends read either through kv_cache.packed_layout.
    out, lse = _SAP.call(q, kv_cache, block_table, indices, scale=float(scale), d_v=d_v, sink=sink,
                         extra_kv_cache=extra_kv_cache, extra_block_table=extra_block_table,
                         extra_indices=extra_indices, kv_cache_layout=layout.name if layout else "",
                         extra_kv_cache_layout=extra_layout.name if extra_layout else "")
    return (out, lse) if return_lse else out


# ---- window_indices ----------------------------------------------------------------------------

def _window_fake(cu_seqlens_q, cu_seqlens_k, window):
    Tq = torch.library.get_ctx().new_dynamic_size()
    return cu_seqlens_q.new_empty((Tq, window), dtype=torch.int32)


_WINDOW = OpDef("window_indices", "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int window", "Tensor", _window_fake)


def window_indices(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, window: int) -> torch.Tensor:
    """Causal sliding-window indices (OPS.md 3.3): row ``t`` is ``p-window+1 .. p`` (``-1`` where negative).

    Query ``i`` of sequence ``b`` sits at ``p = Lk_b - Lq_b + i``. Returns int32 ``[Tq, window]``,
    so sliding-window attention is :func:`sparse_attention` with these indices.
    """
    op = "window_indices"
    S = C.Shapes(op)
    C.tensor(op, "cu_seqlens_q", cu_seqlens_q, (torch.int32,))
    C.tensor(op, "cu_seqlens_k", cu_seqlens_k, (torch.int32,))
    S.check("cu_seqlens_q", cu_seqlens_q.shape, ("B+1",))
    S.check("cu_seqlens_k", cu_seqlens_k.shape, ("B+1",))
    C.positive_int(op, "window", window)
    C.same_device(op, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    return _WINDOW.call(cu_seqlens_q, cu_seqlens_k, window)
