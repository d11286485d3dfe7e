"""Dispatch: auto by device, no silent fallback, OPBRIDGE_FALLBACK, data checks, explain()."""
import warnings

import pytest
import torch

import opbridge
from opbridge.core import registry
from opbridge.core.registry import Availability, Backend, decide, dispatch


@pytest.fixture
def fake_backend():
    """A temporary backend named 'triton' that implements sinkhorn only for n <= 4."""
    saved = registry._backends.get("triton")
    calls = []
    be = Backend("triton", lambda: Availability(True))

    @be.implement("sinkhorn", supports=lambda logits, **kw: None if logits.shape[-1] <= 4 else "n > 4 not supported")
    def _sinkhorn(logits, *, iters, eps):
        calls.append(logits.shape)
        return torch.full(logits.shape, 7.0)

    registry._backends["triton"] = be
    registry._warned.clear()
    yield calls
    if saved is not None:
        registry._backends["triton"] = saved
    else:
        registry._backends.pop("triton")


def test_auto_picks_by_device():
    assert decide("moe", torch.device("cpu")).backend == "reference"
    assert decide("moe", torch.device("cuda")).backend == "triton"
    assert decide("moe", torch.device("meta")).reason is not None


def test_chosen_backend_runs(fake_backend):
    with opbridge.use_backend("triton"):
        out = opbridge.sinkhorn(torch.randn(2, 4, 4))
    assert fake_backend == [torch.Size([2, 4, 4])] and torch.all(out == 7.0)


def test_unsupported_raises_naming_op_backend_reason(fake_backend):
    with opbridge.use_backend("triton"):
        with pytest.raises(opbridge.UnsupportedError) as e:
            opbridge.sinkhorn(torch.randn(6, 6))
        with pytest.raises(opbridge.UnsupportedError, match="not implemented"):
            opbridge.mhc_post(torch.randn(8), torch.randn(4, 8), torch.rand(4), torch.rand(4, 4))
    assert e.value.op == "sinkhorn" and e.value.backend == "triton" and "n > 4" in e.value.reason
    assert fake_backend == []  # nothing ran


def test_fallback_to_reference_warns_once(fake_backend, monkeypatch):
    monkeypatch.setenv("OPBRIDGE_FALLBACK", "reference")
    x = torch.randn(6, 6)
    with opbridge.use_backend("triton"):
        with pytest.warns(UserWarning, match="running it on 'reference'"):
            out = opbridge.sinkhorn(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a second identical fallback does not warn again
            opbridge.sinkhorn(x)
    with opbridge.use_backend("reference"):
        torch.testing.assert_close(out, opbridge.sinkhorn(x))


def test_unavailable_backend_reason():
    be = Backend("x", lambda: Availability(False, "no such device"))
    assert be.why_not("moe", torch.device("cpu")) == "no such device"


def test_data_checks_only_when_asked(fake_backend, monkeypatch):
    seen = []
    monkeypatch.setitem(registry._data_checks, "sinkhorn", lambda *a, **k: seen.append(1))
    with opbridge.use_backend("triton"):
        opbridge.sinkhorn(torch.randn(4, 4))
        assert seen == []
        monkeypatch.setenv("OPBRIDGE_VALIDATE", "1")
        opbridge.sinkhorn(torch.randn(4, 4))
        assert seen == [1]


def test_reference_always_validates():
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    ids = torch.tensor([[0, 9], [1, -1], [2, 3]], dtype=torch.int32)
    w13, w2 = torch.randn(4, 8, 8, dtype=torch.bfloat16), torch.randn(4, 8, 4, dtype=torch.bfloat16)
    with pytest.raises(opbridge.OpError, match="topk_ids"):
        opbridge.moe(x, torch.rand(3, 2), ids, w13, w2)


def test_explain_lists_every_op():
    report = opbridge.explain()
    ops = {d.op for d in report.decisions}
    assert ops == set(opbridge.OP_NAMES)
    names = dict(report.backends)
    assert set(names) == {"reference", "triton", "ascend"} and names["reference"] == "available"
    assert "torch_npu" in names["ascend"] or names["ascend"] == "available"
    assert "moe on cpu: reference (from auto(cpu))" in str(report)


def test_decision_is_printable():
    d = registry.Decision("moe", "cuda", "triton", "OPBRIDGE_BACKEND", "dtype float64 not supported")
    assert str(d) == "moe on cuda: triton (from OPBRIDGE_BACKEND); cannot run: dtype float64 not supported"


def test_dispatch_reaches_reference_directly():
    x = torch.randn(2, 4, 4)
    out = dispatch("sinkhorn", x.device, (x,), {"iters": 3, "eps": 1e-6})
    assert out.shape == x.shape


def test_backward_keeps_the_forward_backend_on_another_context():
    """GPU autograd runs backward on its own thread, which does not inherit use_backend's
    context variable; the choice made at forward time must still pick the backward's backend."""
    import contextvars

    saved = registry._backends.get("triton")
    calls = []
    be = Backend("triton", lambda: Availability(True))
    be.implement("sinkhorn")(lambda logits, *, iters, eps: logits.float().softmax(-1))

    @be.implement("sinkhorn_backward")
    def _bwd(grads, logits, *, iters, eps):
        calls.append("triton")
        return [torch.ones_like(logits)]

    registry._backends["triton"] = be
    try:
        x = torch.randn(4, 4, requires_grad=True)
        with opbridge.use_backend("triton"):
            y = opbridge.sinkhorn(x)
        contextvars.Context().run(lambda: y.sum().backward())  # outside the use_backend block, fresh context
        assert calls == ["triton"] and torch.all(x.grad == 1)
    finally:
        registry._backends["triton"] = saved


def test_per_op_determinism_flag():
    be = Backend("x", lambda: Availability(True))
    be.implement("moe")(lambda *a, **k: None)
    be.implement("indexer_topk", deterministic=False)(lambda *a, **k: None)
    assert be.is_deterministic("moe") and not be.is_deterministic("indexer_topk")
