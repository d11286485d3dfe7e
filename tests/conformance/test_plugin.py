"""`pytest --pyargs opbridge.conformance --opbridge-backend=B` runs the cases as tests."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pytest(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    # -p: the pytest11 entry point registers the plugin once opbridge is installed; a source tree needs -p.
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "opbridge.conformance.plugin", "--pyargs",
                           "opbridge.conformance", "-q", "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_plugin_runs_cases_for_a_backend():
    p = _pytest("--opbridge-backend=reference", "--opbridge-ops=window_indices")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "7 passed" in p.stdout


def test_unsupported_and_xfail_map_to_skip_and_xfail(monkeypatch):
    """The plugin's test body: unsupported -> skip with the backend's reason, fail -> assertion."""
    import pytest

    from opbridge.conformance import catalogue
    from opbridge.conformance.test_conformance import test_case

    case = catalogue.by_id("small")["window_indices/varlen"]
    settings = {"backend": "ascend", "device": "cpu", "oracle_device": None}
    with pytest.raises(pytest.skip.Exception, match="unsupported: backend 'ascend' unavailable"):
        test_case(case, settings)
    test_case(case, dict(settings, backend="reference"))  # passes: no exception
