"""Backward by recomputation: run a forward under autograd and differentiate it.

The reference backend uses this for every differentiable op; another backend may register it
for an op it has no backward kernel for yet (explicitly, so the choice is visible).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Sequence

import torch

from ...core.formats import QuantTensor


def recompute_backward(forward: Callable[..., Any], differentiable: Sequence[str]) -> Callable[..., list]:
    sig = inspect.signature(forward)

    def backward(grads: list, *args: Any, **kwargs: Any) -> list[Optional[torch.Tensor]]:
        bound = sig.bind(*args, **kwargs)
        leaves: list[Optional[torch.Tensor]] = []
        with torch.enable_grad():
            for name in differentiable:
                v = bound.arguments.get(name)
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    leaf = v.detach().requires_grad_(True)
                    bound.arguments[name] = leaf
                    leaves.append(leaf)
                else:  # absent, quantized or integer: no gradient
                    leaves.append(None)
            outs = forward(*bound.args, **bound.kwargs)
            outs = outs if isinstance(outs, tuple) else (outs,)
            pairs = [(o, g) for o, g in zip(outs, grads)
                     if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
            wrt = [leaf for leaf in leaves if leaf is not None]
            if not pairs or not wrt:
                got: Sequence[Optional[torch.Tensor]] = [None] * len(wrt)
            else:
                got = torch.autograd.grad([o for o, _ in pairs], wrt, [g.to(o.dtype) for o, g in pairs],
                                          allow_unused=True)
        it = iter(got)
        return [None if leaf is None else _or_zeros(next(it), leaf) for leaf in leaves]

    return backward


def _or_zeros(g: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


def is_quant(x: Any) -> bool:
    return isinstance(x, QuantTensor)
