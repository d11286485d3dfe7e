"""The registry of decompositions per op, and the checks run before the ONNX graph is built.

A :class:`Translation` pairs the function that records ONNX nodes for one op call with a
``why_not`` predicate that looks at the call as torch.export saw it (example tensors, Python
scalars) and returns the reason the mode cannot express it, or None. Export checks every call
first, so an inexpressible call fails with its op and mode named before any ONNX is built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from .builder import Args, Builder

WhyNot = Callable[[Args], Optional[str]]


def _no_reason(a: Args) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Translation:
    fn: Callable[[Builder, Args], Any]
    why_not: WhyNot = _no_reason


DECOMPOSED: dict[str, Translation] = {}


def decomposition(op: str, why_not: WhyNot = _no_reason):
    def deco(fn: Callable[[Builder, Args], Any]) -> Callable[[Builder, Args], Any]:
        DECOMPOSED[op] = Translation(fn, why_not)
        return fn
    return deco


def plain(*names: str) -> WhyNot:
    """``why_not`` for ops whose ``Quant`` arguments must be plain tensors in this mode."""
    def why_not(a: Args) -> Optional[str]:
        for n in names:
            fmt = getattr(a, f"{n}_fmt")
            if fmt:
                return (f"argument '{n}' is a quantized {fmt} QuantTensor; standard-op decompositions take "
                        f"plain float weights (dequantize first, or use mode 'custom')")
        return None
    return why_not


def load() -> None:
    """Import the modules that fill the registries (kept out of import time of opbridge.onnx)."""
    from . import decompose_attention, decompose_mhc, decompose_moe  # noqa: F401
