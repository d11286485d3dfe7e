"""The opbridge command line."""
import json
import subprocess
import sys

import opbridge
from opbridge.cli import main


def test_info_lists_every_op_and_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for op in opbridge.OP_NAMES:
        assert f"  {op} on cpu: " in out
    assert "reference: available" in out
    assert "ascend: unavailable: torch_npu not installed" in out


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {o["op"] for o in data["ops"]} == set(opbridge.OP_NAMES)
    assert data["backends"]["reference"] == "available"


def test_info_reports_bad_setting(capsys, monkeypatch):
    monkeypatch.setenv("OPBRIDGE_BACKEND", "nonsense")
    assert main(["info"]) == 0
    assert "unknown backend 'nonsense'" in capsys.readouterr().out


def test_unknown_command_fails():
    r = subprocess.run([sys.executable, "-m", "opbridge", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_help_lists_commands():
    r = subprocess.run([sys.executable, "-m", "opbridge", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "conformance" in r.stdout and "info" in r.stdout
