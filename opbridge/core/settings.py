"""Every environment variable opbridge reads, typed and documented in one place (triton.knobs style).

Values are read from the environment on each access (cheap: parsed once per distinct raw
string), so tests and users can change them at run time. ``opbridge.use_backend`` overrides
``OPBRIDGE_BACKEND`` for the current context (thread / asyncio task).
"""
from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import os
from dataclasses import dataclass, field
from typing import Iterator, Mapping

from .errors import ConfigError

# Kept here (not in the registry) so settings can be validated without importing any backend.
BACKEND_NAMES = ("reference", "triton", "ascend")
AUTO = "auto"


class Fallback(str, enum.Enum):
    NONE = "none"
    REFERENCE = "reference"


@dataclass(frozen=True)
class BackendChoice:
    """Parsed ``OPBRIDGE_BACKEND``: a default (``auto`` or a backend) plus per-op overrides."""

    default: str = AUTO
    per_op: Mapping[str, str] = field(default_factory=dict)

    def for_op(self, op: str) -> str:
        return self.per_op.get(op, self.default)

    def __str__(self) -> str:
        parts = [self.default] + [f"{k}={v}" for k, v in sorted(self.per_op.items())]
        return ",".join(parts)


@dataclass(frozen=True)
class Setting:
    env: str
    default: str
    doc: str


SETTINGS = (
    Setting("OPBRIDGE_BACKEND", AUTO,
            "auto | reference | triton | ascend, optionally followed by per-op entries: "
            "'triton,mhc_pre=reference'. auto picks by the inputs' device: cuda->triton, "
            "npu->ascend, cpu->reference."),
    Setting("OPBRIDGE_FALLBACK", "none",
            "none | reference. With 'reference', a call the chosen backend cannot run goes to the "
            "reference backend with one warning per (op, backend, reason); with 'none' it raises "
            "opbridge.UnsupportedError."),
    Setting("OPBRIDGE_VALIDATE", "0",
            "1 to run data-dependent checks (ids and indices in range) before every kernel; "
            "they synchronise the device. The reference backend always runs them."),
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _known_ops() -> frozenset[str]:
    from .registry import OP_NAMES  # local: registry imports settings

    return frozenset(OP_NAMES)


@functools.lru_cache(maxsize=64)
def parse_backend(raw: str, source: str = "OPBRIDGE_BACKEND") -> BackendChoice:
    valid = (AUTO,) + BACKEND_NAMES
    default, per_op = AUTO, {}
    entries = [e.strip() for e in raw.split(",") if e.strip()]
    for i, entry in enumerate(entries):
        if "=" in entry:
            op, _, name = (s.strip() for s in entry.partition("="))
            if op not in _known_ops():
                raise ConfigError(
                    f"{source}={raw!r}: unknown op '{op}'; valid ops: {', '.join(sorted(_known_ops()))}")
            if name not in valid:
                raise ConfigError(
                    f"{source}={raw!r}: unknown backend '{name}' for op '{op}'; valid backends: {', '.join(valid)}")
            per_op[op] = name
        else:
            if i != 0:
                raise ConfigError(f"{source}={raw!r}: the backend name must come first, per-op entries after it")
            if entry not in valid:
                raise ConfigError(f"{source}={raw!r}: unknown backend '{entry}'; valid backends: {', '.join(valid)}")
            default = entry
    return BackendChoice(default, per_op)


def _parse_bool(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r}: expected 0 or 1")


_override: contextvars.ContextVar[BackendChoice | None] = contextvars.ContextVar("opbridge_backend", default=None)


def backend_choice() -> tuple[BackendChoice, str]:
    """The backend choice in force and where it came from ('use_backend' or 'OPBRIDGE_BACKEND')."""
    ctx = _override.get()
    if ctx is not None:
        return ctx, "use_backend"
    return parse_backend(os.environ.get("OPBRIDGE_BACKEND", AUTO)), "OPBRIDGE_BACKEND"


def fallback() -> Fallback:
    raw = os.environ.get("OPBRIDGE_FALLBACK", "none").strip().lower() or "none"
    try:
        return Fallback(raw)
    except ValueError:
        raise ConfigError(f"OPBRIDGE_FALLBACK={raw!r}: expected one of: none, reference") from None


def validate() -> bool:
    return _parse_bool("OPBRIDGE_VALIDATE", os.environ.get("OPBRIDGE_VALIDATE", "0"))


@contextlib.contextmanager
def use_backend(spec: str | None = None, **per_op: str) -> Iterator[BackendChoice]:
    """Choose the backend for the calls made inside this block; takes precedence over OPBRIDGE_BACKEND.

    ``use_backend("triton")``, ``use_backend("triton", mhc_pre="reference")`` or
    ``use_backend("triton,mhc_pre=reference")``. Context-local (contextvars).
    """
    raw = ",".join([spec or AUTO] + [f"{k}={v}" for k, v in per_op.items()])
    token = _override.set(parse_backend(raw, source="use_backend"))
    try:
        yield _override.get()
    finally:
        _override.reset(token)


def current_override() -> BackendChoice | None:
    """The use_backend choice in force in this context (None: the environment decides)."""
    return _override.get()


@contextlib.contextmanager
def restored(choice: BackendChoice | None) -> Iterator[None]:
    """Re-enter a choice captured with current_override(), e.g. in autograd's backward thread,
    which does not inherit the forward's context variables."""
    token = _override.set(choice)
    try:
        yield
    finally:
        _override.reset(token)


def describe() -> dict[str, str]:
    """The raw value of every setting (for reports)."""
    return {s.env: os.environ.get(s.env, s.default) for s in SETTINGS}
