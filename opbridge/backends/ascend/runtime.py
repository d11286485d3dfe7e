"""torch_npu, imported lazily; the device it drives; and the glue every Ascend op module uses.

Nothing here imports torch_npu at module import time: ``import opbridge`` must work (and stay
fast) on machines without it. The first call of :func:`torch_npu` imports it and caches the
module; a failure becomes one actionable line (no stack trace) that ``opbridge info`` and every
``UnsupportedError`` show.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Optional

import torch

from ...core.errors import UnsupportedError
from ...core.opdef import device_of
from ...core.registry import Availability
from . import capabilities as caps

# Device types this backend runs on. Only 'npu' in real use. The contract-emulator tests add
# 'cpu' here (and nowhere else) so the backend's own code path runs on CPU tensors.
DEVICE_TYPES: set[str] = {"npu"}

CANN_HINT = ("install the CANN toolkit and run 'source /usr/local/Ascend/ascend-toolkit/set_env.sh' "
             "(or your CANN install's set_env.sh) before starting Python")

_module: Optional[Any] = None
_import_error: Optional[str] = None
_platforms: dict[Optional[int], caps.Platform] = {}


class TorchNpuUnavailable(RuntimeError):
    """torch_npu cannot be imported here; ``str()`` is one actionable line."""


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _explain_import_failure(e: BaseException) -> str:
    first = _one_line(e)
    if isinstance(e, ModuleNotFoundError) and e.name == "torch_npu":
        return ("torch_npu not installed: pip install 'opbridge[ascend]' (a torch-npu matching your torch) "
                "on a machine with an Ascend NPU and the CANN toolkit")
    if ".so" in first or isinstance(e, OSError):
        return f"torch_npu is installed but cannot load CANN ({first}): {CANN_HINT}"
    if "accelerator" in first.lower():
        return f"torch_npu refuses this torch build ({first}): use a CPU build of torch together with torch_npu"
    return f"torch_npu failed to import ({type(e).__name__}: {first}); is CANN installed and sourced? {CANN_HINT}"


def torch_npu() -> Any:
    """The torch_npu module, imported on first use; raises :class:`TorchNpuUnavailable` (one line)."""
    global _module, _import_error
    if _module is not None:
        return _module
    if _import_error is not None:
        raise TorchNpuUnavailable(_import_error)
    try:
        _module = importlib.import_module("torch_npu")
    except Exception as e:  # ImportError (libhccl.so), OSError, RuntimeError (two accelerators), ...
        _import_error = _explain_import_failure(e)
        raise TorchNpuUnavailable(_import_error) from None
    return _module


def availability() -> Availability:
    try:
        npu = torch_npu()
    except TorchNpuUnavailable as e:
        return Availability(False, str(e))
    try:
        ok = bool(npu.npu.is_available()) and int(npu.npu.device_count()) > 0
    except Exception as e:  # driver present but broken
        return Availability(False, f"torch_npu cannot query devices ({_one_line(e)}): check the Ascend driver and "
                                   f"ASCEND_RT_VISIBLE_DEVICES")
    if not ok:
        return Availability(False, "torch_npu imported but sees no Ascend NPU (check the driver, npu-smi info, "
                                   "and ASCEND_RT_VISIBLE_DEVICES)")
    return Availability(True)


def reset() -> None:
    """Forget the imported torch_npu, its platforms and the backend's cached availability (tests swap torch_npu)."""
    global _module, _import_error
    _module, _import_error = None, None
    _platforms.clear()
    backend = sys.modules.get(__package__)
    if backend is not None and hasattr(backend, "BACKEND"):
        backend.BACKEND._availability = None


def _probe_schemas(npu: Any) -> dict[str, frozenset[str]]:
    """Argument names of each vendor op the table knows, read from torch_npu's own schemas."""
    found: dict[str, frozenset[str]] = {}
    for op in (*caps.OPS, *(f["op"] for f in caps.FEATURES.values())):
        fn = getattr(npu, op, None)
        if fn is None:
            continue
        try:
            schema = getattr(fn, "default", fn)._schema
            found[op] = frozenset(a.name for a in schema.arguments)
        except AttributeError:  # a Python wrapper: the op exists, arguments unknown
            found[op] = frozenset()
    return found


def platform(device: torch.device) -> caps.Platform:
    """What this backend knows about ``device``'s NPU (cached per device index)."""
    npu = torch_npu()
    index = device.index if device.type == "npu" else None
    if index not in _platforms:
        idx = npu.npu.current_device() if index is None else index
        name = str(npu.npu.get_device_name(idx))
        version = str(getattr(npu, "__version__", "unknown"))
        branch, cann = caps.op_plugin_of(version)
        try:
            cann = str(npu.npu.utils.get_cann_version()) or cann
        except Exception:  # older torch_npu: fall back to the table's CANN for this release
            pass
        _platforms[index] = caps.Platform(name, caps.family_of(name), version, branch, cann, _probe_schemas(npu))
    return _platforms[index]


Check = Callable[..., Optional[str]]


def supports(*vendor_ops: str, check: Optional[Check] = None) -> Callable[..., Optional[str]]:
    """A registry ``supports`` predicate: device type, then each vendor op on this platform, then ``check``.

    ``check(platform, *public_args, **public_kwargs)`` returns a reason or None.
    """
    def predicate(*args: Any, **kwargs: Any) -> Optional[str]:
        dev = device_of(args)
        if dev.type not in DEVICE_TYPES:
            return f"device '{dev.type}' is not an Ascend NPU (expected tensors on 'npu')"
        try:
            p = platform(dev)
        except TorchNpuUnavailable as e:
            return str(e)
        for op in vendor_ops:
            reason = caps.op_reason(p, op)
            if reason is not None:
                return reason
        return None if check is None else check(p, *args, **kwargs)

    return predicate


def unsupported(reason: str) -> Callable[..., Optional[str]]:
    """``supports`` for an OPS op no CANN operator covers: always ``reason`` (after the device check)."""
    return supports(check=lambda p, *a, **k: reason)


def never_called(op: str) -> Callable[..., Any]:
    def fn(*args: Any, **kwargs: Any) -> Any:  # the registry asks ``supports`` first, which always refuses
        raise UnsupportedError(op, "ascend", "no CANN operator implements it")

    return fn


# Substrings of CANN errors that mean "the schema exists but the installed CANN has no kernel for it".
_MISSING_KERNEL = ("561103", "not in libopapi", "is not found in", "aclnn api not found")


def call(op: str, vendor_op: str, *args: Any, **kwargs: Any) -> Any:
    """``torch_npu.<vendor_op>(*args, **kwargs)``; a missing CANN kernel becomes an UnsupportedError for ``op``."""
    fn = getattr(torch_npu(), vendor_op)
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        msg = str(e)
        if any(s in msg for s in _MISSING_KERNEL):
            raise UnsupportedError(op, "ascend", f"{vendor_op}: the installed CANN has no kernel for it "
                                                 f"({_one_line(e)}); upgrade CANN") from None
        raise
