"""pytest plugin: the conformance cases as tests.

    pytest --pyargs opbridge.conformance --opbridge-backend=triton [--opbridge-device=cuda]
           [--opbridge-tier=small|full] [--opbridge-ops=moe,sinkhorn]

Installed, opbridge registers this plugin through the ``pytest11`` entry point; from a source
checkout add ``-p opbridge.conformance.plugin``. Cases run in the pytest process (use
``opbridge conformance`` for per-family subprocess isolation). ``unsupported`` cases are skipped
with the backend's reason and documented expected failures are xfailed.
"""
from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("opbridge", "opbridge conformance")
    group.addoption("--opbridge-backend", default="reference", help="backend under test (default: reference)")
    group.addoption("--opbridge-device", default=None, help="device of the inputs (default: the backend's usual one)")
    group.addoption("--opbridge-tier", default="small", choices=("small", "full"), help="case sizes (default: small)")
    group.addoption("--opbridge-ops", default=None, help="comma list of ops (default: all)")
    group.addoption("--opbridge-oracle-device", default=None, help="where the float64 reference runs")


def _settings(config: pytest.Config) -> dict:
    from .cli import default_device

    backend = config.getoption("--opbridge-backend")
    device = config.getoption("--opbridge-device") or default_device(backend)
    return {"backend": backend, "device": device, "tier": config.getoption("--opbridge-tier"),
            "ops": config.getoption("--opbridge-ops"), "oracle_device": config.getoption("--opbridge-oracle-device")}


def pytest_configure(config: pytest.Config) -> None:
    s = _settings(config)
    if s["backend"] == "triton" and s["device"].startswith("cpu"):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "conformance_case" not in metafunc.fixturenames:
        return
    from . import catalogue

    s = _settings(metafunc.config)
    ops = [o for o in s["ops"].split(",") if o] if s["ops"] else None
    cases = catalogue.cases(s["tier"], ops=ops)
    metafunc.parametrize("conformance_case", cases, ids=[c.id for c in cases])


@pytest.fixture
def conformance_settings(request: pytest.FixtureRequest) -> dict:
    return _settings(request.config)
