"""Triton implementations of the MoE ops (OPS.md section 2), forward and backward.

Kernels live in :mod:`opbridge.kernels.triton` (``moe_route``, ``moe_permute``, ``grouped_gemm``,
``moe_grouped``, ``moe_fused``); this module says which calls they can run and turns QuantTensor
arguments into kernel operands. What runs here:

* routing: logits float16/bfloat16/float32 (float64 is the oracle's), up to 4096 experts, top-k <= 64;
* GEMMs and ``moe``: bfloat16/float16 activations; weights of the same dtype, fp8 (128,128) or
  MXFP4 (1,32); activations may also be an fp8 (1,128) QuantTensor. fp32 accumulate everywhere.
  ``moe`` quantises activations to fp8 (1,128) where they feed an fp8 weight (DeepSeek-V3 recipe)
  and keeps them 16-bit for MXFP4 weights;
* backward: ``grouped_gemm``, ``grouped_gemm_masked`` and ``moe`` with unquantised 16-bit operands
  run on the same GEMM kernels; ``moe_combine``'s backward is the reference recompute, registered
  explicitly (it is a weighted gather, not worth kernels of its own yet).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ...core.formats import QuantTensor
from ...kernels.triton import moe_fused as KF
from ...kernels.triton import moe_grouped as KG
from ...kernels.triton import moe_permute as KP
from ...kernels.triton import moe_route as KR
from ...kernels.triton.grouped_gemm import B_FP8, B_MXFP4, Operand
from ...kernels.triton.moe_configs import route_config
from . import BACKEND, devices

HALF = (torch.bfloat16, torch.float16)
ROUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_EXPERTS = 4096  # a token's expert row lives in registers
MAX_TOPK = 64  # top-k is unrolled
_DEVICES = devices()


def _dt(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def _guard(t):
    dev = t.data.device if isinstance(t, QuantTensor) else t.device
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def _operand(x) -> Operand:
    if isinstance(x, QuantTensor):
        return Operand(x.data, x.scale, B_FP8 if x.fmt == "fp8" else B_MXFP4)
    return Operand(x)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _scale_reason(arg: str, q: QuantTensor) -> Optional[str]:
    """The kernels index scales by the contract's shapes; anything else would read out of bounds."""
    shape = tuple(q.shape)
    if q.fmt == "mxfp4":
        want = (*shape[:-1], shape[-1] // 32)
        dtypes = (torch.uint8,)
        data_dtypes = (torch.uint8,)
    elif q.block == (1, 128):
        want = (*shape[:-1], _cdiv(shape[-1], 128))
        dtypes, data_dtypes = (torch.float32,), (torch.float8_e4m3fn,)
    else:
        want = (*shape[:-2], _cdiv(shape[-2], 128), _cdiv(shape[-1], 128))
        dtypes, data_dtypes = (torch.float32,), (torch.float8_e4m3fn,)
    if q.data.dtype not in data_dtypes:
        return f"{arg} data dtype {_dt(q.data)} not supported for {q.fmt}"
    if q.scale is None or tuple(q.scale.shape) != want or q.scale.dtype not in dtypes:
        got = None if q.scale is None else (tuple(q.scale.shape), _dt(q.scale))
        return f"{arg} scale must be {_dt(torch.empty(0, dtype=dtypes[0]))} of shape {want} for {q.fmt} {q.block}, got {got}"
    return None


def _act_reason(arg: str, a) -> Optional[str]:
    if isinstance(a, QuantTensor):
        return _scale_reason(arg, a)
    if a.dtype not in HALF:
        return f"{arg} dtype {_dt(a)} not supported (bfloat16, float16; float32/float64 run on the reference backend)"
    return None


def _weight_reason(arg: str, w, act_dtype: Optional[torch.dtype]) -> Optional[str]:
    if isinstance(w, QuantTensor):
        return _scale_reason(arg, w)
    if w.dtype not in HALF:
        return f"{arg} dtype {_dt(w)} not supported (bfloat16, float16, or an fp8/mxfp4 QuantTensor)"
    if act_dtype is not None and w.dtype != act_dtype:
        return f"{arg} dtype {_dt(w)} differs from the activations' {str(act_dtype).removeprefix('torch.')}"
    return None


def _out_reason(out_dtype) -> Optional[str]:
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"out_dtype {out_dtype} not supported (bfloat16, float16, float32)"
    return None


# ---- routing -------------------------------------------------------------------------------------------

def _route_reason(logits, top_k) -> Optional[str]:
    if logits.dtype not in ROUTE_DTYPES:
        return f"logits dtype {_dt(logits)} not supported (float16, bfloat16, float32)"
    if logits.shape[1] > MAX_EXPERTS:
        return f"{logits.shape[1]} experts not supported (at most {MAX_EXPERTS})"
    if top_k > MAX_TOPK:
        return f"top_k={top_k} not supported (at most {MAX_TOPK})"
    return None


def _route_supports(logits, top_k, *, scoring, correction_bias, num_groups, topk_groups, renormalize,
                    scaling_factor) -> Optional[str]:
    if num_groups > 64:
        return f"num_groups={num_groups} not supported (at most 64)"
    return _route_reason(logits, top_k)


@BACKEND.implement("moe_route", supports=_route_supports, devices=_DEVICES)
def moe_route(logits, top_k, *, scoring, correction_bias, num_groups, topk_groups, renormalize, scaling_factor):
    with _guard(logits):
        return KR.moe_route(logits, top_k, scoring, correction_bias, num_groups, topk_groups, renormalize,
                            scaling_factor, route_config(logits.device, logits.shape[1]))


def _hash_supports(logits, token_ids, tid2eid, *, scoring, renormalize, scaling_factor) -> Optional[str]:
    return _route_reason(logits, tid2eid.shape[1])


@BACKEND.implement("moe_route_hash", supports=_hash_supports, devices=_DEVICES)
def moe_route_hash(logits, token_ids, tid2eid, *, scoring, renormalize, scaling_factor):
    with _guard(logits):
        return KR.moe_route_hash(logits, token_ids, tid2eid, scoring, renormalize, scaling_factor,
                                 route_config(logits.device, logits.shape[1]))


# ---- grouped GEMMs -------------------------------------------------------------------------------------

def _gemm_supports(a, b, groups, *, out_dtype) -> Optional[str]:
    act_dtype = None if isinstance(a, QuantTensor) else a.dtype
    return (_act_reason("a", a) or _weight_reason("b", b, act_dtype) or _out_reason(out_dtype)
            or (None if groups.shape[0] <= 1 << 16 else "more than 65536 groups not supported"))


@BACKEND.implement("grouped_gemm", supports=_gemm_supports, devices=_DEVICES)
def grouped_gemm(a, b, offsets, *, out_dtype):
    with _guard(a):
        return KG.grouped_gemm(_operand(a), _operand(b), offsets, out_dtype)


@BACKEND.implement("grouped_gemm_masked", supports=_gemm_supports, devices=_DEVICES)
def grouped_gemm_masked(a, b, masked_m, *, out_dtype):
    with _guard(a):
        return KG.grouped_gemm_masked(_operand(a), _operand(b), masked_m, out_dtype)


def _gemm_bwd_supports(grads, a, b, groups, *, out_dtype) -> Optional[str]:
    if isinstance(a, QuantTensor) or isinstance(b, QuantTensor):
        return "backward needs unquantized bfloat16/float16 operands"
    return _gemm_supports(a, b, groups, out_dtype=out_dtype)


def _gemm_backward(masked: bool):
    def backward(grads, a, b, groups, *, out_dtype):
        g = grads[0]
        if g is None:
            return [None, None]
        with _guard(a):
            da, db = KG.grouped_gemm_backward(g, a, b, groups, masked)
        return [da, db]
    return backward


BACKEND.implement("grouped_gemm_backward", supports=_gemm_bwd_supports, devices=_DEVICES)(_gemm_backward(False))
BACKEND.implement("grouped_gemm_masked_backward", supports=_gemm_bwd_supports,
                  devices=_DEVICES)(_gemm_backward(True))


# ---- the MoE layer --------------------------------------------------------------------------------------

def _moe_supports(x, topk_weights, topk_ids, w13, w2, *, activation, swiglu_limit) -> Optional[str]:
    if x.dtype not in HALF:
        return f"x dtype {_dt(x)} not supported (bfloat16, float16; float32/float64 run on the reference backend)"
    if topk_weights.dtype == torch.float64:
        return "topk_weights dtype float64 not supported (float32)"
    reason = _weight_reason("w13", w13, x.dtype) or _weight_reason("w2", w2, x.dtype)
    if reason:
        return reason
    I = w13.shape[1] // 2
    if isinstance(w2, QuantTensor) and w2.fmt == "fp8" and I % 128:
        return f"fp8 w2 needs I % 128 == 0 (the fused (1,128) activation quantisation), got I={I}"
    return None


@BACKEND.implement("moe", supports=_moe_supports, devices=_DEVICES)
def moe(x, topk_weights, topk_ids, w13, w2, *, activation, swiglu_limit):
    with _guard(x):
        return KF.moe_forward(x, topk_weights, topk_ids, _operand(w13), _operand(w2), swiglu_limit)


def _moe_bwd_supports(grads, x, topk_weights, topk_ids, w13, w2, *, activation, swiglu_limit) -> Optional[str]:
    if isinstance(w13, QuantTensor) or isinstance(w2, QuantTensor):
        return "backward needs unquantized bfloat16/float16 weights"
    return _moe_supports(x, topk_weights, topk_ids, w13, w2, activation=activation, swiglu_limit=swiglu_limit)


@BACKEND.implement("moe_backward", supports=_moe_bwd_supports, devices=_DEVICES)
def moe_backward(grads, x, topk_weights, topk_ids, w13, w2, *, activation, swiglu_limit):
    g = grads[0]
    if g is None:
        return [None, None, None, None]
    with _guard(x):
        return list(KF.moe_backward(g, x, topk_weights, topk_ids, w13, w2, swiglu_limit))


# ---- permute / combine ----------------------------------------------------------------------------------

@BACKEND.implement("moe_permute", devices=_DEVICES)
def moe_permute(x, topk_ids, num_experts):
    with _guard(x):
        return KP.moe_permute(x, topk_ids, num_experts)


def _combine_supports(y_sorted, src_index, topk_weights, num_tokens) -> Optional[str]:
    if y_sorted.dtype not in ROUTE_DTYPES:
        return f"y_sorted dtype {_dt(y_sorted)} not supported (float16, bfloat16, float32)"
    if topk_weights.dtype == torch.float64:
        return "topk_weights dtype float64 not supported (float32)"
    return None


@BACKEND.implement("moe_combine", supports=_combine_supports, devices=_DEVICES)
def moe_combine(y_sorted, src_index, topk_weights, num_tokens):
    with _guard(y_sorted):
        return KP.moe_combine(y_sorted, src_index, topk_weights, num_tokens)


def _register_combine_backward() -> None:
    # Explicitly the reference recompute (a weighted gather; no kernel of its own yet).
    from ..reference import moe as ref_moe
    from ..reference.autograd import recompute_backward

    def supports(grads, *args, **kwargs) -> Optional[str]:
        return _combine_supports(*args, **kwargs)

    BACKEND.implement("moe_combine_backward", supports=supports, devices=_DEVICES)(
        recompute_backward(ref_moe.moe_combine, ("y_sorted", "topk_weights")))


_register_combine_backward()
