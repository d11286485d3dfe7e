"""What the ONNX side knows about an opbridge op: its flat parameters, their ONNX roles, its node schema.

The exporter hands a translation function the arguments of one FX node of
``torch.ops.opbridge.<name>``: the op's *flat* schema (a ``Quant w`` parameter arrives as
``w, w_scale, w_fmt, w_block``), tensors as ONNX values and everything else as Python values.
:func:`bind` names them; :func:`op_schema` describes the one-node form of the op in the
``opbridge`` domain (tensors become inputs, everything else attributes), built from
``opbridge.core.opdef.OPS`` so a new op needs no new code here.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Optional, Sequence

import torch
from onnx import TensorProto
from onnx.defs import OpSchema

from ..core.opdef import OPS

DOMAIN = "opbridge"
DOMAIN_VERSION = 1

# Names of each op's outputs in the custom-domain node (the torch schemas leave them unnamed).
OUTPUT_NAMES: dict[str, tuple[str, ...]] = {
    "moe_route": ("topk_weights", "topk_ids"),
    "moe_route_hash": ("topk_weights", "topk_ids"),
    "moe_permute": ("x_sorted", "offsets", "src_index"),
    "indexer_topk": ("indices",),
    "indexer_topk_paged": ("indices",),
    "indexer_logits": ("logits",),
    "sparse_attention": ("out", "lse"),
    "sparse_attention_paged": ("out", "lse"),
    "mhc_pre": ("y", "post", "comb"),
    "mhc_post_pre": ("new_residual", "y", "post", "comb"),
}

# torch dtype <-> ONNX element type, for ScalarType attributes (grouped_gemm's out_dtype).
TORCH_TO_ONNX_DTYPE = {
    torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
    torch.float64: TensorProto.DOUBLE, torch.int32: TensorProto.INT32, torch.int64: TensorProto.INT64,
    torch.uint8: TensorProto.UINT8, torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN, torch.bool: TensorProto.BOOL,
}
ONNX_TO_TORCH_DTYPE = {v: k for k, v in TORCH_TO_ONNX_DTYPE.items()}

_ALL_TENSOR_TYPES = [
    "tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)", "tensor(int32)", "tensor(int64)",
    "tensor(uint8)", "tensor(float8e4m3fn)", "tensor(bool)",
]

# schema type of a non-tensor parameter -> ONNX attribute type
_ATTR_TYPES = {
    "int": OpSchema.AttrType.INT, "int?": OpSchema.AttrType.INT, "bool": OpSchema.AttrType.INT,
    "float": OpSchema.AttrType.FLOAT, "float?": OpSchema.AttrType.FLOAT, "str": OpSchema.AttrType.STRING,
    "int[]": OpSchema.AttrType.INTS, "ScalarType": OpSchema.AttrType.INT,
}


@dataclass(frozen=True)
class FlatParam:
    """One parameter of an op's flat (dispatcher) schema."""

    name: str
    type: str  # "Tensor", "Tensor?", "int", "int?", "float", "float?", "bool", "str", "int[]", "ScalarType"

    @property
    def is_tensor(self) -> bool:
        return self.type.startswith("Tensor")


@lru_cache(maxsize=None)
def flat_params(op: str) -> tuple[FlatParam, ...]:
    """The flat parameters of ``torch.ops.opbridge.<op>`` in schema order."""
    out = []
    for p in OPS[op].params:
        for item in p.flat_schema():
            typ, name = item.rsplit(" ", 1)
            out.append(FlatParam(name, typ))
    return tuple(out)


def opbridge_op(target: Any) -> Optional[str]:
    """``"moe"`` for the FX target ``torch.ops.opbridge.moe.default``; None for anything else."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "opbridge":
        return target._schema.name.split("::", 1)[1]
    return None


def num_outputs(op: str) -> int:
    return len(OPS[op].op._schema.returns)


def output_names(op: str) -> tuple[str, ...]:
    n = num_outputs(op)
    return OUTPUT_NAMES.get(op, ("out",) if n == 1 else tuple(f"out{i}" for i in range(n)))


def bind(op: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Name the arguments of one node of ``op`` (flat schema names; absent optionals are None)."""
    params = flat_params(op)
    if len(args) > len(params):
        raise TypeError(f"opbridge.{op}: {len(args)} arguments for a schema of {len(params)}")
    named = {p.name: None for p in params}
    named.update({p.name: a for p, a in zip(params, args)})
    named.update(kwargs)
    return named


def attribute_value(param: FlatParam, value: Any) -> Any:
    """The ONNX attribute value of a non-tensor argument, or None where the attribute is left out.

    Left out: absent optionals (``int? d_v=None``) and the format fields of a plain (unquantized)
    ``Quant`` argument (``w_fmt=""``, ``w_block=[]``), so plain-tensor nodes stay uncluttered.
    """
    if value is None:
        return None
    if param.type == "bool":
        return int(bool(value))
    if param.type == "ScalarType":
        return onnx_dtype(value)
    if param.type == "int[]":
        return [int(v) for v in value] if len(value) else None
    if param.type == "str":
        return value if value else None
    return value


def onnx_dtype(value: Any) -> int:
    """ONNX element type of a ScalarType argument (the exporter already turns torch dtypes into ints)."""
    return int(TORCH_TO_ONNX_DTYPE[value]) if isinstance(value, torch.dtype) else int(value)


def python_value(param: FlatParam, value: Any) -> Any:
    """Inverse of :func:`attribute_value`, for running a custom-domain node (reference evaluator)."""
    if param.type == "bool":
        return bool(value) if value is not None else False
    if param.type == "ScalarType":
        return ONNX_TO_TORCH_DTYPE[int(value)]
    if param.type == "int[]":
        return [int(v) for v in value] if value is not None else []
    if param.type == "str":
        return value.decode() if isinstance(value, bytes) else (value or "")
    if param.type in ("int", "int?"):
        return None if value is None else int(value)
    if param.type in ("float", "float?"):
        return None if value is None else float(value)
    return value


@lru_cache(maxsize=None)
def op_schema(op: str) -> OpSchema:
    """The ONNX schema of ``opbridge::<op>`` (domain ``opbridge``, version 1), derived from the torch schema."""
    FP = OpSchema.FormalParameter
    inputs, attrs, constraints = [], [], []
    for p in flat_params(op):
        if p.is_tensor:
            tc = f"T_{p.name}"
            option = OpSchema.FormalParameterOption.Optional if p.type.endswith("?") else \
                OpSchema.FormalParameterOption.Single
            inputs.append(FP(p.name, tc, "", param_option=option))
            constraints.append((tc, _ALL_TENSOR_TYPES, ""))
        else:
            attrs.append(OpSchema.Attribute(p.name, _ATTR_TYPES[p.type], p.type, required=False))
    outputs = []
    for i, name in enumerate(output_names(op)):
        tc = f"O_{i}"
        outputs.append(FP(name, tc, ""))
        constraints.append((tc, _ALL_TENSOR_TYPES, ""))
    import opbridge  # the public function's docstring states the op's contract

    doc = (getattr(opbridge, op, None).__doc__ or "").split("\n\n")[0].strip()
    return OpSchema(op, DOMAIN, DOMAIN_VERSION, doc, inputs=inputs, outputs=outputs,
                    type_constraints=constraints, attributes=attrs)


def static_dim(value: Any, axis: int) -> Optional[int]:
    """Size of ``axis`` of an ONNX value when it is known at export time, else None."""
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    d = shape[axis]
    return d if isinstance(d, int) else None
