"""Running cases: statuses, the reference small tier, and crash isolation in subprocesses."""
import os

import torch

from opbridge.conformance import catalogue, runner, thresholds
from opbridge.conformance.execute import run_case
from opbridge.core.registry import OpImpl
from tests.conformance.planted import planted_backend

SMALL = catalogue.by_id("small")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_reference_small_tier_subset_passes():
    ops = ["moe_route", "grouped_gemm_masked", "moe_permute", "kv_compress", "window_indices", "sinkhorn", "mhc_post"]
    cases = catalogue.cases("small", ops=ops) + catalogue.cases("small", kinds=["bad", "determinism"])
    results = runner.run(runner.RunConfig("reference", isolate=False), cases)
    assert [(r.id, r.status, r.reason) for r in results if r.status != "pass"] == []
    assert {r.op for r in results} == set(catalogue.FAMILY_OF)  # bad cases touch every op


def test_unsupported_error_and_determinism_statuses():
    def nondeterministic(logits, *, iters, eps):
        out = torch.softmax(logits.float(), -1)
        return out + torch.rand_like(out) * 1e-7

    with planted_backend("sinkhorn", nondeterministic) as name:
        from opbridge.core.registry import get_backend

        backend = get_backend(name)
        del backend.impls["mhc_post"]
        backend.impls["mhc_pre"] = OpImpl(lambda *a, **k: (_ for _ in ()).throw(RuntimeError("kernel exploded")))
        backend.impls["window_indices"] = OpImpl(lambda *a, **k: None, supports=lambda *a, **k: "window > 4 unsupported")
        det = run_case(SMALL["sinkhorn/det-v4"], name, "cpu")
        missing = run_case(SMALL["mhc_post/v4-pro"], name, "cpu")
        boom = run_case(SMALL["mhc_pre/n6"], name, "cpu")
        refused = run_case(SMALL["window_indices/varlen"], name, "cpu")
        bad_missing = run_case(SMALL["mhc_post/bad-comb-shape"], name, "cpu")
    assert det.status == "fail" and "bitwise" in det.reason
    assert missing.status == "unsupported" and "not implemented" in missing.reason
    assert boom.status == "error" and "kernel exploded" in boom.reason
    assert refused.status == "unsupported" and refused.reason == "window > 4 unsupported"
    assert bad_missing.status == "pass"  # validation runs before dispatch, whatever the backend has


def test_expected_failure_becomes_xfail(monkeypatch):
    monkeypatch.setattr(thresholds, "expected_failure", lambda b, cid, device="": thresholds.ExpectedFailure("x", "known: issue 42"))
    from opbridge.conformance import execute

    monkeypatch.setattr(execute, "expected_failure", thresholds.expected_failure)

    def wrong(logits, *, iters, eps):
        return torch.zeros(logits.shape, dtype=torch.float32)

    with planted_backend("sinkhorn", wrong) as name:
        r = run_case(SMALL["sinkhorn/v4"], name, "cpu")
    assert r.status == "xfail" and "known: issue 42" in r.reason and "out.max_abs" in r.reason


def test_time_limit_marks_the_rest_not_run():
    cases = catalogue.cases("small", ops=["window_indices"])
    results = runner.run(runner.RunConfig("reference", isolate=False, time_limit=1e-9), cases)
    assert {r.status for r in results} == {"error"} and "time limit" in results[0].reason


def test_crash_and_hang_are_one_case_each():
    """A segfault and a hang in the worker become those cases' errors; the other cases still run."""
    cases = catalogue.cases("small", ops=["sinkhorn"], kinds=["model", "edge"])
    env = (("OPBRIDGE_TEST_SABOTAGE", "crash"), ("PYTHONPATH", ROOT))
    config = runner.RunConfig("reference", case_timeout=4, preload=("tests.conformance.sabotage",), extra_env=env)
    seen = []
    results = {r.id: r for r in runner.run(config, cases, progress=lambda cid, r: seen.append((cid, r is None)))}
    assert results["sinkhorn/n6"].status == "error" and "SIGSEGV" in results["sinkhorn/n6"].reason
    assert results["sinkhorn/n8"].status == "error" and "timed out" in results["sinkhorn/n8"].reason
    others = {cid: r.status for cid, r in results.items() if cid not in ("sinkhorn/n6", "sinkhorn/n8")}
    assert set(others.values()) == {"pass"} and len(others) == len(cases) - 2
    assert ("sinkhorn/n6", True) in seen  # progress saw it start


def test_expected_failure_can_be_limited_to_device_types():
    xf = thresholds.ExpectedFailure("sparse_attention/T*", "bf16 P on tensor cores", ("cuda",))
    assert xf.applies("sparse_attention/T1", "cuda:0") and xf.applies("sparse_attention/T1", "cuda")
    assert not xf.applies("sparse_attention/T1", "cpu") and not xf.applies("moe/T1", "cuda")
    assert thresholds.ExpectedFailure("moe/*", "any device").applies("moe/x", "npu")
