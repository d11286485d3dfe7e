"""Mode ``custom``: every opbridge op becomes one node ``opbridge::<name>`` (domain version 1).

Tensors (plain or optional) are the node's inputs in schema order, an absent optional is an
empty input name; every other argument is an attribute: ``int``/``bool``/``ScalarType`` as
INT, ``float`` as FLOAT, ``str`` as STRING, ``int[]`` as INTS. Absent optionals (``d_v=None``)
and the format fields of an unquantized ``Quant`` argument are left out. :func:`reference_ops`
runs such nodes in ``onnx.reference.ReferenceEvaluator`` through opbridge's reference backend.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch
from onnxscript import values

from ..core.opdef import OPS
from . import schema

_OPSET = values.Opset(schema.DOMAIN, schema.DOMAIN_VERSION)


@lru_cache(maxsize=None)
def node_op(op: str) -> values.Op:
    """The onnxscript handle that records one ``opbridge::<op>`` node."""
    return values.Op(_OPSET, op, schema.op_schema(op))


def translation(op: str) -> Callable[..., Any]:
    """The exporter's translation function for ``torch.ops.opbridge.<op>.default`` in mode ``custom``."""
    params = schema.flat_params(op)

    def translate(*args: Any, **kwargs: Any) -> Any:
        named = schema.bind(op, args, kwargs)
        inputs = {p.name: named[p.name] for p in params if p.is_tensor}
        attrs = {}
        for p in params:
            if not p.is_tensor and (v := schema.attribute_value(p, named[p.name])) is not None:
                attrs[p.name] = v
        return node_op(op)(**inputs, **attrs)

    translate.__name__ = f"opbridge_{op}_custom"
    return translate


# ---- running custom nodes in onnx.reference ---------------------------------------------------

def to_torch(a: Any) -> Any:
    """numpy (incl. ml_dtypes bfloat16 / float8) -> torch, sharing no memory with the evaluator."""
    if a is None:
        return None
    a = np.asarray(a)
    name = a.dtype.name
    if name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    if name == "float8_e4m3fn":
        return torch.from_numpy(a.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    return torch.from_numpy(a.copy())


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn):
        import ml_dtypes  # a dependency of onnx; only needed for these two dtypes

        np_dtype = ml_dtypes.bfloat16 if t.dtype == torch.bfloat16 else ml_dtypes.float8_e4m3fn
        bits = torch.int16 if t.dtype == torch.bfloat16 else torch.uint8
        return t.view(bits).numpy().view(np_dtype)
    return t.numpy()


def _run_on_reference(op: str, inputs: tuple, attrs: dict) -> tuple:
    from ..core.settings import use_backend

    params = schema.flat_params(op)
    tensors = iter(list(inputs) + [None] * (sum(p.is_tensor for p in params) - len(inputs)))
    flat = [to_torch(next(tensors)) if p.is_tensor else schema.python_value(p, attrs.get(p.name)) for p in params]
    with use_backend("reference"), torch.no_grad():
        out = OPS[op].op(*flat)
    out = out if isinstance(out, (tuple, list)) else (out,)
    return tuple(to_numpy(o) for o in out)


@lru_cache(maxsize=None)
def _op_run_class(op: str) -> type:
    from onnx.reference.op_run import OpRun

    def _run(self: Any, *inputs: Any, **attrs: Any) -> tuple:
        return _run_on_reference(op, inputs, attrs)

    # ReferenceEvaluator finds an implementation by (op_domain, class name), so the class is named like the op.
    return type(op, (OpRun,), {"op_domain": schema.DOMAIN, "_run": _run,
                               "__doc__": f"opbridge::{op} on opbridge's reference backend."})


def reference_ops() -> list[type]:
    """``OpRun`` classes for every ``opbridge`` domain op, for ``ReferenceEvaluator(model, new_ops=...)``.

    Each runs the op on opbridge's reference backend (the numerical oracle of OPS.md), so a model
    exported with ``mode="custom"`` runs wherever Python, torch and onnx do.
    """
    return [_op_run_class(op) for op in OPS]
