"""Bad inputs as data: small edits of a valid :class:`Call`, named in a case's ``mutate`` list.

Each edit names an argument and one action:
``dtype`` (cast), ``dtype_value`` (replace the argument by a torch dtype), ``device`` (move,
e.g. to ``meta``), ``narrow: [dim, length]``, ``value`` (replace; JSON null = None),
``poke: [[index...], v]`` (set one element; ``"=i,j"`` copies element ``[i, j]`` to make a
duplicate), ``quantize: [fmt, block]`` (replace by a QuantTensor of the wrong layout).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

import opbridge

from .call import Call
from .inputs.common import DTYPES, INT_DTYPES

_ALL_DTYPES = {**DTYPES, **INT_DTYPES}


def _poke(t: torch.Tensor, index: list, value: Any) -> torch.Tensor:
    t = t.clone()
    if isinstance(value, str) and value.startswith("="):
        src = tuple(int(i) for i in value[1:].split(","))
        value = t[src].item()
    t[tuple(index)] = value
    return t


def apply(call: Call, edit: Mapping[str, Any]) -> Call:
    arg = edit["arg"]
    if arg not in call.named:
        raise KeyError(f"mutation of '{arg}': {call.op} has no such argument in this call")
    v = call.named[arg]
    if "value" in edit:
        return call.replace(**{arg: edit["value"]})
    if "dtype_value" in edit:
        return call.replace(**{arg: _ALL_DTYPES[edit["dtype_value"]]})
    if "quantize" in edit:
        fmt, block = edit["quantize"]
        return call.replace(**{arg: opbridge.quantize(v.float(), fmt, tuple(block))})
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"mutation {dict(edit)} needs a tensor argument, '{arg}' is {type(v).__name__}")
    if "dtype" in edit:
        return call.replace(**{arg: v.to(_ALL_DTYPES[edit["dtype"]])})
    if "device" in edit:
        return call.replace(**{arg: v.to(edit["device"])})
    if "narrow" in edit:
        dim, length = edit["narrow"]
        return call.replace(**{arg: v.narrow(dim, 0, length)})
    if "poke" in edit:
        index, value = edit["poke"]
        return call.replace(**{arg: _poke(v, index, value)})
    raise ValueError(f"unknown mutation {dict(edit)}")


def mutate(call: Call, edits) -> Call:
    for e in edits:
        call = apply(call, e)
    return call
