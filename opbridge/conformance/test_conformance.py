"""The conformance cases as pytest tests (collected by ``pytest --pyargs opbridge.conformance``; see plugin.py)."""
import pytest

from opbridge.conformance.execute import run_case


def test_case(conformance_case, conformance_settings):
    s = conformance_settings
    r = run_case(conformance_case, s["backend"], s["device"], oracle_device=s["oracle_device"])
    if r.status == "unsupported":
        pytest.skip(f"unsupported: {r.reason}")
    if r.status == "xfail":
        pytest.xfail(r.reason)
    assert r.status == "pass", f"{r.status}: {r.reason}"
