"""A thin helper over onnxscript ops for writing decompositions: constants, dtypes, shapes.

Decompositions run inside the exporter's tracer, so every ``g.op.X(...)`` call records one
standard ONNX node. Constants are made explicit (typed) rather than left to the tracer's
Python-constant handling, because intermediate values do not always carry a dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
import onnx_ir as ir
from onnxscript import values

from . import schema

MIN_OPSET = 18  # ReduceMax/ReduceMean take axes as an input from 18; every decomposition is written for that

_NP = {ir.DataType.FLOAT: np.float32, ir.DataType.DOUBLE: np.float64, ir.DataType.INT64: np.int64,
       ir.DataType.INT32: np.int32, ir.DataType.BOOL: np.bool_}


class Args:
    """Bound arguments of one node, by flat schema name (``a.x``, ``a.w13_fmt``)."""

    def __init__(self, op: str, named: Mapping[str, Any]):
        self._op, self._named = op, dict(named)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._named[name]
        except KeyError:
            raise AttributeError(f"opbridge.{self._op} has no argument '{name}'") from None


@dataclass
class Builder:
    """What a decomposition needs: the standard opset, in the model's opset version."""

    opset_version: int

    def __post_init__(self) -> None:
        self.op = values.Opset("", self.opset_version)

    # ---- dtypes ------------------------------------------------------------------------------
    def wide(self, *xs: Any) -> ir.DataType:
        """The reference's compute precision: double if any input is double, else float."""
        return ir.DataType.DOUBLE if any(x is not None and x.dtype == ir.DataType.DOUBLE for x in xs) \
            else ir.DataType.FLOAT

    def cast(self, x: Any, to: ir.DataType) -> Any:
        if getattr(x, "dtype", None) == to:
            return x
        return self.op.Cast(x, to=int(to))

    # ---- constants ---------------------------------------------------------------------------
    def const(self, value: Any, dtype: ir.DataType) -> Any:
        return self.op.Constant(value=ir.tensor(np.asarray(value, dtype=_NP[dtype])))

    def f(self, value: float, dtype: ir.DataType) -> Any:
        """A float scalar in ``dtype`` (float or double)."""
        return self.const(value, dtype)

    def i64(self, *vals: int) -> Any:
        """A 1-D int64 tensor (axes, shapes, starts)."""
        return self.const(list(vals), ir.DataType.INT64)

    def s64(self, val: int) -> Any:
        """A 0-D int64 scalar."""
        return self.const(val, ir.DataType.INT64)

    # ---- shapes ------------------------------------------------------------------------------
    def dim(self, x: Any, axis: int) -> Any:
        """Size of ``axis`` of ``x`` as a 1-D int64 tensor of one element (dynamic sizes welcome)."""
        end = axis + 1 if axis != -1 else None
        return self.op.Shape(x, start=axis, end=end) if end is not None else self.op.Shape(x, start=axis)

    def scalar_dim(self, x: Any, axis: int) -> Any:
        return self.op.Squeeze(self.dim(x, axis), self.i64(0))

    def arange(self, n: Any, dtype: ir.DataType = ir.DataType.INT64) -> Any:
        """0..n-1 with ``n`` a 0-D int64 value."""
        r = self.op.Range(self.s64(0), n, self.s64(1))
        return self.cast(r, dtype)

    def slice(self, x: Any, start: int, end: int, axis: int) -> Any:
        return self.op.Slice(x, self.i64(start), self.i64(end), self.i64(axis))

    def reshape(self, x: Any, *shape: Any) -> Any:
        """Reshape to ``shape``: ints are static sizes (0 copies, -1 infers), values are 1-D int64 pieces."""
        parts = [self.i64(s) if isinstance(s, int) else s for s in shape]
        return self.op.Reshape(x, parts[0] if len(parts) == 1 else self.op.Concat(*parts, axis=0))

    def unsq(self, x: Any, *axes: int) -> Any:
        return self.op.Unsqueeze(x, self.i64(*axes))

    def sum(self, x: Any, axis: int, keepdims: bool = False) -> Any:
        return self.op.ReduceSum(x, self.i64(axis), keepdims=int(keepdims))

    def max(self, x: Any, axis: int, keepdims: bool = False) -> Any:
        return self.op.ReduceMax(x, self.i64(axis), keepdims=int(keepdims))

    def neg_inf_like(self, dtype: ir.DataType) -> Any:
        return self.f(-np.inf, dtype)

    def transpose_last2(self, x: Any, rank: int) -> Any:
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        return self.op.Transpose(x, perm=perm)


def rank(x: Any) -> int:
    return len(x.shape)


def sdim(x: Any, axis: int) -> Optional[int]:
    return schema.static_dim(x, axis)
