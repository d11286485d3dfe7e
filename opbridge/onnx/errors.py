"""The export error: an op, or this call of it, that the chosen mode cannot express."""
from __future__ import annotations

from ..core.errors import UnsupportedError


class ExportUnsupportedError(UnsupportedError):
    """An op (or this call of it) cannot be expressed in the chosen export mode."""

    def __init__(self, op: str, mode: str, reason: str):
        self.op, self.backend, self.reason, self.mode = op, f"onnx:{mode}", reason, mode
        hint = "" if mode == "custom" else " (mode 'custom' exports every opbridge op as one 'opbridge' domain node)"
        RuntimeError.__init__(self, f"opbridge.{op}: cannot be exported in ONNX mode '{mode}': {reason}{hint}")
