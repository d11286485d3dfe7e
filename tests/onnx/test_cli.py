"""``opbridge export MODULE:FACTORY out.onnx --mode ...``."""
from __future__ import annotations

import onnx
import torch

import opbridge
from opbridge.cli import main


class Post(torch.nn.Module):
    def forward(self, f, residual, post, comb):
        return opbridge.mhc_post(f, residual, post, comb)


def small():
    """A factory as the CLI expects: (module, args, dynamic_shapes)."""
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(6, 8, generator=g), torch.randn(6, 4, 8, generator=g), torch.rand(6, 4, generator=g),
            torch.rand(6, 4, 4, generator=g))
    return Post(), args, tuple({0: torch.export.Dim.DYNAMIC} for _ in args)


def test_export_and_verify(tmp_path, capsys):
    for mode, runtime in (("decomposed", "onnxruntime"), ("custom", "onnx.reference")):
        out = tmp_path / f"{mode}.onnx"
        rc = main(["export", "tests.onnx.test_cli:small", str(out), "--mode", mode, "--verify"])
        text = capsys.readouterr().out
        assert rc == 0, text
        model = onnx.load(str(out))
        onnx.checker.check_model(model)
        assert {n.domain for n in model.graph.node} == ({""} if mode == "decomposed" else {"opbridge"})
        assert f"wrote {out}: mode {mode}" in text and f"runs on {runtime}" in text
        assert "output 0: ok (diff" in text and "MISMATCH" not in text
        # the token count stayed dynamic
        assert model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_param")


def test_bad_factory_is_a_usage_error(tmp_path, capsys):
    assert main(["export", "opbridge.onnx.example", str(tmp_path / "x.onnx")]) == 2
    assert "expected MODULE:FACTORY" in capsys.readouterr().err
    assert main(["export", "opbridge.onnx.example:nope", str(tmp_path / "x.onnx")]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
