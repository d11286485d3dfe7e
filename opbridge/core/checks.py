"""Small validation helpers: each raises OpError / OpTypeError naming the op and the argument."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch

from .errors import OpError, OpTypeError
from .formats import QuantTensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
Dim = Union[int, str, None]  # an int must match; a str names a size that must agree across args


def wide_dtype(*xs: object) -> torch.dtype:
    """The precision of the reference math and of float coefficient outputs: float64 if any input is, else float32."""
    return torch.float64 if any(isinstance(x, torch.Tensor) and x.dtype == torch.float64 for x in xs) else torch.float32


def _dt(dtypes: Iterable[torch.dtype]) -> str:
    return "one of (" + ", ".join(str(d).removeprefix("torch.") for d in dtypes) + ")"


def tensor(op: str, arg: str, x: object, dtypes: Optional[Sequence[torch.dtype]] = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise OpTypeError(op, arg, "a torch.Tensor", type(x).__name__)
    if dtypes is not None and x.dtype not in dtypes:
        raise OpTypeError(op, arg, f"dtype {_dt(dtypes)}", str(x.dtype).removeprefix("torch."))
    return x


def optional(op: str, arg: str, x: object, dtypes: Optional[Sequence[torch.dtype]] = None) -> Optional[torch.Tensor]:
    return None if x is None else tensor(op, arg, x, dtypes)


class Shapes:
    """Collects named sizes across the arguments of one call so mismatches name both sides."""

    def __init__(self, op: str):
        self.op = op
        self.sizes: dict[str, tuple[int, str]] = {}

    def check(self, arg: str, shape: Sequence[int], expected: Sequence[Dim]) -> None:
        pretty = "[" + ", ".join(str(e) if e is not None else "*" for e in expected) + "]"
        if len(shape) != len(expected):
            raise OpError(self.op, arg, f"{len(expected)} dimensions {pretty}", f"shape {tuple(shape)}")
        for size, exp in zip(shape, expected):
            if exp is None:
                continue
            if isinstance(exp, (int, torch.SymInt)):  # SymInt: a traced size (torch.export), not a name
                if size != exp:
                    raise OpError(self.op, arg, f"shape {pretty}", f"shape {tuple(shape)}")
                continue
            if exp in self.sizes and self.sizes[exp][0] != size:
                seen, where = self.sizes[exp]
                raise OpError(self.op, arg, f"{exp}={seen} (from '{where}') in shape {pretty}", f"shape {tuple(shape)}")
            self.sizes.setdefault(exp, (size, arg))

    def __getitem__(self, name: str) -> int:
        return self.sizes[name][0]


def same_device(op: str, **tensors: object) -> None:
    first: Optional[tuple[str, torch.device]] = None
    for name, t in tensors.items():
        if isinstance(t, QuantTensor):
            t = t.data
        if not isinstance(t, torch.Tensor):
            continue
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise OpError(op, name, f"a tensor on {first[1]} (the device of '{first[0]}')", f"a tensor on {t.device}")


def positive_int(op: str, arg: str, v: object, *, low: int = 1, high: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise OpTypeError(op, arg, "an int", type(v).__name__)
    if v < low or (high is not None and v > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise OpError(op, arg, f"an int {rng}", str(v))
    return v


def choice(op: str, arg: str, v: object, options: Sequence[object]) -> None:
    if v not in options:
        raise OpError(op, arg, f"one of {tuple(options)}", repr(v))


def cu_seqlens(op: str, arg: str, cu: Optional[torch.Tensor], total: int, shapes: Shapes, batch: str = "B+1") -> None:
    if cu is None:
        return
    tensor(op, arg, cu, (torch.int32,))
    shapes.check(arg, cu.shape, (batch,))


def in_range(op: str, arg: str, x: torch.Tensor, low: int, high: int, what: str = "values") -> None:
    """Data-dependent: every element in [low, high). Syncs the device."""
    if x.numel() == 0:
        return
    lo, hi = int(x.min()), int(x.max())
    if lo < low or hi >= high:
        raise OpError(op, arg, f"{what} in [{low}, {high})", f"values in [{lo}, {hi}]")
