"""The reference backend: every op in plain PyTorch, written for clarity. It is the oracle.

Runs on any device; computes in float32, or float64 when the inputs are float64; always runs
the data-dependent input checks. The backward of every differentiable op is autograd through
the same code (:mod:`.autograd`).
"""
from ...core.opdef import OPS
from ...core.registry import Availability, Backend, register_backend

BACKEND = register_backend(Backend("reference", lambda: Availability(True), deterministic=True,
                                   always_validates=True))

from . import mhc, moe, sparse_attention  # noqa: E402,F401  (register the implementations)
from .autograd import recompute_backward  # noqa: E402

for _name, _op in OPS.items():
    if _op.differentiable:
        BACKEND.implement(f"{_name}_backward")(recompute_backward(BACKEND.impls[_name].fn, _op.differentiable))
