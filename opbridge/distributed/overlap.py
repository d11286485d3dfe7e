"""Shared experts computed while the dispatch and combine are in flight.

On an accelerator the shared experts run on a second stream, started before the token-count
exchange: NCCL (and HCCL) run their collectives on their own internal stream and the routed-expert
work waits on them, so the shared-expert kernels fill the time spent in the all-to-alls. The
result is joined back onto the current stream at the end. On the CPU (gloo) collectives block the
calling thread, so the shared experts simply run first.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


class SharedExperts:
    """Starts ``fn(x)`` now, on a side stream where the device has streams; ``result()`` joins it."""

    def __init__(self, fn: Optional[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, overlap: bool = True):
        self._out: Optional[torch.Tensor] = None
        self._main = self._side = None
        if fn is None:
            return
        mod = _stream_module(x.device) if overlap else None
        if mod is None:
            self._out = fn(x)
            return
        self._main = mod.current_stream(x.device)
        self._side = mod.Stream(device=x.device)
        self._side.wait_stream(self._main)  # x is ready
        with mod.stream(self._side):
            self._out = fn(x)
        x.record_stream(self._side)  # x's memory stays reserved until the side stream is done with it

    def result(self) -> Optional[torch.Tensor]:
        if self._side is not None and self._out is not None:
            self._main.wait_stream(self._side)
            self._out.record_stream(self._main)
        return self._out


def _stream_module(device: torch.device):  # noqa: ANN202 - torch.cuda, torch.npu, ... or None
    if device.type == "cpu":
        return None
    try:
        mod = torch.get_device_module(device)
    except (RuntimeError, AttributeError):
        return None
    return mod if all(hasattr(mod, a) for a in ("Stream", "current_stream", "stream")) else None
