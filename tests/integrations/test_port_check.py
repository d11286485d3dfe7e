"""`opbridge port-check`: passes on a faithful port, exits non-zero on a disagreement; its metrics."""
import json
import math

import pytest
import torch

import opbridge
from opbridge.cli import main
from opbridge.integrations import patch, unpatch
from opbridge.integrations.agreement import diff, max_abs, nonfinite_match
from opbridge.integrations.port_check import check

from .conftest import prompt


def test_metrics():
    x = torch.tensor([1.0, 2.0, -3.0])
    assert diff(x, x) == 0.0 and diff(torch.zeros(3), torch.zeros(3)) == 0.0
    y = torch.tensor([1.0, 2.0, -2.0])  # 1 - 2*(1+4+6)/(2+8+13) = 1/23
    assert math.isclose(diff(x, y), 1 / 23, rel_tol=1e-12) and max_abs(x, y) == 1.0
    assert diff(x, -x) == 2.0
    a = torch.tensor([1.0, float("nan"), float("inf")])
    assert nonfinite_match(a, a.clone()) and not nonfinite_match(a, torch.tensor([1.0, float("nan"), 1.0]))


def test_cli_passes_and_writes_json(tmp_path, capsys):
    out = tmp_path / "v3.json"
    rc = main(["port-check", "--model", "v3", "--batch", "2", "--seq-len", "12", "--decode-steps", "2",
               "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "PASS" in text and "greedy tokens: 6/6 agree" in text
    res = json.loads(out.read_text())
    assert res["ok"] and res["agreement"]["prefill"]["diff"] < 1e-9 and len(res["agreement"]["layers"]) == 3
    assert res["patch"]["kinds"] == {"attention": 3, "experts": 2, "router": 2}


def test_disagreement_exits_nonzero(monkeypatch, capsys):
    real = opbridge.moe
    monkeypatch.setattr(opbridge, "moe", lambda *a, **kw: real(*a, **kw) * 1.05)  # a 5% wrong expert path
    rc = main(["port-check", "--model", "v32", "--seq-len", "12", "--decode-steps", "1"])
    text = capsys.readouterr().out
    assert rc == 1 and "FAIL" in text and "logits diff" in text


def test_backend_against_backend_and_already_patched(models):
    model = models["v32"]
    ids = prompt(batch=1, length=12)
    res = check(model, ids, backend="reference", against="reference", decode_steps=1)
    assert res["ok"] and res["agreement"]["prefill"]["diff"] == 0.0  # the same backend twice: bitwise
    assert not any("forward" in m.__dict__ for m in model.modules())  # left as found
    patch(model)
    try:
        with pytest.raises(ValueError, match="already patched"):
            check(model, ids)
    finally:
        unpatch(model)


def test_cli_on_a_local_checkpoint(tmp_path, capsys):
    from opbridge.integrations.models import build_model

    build_model("v4", "tiny", seed=1).save_pretrained(tmp_path / "ckpt")
    rc = main(["port-check", "--checkpoint", str(tmp_path / "ckpt"), "--seq-len", "10", "--decode-steps", "1"])
    text = capsys.readouterr().out
    assert rc == 0 and "PASS" in text and "decoder_layer x4" in text, text
    assert main(["port-check", "--checkpoint", str(tmp_path / "missing")]) == 2
