"""Triton implementations of the DeepSeek sparse-attention ops (OPS.md section 3).

Each op adapts the public arguments (sequence bounds, query positions, candidate limits, all
computed on the device) and calls the kernels in :mod:`opbridge.kernels.triton`. The ``supports``
predicates say which calls the kernels cannot run; the registry turns those reasons into
``UnsupportedError``.

``kv_compress_backward`` has no Triton kernel yet: it is registered explicitly as the reference
backend's autograd recomputation (plain PyTorch on the same device), so the choice is visible.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...core.kv_cache import GROUP, packed_layout
from ...core.opdef import OPS
from ...core.sparse_attention import FP8, query_positions, seq_bounds
from ...kernels.triton import indexer as K_idx
from ...kernels.triton import kv_compress as K_kvc
from ...kernels.triton import sparse_attention as K_sa
from ...kernels.triton import sparse_attention_bwd as K_bwd
from ...kernels.triton import sparse_attention_fp8kv as K_fp8
from ...kernels.triton.sparse_attention_common import pow2
from ..reference.autograd import recompute_backward
from . import BACKEND, devices, interpreting

ATTN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_DV = 512  # the value part of one head: acc [BLOCK_H, d_v] fp32 lives in registers
MAX_DTAIL = 256


def _dt(x: torch.Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")


# ---- sparse attention ----------------------------------------------------------------------------

def _attn_reason(q: torch.Tensor, d_v: Optional[int], **kv_like: Optional[torch.Tensor]) -> Optional[str]:
    if q.dtype not in ATTN_DTYPES:
        return f"q dtype {_dt(q)} not supported (float16, bfloat16, float32)"
    for name, t in kv_like.items():
        if t is not None and t.dtype != q.dtype:
            return f"{name} dtype {_dt(t)} differs from q dtype {_dt(q)}"
    Dqk = q.shape[-1]
    dv = d_v or Dqk
    if pow2(dv) > MAX_DV:
        return f"d_v={dv} > {MAX_DV} (the output accumulator must fit in registers)"
    if Dqk - dv > 0 and pow2(Dqk - dv) > MAX_DTAIL:
        return f"key-only tail Dqk - d_v = {Dqk - dv} > {MAX_DTAIL}"
    return None


def _sa_supports(q, kv, indices, *, d_v=None, extra_kv=None, **_):
    return _attn_reason(q, d_v, kv=kv, extra_kv=extra_kv)


def _key_sets(q, kv, indices, cu_seqlens_q, cu_seqlens_k, extra_kv, extra_indices, extra_cu_seqlens_k):
    Tq = q.shape[0]
    ks, kl = K_sa.varlen_bounds(cu_seqlens_q, cu_seqlens_k, Tq, kv.shape[0], q.device)
    sets = [K_sa.KeySet(kv, indices, ks, kl)]
    if extra_kv is not None:
        eks, ekl = K_sa.varlen_bounds(cu_seqlens_q, extra_cu_seqlens_k, Tq, extra_kv.shape[0], q.device)
        sets.append(K_sa.KeySet(extra_kv, extra_indices, eks, ekl))
    return sets


@BACKEND.implement("sparse_attention", supports=_sa_supports, devices=devices())
def sparse_attention(q, kv, indices, *, scale, d_v, cu_seqlens_q, cu_seqlens_k, sink, extra_kv, extra_indices,
                     extra_cu_seqlens_k):
    sets = _key_sets(q, kv, indices, cu_seqlens_q, cu_seqlens_k, extra_kv, extra_indices, extra_cu_seqlens_k)
    return K_sa.sparse_attention_fwd(q, sets, scale=scale, d_v=d_v or q.shape[-1], sink=sink,
                                     interpret=interpreting())


# dkv is scattered with fp32 atomics: bitwise results depend on their order.
@BACKEND.implement("sparse_attention_backward", supports=lambda grads, *a, **kw: _sa_supports(*a, **kw),
                   devices=devices(), deterministic=False)
def sparse_attention_backward(grads, q, kv, indices, *, scale, d_v, cu_seqlens_q, cu_seqlens_k, sink, extra_kv,
                              extra_indices, extra_cu_seqlens_k):
    sets = _key_sets(q, kv, indices, cu_seqlens_q, cu_seqlens_k, extra_kv, extra_indices, extra_cu_seqlens_k)
    g_out, g_lse = (list(grads) + [None, None])[:2]
    dq, dkvs, dsink = K_bwd.sparse_attention_bwd(g_out, g_lse, q, sets, scale=scale, d_v=d_v or q.shape[-1],
                                                 sink=sink, interpret=interpreting())
    dkv = dkvs[0].to(kv.dtype)
    dextra = dkvs[1].to(extra_kv.dtype) if extra_kv is not None else None
    return [dq, dkv, dsink, dextra]


def _sap_supports(q, kv_cache, block_table, indices, *, d_v=None, extra_kv_cache=None, kv_cache_layout="",
                  extra_kv_cache_layout="", **_):
    L = packed_layout(kv_cache_layout)
    if L is None:
        if extra_kv_cache is not None and packed_layout(extra_kv_cache_layout) is not None:
            return "a float kv_cache with a packed extra_kv_cache (use one kind of cache for both sets)"
        return _attn_reason(q, d_v, kv_cache=kv_cache, extra_kv_cache=extra_kv_cache)
    if extra_kv_cache is not None and packed_layout(extra_kv_cache_layout) != L:
        return f"extra_kv_cache_layout must be kv_cache_layout ('{L.name}') with a packed kv_cache"
    if q.dtype not in ATTN_DTYPES:
        return f"q dtype {_dt(q)} not supported (float16, bfloat16, float32)"
    if (d_v or q.shape[-1]) != L.n_fp8:
        # The values are exactly the e4m3 channels: the kernel's value accumulators never mix in RoPE.
        return f"kv_cache_layout '{L.name}' needs d_v = {L.n_fp8} (its e4m3 channels), got {d_v or q.shape[-1]}"
    return None


def _packed_set(cache, layout: str, block_table, indices, Sq: int) -> K_fp8.PackedKeySet:
    L = packed_layout(layout)
    fmt = K_fp8.PackedFormat(L.bytes_per_token, L.n_fp8, L.n_rope, GROUP)
    return K_fp8.PackedKeySet.paged(cache, fmt, block_table, indices, Sq)


@BACKEND.implement("sparse_attention_paged", supports=_sap_supports, devices=devices())
def sparse_attention_paged(q, kv_cache, block_table, indices, *, scale, d_v, sink, extra_kv_cache,
                           extra_block_table, extra_indices, kv_cache_layout="", extra_kv_cache_layout=""):
    B, Sq, Hq, Dqk = q.shape
    dv = d_v or Dqk
    idx = indices.reshape(B * Sq, -1)
    eidx = None if extra_kv_cache is None else extra_indices.reshape(B * Sq, -1)
    if packed_layout(kv_cache_layout) is not None:
        # Packed FP8 cache: its own kernel reads the bytes and keeps the scales out of the products.
        sets = [_packed_set(kv_cache, kv_cache_layout, block_table, idx, Sq)]
        if extra_kv_cache is not None:
            sets.append(_packed_set(extra_kv_cache, extra_kv_cache_layout, extra_block_table, eidx, Sq))
        out, lse = K_fp8.sparse_attention_fp8kv_fwd(q.reshape(B * Sq, Hq, Dqk), sets, scale=scale, sink=sink,
                                                    interpret=interpreting())
        return out.view(B, Sq, Hq, dv), lse.view(B, Sq, Hq)
    sets = [K_sa.KeySet.paged(kv_cache, block_table, idx, Sq)]
    if extra_kv_cache is not None:
        sets.append(K_sa.KeySet.paged(extra_kv_cache, extra_block_table, eidx, Sq))
    out, lse = K_sa.sparse_attention_fwd(q.reshape(B * Sq, Hq, Dqk), sets, scale=scale, d_v=dv, sink=sink,
                                         interpret=interpreting())
    return out.view(B, Sq, Hq, dv), lse.view(B, Sq, Hq)


@BACKEND.implement("window_indices", devices=devices())
def window_indices(cu_seqlens_q, cu_seqlens_k, window):
    # A [Tq, window] int32 fill: plain device tensor ops are already one fused pass, no kernel needed.
    Tq, Tk = int(cu_seqlens_q[-1]), int(cu_seqlens_k[-1])
    p = query_positions(cu_seqlens_q, cu_seqlens_k, Tq, Tk, cu_seqlens_q.device)
    idx = p.unsqueeze(1) - (window - 1) + torch.arange(window, device=p.device, dtype=torch.int32)
    return torch.where(idx < 0, -1, idx).to(torch.int32)


# ---- lightning indexer ---------------------------------------------------------------------------

def _indexer_reason(q, k, weights) -> Optional[str]:
    ok = (torch.float16, torch.bfloat16, torch.float32, FP8)
    if q.dtype not in ok:
        return f"q dtype {_dt(q)} not supported (float8_e4m3fn, float16, bfloat16, float32)"
    if k.dtype != q.dtype:
        return f"k dtype {_dt(k)} differs from q dtype {_dt(q)}"
    if weights.dtype != torch.float32:
        return f"weights dtype {_dt(weights)} not supported (float32)"
    if pow2(q.shape[-1]) > 256:
        return f"head dim {q.shape[-1]} > 256"
    return None


def _limits(positions: torch.Tensor, klen: torch.Tensor, causal: bool, rate: int) -> torch.Tensor:
    """Candidate count per query: ``s < Lk`` and, causal, ``s < (p + 1) // rate``."""
    lim = klen.long()
    if causal:
        lim = torch.minimum(lim, torch.div(positions.long() + 1, rate, rounding_mode="floor"))
    return lim.clamp_min(0).to(torch.int32)


def _varlen_indexer(q, k, k_scale, cu_seqlens_q, cu_seqlens_k, causal, compress_rate, q_positions):
    Tq, Tk = q.shape[0], k.shape[0]
    ks, kl = K_sa.varlen_bounds(cu_seqlens_q, cu_seqlens_k, Tq, Tk, q.device)
    if q_positions is None:
        q_positions = query_positions(cu_seqlens_q, cu_seqlens_k, Tq, Tk, q.device)
    limit = _limits(q_positions, kl, causal, compress_rate)
    if cu_seqlens_k is None:
        width = Tk
    else:  # the one host sync: the score rows are as wide as the longest key sequence
        width = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if cu_seqlens_k.shape[0] > 1 else 0
    cu_q = seq_bounds(cu_seqlens_q, Tq, q.device)
    return K_idx.Keys(k, k_scale, kstart=ks), limit, cu_q, width


def _idx_supports(q, k, weights, *a, **kw):
    return _indexer_reason(q, k, weights)


@BACKEND.implement("indexer_logits", supports=_idx_supports, devices=devices())
def indexer_logits(q, k, weights, *, cu_seqlens_q, cu_seqlens_k, causal, compress_rate, q_positions, q_scale,
                   k_scale):
    keys, limit, cu_q, width = _varlen_indexer(q, k, k_scale, cu_seqlens_q, cu_seqlens_k, causal, compress_rate,
                                               q_positions)
    out = torch.empty((q.shape[0], width), dtype=torch.float32, device=q.device)
    if q.shape[0] and width:
        K_idx.indexer_scores(q, keys, weights, q_scale, limit, cu_q, out, 0, q.shape[0], write_masked=True,
                             interpret=interpreting())
    return out


# Which of several equal scores makes the cut depends on the order of atomic appends.
@BACKEND.implement("indexer_topk", supports=_idx_supports, devices=devices(), deterministic=False)
def indexer_topk(q, k, weights, top_k, *, cu_seqlens_q, cu_seqlens_k, causal, compress_rate, q_positions, q_scale,
                 k_scale):
    keys, limit, cu_q, width = _varlen_indexer(q, k, k_scale, cu_seqlens_q, cu_seqlens_k, causal, compress_rate,
                                               q_positions)
    return K_idx.indexer_topk(q, keys, weights, q_scale, limit, cu_q, width, top_k, interpret=interpreting())


def _idx_paged_supports(q, k_cache, block_table, context_lens, weights, *a, **kw):
    return _indexer_reason(q, k_cache, weights)


@BACKEND.implement("indexer_topk_paged", supports=_idx_paged_supports, devices=devices(), deterministic=False)
def indexer_topk_paged(q, k_cache, block_table, context_lens, weights, top_k, *, compress_rate, q_positions,
                       q_scale, k_scale):
    B, Sq, Hi, D = q.shape
    nb, bs = k_cache.shape[:2]
    L = context_lens.long().repeat_interleave(Sq)
    if q_positions is None:
        pos = L - Sq + torch.arange(Sq, device=q.device).repeat(B)
    else:
        pos = q_positions.reshape(-1).long()
    # Causal (a decode query sees its own prefix); never past the block table's capacity.
    limit = _limits(pos, L.clamp(max=block_table.shape[1] * bs), True, compress_rate)
    keys = K_idx.Keys(k_cache.reshape(nb * bs, D), k_scale, block_table=block_table.contiguous(), page=bs,
                      q_per_batch=Sq)
    cu_q = torch.arange(B + 1, device=q.device) * Sq
    out = K_idx.indexer_topk(q.reshape(B * Sq, Hi, D), keys, weights.reshape(B * Sq, Hi),
                             None if q_scale is None else q_scale.reshape(B * Sq, Hi), limit, cu_q,
                             block_table.shape[1] * bs, top_k, interpret=interpreting())
    return out.view(B, Sq, top_k)


# ---- kv_compress ---------------------------------------------------------------------------------

def _kvc_supports(kv, gate, position_bias, rate, *, prev_kv=None, prev_gate=None, **_):
    for name, t in (("kv", kv), ("gate", gate), ("position_bias", position_bias), ("prev_kv", prev_kv),
                    ("prev_gate", prev_gate)):
        if t is not None and t.dtype not in ATTN_DTYPES:
            return f"{name} dtype {_dt(t)} not supported (float16, bfloat16, float32)"
    if rate > 4096:
        return f"rate {rate} > 4096"
    return None


@BACKEND.implement("kv_compress", supports=_kvc_supports, devices=devices())
def kv_compress(kv, gate, position_bias, rate, *, overlap, prev_kv, prev_gate):
    return K_kvc.kv_compress(kv, gate, position_bias, rate, overlap=overlap, prev_kv=prev_kv, prev_gate=prev_gate,
                             interpret=interpreting())


def _kv_compress_torch(kv, gate, position_bias, rate, *, overlap, prev_kv, prev_gate):
    from ..reference.sparse_attention import kv_compress as ref  # plain PyTorch, differentiable

    return ref(kv, gate, position_bias, rate, overlap=overlap, prev_kv=prev_kv, prev_gate=prev_gate)


BACKEND.implement("kv_compress_backward", supports=lambda grads, *a, **kw: _kvc_supports(*a, **kw),
                  devices=devices())(recompute_backward(_kv_compress_torch, OPS["kv_compress"].differentiable))
