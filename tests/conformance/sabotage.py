"""Imported into conformance workers with ``--preload`` to make the reference backend misbehave there.

``OPBRIDGE_TEST_SABOTAGE`` chooses how its ``sinkhorn`` misbehaves:
- ``crash``: a real SIGSEGV for n=6 logits and a hang for n=8 (other sizes stay correct);
- ``wrong``: results off by 1e-3 for non-float64 logits. The oracle runs on float64 copies, so it
  stays right while the backend under test is wrong, as with a bug in a low-precision kernel path.
"""
import os
import signal
import time

from opbridge.backends.reference import mhc
from opbridge.core.registry import OpImpl, get_backend

_mode = os.environ.get("OPBRIDGE_TEST_SABOTAGE", "")
_correct = mhc.sinkhorn


def _sinkhorn(logits, *, iters, eps):
    n = logits.shape[-1]
    if _mode == "crash" and n == 6:
        os.kill(os.getpid(), signal.SIGSEGV)
    if _mode == "crash" and n == 8:
        time.sleep(600)
    out = _correct(logits, iters=iters, eps=eps)
    if _mode == "wrong" and logits.dtype != __import__("torch").float64:
        out = out + 1e-3
    return out


_backend = get_backend("reference")
_backend.impls["sinkhorn"] = OpImpl(_sinkhorn, _backend.impls["sinkhorn"].supports, _backend.impls["sinkhorn"].devices)
