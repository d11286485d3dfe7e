"""Routers and routed experts of DeepSeek-V3 / V3.2 / V4 through ``moe_route``, ``moe_route_hash`` and ``moe``.

Checked against transformers 5.x:

- V3 / V3.2 ``TopkRouter``: fp32 logits, ``sigmoid`` scores, selection on ``scores + bias`` within
  the ``topk_group`` best of ``n_group`` groups (a group scores its two best), weights = scores at
  the ids, divided by ``(sum + 1e-20)`` when ``norm_topk_prob``, times ``routed_scaling_factor``:
  ``moe_route(scoring="sigmoid", num_groups, topk_groups, renormalize, scaling_factor)``.
- V4 ``TopKRouter``: logits in the model dtype, ``ACT2FN[scoring_func]`` scores (sqrtsoftplus or
  sigmoid), ``topk(scores + bias)`` and always renormalised (+1e-20): ``moe_route(..., renormalize=True)``.
- V4 ``HashRouter``: ids ``tid2eid[input_ids]``, same weights: ``moe_route_hash``.
- ``Experts`` (all three): ``gate_up_proj [E, 2I, H]`` (gate rows first) and ``down_proj [E, H, I]``
  are exactly ``w13`` / ``w2``; SiLU-gated, with V4's clamp ``gate <= limit``, ``|up| <= limit``:
  ``moe(..., swiglu_limit)``.

The top-k order differs (transformers: unsorted; opbridge: descending) but every consumer sums
over the k slots, so only the set matters. ``moe_route`` is not differentiable (OPS.md 4.4), so it
sees detached logits; when autograd needs the router's gradient, the weights keep the op's values
and take their gradient from the same formula in PyTorch (straight-through), so training sees the
unpatched gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

import opbridge

from .hf import activation_name
from .patching import Rule

QUANT_BLOCKS = {"fp8": (128, 128), "mxfp4": (1, 32)}


def _scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    return logits.sigmoid() if scoring == "sigmoid" else F.softplus(logits).sqrt()  # sqrtsoftplus


def _with_router_grad(weights: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, scoring: str,
                      renormalize: bool, scaling: float) -> torch.Tensor:
    """The op's weights, carrying d(weights)/d(logits) of the same formula when autograd needs it."""
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return weights
    w = _scores(logits, scoring).gather(1, ids.long())
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * scaling
    return weights + (w - w.detach()).to(weights.dtype)  # value: the op's; gradient: the formula's


# ---- V3 / V3.2 grouped sigmoid router ----------------------------------------------------------------

def grouped_router_forward(self, hidden_states):
    h = hidden_states.view(-1, self.hidden_dim)
    logits = F.linear(h.float(), self.weight.float())
    weights, ids = opbridge.moe_route(logits.detach(), self.top_k, scoring="sigmoid",
                                      correction_bias=self.e_score_correction_bias.float(),
                                      num_groups=self.num_group, topk_groups=self.topk_group,
                                      renormalize=bool(self.norm_topk_prob),
                                      scaling_factor=float(self.routed_scaling_factor))
    weights = _with_router_grad(weights, logits, ids, "sigmoid", bool(self.norm_topk_prob),
                                float(self.routed_scaling_factor))
    return logits, weights, ids.long()


def _check_grouped_router(m, quantize) -> Optional[str]:
    E = m.weight.shape[0]
    if m.weight.shape != (m.num_experts, m.hidden_dim) or E % m.num_group:
        return f"router weight {tuple(m.weight.shape)} does not split into {m.num_group} expert groups"
    if not 1 <= m.topk_group <= m.num_group or m.top_k > m.topk_group * (E // m.num_group):
        return f"top_k={m.top_k} cannot be chosen from topk_group={m.topk_group} of {m.num_group} groups"
    return None


# ---- V4 routers --------------------------------------------------------------------------------------

def _v4_scoring(m) -> Optional[str]:
    name = activation_name(m.score_fn)
    return name if name in ("sigmoid", "sqrtsoftplus") else None


def topk_router_forward(self, hidden_states):
    logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
    scoring = _v4_scoring(self)
    weights, ids = opbridge.moe_route(logits.detach(), self.top_k, scoring=scoring,
                                      correction_bias=self.e_score_correction_bias.float(), renormalize=True,
                                      scaling_factor=float(self.routed_scaling_factor))
    weights = _with_router_grad(weights, logits, ids, scoring, True, float(self.routed_scaling_factor))
    return logits, weights.to(logits.dtype), ids.long()  # transformers hands the experts model-dtype weights


def hash_router_forward(self, hidden_states, input_ids):
    logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
    scoring = _v4_scoring(self)
    weights, ids = opbridge.moe_route_hash(logits.detach(), input_ids.reshape(-1), self.tid2eid, scoring=scoring,
                                           renormalize=True, scaling_factor=float(self.routed_scaling_factor))
    weights = _with_router_grad(weights, logits, ids, scoring, True, float(self.routed_scaling_factor))
    return logits, weights.to(logits.dtype), ids.long()


def _check_v4_router(m, quantize) -> Optional[str]:
    if _v4_scoring(m) is None:
        return f"scoring function {type(m.score_fn).__name__} has no moe_route equivalent"
    if m.weight.shape != (m.num_experts, m.hidden_dim):
        return f"router weight {tuple(m.weight.shape)} is not [num_experts, hidden]"
    return None


# ---- experts -----------------------------------------------------------------------------------------

def experts_forward(self, hidden_states, top_k_index, top_k_weights):
    w13 = getattr(self, "_opbridge_w13", None)
    w2 = getattr(self, "_opbridge_w2", None)
    if w13 is None:
        w13, w2 = self.gate_up_proj, self.down_proj  # the parameters themselves: no copy
    return opbridge.moe(hidden_states, top_k_weights.float(), top_k_index, w13, w2, swiglu_limit=_limit(self))


def _limit(m) -> Optional[float]:
    limit = getattr(m, "limit", None)
    return None if limit is None else float(limit)


def _check_experts(m, quantize) -> Optional[str]:
    if activation_name(m.act_fn) != "silu":
        return f"activation {type(m.act_fn).__name__} is not SiLU-gated (moe supports swiglu)"
    for attr, want in (("has_bias", False), ("is_transposed", False), ("is_concatenated", True),
                       ("has_gate", True), ("_is_expert_parallel", False)):
        if getattr(m, attr, want) != want:
            return f"{attr}={getattr(m, attr)} (opbridge maps {attr}={want})"
    gu, down = m.gate_up_proj, m.down_proj
    if gu.dim() != 3 or down.dim() != 3 or gu.shape[1] != 2 * down.shape[2] or gu.shape[2] != down.shape[1] \
            or gu.shape[0] != down.shape[0]:
        return f"expert weights {tuple(gu.shape)} / {tuple(down.shape)} are not [E, 2I, H] / [E, H, I]"
    limit = getattr(m, "limit", None)
    if limit is not None and not limit > 0:
        return f"swiglu limit {limit!r} is not positive"
    if quantize == "mxfp4" and (gu.shape[2] % 32 or down.shape[2] % 32):
        return f"mxfp4 needs hidden and intermediate sizes divisible by 32, got {gu.shape[2]} and {down.shape[2]}"
    return None


def _prepare_experts(m, quantize):
    if quantize is None:
        return {}
    block = QUANT_BLOCKS[quantize]
    with torch.no_grad():
        return {"_opbridge_w13": opbridge.quantize(m.gate_up_proj.detach(), quantize, block),
                "_opbridge_w2": opbridge.quantize(m.down_proj.detach(), quantize, block)}


def rules(mods: dict) -> list[Rule]:
    out = []
    for fam in ("v3", "v32"):
        if fam in mods:
            M = mods[fam]
            router = M.DeepseekV3TopkRouter if fam == "v3" else M.DeepseekV32TopkRouter
            experts = M.DeepseekV3Experts if fam == "v3" else M.DeepseekV32Experts
            out.append(Rule(router, "router", ("moe_route",), grouped_router_forward, _check_grouped_router))
            out.append(Rule(experts, "experts", ("moe",), experts_forward, _check_experts, prepare=_prepare_experts))
    if "v4" in mods:
        M = mods["v4"]
        out.append(Rule(M.DeepseekV4TopKRouter, "router", ("moe_route",), topk_router_forward, _check_v4_router))
        out.append(Rule(M.DeepseekV4HashRouter, "hash_router", ("moe_route_hash",), hash_router_forward,
                        _check_v4_router))
        out.append(Rule(M.DeepseekV4Experts, "experts", ("moe",), experts_forward, _check_experts,
                        prepare=_prepare_experts))
    return out
