"""The Ascend backend: Huawei NPUs through torch_npu / CANN operators (imported lazily).

Each OPS.md op is translated onto documented torch_npu operators (``moe.py``, ``sparse_attention.py``,
``mhc.py``); what each vendor op accepts per SoC family and torch_npu / CANN version is data
(``capabilities.json``, read by ``capabilities.py``). A call outside that table raises
``UnsupportedError`` naming the vendor op and the limit. ``runtime.py`` imports torch_npu on first
use and turns a missing CANN into one actionable line. See docs/ascend.md: no NPU has run this
code; CI runs it against a contract emulator of the documented vendor ops.
"""
from __future__ import annotations

from ...core.registry import Backend, register_backend
from .runtime import availability

BACKEND = register_backend(Backend(
    "ascend", availability, deterministic=True,
    note="translation checked in CI against a contract emulator of the documented torch_npu ops; "
         "no NPU has run this code yet, see docs/ascend.md"))

from . import mhc, moe, sparse_attention  # noqa: E402,F401  (register the implementations)
