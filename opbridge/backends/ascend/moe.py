"""MoE ops on CANN: routing (npu_moe_gating_top_k), grouped GEMMs (npu_grouped_matmul), the MoE layer
(npu_moe_init_routing_v2 -> npu_grouped_matmul -> npu_swiglu -> npu_grouped_matmul -> npu_moe_token_unpermute).

Conventions that differ between OPS.md and CANN live in the small helpers at the top, one per
convention, so each is stated (and tested) once.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...core.formats import QuantTensor
from . import BACKEND
from . import capabilities as caps
from .capabilities import Platform
from .runtime import call, platform, supports

GATING, ROUTING, GMM, SWIGLU, UNPERMUTE = ("npu_moe_gating_top_k", "npu_moe_init_routing_v2", "npu_grouped_matmul",
                                           "npu_swiglu", "npu_moe_token_unpermute")
GMM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # npu_grouped_matmul, no-quant rows of its dtype table
RENORM_EPS = 1e-20  # OPS.md 2.1: divided by (sum + 1e-20)


# ---- conventions -------------------------------------------------------------------------------

def expert_weights_view(w: torch.Tensor) -> torch.Tensor:
    """OPS weights are [E, N, K] (K contiguous); npu_grouped_matmul multiplies x [M, K] by weight [E, K, N].

    The transposed view of a contiguous [E, N, K] tensor is the "transposed weight" GMM accepts
    without a copy (stride[-2] == 1 and stride[-1] == K).
    """
    return w.contiguous().transpose(1, 2)


def group_list_from_offsets(offsets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """OPS offsets [E+1] (from 0 to M) -> GMM group_list int64 [E] of cumulative ends, group_list_type=0."""
    return offsets[1:].to(torch.int64), 0


def group_list_from_counts(counts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-expert row counts (init_routing_v2, expert_tokens_num_type=1) -> GMM group_list_type=1.

    GMM documents that a counts list (type 1) may not have length 1; with one expert the count
    is also its cumulative end, so type 0 is the same list, stated correctly.
    """
    return counts.to(torch.int64), (1 if counts.numel() > 1 else 0)


def no_expert_to_zero_weight(topk_ids: torch.Tensor, topk_weights: torch.Tensor):
    """OPS ids may be -1 ("no expert", expert parallelism). CANN's routing + unpermute need a full
    permutation of T*k rows, so a -1 slot is routed to expert 0 with weight 0: it costs one wasted
    row of GEMM work and adds exactly nothing to the token."""
    valid = topk_ids >= 0
    ids = torch.where(valid, topk_ids, torch.zeros_like(topk_ids)).to(torch.int32)
    return ids, torch.where(valid, topk_weights.float(), torch.zeros((), dtype=torch.float32, device=ids.device))


# ---- checks ------------------------------------------------------------------------------------

def _quant_reason(p: Platform, **operands) -> Optional[str]:
    for name, t in operands.items():
        if isinstance(t, QuantTensor):
            return (f"'{name}' is a {t.fmt} QuantTensor: " + (caps.feature_reason(p, "gmm_fp8_mxfp4") or
                                                               f"{GMM}: {t.fmt} is not translated"))
    return None


def _gmm_reason(p: Platform, x: torch.Tensor, w: torch.Tensor, what: str) -> Optional[str]:
    if x.dtype not in GMM_DTYPES or w.dtype != x.dtype:
        return (f"{GMM} (no quantization) takes x and weight of one dtype among float16/bfloat16/float32; "
                f"{what} has {x.dtype} x {w.dtype}")
    E, N, K = w.shape
    if E > caps.limit(GMM, "max_groups"):
        return f"{GMM} supports at most {caps.limit(GMM, 'max_groups')} groups (experts); got {E}"
    inner = caps.limit(GMM, "inner_limit")
    if K >= inner or N >= inner:
        return f"{GMM}: the last dimensions of x and weight must be < {inner}; {what} has K={K}, N={N}"
    return None


# ---- routing -----------------------------------------------------------------------------------

def _gating_reason(p: Platform, E: int, k: int, scoring: str, num_groups: int, topk_groups: int, dtype,
                   has_bias: bool, needs_scores: bool) -> Optional[str]:
    if scoring not in ("softmax", "sigmoid"):
        return (f"{GATING} scores with softmax (norm_type=0) or sigmoid (norm_type=1) only; scoring='{scoring}' "
                f"has no CANN operator")
    if dtype == torch.float64:
        return f"{GATING} takes float16/bfloat16/float32 logits, not float64"
    lim = caps.LIMITS[GATING]
    if E > lim["max_experts"]:
        return f"{GATING} supports at most {lim['max_experts']} experts; got {E}"
    group = E // num_groups
    if group <= lim["min_group_size_exclusive"]:
        return (f"{GATING} needs more than {lim['min_group_size_exclusive']} experts per group "
                f"(E / group_count); got E={E}, num_groups={num_groups}")
    a = lim["align"]
    if -(-group // a) * a * num_groups > lim["max_aligned_experts"]:
        return f"{GATING}: align{a}(E / group_count) * group_count must be <= {lim['max_aligned_experts']}"
    if not caps.has_feature(p, "gating_general_shapes"):
        leg = lim["legacy_shape"]
        if (E, num_groups, topk_groups) != (leg["experts"], leg["group_count"], leg["k_group"]) \
                or k > leg["max_k"] or not has_bias:
            return caps.feature_reason(p, "gating_general_shapes")
    if needs_scores:
        return caps.feature_reason(p, "gating_out_flag")
    return None


def _weights(y: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor, scoring: str, renormalize: bool,
             scaling_factor: float) -> torch.Tensor:
    """OPS weights from the vendor outputs.

    The vendor op always renormalises sigmoid scores (norm_type=1) and never softmax ones
    (norm_type=0), then multiplies by routed_scaling_factor. See :func:`_gating_plan`.
    """
    if scoring == "sigmoid" and not renormalize:  # un-renormalised sigmoid: the scores at the chosen ids
        return scores.gather(1, ids.long()) * scaling_factor
    if scoring == "softmax" and renormalize:
        y = y.float()
        return y / (y.sum(-1, keepdim=True) + RENORM_EPS) * scaling_factor
    return y.float()  # the vendor already renormalised (sigmoid) or needs none (softmax), and scaled


def _gating_plan(scoring: str, renormalize: bool, scaling_factor: float) -> dict:
    fused = (scoring == "sigmoid") == renormalize  # the vendor's own renormalisation rule matches OPS
    return dict(norm_type=1 if scoring == "sigmoid" else 0, renorm=0, eps=RENORM_EPS,
                out_flag=scoring == "sigmoid" and not renormalize,
                routed_scaling_factor=float(scaling_factor) if fused else 1.0)


def _route_check(p, logits, top_k, *, scoring, correction_bias, num_groups, topk_groups, renormalize, scaling_factor):
    return _gating_reason(p, logits.shape[1], top_k, scoring, num_groups, topk_groups, logits.dtype,
                          correction_bias is not None, scoring == "sigmoid" and not renormalize)


@BACKEND.implement("moe_route", supports=supports(GATING, check=_route_check))
def moe_route(logits, top_k, *, scoring, correction_bias, num_groups, topk_groups, renormalize, scaling_factor):
    # float32 logits: the vendor requires bias in x's dtype, and OPS's bias is float32 (a bf16 bias
    # would change which experts are selected).
    bias = None if correction_bias is None else correction_bias.float().contiguous()
    y, ids, scores = call("moe_route", GATING, logits.float().contiguous(), top_k, bias=bias, k_group=topk_groups,
                          group_count=num_groups, group_select_mode=1,  # 1: a group scores its top-2 sum (OPS 2.1)
                          **_gating_plan(scoring, renormalize, scaling_factor))
    return _weights(y, ids, scores, scoring, renormalize, scaling_factor), ids.to(torch.int32)


def _hash_check(p, logits, token_ids, tid2eid, *, scoring, renormalize, scaling_factor):
    return (caps.feature_reason(p, "gating_hash_routing")
            or _gating_reason(p, logits.shape[1], tid2eid.shape[1], scoring, 1, 1, logits.dtype, True,
                              scoring == "sigmoid" and not renormalize))


@BACKEND.implement("moe_route_hash", supports=supports(GATING, check=_hash_check))
def moe_route_hash(logits, token_ids, tid2eid, *, scoring, renormalize, scaling_factor):
    y, ids, scores = call("moe_route_hash", GATING, logits.float().contiguous(), tid2eid.shape[1],
                          input_ids=token_ids, tid2eid=tid2eid, **_gating_plan(scoring, renormalize, scaling_factor))
    return _weights(y, ids, scores, scoring, renormalize, scaling_factor), ids.to(torch.int32)


# ---- grouped GEMMs -----------------------------------------------------------------------------

def _gemm_check(p, a, b, offsets, *, out_dtype):
    return _quant_reason(p, a=a, b=b) or _gmm_reason(p, a, b, "a x b")


def _gmm(op: str, x: torch.Tensor, w: torch.Tensor, group_list: torch.Tensor, group_list_type: int) -> torch.Tensor:
    """One npu_grouped_matmul call in its MoE form: single x [M, K], single weight [E, K, N], single y [M, N]."""
    return call(op, GMM, [x.contiguous()], [expert_weights_view(w)], group_list=group_list,
                group_list_type=group_list_type, split_item=3, group_type=0)[0]


@BACKEND.implement("grouped_gemm", supports=supports(GMM, check=_gemm_check))
def grouped_gemm(a, b, offsets, *, out_dtype):
    if a.shape[0] == 0:
        return a.new_empty((0, b.shape[1]), dtype=out_dtype)
    y = _gmm("grouped_gemm", a, b, *group_list_from_offsets(offsets))
    return y.to(out_dtype)  # GMM (no quantization) outputs x's dtype


def _masked_check(p, a, b, masked_m, *, out_dtype):
    return _quant_reason(p, a=a, b=b) or _gmm_reason(p, a, b, "a x b")


@BACKEND.implement("grouped_gemm_masked", supports=supports(GMM, check=_masked_check))
def grouped_gemm_masked(a, b, masked_m, *, out_dtype):
    # Every expert's M_max rows run through GMM (groups must tile x), then rows at and past
    # masked_m are replaced by zeros: no host sync, and garbage (even NaN) rows cannot leak.
    E, M_max, K = a.shape
    if M_max == 0:
        return a.new_zeros((E, 0, b.shape[1]), dtype=out_dtype)
    ends = torch.arange(1, E + 1, device=a.device, dtype=torch.int64) * M_max
    y = _gmm("grouped_gemm_masked", a.reshape(E * M_max, K), b, ends, 0).view(E, M_max, -1)
    keep = torch.arange(M_max, device=a.device).unsqueeze(0) < masked_m.unsqueeze(1)
    return torch.where(keep.unsqueeze(-1), y, torch.zeros((), dtype=y.dtype, device=y.device)).to(out_dtype)


# ---- the MoE layer -----------------------------------------------------------------------------

def _routing_reason(p: Platform, E: int, x_dtype) -> Optional[str]:
    if E > caps.limit(ROUTING, "max_experts"):
        return f"{ROUTING} supports at most {caps.limit(ROUTING, 'max_experts')} experts; got {E}"
    if x_dtype not in GMM_DTYPES:
        return f"{ROUTING} takes float16/bfloat16/float32 (or int8) tokens, not {x_dtype}"
    return None


def _unpermute_reason(p: Platform, k: int) -> Optional[str]:
    max_k = caps.limit(UNPERMUTE, "max_topk", p.family)
    if max_k is not None and k > max_k:
        return f"{UNPERMUTE} supports topK <= {max_k} on {p.soc}; got k={k}"
    return None


def _moe_check(p, x, topk_weights, topk_ids, w13, w2, *, activation, swiglu_limit):
    return (_quant_reason(p, w13=w13, w2=w2)
            or _routing_reason(p, w13.shape[0], x.dtype)
            or _gmm_reason(p, x, w13, "x x w13") or _gmm_reason(p, x, w2, "act x w2")
            or _unpermute_reason(p, topk_ids.shape[1]))


def _swiglu(p: Platform, h: torch.Tensor, swiglu_limit: Optional[float]) -> torch.Tensor:
    """silu(gate) * up on h = [gate | up] (OPS 2.4: gate rows first, as npu_swiglu's A | B halves).

    npu_swiglu where it is documented (Atlas A2) and there is no clamp; otherwise the same math
    composed from torch ops (which run as ordinary NPU kernels), with the OPS clamp.
    """
    if swiglu_limit is None and caps.op_reason(p, SWIGLU) is None:
        return call("moe", SWIGLU, h, dim=-1)
    g, u = h.chunk(2, dim=-1)
    if swiglu_limit is not None:
        g = g.clamp(max=swiglu_limit)
        u = u.clamp(-swiglu_limit, swiglu_limit)
    return (F.silu(g.float()) * u.float()).to(h.dtype)


@BACKEND.implement("moe", supports=supports(ROUTING, GMM, UNPERMUTE, check=_moe_check))
def moe(x, topk_weights, topk_ids, w13, w2, *, activation, swiglu_limit):
    T, k = topk_ids.shape
    E = w13.shape[0]
    if T == 0:
        return torch.zeros_like(x)
    ids, probs = no_expert_to_zero_weight(topk_ids, topk_weights)
    # Dropless routing over all experts. quant_mode=-1 always: its default was 0 (static int8,
    # unsupported) up to op-plugin 7.3.0. Counts per expert (type 1) feed GMM directly.
    x_sorted, row_idx, counts, _ = call(
        "moe", ROUTING, x.contiguous(), ids, active_num=T * k, expert_num=E, drop_pad_mode=0,
        expert_tokens_num_type=1, expert_tokens_num_flag=True, quant_mode=-1, active_expert_range=[0, E],
        row_idx_type=0)
    group_list, group_list_type = group_list_from_counts(counts)
    h = _gmm("moe", x_sorted, w13, group_list, group_list_type)
    act = _swiglu(platform(x.device), h, swiglu_limit)
    y = _gmm("moe", act, w2, group_list, group_list_type)
    # row_idx (gather form) maps token slot t*k+j to its row of y: exactly unpermute's sorted_indices.
    # The weighted sum runs in float32 (OPS: fp32 accumulate).
    out = call("moe", UNPERMUTE, y.float(), row_idx, probs=probs)
    return out.to(x.dtype)


def _permute_check(p, x, topk_ids, num_experts):
    return _routing_reason(p, num_experts, x.dtype)


@BACKEND.implement("moe_permute", supports=supports(ROUTING, check=_permute_check))
def moe_permute(x, topk_ids, num_experts):
    T, k = topk_ids.shape
    # Ids outside active_expert_range (here: -1) are left out and the kept rows come first,
    # stably sorted by expert; row_idx_type=1 (scatter form) is then token*k + slot per row.
    x_sorted, row_idx, counts, _ = call(
        "moe_permute", ROUTING, x.contiguous(), topk_ids.to(torch.int32), active_num=T * k, expert_num=num_experts,
        drop_pad_mode=0, expert_tokens_num_type=1, expert_tokens_num_flag=True, quant_mode=-1,
        active_expert_range=[0, num_experts], row_idx_type=1)
    M = int(counts.sum())  # the output size is data-dependent (OPS 2.5): one host sync
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return x_sorted[:M], offsets, row_idx[:M].to(torch.int64)


def _combine_check(p, y_sorted, src_index, topk_weights, num_tokens):
    if y_sorted.dtype not in GMM_DTYPES:
        return f"{UNPERMUTE} takes float16/bfloat16/float32 rows, not {y_sorted.dtype}"
    return _unpermute_reason(p, topk_weights.shape[1])


@BACKEND.implement("moe_combine", supports=supports(UNPERMUTE, check=_combine_check))
def moe_combine(y_sorted, src_index, topk_weights, num_tokens):
    T, k = topk_weights.shape
    M, H = y_sorted.shape
    n = T * k
    # unpermute needs a permutation of all T*k slots: slots without a row (ids == -1) get the
    # zero rows appended after y, numbered in slot order (cumsum: no host sync).
    slot_row = torch.full((n,), -1, dtype=torch.int64, device=y_sorted.device)
    slot_row.scatter_(0, src_index.long(), torch.arange(M, device=y_sorted.device))
    missing = slot_row < 0
    slot_row = torch.where(missing, M - 1 + missing.long().cumsum(0), slot_row)
    rows = torch.cat([y_sorted.float(), y_sorted.new_zeros((n - M, H), dtype=torch.float32)])
    out = call("moe_combine", UNPERMUTE, rows, slot_row.to(torch.int32), probs=topk_weights.float())
    return out.to(y_sorted.dtype)
