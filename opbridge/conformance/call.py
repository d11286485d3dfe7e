"""One op call as data: the public op's name and its arguments by parameter name.

Generators build a :class:`Call`, mutations (bad inputs) edit one, the oracle converts one to
float64; :meth:`Call.run` is the only place an op is invoked, through the public API.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

import opbridge


@functools.lru_cache(maxsize=None)
def signature(op: str) -> inspect.Signature:
    return inspect.signature(getattr(opbridge, op))


def public_op(op: str) -> Callable[..., Any]:
    return getattr(opbridge, op)


@dataclass(frozen=True)
class Call:
    op: str
    named: Mapping[str, Any] = field(default_factory=dict)

    def split(self) -> tuple[tuple, dict]:
        """Positional parameters as args (in order), keyword-only ones as kwargs."""
        args, kwargs = [], {}
        for name, p in signature(self.op).parameters.items():
            if name not in self.named:
                continue
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                kwargs[name] = self.named[name]
            else:
                args.append(self.named[name])
        return tuple(args), kwargs

    def run(self) -> tuple[torch.Tensor, ...]:
        """Call the public op; always return a tuple of outputs."""
        args, kwargs = self.split()
        out = public_op(self.op)(*args, **kwargs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def replace(self, **changes: Any) -> "Call":
        return Call(self.op, {**self.named, **changes})

    def tensors(self) -> list[torch.Tensor]:
        out = []
        for v in self.named.values():
            if isinstance(v, opbridge.QuantTensor):
                out += [v.data, v.scale]
            elif isinstance(v, torch.Tensor):
                out.append(v)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
