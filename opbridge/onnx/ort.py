"""Mode ``ort``: ``moe`` on onnxruntime's ``com.microsoft::MoE``; every other op as in ``decomposed``.

What ``com.microsoft::MoE`` computes (contrib schema v1, checked on onnxruntime 1.32 CPU, see
docs/onnx.md): ``router_probs`` are *logits*; ``p = softmax`` over all experts; the top ``k`` of
``p`` are chosen; ``out = sum p_e * W2_e act(W1_e x)`` (``normalize_routing_weights=1`` would
renormalise ``p`` over the chosen ones). The CPU kernel is float32 only and takes SwiGLU only
interleaved (``swiglu_fusion=1``: rows ``g0, u0, g1, u1, ...``) with ``act = g * sigmoid(alpha*g) *
(u + beta)``, ``g = min(g, limit)``, ``u = clamp(u, -limit, limit)``.

opbridge's ``moe`` takes routing that is already decided (``topk_weights``, ``topk_ids``), and
ORT re-does softmax + top-k itself, so the mapping feeds ORT a router input whose softmax and
top-k give back exactly our choice: ``router[t, e] = log(w[t, e])`` for the chosen experts (``w``
summed over repeated ids) and ``-1e4`` elsewhere. ``softmax`` then yields ``w_e / sum(w)`` on the
chosen experts (``exp(-1e4)`` is 0 in float32) and ORT's top-k picks them; multiplying the output by
``sum(w)`` restores the weights, since each expert's output is linear in its weight. This holds
only for non-negative weights, so the mapping is used where ``topk_weights`` comes straight from
``moe_route`` / ``moe_route_hash`` with ``scaling_factor >= 0`` (scores are softmax, sigmoid or
sqrt-softplus: never negative); any other ``moe`` call is decomposed. Quantized weights
(``com.microsoft::QMoE``) are not mapped.
"""
from __future__ import annotations

import operator
from functools import lru_cache
from typing import Any

import onnx_ir as ir
import torch
from onnx.defs import OpSchema
from onnxscript import values

from ..core.opdef import OPS
from .builder import Args, Builder, sdim
from .decompose_moe import dense_routing

MS_DOMAIN = "com.microsoft"
SENTINEL = -1e4  # router logit of an expert that must not be chosen (ORT's MoEGroupRouter uses the same value)
ROUTERS = ("moe_route", "moe_route_hash")


@lru_cache(maxsize=None)
def _moe_op() -> values.Op:
    FP, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    names = ["input", "router_probs", "fc1_experts_weights", "fc1_experts_bias", "fc2_experts_weights",
             "fc2_experts_bias", "fc3_experts_weights", "fc3_experts_bias"]
    inputs = [FP(n, "T", "", param_option=opt if n.endswith("bias") or n.startswith("fc3") else
                 OpSchema.FormalParameterOption.Single) for n in names]
    A = OpSchema.AttrType
    attrs = [OpSchema.Attribute(n, t, "", required=False) for n, t in (
        ("k", A.INT), ("activation_type", A.STRING), ("normalize_routing_weights", A.INT),
        ("use_sparse_mixer", A.INT), ("swiglu_fusion", A.INT), ("activation_alpha", A.FLOAT),
        ("activation_beta", A.FLOAT), ("swiglu_limit", A.FLOAT))]
    schema = OpSchema("MoE", MS_DOMAIN, 1, inputs=inputs, outputs=[FP("output", "T", "")],
                      type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
                      attributes=attrs)
    return values.Op(values.Opset(MS_DOMAIN, 1), "MoE", schema)


def weights_from_router(node: torch.fx.Node) -> bool:
    """Whether a ``moe`` node's ``topk_weights`` come straight from a router with ``scaling_factor >= 0``
    (so they are never negative)."""
    from .schema import bind, opbridge_op

    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("topk_weights")
    if not (isinstance(w, torch.fx.Node) and w.target is operator.getitem and w.args[1] == 0):
        return False
    src = w.args[0]
    op = opbridge_op(src.target)
    return op in ROUTERS and bind(op, src.args, src.kwargs)["scaling_factor"] >= 0


# The moe calls that go to com.microsoft::MoE are re-targeted, in the exported program, to this op:
# same schema and behaviour as opbridge::moe, so the exporter's re-tracing keeps it and the
# translation table can send it, and only it, to ORT's kernel.
_LIB = torch.library.Library("opbridge_onnx", "DEF")
_LIB.define(str(OPS["moe"].op._schema).replace("opbridge::moe(", "moe_ort(", 1))


@torch.library.impl(_LIB, "moe_ort", "CompositeExplicitAutograd")
def _moe_ort_impl(*flat: Any) -> torch.Tensor:
    return OPS["moe"].op(*flat)


@torch.library.register_fake("opbridge_onnx::moe_ort", lib=_LIB)
def _moe_ort_fake(*flat: Any) -> torch.Tensor:
    return torch.empty_like(flat[0])


MOE_ORT = torch.ops.opbridge_onnx.moe_ort.default


def moe_applies(node: torch.fx.Node, a: Args) -> bool:
    """Whether this ``moe`` call goes to ``com.microsoft::MoE``: plain weights, ``k <= E`` (ORT's top-k
    must find k experts) and weights straight from a router (never negative)."""
    return not a.w13_fmt and not a.w2_fmt and a.topk_ids.shape[1] <= a.w13.shape[0] and weights_from_router(node)


def moe_nodes(g: Builder, a: Args) -> Any:
    op = g.op
    dt = ir.DataType.FLOAT if a.x.dtype not in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16) else a.x.dtype
    E, two_i, H = sdim(a.w13, 0), sdim(a.w13, 1), sdim(a.w13, 2)
    inter = two_i // 2
    k = sdim(a.topk_ids, 1)
    wd = dense_routing(g, a.topk_weights, a.topk_ids, E, ir.DataType.FLOAT)  # [T, E], >= 0
    router = op.Where(op.Greater(wd, g.f(0.0, ir.DataType.FLOAT)), op.Log(wd), g.f(SENTINEL, ir.DataType.FLOAT))
    total = g.sum(wd, -1, keepdims=True)  # [T, 1]
    # gate rows then up rows -> interleaved g0, u0, g1, u1, ... (swiglu_fusion=1, the CPU kernel's layout)
    fc1 = g.reshape(op.Transpose(g.reshape(g.cast(a.w13, dt), E, 2, inter, H), perm=[0, 2, 1, 3]), E, two_i, H)
    attrs = dict(k=k, activation_type="swiglu", normalize_routing_weights=0, use_sparse_mixer=0, swiglu_fusion=1,
                 activation_alpha=1.0, activation_beta=0.0)
    if a.swiglu_limit is not None:
        attrs["swiglu_limit"] = float(a.swiglu_limit)
    out = _moe_op()(input=g.cast(a.x, dt), router_probs=g.cast(router, dt), fc1_experts_weights=fc1,
                    fc2_experts_weights=g.cast(a.w2, dt), **attrs)
    out = op.Mul(g.cast(out, ir.DataType.FLOAT), total)
    return g.cast(out, a.x.dtype)

