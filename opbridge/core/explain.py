"""What opbridge sees on this machine: devices, backend availability, and where each op goes."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import settings
from .registry import BACKEND_MODULES, OP_NAMES, Decision, decide, get_backend


def devices() -> list[torch.device]:
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():
        found += [torch.device("npu", i) for i in range(npu.device_count())]
    return found


def device_name(d: torch.device) -> str:
    if d.type == "cuda":
        return torch.cuda.get_device_name(d)
    if d.type == "npu":
        return torch.npu.get_device_name(d)
    return "cpu"


@dataclass(frozen=True)
class Report:
    devices: tuple[str, ...]
    backends: tuple[tuple[str, str], ...]  # (name, availability)
    decisions: tuple[Decision, ...]
    settings: tuple[tuple[str, str], ...]

    def __str__(self) -> str:
        lines = ["devices:"] + [f"  {d}" for d in self.devices]
        lines += ["backends:"] + [f"  {n}: {a}" for n, a in self.backends]
        lines += ["settings:"] + [f"  {k}={v}" for k, v in self.settings]
        lines += ["ops (resolved backend per device):"]
        lines += [f"  {d}" for d in self.decisions]
        return "\n".join(lines)


def _describe(backend) -> str:
    s = str(backend.availability())
    return f"{s} ({backend.note})" if backend.note else s


def explain() -> Report:
    """Devices found, each backend's availability (with the reason when unavailable), and the
    backend each op resolves to on each device type under the current settings."""
    devs = devices()
    backends = tuple((name, _describe(get_backend(name))) for name in BACKEND_MODULES)
    decisions = []
    for dtype in dict.fromkeys(d.type for d in devs):
        for op in OP_NAMES:
            try:
                decisions.append(decide(op, torch.device(dtype)))
            except Exception as e:  # a bad OPBRIDGE_BACKEND: report, do not crash
                decisions.append(Decision(op, dtype, "error", "settings", str(e)))
    return Report(tuple(f"{d}: {device_name(d)}" for d in devs), backends, tuple(decisions),
                  tuple(settings.describe().items()))
