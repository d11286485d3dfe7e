"""Input generators: one small function per op turning a case's parameters into a :class:`Call`.

Every generator draws random data (never zeros) from a seeded generator on the target device,
so a case is reproducible and full-tier inputs are made where they are used.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from ..call import Call
from .common import Rand
from . import mhc, moe, sparse_attention

GENERATORS: dict[str, Callable[[Mapping[str, Any], Rand], dict]] = {
    **moe.GENERATORS, **sparse_attention.GENERATORS, **mhc.GENERATORS,
}


def build(op: str, params: Mapping[str, Any], device: str, seed: int) -> Call:
    """The call of ``op`` described by ``params``, with tensors on ``device``."""
    rng = Rand(seed, device)
    return Call(op, GENERATORS[op](params, rng))
