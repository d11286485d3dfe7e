"""Launch configurations of the mHC kernels, kept as data in ``configs/mhc_*.json``.

Each file maps a key to a dict of tile sizes and launch options:
``interpret`` (CPU tensors under TRITON_INTERPRET=1: small tiles, so that tiny test shapes still run
several blocks, splits and lags), ``default`` (any GPU, any n) and ``n<k>`` entries tuned for one
stream count, which are merged over ``default``.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import torch

_DIR = Path(__file__).with_name("configs")


@lru_cache(maxsize=None)
def _load(name: str) -> dict:
    with open(_DIR / f"{name}.json") as fh:
        return json.load(fh)


def config(name: str, n: int, device: torch.device, override: Optional[dict] = None,
           tokens: Optional[int] = None) -> dict[str, Any]:
    """The launch configuration for ``n`` streams: ``interpret`` off the GPU, else ``default`` with the
    ``n<k>`` entry merged over it, then the ``small`` entry when ``tokens <= small["max_T"]`` (decode
    batches want more, shorter programs), then ``override``."""
    table = _load(name)
    if device.type != "cuda":
        cfg = dict(table["interpret"])
    else:
        cfg = dict(table["default"])
        cfg.update(table.get(f"n{n}", {}))
        small = dict(table.get("small", {}))
        if tokens is not None and tokens <= small.pop("max_T", -1):
            cfg.update(small)
    cfg.pop("comment", None)
    if override:
        cfg.update(override)
    return cfg


def next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())
