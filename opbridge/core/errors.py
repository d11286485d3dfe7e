"""The three errors users see: bad input, bad dtype, and "this backend cannot run this call"."""
from __future__ import annotations


def _message(op: str, arg: str, expected: str, given: str) -> str:
    return f"opbridge.{op}: argument '{arg}': expected {expected}, got {given}"


class OpError(ValueError):
    """Bad input (shape, device, size, value) caught before any kernel runs."""

    def __init__(self, op: str, arg: str, expected: str, given: str):
        self.op, self.arg, self.expected, self.given = op, arg, expected, given
        super().__init__(_message(op, arg, expected, given))


class OpTypeError(TypeError):
    """Wrong dtype (or wrong Python type) for an op argument."""

    def __init__(self, op: str, arg: str, expected: str, given: str):
        self.op, self.arg, self.expected, self.given = op, arg, expected, given
        super().__init__(_message(op, arg, expected, given))


class UnsupportedError(RuntimeError):
    """The chosen backend cannot run this call; nothing else was tried unless OPBRIDGE_FALLBACK says so."""

    def __init__(self, op: str, backend: str, reason: str):
        self.op, self.backend, self.reason = op, backend, reason
        super().__init__(
            f"opbridge.{op}: backend '{backend}' cannot run this call: {reason} "
            f"(choose another backend with OPBRIDGE_BACKEND or opbridge.use_backend(), "
            f"or allow OPBRIDGE_FALLBACK=reference)"
        )


class ConfigError(ValueError):
    """A setting (environment variable or use_backend argument) names something that does not exist."""
