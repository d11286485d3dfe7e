"""Backends, what each supports, and the one dispatch path every op call takes.

A backend is a :class:`Backend` holding one :class:`OpImpl` per op it implements. An impl has
the op's public signature (QuantTensor arguments rebuilt) and a ``supports`` predicate that
returns ``None`` or the reason it cannot run a call. Backend modules are imported lazily, the
first time a backend is asked for, so a missing vendor stack costs nothing until it is chosen.
"""
from __future__ import annotations

import importlib
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from . import settings
from .errors import ConfigError, UnsupportedError

# Every public op of OPS.md, in the order of the spec. Backward ops are named "<op>_backward".
OP_NAMES = (
    "moe_route", "moe_route_hash", "grouped_gemm", "grouped_gemm_masked", "moe", "moe_permute", "moe_combine",
    "indexer_topk", "indexer_logits", "indexer_topk_paged", "kv_compress",
    "sparse_attention", "sparse_attention_paged", "window_indices",
    "sinkhorn", "mhc_pre", "mhc_post", "mhc_post_pre",
)

BACKEND_MODULES = {
    "reference": "opbridge.backends.reference",
    "triton": "opbridge.backends.triton",
    "ascend": "opbridge.backends.ascend",
}

# auto: the inputs' device type picks the backend. One place, like vLLM's platform detection.
AUTO_BY_DEVICE = {"cuda": "triton", "npu": "ascend", "cpu": "reference"}

Supports = Callable[..., Optional[str]]


def _always(*args: Any, **kwargs: Any) -> Optional[str]:
    return None


@dataclass(frozen=True)
class OpImpl:
    fn: Callable[..., Any]
    supports: Supports = _always
    devices: Optional[frozenset[str]] = None  # None: any device type
    deterministic: bool = True  # two identical calls give bitwise-identical results

    def why_not(self, device: torch.device, args: tuple, kwargs: dict) -> Optional[str]:
        if self.devices is not None and device.type not in self.devices:
            return f"device '{device.type}' not supported (supports: {', '.join(sorted(self.devices))})"
        if not args and not kwargs:  # asked without a call (opbridge info): the device is all we know
            return None
        return self.supports(*args, **kwargs)


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""

    def __str__(self) -> str:
        return "available" if self.ok else f"unavailable: {self.reason}"


@dataclass
class Backend:
    """One vendor backend. ``availability`` is checked once per process (cached)."""

    name: str
    check_available: Callable[[], Availability]
    deterministic: bool = True
    always_validates: bool = False  # run data-dependent input checks on every call
    note: str = ""  # one line on what has (and has not) been proven for this backend, shown by explain()
    impls: dict[str, OpImpl] = field(default_factory=dict)
    _availability: Optional[Availability] = None

    def availability(self) -> Availability:
        if self._availability is None:
            self._availability = self.check_available()
        return self._availability

    def implement(self, op: str, *, supports: Supports = _always, devices: Optional[set[str]] = None,
                  deterministic: bool = True):
        """Decorator: register ``fn`` as this backend's implementation of ``op``.

        ``deterministic=False`` where results may differ bitwise between identical calls
        (atomics, tie order); the conformance suite then skips the op's determinism cases.
        """
        base = op.removesuffix("_backward")
        if base not in OP_NAMES:
            raise ConfigError(f"backend '{self.name}': unknown op '{op}'")

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.impls[op] = OpImpl(fn, supports, frozenset(devices) if devices else None, deterministic)
            return fn

        return deco

    def is_deterministic(self, op: str) -> bool:
        impl = self.impls.get(op)
        return self.deterministic and (impl is None or impl.deterministic)

    def why_not(self, op: str, device: torch.device, args: tuple = (), kwargs: Optional[dict] = None) -> Optional[str]:
        avail = self.availability()
        if not avail.ok:
            return avail.reason
        impl = self.impls.get(op)
        if impl is None:
            return f"op '{op}' is not implemented by this backend"
        return impl.why_not(device, args, kwargs or {})


_backends: dict[str, Backend] = {}
_lock = threading.Lock()


def register_backend(backend: Backend) -> Backend:
    _backends[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    if name not in _backends:
        if name not in BACKEND_MODULES:
            raise ConfigError(f"unknown backend '{name}'; valid backends: {', '.join(BACKEND_MODULES)}")
        with _lock:
            importlib.import_module(BACKEND_MODULES[name])
    return _backends[name]


# Data-dependent checks (ids / indices in range), registered by core per op; they sync the device.
_data_checks: dict[str, Callable[..., None]] = {}


def register_data_check(op: str, fn: Callable[..., None]) -> None:
    _data_checks[op] = fn


@dataclass(frozen=True)
class Decision:
    """Which backend runs an op, and why; printable."""

    op: str
    device: str
    backend: str
    source: str  # 'use_backend', 'OPBRIDGE_BACKEND' or 'auto(<device>)'
    reason: Optional[str] = None  # why the chosen backend cannot run it (None: it can)

    def __str__(self) -> str:
        s = f"{self.op} on {self.device}: {self.backend} (from {self.source})"
        return s if self.reason is None else f"{s}; cannot run: {self.reason}"


def decide(op: str, device: torch.device, args: tuple = (), kwargs: Optional[dict] = None) -> Decision:
    choice, source = settings.backend_choice()
    name = choice.for_op(op.removesuffix("_backward"))
    if name == settings.AUTO:
        name = AUTO_BY_DEVICE.get(device.type, "")
        source = f"auto({device.type})"
        if not name:
            return Decision(op, str(device), "none", source, f"no backend is known for device type '{device.type}'")
    backend = get_backend(name)
    return Decision(op, str(device), name, source, backend.why_not(op, device, args, kwargs))


_warned: set[tuple[str, str, str]] = set()


def dispatch(op: str, device: torch.device, args: tuple, kwargs: dict) -> Any:
    """Run ``op`` on the backend the settings choose; raise UnsupportedError rather than guess."""
    d = decide(op, device, args, kwargs)
    name = d.backend
    if d.reason is not None:
        if settings.fallback() is not settings.Fallback.REFERENCE or name == "reference":
            raise UnsupportedError(op, name, d.reason)
        key = (op, name, d.reason)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"opbridge.{op}: backend '{name}' cannot run this call ({d.reason}); "
                          f"running it on 'reference' because OPBRIDGE_FALLBACK=reference", stacklevel=3)
        name = "reference"
        ref_reason = get_backend(name).why_not(op, device, args, kwargs)
        if ref_reason is not None:
            raise UnsupportedError(op, name, ref_reason)
    backend = get_backend(name)
    check = _data_checks.get(op)
    if check is not None and (backend.always_validates or settings.validate()):
        check(*args, **kwargs)
    return backend.impls[op].fn(*args, **kwargs)
