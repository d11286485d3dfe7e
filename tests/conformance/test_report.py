"""report.json / report.md, the merged scoreboard, and the `opbridge conformance` command."""
import json
import os
import pytest
import torch

from opbridge.conformance import merge, report
from opbridge.conformance.compare import Metric
from opbridge.conformance.execute import CaseResult

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {"device": "cpu", "device_name": "Test CPU", "backend": "reference", "backend_available": "available",
       "backend_deterministic": True, "oracle": "reference backend, float64, on cpu", "settings": {},
       "versions": {"torch": "2.x", "triton": None}, "created": "2026-01-01T00:00:00+00:00", "driver": None}


def _results(statuses):
    out = []
    for i, (op, st) in enumerate(statuses):
        m = Metric("out.diff", 1e-7 if st == "pass" else 0.5, "< 1e-05", st == "pass", "gemm.half")
        out.append(CaseResult(f"{op}/c{i}", op, "model", st, "" if st == "pass" else "out.diff=0.5 (< 1e-05) FAIL",
                              [m], {"E": 4}, 0.001, 0.01))
    return out


def _report(statuses, backend="reference", device_name="Test CPU"):
    env = dict(ENV, backend=backend, device_name=device_name)
    return report.build(_results(statuses), env, "small", {})


def test_report_summary_and_exit_status():
    rep = _report([("moe", "pass"), ("moe", "fail"), ("sinkhorn", "unsupported"), ("sinkhorn", "xfail")])
    assert rep["ops"]["moe"] == {"pass": 1, "fail": 1, "error": 0, "unsupported": 0, "xfail": 0, "total": 2}
    assert rep["exit_status"] == 1
    assert _report([("moe", "pass"), ("sinkhorn", "unsupported"), ("sinkhorn", "xfail")])["exit_status"] == 0
    md = report.markdown(rep)
    assert "## moe" in md and "## sinkhorn" in md and "**Result: FAILED**" in md
    assert "out.diff=0.5 (< 1e-05)" in md


def test_report_roundtrip_and_schema(tmp_path):
    rep = _report([("moe", "pass")])
    jpath, mpath = report.write(rep, str(tmp_path / "r"))
    assert report.load(jpath)["cases"][0]["metrics"][0]["value"] == pytest.approx(1e-7)
    assert os.path.exists(mpath)
    (tmp_path / "other.json").write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(ValueError, match="not an opbridge conformance report"):
        report.load(str(tmp_path / "other.json"))


def test_scoreboard_cells(tmp_path):
    a = _report([("moe", "pass"), ("moe", "pass"), ("sinkhorn", "pass")])
    b = _report([("moe", "pass"), ("moe", "fail"), ("sinkhorn", "unsupported")], backend="triton", device_name="H100")
    paths = []
    for name, rep in (("a", a), ("b", b)):
        paths.append(report.write(rep, str(tmp_path / name))[0])
    text = merge.scoreboard(paths)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| op")}
    assert rows["moe"] == ["2/2", "1/2 F1"]
    assert rows["sinkhorn"] == ["1/1", "0/0 U1"]
    assert "triton @ H100" in text


def _cli(*args, env=None, monkeypatch=None):
    """`opbridge conformance ...` in this process (its workers are still subprocesses)."""
    from opbridge.cli import main

    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    return main(["conformance", *args])


def test_cli_run_report_and_merge(tmp_path, capsys):
    out = tmp_path / "cpu-reference"
    assert _cli("--backend", "reference", "--ops", "sinkhorn", "--kinds", "model", "edge", "--report", str(out)) == 0
    printed = capsys.readouterr().out
    assert "| sinkhorn | 8 | 0 | 0 | 0 | 0 | 8 |" in printed
    rep = json.loads((out / "report.json").read_text())
    assert rep["environment"]["backend"] == "reference" and rep["environment"]["settings"]
    assert {c["status"] for c in rep["cases"]} == {"pass"} and all(c["time_s"] for c in rep["cases"])
    board = tmp_path / "SCOREBOARD.md"
    assert _cli("merge", str(out / "report.json"), str(out / "report.json"), "--out", str(board)) == 0
    printed = capsys.readouterr().out
    assert "| sinkhorn | 8/8 | 8/8 |" in printed and board.read_text() == printed


def test_cli_exit_status_when_a_case_fails(tmp_path, capsys, monkeypatch):
    """The sabotage module makes the reference's float32 sinkhorn wrong inside the workers only."""
    monkeypatch.setenv("PYTHONPATH", ROOT)
    code = _cli("--backend", "reference", "--ops", "sinkhorn", "--cases", "sinkhorn/v4", "sinkhorn/fp64",
                "--preload", "tests.conformance.sabotage", "--report", str(tmp_path),
                env={"OPBRIDGE_TEST_SABOTAGE": "wrong"}, monkeypatch=monkeypatch)
    assert code == 1
    cases = {c["id"]: c["status"] for c in json.loads((tmp_path / "report.json").read_text())["cases"]}
    assert cases == {"sinkhorn/v4": "fail", "sinkhorn/fp64": "pass"}
    assert "FAIL sinkhorn/v4" in capsys.readouterr().out


def test_cli_usage_errors(capsys):
    assert _cli("--ops", "no_such_op") == 2
    assert _cli("--backend", "nope") == 2
    assert _cli("merge") == 2
    assert _cli("--backend", "reference", "--device", "cuda:7" if not torch.cuda.is_available() else "npu") == 2
    assert _cli("--list", "--ops", "sinkhorn") == 0
    assert "sinkhorn/det-v4" in capsys.readouterr().out
