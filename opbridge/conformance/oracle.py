"""The oracle: the reference backend run on float64 copies of a call's (de-quantized) inputs."""
from __future__ import annotations

from typing import Any, Optional

import torch

import opbridge

from .call import Call

# Arguments whose documented dtype is float32 only: converted exactly, not widened.
_KEEP_FLOAT32 = {("moe_route", "correction_bias")}


def _widen(op: str, name: str, v: Any, device: Optional[torch.device]) -> Any:
    if isinstance(v, opbridge.QuantTensor):
        v = opbridge.dequantize(v).to(torch.float64)
    elif isinstance(v, torch.Tensor) and (v.is_floating_point()):
        v = v.to(torch.float32 if (op, name) in _KEEP_FLOAT32 else torch.float64)
    if isinstance(v, torch.Tensor) and device is not None:
        v = v.to(device)
    return v


def _fold_scales(call: Call) -> dict:
    """fp8 indexer inputs: multiply the scales in, so the oracle sees plain float64 values."""
    named = dict(call.named)
    q_scale, k_scale = named.get("q_scale"), named.get("k_scale")
    if q_scale is not None:
        named["q"] = named["q"].to(torch.float64) * q_scale.to(torch.float64).unsqueeze(-1)
        named["q_scale"] = None
    if k_scale is not None:
        key = "k_cache" if "k_cache" in named else "k"
        named[key] = named[key].to(torch.float64) * k_scale.to(torch.float64).unsqueeze(-1)
        named["k_scale"] = None
    return named


def to_oracle(call: Call, device: Optional[str] = None) -> Call:
    """The float64 twin of ``call`` (on ``device`` when given)."""
    dev = torch.device(device) if device is not None else None
    named = _fold_scales(call)
    return Call(call.op, {k: _widen(call.op, k, v, dev) for k, v in named.items()})


def run(call: Call) -> tuple[torch.Tensor, ...]:
    with opbridge.use_backend("reference"):
        return call.run()


def reference(op: str, *args: Any, **kwargs: Any) -> Any:
    """Any other public op on the reference backend (checks use it to get scores and weights)."""
    with opbridge.use_backend("reference"):
        return getattr(opbridge, op)(*args, **kwargs)
