"""DeepSeek sparse attention on CANN: the lightning indexer (npu_lightning_indexer) and sparse MLA
attention (npu_sparse_flash_attention, attention_mode=2).

OPS.md packs sequences (varlen, cu_seqlens) and keeps MLA's 576 = 512 latent + 64 rope channels in
one tensor; CANN's TND layout takes cumulative lengths and wants the latent and rope parts as
separate contiguous tensors. The helpers at the top state each of those conversions once.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...core.sparse_attention import FP8
from . import BACKEND
from . import capabilities as caps
from .capabilities import Platform
from .runtime import call, never_called, platform, supports, unsupported

LI, SFA = "npu_lightning_indexer", "npu_sparse_flash_attention"
HALF = (torch.float16, torch.bfloat16)
LATENT, ROPE = caps.limit(SFA, "latent_dim"), caps.limit(SFA, "rope_dim")


# ---- conventions -------------------------------------------------------------------------------

def cumulative_lengths(cu_seqlens: Optional[torch.Tensor], total: int, device: torch.device) -> torch.Tensor:
    """OPS cu_seqlens [B+1] (None: one sequence) -> TND's actual_seq_lengths int32 [B]: cumulative ends."""
    if cu_seqlens is None:
        return torch.tensor([total], dtype=torch.int32, device=device)
    return cu_seqlens[1:].to(torch.int32).contiguous()


def split_latent(x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """[..., 576] -> ([..., 512] latent, [..., 64] rope) as separate contiguous tensors (CANN's query /
    query_rope, key / key_rope); [..., 512] -> (itself, None). A copy for 576: the vendor op takes
    the two parts as distinct contiguous inputs."""
    if x.shape[-1] == LATENT:
        return x.contiguous(), None
    return x[..., :LATENT].contiguous(), x[..., LATENT:].contiguous()


def valid_first(indices: torch.Tensor) -> torch.Tensor:
    """SFA reads each row's indices up to the first -1; OPS allows -1 anywhere in a row. Sorting
    descending moves every -1 to the end and keeps each valid index once (attention does not
    depend on the order of its keys)."""
    return indices.sort(dim=-1, descending=True).values.contiguous()


def sparse_count(top_k: int) -> Optional[int]:
    """The smallest sparse_count the indexer accepts that covers ``top_k``: its output is sorted by
    score, so the first top_k of a larger count are the top_k best."""
    if top_k <= caps.limit(LI, "sparse_counts_upto"):
        return top_k
    return next((c for c in caps.limit(LI, "sparse_counts_extra") if c >= top_k), None)


# ---- checks ------------------------------------------------------------------------------------

def _heads_reason(p: Platform, op: str, heads: int) -> Optional[str]:
    allowed, most = caps.limit(op, "heads", p.family), caps.limit(op, "max_heads", p.family)
    if allowed is not None and heads not in allowed:
        return f"{op} supports {allowed} query heads on {p.soc}; got {heads}"
    if most is not None and heads > most:
        return f"{op} supports at most {most} query heads on {p.soc}; got {heads}"
    return None


def _indexer_reason(p: Platform, q, k, D: int, heads: int, top_k: int) -> Optional[str]:
    if q.dtype == FP8 or k.dtype == FP8:
        return caps.feature_reason(p, "li_fp8")
    if q.dtype not in HALF or k.dtype != q.dtype:
        return f"{LI} takes bfloat16/float16 query and key of one dtype; got {q.dtype} and {k.dtype}"
    if D != caps.limit(LI, "head_dim"):
        return f"{LI} supports head dim D={caps.limit(LI, 'head_dim')} only; got D={D}"
    if sparse_count(top_k) is None:
        return (f"{LI} keeps at most {caps.limit(LI, 'sparse_counts_extra')[-1]} indices per query "
                f"(sparse_count); got top_k={top_k}")
    return _heads_reason(p, LI, heads)


def _li_weights(p: Platform, weights: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """float32 weights where CANN takes them (A2/A3); elsewhere the query dtype (the doc's other choice)."""
    dt = torch.float32 if caps.has_feature(p, "li_weights_fp32") else q.dtype
    return weights.to(dt).contiguous()


_POSITIONS = (f"{LI} derives query positions from the sequence lengths (sparse_mode=3: query i of a "
              f"sequence sees keys j <= Lk - Lq + i)")


def _topk_check(p, q, k, weights, top_k, *, cu_seqlens_q, cu_seqlens_k, causal, compress_rate, q_positions,
                q_scale, k_scale):
    if causal and compress_rate != 1:
        return f"{_POSITIONS}; causal selection over compressed keys (compress_rate={compress_rate}) is not expressible"
    if causal and q_positions is not None:
        return f"{_POSITIONS}; explicit q_positions are not expressible"
    return _indexer_reason(p, q, k, q.shape[-1], q.shape[1], top_k)


@BACKEND.implement("indexer_topk", supports=supports(LI, check=_topk_check))
def indexer_topk(q, k, weights, top_k, *, cu_seqlens_q, cu_seqlens_k, causal, compress_rate, q_positions,
                 q_scale, k_scale):
    Tq, _, D = q.shape
    Tk = k.shape[0]
    if Tq == 0:
        return torch.empty((0, top_k), dtype=torch.int32, device=q.device)
    idx, _ = call("indexer_topk", LI, q.contiguous(), k.reshape(Tk, 1, D).contiguous(),
                  _li_weights(platform(q.device), weights, q),
                  actual_seq_lengths_query=cumulative_lengths(cu_seqlens_q, Tq, q.device),
                  actual_seq_lengths_key=cumulative_lengths(cu_seqlens_k, Tk, q.device),
                  layout_query="TND", layout_key="TND", sparse_count=sparse_count(top_k),
                  sparse_mode=3 if causal else 0)  # 0: every key of the sequence is a candidate
    return idx[:, 0, :top_k].contiguous()


def _paged_topk_check(p, q, k_cache, block_table, context_lens, weights, top_k, *, compress_rate, q_positions,
                      q_scale, k_scale):
    if compress_rate != 1:
        return f"{_POSITIONS}; compressed keys (compress_rate={compress_rate}) need q_positions, not expressible"
    if q_positions is not None:
        return f"{_POSITIONS}; explicit q_positions are not expressible"
    bs, mult, most = k_cache.shape[1], caps.limit(LI, "block_size_multiple"), caps.limit(LI, "max_block_size")
    if bs % mult or bs > most:
        return f"{LI} (PA_BSND) needs a block_size that is a multiple of {mult} and <= {most}; got {bs}"
    return _indexer_reason(p, q, k_cache, q.shape[-1], q.shape[2], top_k)


@BACKEND.implement("indexer_topk_paged", supports=supports(LI, check=_paged_topk_check))
def indexer_topk_paged(q, k_cache, block_table, context_lens, weights, top_k, *, compress_rate, q_positions,
                       q_scale, k_scale):
    B, Sq, _, D = q.shape
    nb, bs, _ = k_cache.shape
    # BSND queries with actual_seq_lengths_query=None (= Sq for every batch) and per-sequence key
    # lengths: query i of batch b sits at context_lens[b] - Sq + i, as OPS 3.4 says.
    idx, _ = call("indexer_topk_paged", LI, q.contiguous(), k_cache.reshape(nb, bs, 1, D).contiguous(),
                  _li_weights(platform(q.device), weights, q), actual_seq_lengths_key=context_lens.contiguous(),
                  block_table=block_table.contiguous(), layout_query="BSND", layout_key="PA_BSND",
                  sparse_count=sparse_count(top_k), sparse_mode=3)
    return idx[:, :, 0, :top_k].contiguous()


# ---- sparse attention --------------------------------------------------------------------------

_ONE_KEY_SET = (f"{SFA} attends to one key set; extra_kv / extra_indices (a second key set in the same softmax) "
                f"cannot be expressed")


def _sfa_reason(p: Platform, q, kv, d_v: Optional[int], heads: int) -> Optional[str]:
    if q.dtype not in HALF or kv.dtype != q.dtype:
        return f"{SFA} takes bfloat16/float16 query and key of one dtype; got {q.dtype} and {kv.dtype}"
    Dqk = q.shape[-1]
    if Dqk not in (LATENT, LATENT + ROPE):
        return (f"{SFA} (attention_mode=2, absorbed MLA) takes a {LATENT}-dim latent plus an optional {ROPE}-dim "
                f"rope part (Dqk {LATENT + ROPE} or {LATENT}); got Dqk={Dqk}")
    if (d_v or Dqk) != LATENT:
        return f"{SFA} returns the {LATENT}-dim latent as values (d_v={LATENT}); got d_v={d_v or Dqk}"
    return _heads_reason(p, SFA, heads)


def _attend(op: str, q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float,
            asl_q: torch.Tensor, asl_kv: torch.Tensor, sink: Optional[torch.Tensor]):
    """One TND call of npu_sparse_flash_attention: q [T, H, Dqk], kv [Tk, Dqk], indices [T, top_k]."""
    T, H, _ = q.shape
    if T == 0:
        return q.new_zeros((0, H, LATENT)), torch.empty((0, H), dtype=torch.float32, device=q.device)
    qn, qr = split_latent(q)
    kn, kr = split_latent(kv)
    Tk = kv.shape[0]
    kn = kn.view(Tk, 1, LATENT)  # one shared KV head (KV_N = 1); key and value are the same latent tensor
    kr = None if kr is None else kr.view(Tk, 1, ROPE)
    out, smax, ssum = call(op, SFA, qn, kn, kn, valid_first(indices).view(T, 1, -1), float(scale),
                           actual_seq_lengths_query=asl_q, actual_seq_lengths_kv=asl_kv, query_rope=qr, key_rope=kr,
                           sparse_block_size=1, layout_query="TND", layout_kv="TND",
                           sparse_mode=0,  # no mask: the indices alone choose the keys (OPS 3.3)
                           attention_mode=2,  # MLA-absorbed; the schema's default 0 is not a supported mode
                           return_softmax_lse=True)
    lse = (smax + ssum.log())[0]  # softmax_max / softmax_sum are [KV_N=1, T, H]
    # A row without a valid index has no softmax: OPS wants out 0 and lse -inf; CANN leaves it undefined.
    valid = (indices >= 0).any(-1)
    lse = torch.where(valid.unsqueeze(-1), lse, torch.full_like(lse, float("-inf")))
    o = out.float()
    if sink is not None:  # a per-head sink joins the denominator: exp(lse) / (exp(lse) + exp(sink))
        o = o * torch.sigmoid(lse - sink.float()).unsqueeze(-1)
    o = torch.where(valid[:, None, None], o, torch.zeros((), dtype=o.dtype, device=o.device))
    return o.to(q.dtype), lse


def _sa_check(p, q, kv, indices, *, scale, d_v, cu_seqlens_q, cu_seqlens_k, sink, extra_kv, extra_indices,
              extra_cu_seqlens_k):
    if extra_kv is not None:
        return _ONE_KEY_SET
    return _sfa_reason(p, q, kv, d_v, q.shape[1])


@BACKEND.implement("sparse_attention", supports=supports(SFA, check=_sa_check))
def sparse_attention(q, kv, indices, *, scale, d_v, cu_seqlens_q, cu_seqlens_k, sink, extra_kv, extra_indices,
                     extra_cu_seqlens_k):
    # TND with cumulative lengths: indices stay logical positions inside each query's own sequence.
    return _attend("sparse_attention", q, kv, indices, scale, cumulative_lengths(cu_seqlens_q, q.shape[0], q.device),
                   cumulative_lengths(cu_seqlens_k, kv.shape[0], q.device), sink)


def paged_to_slots(indices: torch.Tensor, block_table: torch.Tensor, block_size: int) -> torch.Tensor:
    """Logical positions of sequence b -> slots of the flattened cache: block_table[b, p // bs] * bs + p % bs.

    -1 stays -1; an out-of-range position is clamped to the table (never read out of bounds).
    """
    B, Sq, K = indices.shape
    p = indices.long().clamp(min=0)
    blk = (p // block_size).clamp(max=block_table.shape[1] - 1)
    slots = block_table.long().gather(1, blk.view(B, Sq * K)).view(B, Sq, K) * block_size + p % block_size
    return torch.where(indices >= 0, slots, torch.full_like(slots, -1)).to(torch.int32)


def _sap_check(p, q, kv_cache, block_table, indices, *, scale, d_v, sink, extra_kv_cache, extra_block_table,
               extra_indices, kv_cache_layout="", extra_kv_cache_layout=""):
    if kv_cache_layout not in ("", "native"):
        return (f"packed KV cache layout '{kv_cache_layout}' not supported: npu_sparse_flash_attention reads "
                f"float (bf16/fp16) caches only")
    if extra_kv_cache is not None:
        return _ONE_KEY_SET
    return _sfa_reason(p, q, kv_cache, d_v, q.shape[2])


@BACKEND.implement("sparse_attention_paged", supports=supports(SFA, check=_sap_check))
def sparse_attention_paged(q, kv_cache, block_table, indices, *, scale, d_v, sink, extra_kv_cache,
                           extra_block_table, extra_indices, kv_cache_layout="", extra_kv_cache_layout=""):
    # The paged cache is read as one flat key sequence [num_blocks * block_size] with indices turned
    # into slot numbers: the same TND call as sparse_attention, with the softmax lse CANN's paged
    # layout (PA_BSND) does not return, and sinks composed from it on every SoC.
    B, Sq, H, Dqk = q.shape
    nb, bs, _ = kv_cache.shape
    dev = q.device
    out, lse = _attend("sparse_attention_paged", q.reshape(B * Sq, H, Dqk), kv_cache.reshape(nb * bs, Dqk),
                       paged_to_slots(indices, block_table, bs).view(B * Sq, -1), scale,
                       torch.tensor([B * Sq], dtype=torch.int32, device=dev),
                       torch.tensor([nb * bs], dtype=torch.int32, device=dev), sink)
    return out.view(B, Sq, H, -1), lse.view(B, Sq, H)


# ---- no CANN operator --------------------------------------------------------------------------

_NONE = {
    "indexer_logits": f"no CANN operator returns the full indexer score matrix ({LI} returns top-k indices only)",
    "kv_compress": "no CANN operator in torch_npu 2.13.0 implements DeepSeek-V4 KV compression",
    "window_indices": ("index construction only, no CANN operator: run it on the reference backend, which works "
                       "on npu tensors (OPBRIDGE_BACKEND=ascend,window_indices=reference)"),
}
for _op, _why in _NONE.items():
    BACKEND.implement(_op, supports=unsupported(_why))(never_called(_op))
