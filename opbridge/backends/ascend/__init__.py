"""The Ascend backend: Huawei NPUs through torch_npu / CANN operators (imported lazily)."""
from __future__ import annotations

import importlib.util

from ...core.registry import Availability, Backend, register_backend


def _availability() -> Availability:
    if importlib.util.find_spec("torch_npu") is None:
        return Availability(False, "torch_npu not installed (pip install 'opbridge[ascend]' on a machine with CANN)")
    try:
        import torch_npu  # noqa: F401
    except Exception as e:  # CANN missing surfaces as ImportError/OSError from its shared libraries
        return Availability(False, f"torch_npu present but cannot be imported (is CANN installed and sourced?): "
                                   f"{str(e).splitlines()[0]}")
    import torch

    if not (hasattr(torch, "npu") and torch.npu.is_available()):
        return Availability(False, "no Ascend NPU visible to torch_npu")
    return Availability(True)


BACKEND = register_backend(Backend("ascend", _availability, deterministic=True))
