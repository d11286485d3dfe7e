"""Run one case in this process: build the call, run it on the backend, judge it.

Statuses: ``pass``; ``fail`` (a metric over its threshold, a bad input not rejected as
documented, or results that differ between two identical calls); ``error`` (an unexpected
exception); ``unsupported`` (the backend said it cannot run the call: UnsupportedError, with
its reason); ``xfail`` (a failure listed in ``data/exceptions.json`` with its reason).
"""
from __future__ import annotations

import contextlib
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

import opbridge
from opbridge.core.opdef import OPS
from opbridge.core.registry import get_backend

from . import compare, mutations, oracle
from .catalogue import Case
from .inputs import build
from .thresholds import thresholds_for, expected_failure

STATUSES = ("pass", "fail", "error", "unsupported", "xfail")


@dataclass
class CaseResult:
    id: str
    op: str
    kind: str
    status: str
    reason: str = ""
    metrics: list = field(default_factory=list)
    params: dict = field(default_factory=dict)
    time_s: Optional[float] = None  # the backend call(s), synchronised
    total_s: Optional[float] = None  # everything: inputs, oracle, checks

    def to_json(self) -> dict:
        return {"id": self.id, "op": self.op, "kind": self.kind, "status": self.status, "reason": self.reason,
                "params": self.params, "metrics": [m.to_json() if hasattr(m, "to_json") else m for m in self.metrics],
                "time_s": self.time_s, "total_s": self.total_s}

    @classmethod
    def from_json(cls, d: dict) -> "CaseResult":
        return cls(d["id"], d["op"], d["kind"], d["status"], d.get("reason", ""), d.get("metrics", []),
                   d.get("params", {}), d.get("time_s"), d.get("total_s"))


def synchronize(device: str) -> None:
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "npu":
        torch.npu.synchronize()  # type: ignore[attr-defined]


@contextlib.contextmanager
def _validate_env(on: bool) -> Iterator[None]:
    if not on:
        yield
        return
    old = os.environ.get("OPBRIDGE_VALIDATE")
    os.environ["OPBRIDGE_VALIDATE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OPBRIDGE_VALIDATE", None)
        else:
            os.environ["OPBRIDGE_VALIDATE"] = old


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()[:2000]


def _trace(e: BaseException) -> str:
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    return "".join(tb)[-3000:]


def _timed(backend: str, call, device: str) -> tuple[tuple, float]:
    with opbridge.use_backend(backend):
        t0 = time.perf_counter()
        out = call.run()
        synchronize(device)
        return out, time.perf_counter() - t0


def _gradients(backend: str, call, device: str, upstream: Optional[list]) -> tuple[dict, list, float]:
    """Run ``call`` on ``backend`` with its differentiable float inputs as leaves and backpropagate
    ``upstream`` (one tensor per float output; drawn here, seeded, when None)."""
    named, leaves = dict(call.named), {}
    for name in OPS[call.op].differentiable:
        v = named.get(name)
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            leaves[name] = named[name] = v.detach().clone().requires_grad_(True)
    with opbridge.use_backend(backend):
        t0 = time.perf_counter()
        outs = [o for o in call.replace(**named).run() if o.is_floating_point() and o.requires_grad]
        if upstream is None:
            g = torch.Generator().manual_seed(1234)
            upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
        grads = [u.to(device=o.device, dtype=o.dtype) for u, o in zip(upstream, outs)]
        torch.autograd.backward(outs, grads)
        synchronize(device)
        elapsed = time.perf_counter() - t0
    return {n: leaf.grad for n, leaf in leaves.items()}, upstream, elapsed


def _run_grad(case: Case, backend: str, call, device: str, oracle_device: str, th, res: CaseResult) -> None:
    try:
        got, upstream, res.time_s = _gradients(backend, call, device, None)
    except opbridge.UnsupportedError as e:
        res.status, res.reason = "unsupported", e.reason
        return
    except Exception as e:  # noqa: BLE001
        res.status, res.reason = "error", f"{_short(e)}\n{_trace(e)}"
        return
    # The oracle backpropagates the same upstream values (as rounded to the backend's output dtypes).
    want, _, _ = _gradients("reference", oracle.to_oracle(call, oracle_device), oracle_device,
                            [u.to(torch.float64) for u in upstream])
    res.metrics = compare.gradients(got, want, th)
    failed = [m for m in res.metrics if not m.passed]
    res.status = "fail" if failed else "pass"
    res.reason = "; ".join(str(m) for m in failed)


def _run_bad(case: Case, backend: str, device: str, res: CaseResult) -> CaseResult:
    call = mutations.mutate(build(case.op, case.params, device, case.seed), case.mutate)
    exp = case.expect or {}
    want_type = {"OpError": opbridge.OpError, "OpTypeError": opbridge.OpTypeError}[exp["error"]]
    try:
        with _validate_env(case.validate):
            _timed(backend, call, device)
    except opbridge.UnsupportedError as e:
        if case.validate:  # the op is missing on this backend: dispatch refuses before the data checks
            res.status, res.reason = "unsupported", e.reason
        else:
            res.status, res.reason = "fail", f"expected {exp['error']} naming '{exp['arg']}' before dispatch, got {_short(e)}"
        return res
    except (opbridge.OpError, opbridge.OpTypeError) as e:
        named_ok = getattr(e, "op", None) == case.op and getattr(e, "arg", None) == exp["arg"]
        text_ok = f"opbridge.{case.op}" in str(e) and f"'{exp['arg']}'" in str(e)
        if isinstance(e, want_type) and named_ok and text_ok:
            res.status, res.reason = "pass", str(e)
        else:
            res.status = "fail"
            res.reason = f"expected {exp['error']} naming op '{case.op}' and argument '{exp['arg']}', got {_short(e)}"
        return res
    except Exception as e:  # noqa: BLE001 - any other exception is the wrong error
        res.status, res.reason = "fail", f"expected {exp['error']} naming '{exp['arg']}', got {_short(e)}"
        return res
    res.status, res.reason = "fail", f"expected {exp['error']} naming '{exp['arg']}', but the call succeeded"
    return res


def run_case(case: Case, backend: str, device: str, *, oracle_device: Optional[str] = None) -> CaseResult:
    """Run ``case`` on ``backend`` with inputs on ``device``; the oracle runs on ``oracle_device`` (default: same)."""
    res = CaseResult(case.id, case.op, case.kind, "error", params=dict(case.params))
    t_start = time.perf_counter()
    try:
        _run(case, backend, device, oracle_device or device, res)
    except Exception as e:  # noqa: BLE001 - a suite-side failure is this case's error, not the run's end
        res.status, res.reason = "error", f"conformance suite error: {_short(e)}\n{_trace(e)}"
    res.total_s = time.perf_counter() - t_start
    if res.status in ("fail", "error"):
        xf = expected_failure(backend, case.id, device)
        if xf is not None:
            res.reason = f"expected failure: {xf.reason} | observed: {res.reason}"
            res.status = "xfail"
    elif res.status == "pass" and expected_failure(backend, case.id, device) is not None:
        res.reason = "listed in exceptions.json as an expected failure but passed: remove the entry"
    return res


def _run(case: Case, backend: str, device: str, oracle_device: str, res: CaseResult) -> None:
    th = thresholds_for(backend)
    be = get_backend(backend)
    avail = be.availability()
    if not avail.ok:
        res.status, res.reason = "unsupported", f"backend '{backend}' unavailable: {avail.reason}"
        return
    if case.kind == "bad":
        _run_bad(case, backend, device, res)
        return
    if case.kind == "determinism" and not be.is_deterministic(case.op):
        res.status, res.reason = "unsupported", f"backend '{backend}' does not claim determinism for {case.op}"
        return
    try:
        call = build(case.op, case.params, device, case.seed)
    except Exception as e:  # noqa: BLE001
        res.status, res.reason = "error", f"input generation failed: {_short(e)}\n{_trace(e)}"
        return
    if case.kind == "grad":
        _run_grad(case, backend, call, device, oracle_device, th, res)
        return
    try:
        got, res.time_s = _timed(backend, call, device)
    except opbridge.UnsupportedError as e:
        res.status, res.reason = "unsupported", e.reason
        return
    except Exception as e:  # noqa: BLE001 - a crashing kernel, an OpError on valid input, ...
        res.status, res.reason = "error", f"{_short(e)}\n{_trace(e)}"
        return
    if case.kind == "determinism":
        try:
            again, t2 = _timed(backend, call, device)
        except Exception as e:  # noqa: BLE001
            res.status, res.reason = "error", f"second call: {_short(e)}"
            return
        res.time_s += t2
        res.metrics = compare.determinism(got, again, th)
    else:
        ocall = oracle.to_oracle(call, oracle_device)
        want = oracle.run(ocall)
        got = tuple(g.to(oracle_device) if isinstance(g, torch.Tensor) else g for g in got)
        res.metrics = compare.compare(call, ocall, got, want, th)
    failed = [m for m in res.metrics if not m.passed]
    res.status = "fail" if failed else "pass"
    res.reason = "; ".join(str(m) for m in failed)
