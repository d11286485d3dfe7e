"""Check that every rank of the group calls the layer with compatible arguments, before any payload moves.

A mistake on one rank (a wrong shard, a different hidden size, a bad dtype) would otherwise make
the ranks post ``all_to_all`` calls of different sizes, which hangs or corrupts memory. So each
rank validates its own arguments *without raising*, then the ranks exchange a small fixed-size
vector of metadata with one ``all_gather``; every rank sees the same table and raises the same
error (or none). Only when some rank reports an error do the ranks exchange its message.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..core.errors import OpError, OpTypeError
from .comm import all_gather_rows

PROTOCOL = 0x0EB1  # changes when the metadata layout does

# (field, argument named in the error, what must agree)
FIELDS = (
    ("protocol", "group", "the same opbridge expert-parallel protocol version"),
    ("world_size", "group", "the same group size"),
    ("local_experts", "w13", "the same number of local experts (w13.shape[0]) on every rank; experts are "
                             "sharded evenly"),
    ("hidden", "x", "the same hidden size H"),
    ("intermediate", "w2", "the same expert intermediate size I"),
    ("top_k", "topk_ids", "the same top_k"),
    ("dtype", "x", "the same x dtype (it is the dispatch payload)"),
    ("dispatch_fp8", "dispatch_fp8", "the same dispatch_fp8 setting"),
    ("capacity", "capacity", "the same capacity (-1: dropless)"),
    ("activation", "activation", "the same activation"),
    ("swiglu_limit", "swiglu_limit", "the same swiglu_limit"),
    ("grad", "x", "the same autograd mode (x / weights requiring grad): backward runs collectives"),
)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dtype_code(dt: torch.dtype) -> int:
    return _DTYPES.index(dt) if dt in _DTYPES else -1


def float_code(v: Optional[float]) -> int:
    return -1 if v is None else struct.unpack("<q", struct.pack("<d", float(v)))[0]


@dataclass(frozen=True)
class Meta:
    world_size: int
    local_experts: int
    hidden: int
    intermediate: int
    top_k: int
    dtype: int
    dispatch_fp8: int
    capacity: int
    activation: int
    swiglu_limit: int
    grad: int
    protocol: int = PROTOCOL

    def vector(self) -> list[int]:
        return [int(getattr(self, name)) for name, _, _ in FIELDS]


def _readable(field: str, values: list[int]) -> list[object]:
    if field == "dtype":
        return [str(_DTYPES[v]).removeprefix("torch.") if 0 <= v < len(_DTYPES) else v for v in values]
    if field == "swiglu_limit":
        return [None if v == -1 else struct.unpack("<d", struct.pack("<q", v))[0] for v in values]
    return values


def agree(op: str, group, device: torch.device, meta: Optional[Meta],  # noqa: ANN001
          error: Optional[BaseException]) -> None:
    """Collective: raise on every rank if any rank had a local ``error`` or the ranks' ``meta`` differ.

    ``error`` is this rank's own validation error (re-raised here, after the exchange, so the other
    ranks do not wait for it). Other ranks raise an ``OpError`` naming the failing rank and its message.
    """
    n = len(FIELDS)
    vec = meta.vector() if meta is not None and error is None else [-1] * n
    vec.append(1 if error is not None else 0)
    table = all_gather_rows(torch.tensor(vec, dtype=torch.int64, device=device), group).tolist()
    failing = [r for r, row in enumerate(table) if row[n]]
    if failing:
        info = None
        if error is not None:
            info = (type(error).__name__, getattr(error, "arg", None), getattr(error, "expected", None),
                    getattr(error, "given", None), str(error))
        infos: list = [None] * len(table)
        dist.all_gather_object(infos, info, group=group)
        if error is not None:
            raise error
        r = failing[0]
        kind, arg, expected, given, text = infos[r]
        if arg is None:
            raise _on_rank(OpError, op, "(unknown)", "valid arguments", text, r, failing)
        raise _on_rank(OpTypeError if kind == "OpTypeError" else OpError, op, arg, expected, given, r, failing)
    for i, (field, arg, what) in enumerate(FIELDS):
        values = [row[i] for row in table]
        if len(set(values)) > 1:
            per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(_readable(field, values)))
            raise OpError(op, arg, what, per_rank)


def _on_rank(cls, op: str, arg: str, expected: str, given: str, rank: int, failing: list[int]):  # noqa: ANN001, ANN202
    """The error of another rank, raised here so that every rank stops with the same message."""
    e = cls(op, arg, expected, given)
    e.rank = rank
    others = f" (ranks failing: {failing})" if len(failing) > 1 else ""
    e.args = (f"opbridge.{op}: argument '{arg}' on rank {rank}{others}: expected {expected}, got {given}",)
    return e
