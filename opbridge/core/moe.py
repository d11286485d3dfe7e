"""Mixture-of-experts ops (OPS.md section 2): routing, grouped GEMMs, the fused MoE, permute/combine."""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import checks as C
from .errors import OpError
from .formats import QuantTensor
from .opdef import OpDef
from .registry import register_data_check

Weight = Union[torch.Tensor, QuantTensor]
SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus")
ACTIVATIONS = ("swiglu",)


# ---- moe_route ---------------------------------------------------------------------------------

def _route_fake(logits, top_k, *, scoring, correction_bias, num_groups, topk_groups, renormalize, scaling_factor):
    T = logits.shape[0]
    return logits.new_empty((T, top_k), dtype=torch.float32), logits.new_empty((T, top_k), dtype=torch.int32)


_ROUTE = OpDef(
    "moe_route",
    "Tensor logits, int top_k, *, str scoring, Tensor? correction_bias, int num_groups, int topk_groups, "
    "bool renormalize, float scaling_factor",
    "(Tensor, Tensor)", _route_fake)


def moe_route(logits: torch.Tensor, top_k: int, *, scoring: str = "softmax",
              correction_bias: Optional[torch.Tensor] = None, num_groups: int = 1, topk_groups: int = 1,
              renormalize: bool = False, scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``top_k`` experts per token (OPS.md 2.1).

    Scores ``s = softmax | sigmoid | sqrt(softplus)`` of ``logits`` in fp32; selection score
    ``q = s + correction_bias``. With ``num_groups > 1`` experts form equal contiguous groups, a
    group scores the sum of its two largest ``q`` and only the ``topk_groups`` best groups may be
    chosen (DeepSeek-V3). ``topk_ids`` int32 ``[T, k]`` in descending ``q`` (ties to the lower
    id); ``topk_weights`` float32 ``[T, k]`` are ``s`` at those ids, renormalised to sum 1 if
    ``renormalize``, times ``scaling_factor``.

    Args: logits ``[T, E]`` float; correction_bias float32 ``[E]`` or None.
    """
    op = "moe_route"
    C.tensor(op, "logits", logits, C.FLOAT_DTYPES)
    S = C.Shapes(op)
    S.check("logits", logits.shape, ("T", "E"))
    E = S["E"]
    C.choice(op, "scoring", scoring, SCORINGS)
    C.positive_int(op, "num_groups", num_groups, high=max(E, 1))
    if E % num_groups:
        raise OpError(op, "num_groups", f"a divisor of the expert count E={E}", str(num_groups))
    C.positive_int(op, "topk_groups", topk_groups, high=num_groups)
    C.positive_int(op, "top_k", top_k, high=topk_groups * (E // num_groups))
    if C.optional(op, "correction_bias", correction_bias, (torch.float32,)) is not None:
        S.check("correction_bias", correction_bias.shape, ("E",))
    C.same_device(op, logits=logits, correction_bias=correction_bias)
    return _ROUTE.call(logits, top_k, scoring=scoring, correction_bias=correction_bias, num_groups=num_groups,
                       topk_groups=topk_groups, renormalize=bool(renormalize), scaling_factor=float(scaling_factor))


# ---- moe_route_hash ----------------------------------------------------------------------------

def _hash_fake(logits, token_ids, tid2eid, *, scoring, renormalize, scaling_factor):
    T, k = token_ids.shape[0], tid2eid.shape[1]
    return logits.new_empty((T, k), dtype=torch.float32), logits.new_empty((T, k), dtype=torch.int32)


_HASH = OpDef("moe_route_hash",
              "Tensor logits, Tensor token_ids, Tensor tid2eid, *, str scoring, bool renormalize, float scaling_factor",
              "(Tensor, Tensor)", _hash_fake)


def _hash_data_check(logits, token_ids, tid2eid, **_):
    C.in_range("moe_route_hash", "token_ids", token_ids, 0, tid2eid.shape[0], "token ids")
    C.in_range("moe_route_hash", "tid2eid", tid2eid, 0, logits.shape[1], "expert ids")


register_data_check("moe_route_hash", _hash_data_check)


def moe_route_hash(logits: torch.Tensor, token_ids: torch.Tensor, tid2eid: torch.Tensor, *,
                   scoring: str = "sqrtsoftplus", renormalize: bool = True,
                   scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V4 hash routing (OPS.md 2.1b): ``topk_ids = tid2eid[token_ids]``.

    Weights are the scores ``s`` (as in :func:`moe_route`) at those ids, renormalised if
    ``renormalize``, times ``scaling_factor``. logits ``[T, E]``; token_ids int ``[T]``;
    tid2eid int ``[vocab, k]``. Returns float32 ``[T, k]`` weights and int32 ``[T, k]`` ids.
    """
    op = "moe_route_hash"
    C.tensor(op, "logits", logits, C.FLOAT_DTYPES)
    C.tensor(op, "token_ids", token_ids, C.INDEX_DTYPES)
    C.tensor(op, "tid2eid", tid2eid, C.INDEX_DTYPES)
    S = C.Shapes(op)
    S.check("logits", logits.shape, ("T", "E"))
    S.check("token_ids", token_ids.shape, ("T",))
    S.check("tid2eid", tid2eid.shape, ("vocab", "k"))
    C.choice(op, "scoring", scoring, SCORINGS)
    C.same_device(op, logits=logits, token_ids=token_ids, tid2eid=tid2eid)
    return _HASH.call(logits, token_ids, tid2eid, scoring=scoring, renormalize=bool(renormalize),
                      scaling_factor=float(scaling_factor))


# ---- grouped GEMMs -----------------------------------------------------------------------------

def _check_a(op: str, a: Weight, shape_names, S: C.Shapes) -> None:
    if isinstance(a, QuantTensor):
        if a.fmt != "fp8" or a.block != (1, 128):
            raise OpError(op, "a", "a bf16/fp16 tensor or an fp8 QuantTensor with block (1, 128)",
                          f"QuantTensor fmt={a.fmt} block={a.block}")
        S.check("a", a.shape, shape_names)
    else:
        C.tensor(op, "a", a, C.FLOAT_DTYPES)
        S.check("a", a.shape, shape_names)


def check_weight(op: str, arg: str, w: Weight, names, S: C.Shapes) -> None:
    """``w`` is [E, N, K]: a float tensor, an fp8 (128,128) or an mxfp4 (1,32) QuantTensor."""
    if isinstance(w, QuantTensor):
        if (w.fmt, w.block) not in (("fp8", (128, 128)), ("mxfp4", (1, 32))):
            raise OpError(op, arg, "an fp8 (128, 128) or mxfp4 (1, 32) QuantTensor",
                          f"QuantTensor fmt={w.fmt} block={w.block}")
        S.check(arg, w.shape, names)
    else:
        C.tensor(op, arg, w, C.FLOAT_DTYPES)
        S.check(arg, w.shape, names)


def _gemm_fake(a, b, offsets, *, out_dtype):
    return torch.empty((a.shape[0], b.shape[1]), dtype=out_dtype, device=a.device)


_GEMM = OpDef("grouped_gemm", "Quant a, Quant b, Tensor offsets, *, ScalarType out_dtype", "Tensor", _gemm_fake,
              differentiable=("a", "b"))


def _offsets_check(a, b, offsets, **_):
    op = "grouped_gemm"
    off = offsets.long()
    if off.numel() and (int(off[0]) != 0 or int(off[-1]) != a.shape[0] or bool((off[1:] < off[:-1]).any())):
        raise OpError(op, "offsets", f"non-decreasing with offsets[0]=0 and offsets[E]=M={a.shape[0]}",
                      f"{offsets.tolist() if offsets.numel() <= 16 else 'values violating that'}")


register_data_check("grouped_gemm", _offsets_check)


def grouped_gemm(a: Weight, b: Weight, offsets: torch.Tensor, *,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Contiguous grouped GEMM (OPS.md 2.2): ``out[r] = a[r] @ b[e].T`` for ``offsets[e] <= r < offsets[e+1]``.

    a ``[M, K]`` bf16/fp16 or fp8 QuantTensor block (1,128); b ``[E, N, K]`` bf16/fp16 or
    QuantTensor fp8 (128,128) / mxfp4 (1,32); offsets int32 ``[E+1]`` non-decreasing from 0 to M.
    fp32 accumulate; returns ``[M, N]`` in ``out_dtype``. fp32/fp64 inputs run on the reference.
    """
    op = "grouped_gemm"
    S = C.Shapes(op)
    _check_a(op, a, ("M", "K"), S)
    check_weight(op, "b", b, ("E", "N", "K"), S)
    C.tensor(op, "offsets", offsets, (torch.int32,))
    S.check("offsets", offsets.shape, (S["E"] + 1,))
    if out_dtype not in C.FLOAT_DTYPES:
        raise OpError(op, "out_dtype", "a floating dtype", str(out_dtype))
    C.same_device(op, a=a, b=b, offsets=offsets)
    return _GEMM.call(a, b, offsets, out_dtype=out_dtype)


def _masked_fake(a, b, masked_m, *, out_dtype):
    return torch.empty((a.shape[0], a.shape[1], b.shape[1]), dtype=out_dtype, device=a.device)


_MASKED = OpDef("grouped_gemm_masked", "Quant a, Quant b, Tensor masked_m, *, ScalarType out_dtype", "Tensor",
                _masked_fake, differentiable=("a", "b"))


def _masked_check(a, b, masked_m, **_):
    C.in_range("grouped_gemm_masked", "masked_m", masked_m, 0, a.shape[1] + 1, "row counts")


register_data_check("grouped_gemm_masked", _masked_check)


def grouped_gemm_masked(a: Weight, b: Weight, masked_m: torch.Tensor, *,
                        out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Masked grouped GEMM (OPS.md 2.3): ``out[e, :masked_m[e]] = a[e, :masked_m[e]] @ b[e].T``, other rows 0.

    a ``[E, M_max, K]``, b ``[E, N, K]`` (formats as :func:`grouped_gemm`), masked_m int32 ``[E]``.
    """
    op = "grouped_gemm_masked"
    S = C.Shapes(op)
    if isinstance(a, QuantTensor):
        _check_a(op, a, ("E", "M_max", "K"), S)
    else:
        C.tensor(op, "a", a, C.FLOAT_DTYPES)
        S.check("a", a.shape, ("E", "M_max", "K"))
    check_weight(op, "b", b, ("E", "N", "K"), S)
    C.tensor(op, "masked_m", masked_m, (torch.int32,))
    S.check("masked_m", masked_m.shape, ("E",))
    if out_dtype not in C.FLOAT_DTYPES:
        raise OpError(op, "out_dtype", "a floating dtype", str(out_dtype))
    C.same_device(op, a=a, b=b, masked_m=masked_m)
    return _MASKED.call(a, b, masked_m, out_dtype=out_dtype)


# ---- moe ---------------------------------------------------------------------------------------

def _moe_fake(x, topk_weights, topk_ids, w13, w2, *, activation, swiglu_limit):
    return torch.empty_like(x)


_MOE = OpDef("moe", "Tensor x, Tensor topk_weights, Tensor topk_ids, Quant w13, Quant w2, *, str activation, "
             "float? swiglu_limit", "Tensor", _moe_fake, differentiable=("x", "topk_weights", "w13", "w2"))


def _ids_check(op: str, arg: str, ids: torch.Tensor, num_experts: int) -> None:
    C.in_range(op, arg, ids, -1, num_experts, "expert ids (-1 = none)")


register_data_check("moe", lambda x, tw, ids, w13, w2, **_: _ids_check("moe", "topk_ids", ids, w13.shape[0]))


def check_moe_args(op: str, x, topk_weights, topk_ids, w13: Weight, w2: Weight, experts: str = "E") -> C.Shapes:
    """Dtypes and shapes of a MoE layer's tensors (shared with expert parallelism, where the
    weights hold the local experts: ``experts="El"``). Returns the collected sizes."""
    C.tensor(op, "x", x, C.FLOAT_DTYPES)
    C.tensor(op, "topk_weights", topk_weights, C.FLOAT_DTYPES)
    C.tensor(op, "topk_ids", topk_ids, C.INDEX_DTYPES)
    S = C.Shapes(op)
    S.check("x", x.shape, ("T", "H"))
    S.check("topk_weights", topk_weights.shape, ("T", "k"))
    S.check("topk_ids", topk_ids.shape, ("T", "k"))
    check_weight(op, "w13", w13, (experts, "2I", "H"), S)
    if S["2I"] % 2:
        raise OpError(op, "w13", "an even number of rows 2I (gate then up)", f"shape {tuple(w13.shape)}")
    S.sizes["I"] = (S["2I"] // 2, "w13")
    check_weight(op, "w2", w2, (experts, "H", "I"), S)
    return S


def moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: Weight, w2: Weight, *,
        activation: str = "swiglu", swiglu_limit: Optional[float] = None) -> torch.Tensor:
    """The fused MoE layer, DeepSeek's "Mega MoE" entry point (OPS.md 2.4).

    ``h = w13[e] @ x[t]``; ``g, u = h[:I], h[I:]``; with ``swiglu_limit=c``: ``g = min(g, c)``,
    ``u = clamp(u, -c, c)``; ``out[t] = sum_k topk_weights[t,k] * (w2[ids[t,k]] @ (silu(g) * u))``
    over ``ids != -1`` (a token with no valid id gets zeros). fp32 accumulate, output dtype of x.

    Args: x ``[T, H]`` bf16/fp16 (fp32/fp64 on the reference); topk_weights float32 ``[T, k]``;
    topk_ids int32/int64 ``[T, k]``; w13 ``[E, 2I, H]`` (gate rows first, then up); w2 ``[E, H, I]``;
    either weight may be an fp8 (128,128) or mxfp4 (1,32) QuantTensor.
    """
    op = "moe"
    check_moe_args(op, x, topk_weights, topk_ids, w13, w2)
    C.choice(op, "activation", activation, ACTIVATIONS)
    if swiglu_limit is not None and not swiglu_limit > 0:
        raise OpError(op, "swiglu_limit", "a positive float or None", repr(swiglu_limit))
    C.same_device(op, x=x, topk_weights=topk_weights, topk_ids=topk_ids, w13=w13, w2=w2)
    return _MOE.call(x, topk_weights, topk_ids, w13, w2, activation=activation,
                     swiglu_limit=None if swiglu_limit is None else float(swiglu_limit))


# ---- permute / combine -------------------------------------------------------------------------

def _permute_fake(x, topk_ids, num_experts):
    M = torch.library.get_ctx().new_dynamic_size()
    return (x.new_empty((M, x.shape[1])), x.new_empty((num_experts + 1,), dtype=torch.int32),
            x.new_empty((M,), dtype=torch.int64))


_PERMUTE = OpDef("moe_permute", "Tensor x, Tensor topk_ids, int num_experts", "(Tensor, Tensor, Tensor)",
                 _permute_fake)
register_data_check("moe_permute", lambda x, ids, E: _ids_check("moe_permute", "topk_ids", ids, E))


def moe_permute(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort token copies by expert (OPS.md 2.5).

    Returns ``x_sorted [M, H]`` (M = number of ids != -1), ``offsets`` int32 ``[E+1]`` and
    ``src_index`` int64 ``[M]`` with ``src_index[m] = token*k + slot`` and
    ``x_sorted[m] = x[src_index[m] // k]``; rows are stable by (token, slot) within an expert.
    """
    op = "moe_permute"
    C.tensor(op, "x", x)
    C.tensor(op, "topk_ids", topk_ids, C.INDEX_DTYPES)
    S = C.Shapes(op)
    S.check("x", x.shape, ("T", "H"))
    S.check("topk_ids", topk_ids.shape, ("T", "k"))
    C.positive_int(op, "num_experts", num_experts)
    C.same_device(op, x=x, topk_ids=topk_ids)
    return _PERMUTE.call(x, topk_ids, num_experts)


def _combine_fake(y_sorted, src_index, topk_weights, num_tokens):
    return y_sorted.new_empty((num_tokens, y_sorted.shape[1]))


_COMBINE = OpDef("moe_combine", "Tensor y_sorted, Tensor src_index, Tensor topk_weights, int num_tokens", "Tensor",
                 _combine_fake, differentiable=("y_sorted", "topk_weights"))
def _combine_check(y_sorted, src_index, topk_weights, num_tokens) -> None:
    C.in_range("moe_combine", "src_index", src_index, 0, topk_weights.numel(), "token*k + slot")
    if src_index.numel() and src_index.unique().numel() != src_index.numel():
        raise OpError("moe_combine", "src_index", "distinct token*k + slot values (as moe_permute makes them)",
                      "duplicates")


register_data_check("moe_combine", _combine_check)


def moe_combine(y_sorted: torch.Tensor, src_index: torch.Tensor, topk_weights: torch.Tensor,
                num_tokens: int) -> torch.Tensor:
    """Weighted sum back per token (OPS.md 2.5): ``out[t] = sum_m [src_index[m] // k == t] w[t, slot] y_sorted[m]``.

    fp32 accumulate; output ``[num_tokens, H]`` in the dtype of ``y_sorted``.
    """
    op = "moe_combine"
    C.tensor(op, "y_sorted", y_sorted, C.FLOAT_DTYPES)
    C.tensor(op, "src_index", src_index, C.INDEX_DTYPES)
    C.tensor(op, "topk_weights", topk_weights, C.FLOAT_DTYPES)
    S = C.Shapes(op)
    S.check("y_sorted", y_sorted.shape, ("M", "H"))
    S.check("src_index", src_index.shape, ("M",))
    S.check("topk_weights", topk_weights.shape, ("T", "k"))
    C.positive_int(op, "num_tokens", num_tokens, low=0)
    if num_tokens != S["T"]:
        raise OpError(op, "num_tokens", f"the token count of topk_weights ({S['T']})", str(num_tokens))
    C.same_device(op, y_sorted=y_sorted, src_index=src_index, topk_weights=topk_weights)
    return _COMBINE.call(y_sorted, src_index, topk_weights, num_tokens)
