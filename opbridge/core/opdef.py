"""Turn one op declaration into a PyTorch custom op: schema, dispatching impl, fake, autograd.

An op is declared with its public parameters in schema syntax, plus one opbridge-only type:
``Quant w`` is a plain tensor or a :class:`QuantTensor`, carried through the dispatcher as
``Tensor w, Tensor? w_scale, str w_fmt, int[] w_block``. The custom op's implementation
rebuilds the public arguments and hands them to :func:`registry.dispatch`, so backend
implementations see the same signature as users do.

Differentiable ops get a second op ``opbridge::<name>_backward`` that is dispatched the same
way: a backend may bring its own backward kernels or reuse the reference's recompute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from . import registry, settings
from .formats import QuantTensor

LIB = torch.library.Library("opbridge", "DEF")
OPS: dict[str, "OpDef"] = {}  # every declared op by name


@dataclass(frozen=True)
class Param:
    type: str  # schema type, or "Quant"
    name: str
    kwonly: bool

    def flat_schema(self) -> list[str]:
        if self.type == "Quant":
            n = self.name
            return [f"Tensor {n}", f"Tensor? {n}_scale", f"str {n}_fmt", f"int[] {n}_block"]
        return [f"{self.type} {self.name}"]

    @property
    def width(self) -> int:
        return 4 if self.type == "Quant" else 1


def _parse(params: str) -> list[Param]:
    out, kwonly = [], False
    for item in (p.strip() for p in params.split(",")):
        if item == "*":
            kwonly = True
            continue
        typ, name = item.rsplit(" ", 1)
        out.append(Param(typ, name, kwonly))
    return out


def _flatten_quant(v: Any) -> list[Any]:
    if isinstance(v, QuantTensor):
        return [v.data, v.scale, v.fmt, list(v.block)]
    return [v, None, "", []]


def _unflatten_quant(data: torch.Tensor, scale: Optional[torch.Tensor], fmt: str, block: Sequence[int]) -> Any:
    if not fmt:
        return data
    return QuantTensor(data, scale, fmt, tuple(block))


def device_of(args: tuple) -> torch.device:
    """The device of a call: that of its first tensor (or QuantTensor) argument."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, QuantTensor):
            return a.data.device
    return torch.device("cpu")


class OpDef:
    """One registered op. ``call`` is what the public function uses after validating."""

    def __init__(self, name: str, params: str, returns: str, fake: Callable[..., Any],
                 differentiable: Sequence[str] = ()):
        self.name = name
        self.params = _parse(params)
        flat = ", ".join(s for p in self.params for s in p.flat_schema())
        LIB.define(f"{name}({flat}) -> {returns}")
        self.op = getattr(torch.ops.opbridge, name).default
        self._fake = fake
        torch.library.impl(LIB, name, "CompositeExplicitAutograd")(self._impl)
        torch.library.register_fake(f"opbridge::{name}", self._fake_impl, lib=LIB)
        self.differentiable = tuple(differentiable)
        if self.differentiable:
            self._define_backward()
        OPS[name] = self

    # -- flat <-> public ------------------------------------------------------------------
    def flatten(self, args: tuple, kwargs: dict) -> list[Any]:
        flat: list[Any] = []
        pos = [p for p in self.params if not p.kwonly]
        if len(args) != len(pos):
            raise TypeError(f"opbridge.{self.name}: expected {len(pos)} positional arguments, got {len(args)}")
        values = list(args) + [kwargs[p.name] for p in self.params if p.kwonly]
        for p, v in zip(self.params, values):
            flat.extend(_flatten_quant(v) if p.type == "Quant" else [v])
        return flat

    def unflatten(self, flat: Sequence[Any]) -> tuple[tuple, dict]:
        args, kwargs, i = [], {}, 0
        for p in self.params:
            v = _unflatten_quant(*flat[i:i + 4]) if p.type == "Quant" else flat[i]
            i += p.width
            (kwargs.__setitem__(p.name, v) if p.kwonly else args.append(v))
        return tuple(args), kwargs

    def call(self, *args: Any, **kwargs: Any) -> Any:
        return self.op(*self.flatten(args, kwargs))

    def _impl(self, *flat: Any) -> Any:
        args, kwargs = self.unflatten(flat)
        return registry.dispatch(self.name, device_of(args), args, kwargs)

    def _fake_impl(self, *flat: Any) -> Any:
        args, kwargs = self.unflatten(flat)
        return self._fake(*args, **kwargs)

    # -- autograd -------------------------------------------------------------------------
    def _diff_params(self) -> list[tuple[int, Param]]:
        """(flat position, param) of each differentiable parameter, in declaration order."""
        out, i = [], 0
        for p in self.params:
            if p.name in self.differentiable:
                out.append((i, p))
            i += p.width
        return out

    def _define_backward(self) -> None:
        name = f"{self.name}_backward"
        flat = ", ".join(s for p in self.params for s in p.flat_schema())
        LIB.define(f"{name}(Tensor?[] grads, {flat}) -> Tensor[]")
        self.backward_op = getattr(torch.ops.opbridge, name).default
        diff = self._diff_params()

        def impl(grads: list, *flat_in: Any) -> list[torch.Tensor]:
            args, kwargs = self.unflatten(flat_in)
            res = registry.dispatch(name, device_of(args), (list(grads),) + args, kwargs)
            # The schema needs a tensor in every slot: an absent (None) or quantized input, or a
            # gradient the backend did not compute, gets the same empty placeholder as the fake.
            return [r if r is not None else self._grad_like(flat_in, i, p, empty=True)
                    for r, (i, p) in zip(res, diff)]

        def fake(grads: list, *flat_in: Any) -> list[torch.Tensor]:
            return [self._grad_like(flat_in, i, p) for i, p in diff]

        torch.library.impl(LIB, name, "CompositeExplicitAutograd")(impl)
        torch.library.register_fake(f"opbridge::{name}", fake, lib=LIB)

        def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
            is_tensor = [isinstance(x, torch.Tensor) for x in inputs]
            ctx.save_for_backward(*[x for x, t in zip(inputs, is_tensor) if t])
            ctx.is_tensor = is_tensor
            ctx.others = [None if t else x for x, t in zip(inputs, is_tensor)]
            ctx.backend_choice = settings.current_override()  # backward may run on another thread

        def backward(ctx: Any, *grads: Any) -> tuple:
            saved = iter(ctx.saved_tensors)
            flat_in = [next(saved) if t else x for x, t in zip(ctx.others, ctx.is_tensor)]
            with settings.restored(ctx.backend_choice):
                res = self.backward_op(list(grads), *flat_in)
            out: list[Any] = [None] * len(flat_in)
            for r, (i, _) in zip(res, diff):
                if ctx.needs_input_grad[i] and r.numel() > 0:
                    out[i] = r
            return tuple(out)

        torch.library.register_autograd(f"opbridge::{self.name}", backward, setup_context=setup_context, lib=LIB)

    def _grad_like(self, flat_in: Sequence[Any], i: int, p: Param, empty: bool = False) -> torch.Tensor:
        x = flat_in[i]
        if isinstance(x, torch.Tensor) and not empty and not (p.type == "Quant" and flat_in[i + 2]):
            return torch.empty_like(x)
        anchor = next(t for t in flat_in if isinstance(t, torch.Tensor))
        return anchor.new_empty(0, dtype=torch.float32)
