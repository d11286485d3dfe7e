"""The Triton backend: NVIDIA GPUs (sm_90 / sm_100 tuned), and CPU tensors under TRITON_INTERPRET=1.

Kernels live in :mod:`opbridge.kernels.triton`; this package only says which calls they can
run and adapts arguments. Ops without an implementation here raise UnsupportedError.
"""
from __future__ import annotations

import os

from ...core.registry import Availability, Backend, register_backend


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _availability() -> Availability:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return Availability(False, f"triton not installed ({e})")
    if interpreting():
        return Availability(True)
    import torch

    if not torch.cuda.is_available():
        return Availability(False, "no CUDA device (set TRITON_INTERPRET=1 to run its kernels on CPU tensors)")
    return Availability(True)


def devices() -> set[str]:
    """Device types the kernels may be launched on in this process."""
    return {"cuda", "cpu"} if interpreting() else {"cuda"}


BACKEND = register_backend(Backend("triton", _availability, deterministic=True))

from . import mhc, moe, sparse_attention  # noqa: E402,F401  (register the implementations)
