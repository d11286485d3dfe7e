"""Gradient cases (OPS.md 4.4): every differentiable op gets one, and a wrong backward is caught."""
import contextlib

import opbridge
from opbridge.backends.reference.autograd import recompute_backward
from opbridge.conformance import catalogue, runner
from opbridge.core import registry, settings
from opbridge.core.opdef import OPS
from opbridge.core.registry import Availability, Backend, OpImpl

SMALL = catalogue.by_id("small")


def test_every_differentiable_op_has_a_grad_case():
    ops = {c.op for c in SMALL.values() if c.kind == "grad"}
    assert ops == {op for op in opbridge.OP_NAMES if OPS[op].differentiable}


@contextlib.contextmanager
def _backend_with_backward(op, backward):
    """A backend 'planted' with the reference forwards and backwards, ``op``'s backward replaced."""
    ref = registry.get_backend("reference")
    be = Backend("planted", lambda: Availability(True))
    be.impls.update(ref.impls)
    be.impls[f"{op}_backward"] = OpImpl(backward)
    old = settings.BACKEND_NAMES
    settings.BACKEND_NAMES = old + ("planted",)
    registry.register_backend(be)
    try:
        yield "planted"
    finally:
        registry._backends.pop("planted", None)
        settings.BACKEND_NAMES = old


def _grad_case(op):
    return next(c for c in SMALL.values() if c.op == op and c.kind == "grad")


def test_wrong_backward_is_caught_and_a_right_one_passes():
    ref_post = registry.get_backend("reference").impls["mhc_post"].fn
    right = recompute_backward(ref_post, OPS["mhc_post"].differentiable)

    def transposed_dcomb(grads, f, residual, post, comb):
        df, dres, dpost, dcomb = right(grads, f, residual, post, comb)
        return [df, dres, dpost, dcomb.transpose(-1, -2)]  # the planted bug

    case = _grad_case("mhc_post")
    with _backend_with_backward("mhc_post", transposed_dcomb) as name:
        (bad,) = runner.run(runner.RunConfig(name, isolate=False), [case])
    with _backend_with_backward("mhc_post", right) as name:
        (good,) = runner.run(runner.RunConfig(name, isolate=False), [case])
    assert bad.status == "fail" and "comb.grad.diff" in bad.reason, bad.reason
    assert good.status == "pass", good.reason


def test_missing_backward_is_unsupported():
    ref = registry.get_backend("reference")
    be = Backend("planted", lambda: Availability(True))
    be.impls.update({k: v for k, v in ref.impls.items() if not k.endswith("_backward")})
    old = settings.BACKEND_NAMES
    settings.BACKEND_NAMES = old + ("planted",)
    registry.register_backend(be)
    try:
        (r,) = runner.run(runner.RunConfig("planted", isolate=False), [_grad_case("sinkhorn")])
    finally:
        registry._backends.pop("planted", None)
        settings.BACKEND_NAMES = old
    assert r.status == "unsupported" and "sinkhorn_backward" in r.reason
