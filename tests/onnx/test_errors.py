"""What cannot be exported fails before any ONNX is built, naming the op and the mode; bad arguments are named."""
from __future__ import annotations

import onnx
import pytest
import torch

import opbridge
import opbridge.onnx as ox

from .compare import assert_float

T, H, I, E, K = 6, 32, 16, 4, 2


class QuantMoE(torch.nn.Module):
    """moe with fp8 (128, 128) block-quantized expert weights."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.w13 = opbridge.quantize(torch.randn(E, 2 * I, H, generator=g) * 0.2, "fp8", (128, 128))
        self.w2 = opbridge.quantize(torch.randn(E, H, I, generator=g) * 0.2, "fp8", (128, 128))

    def forward(self, x, logits):
        w, ids = opbridge.moe_route(logits, K)
        return opbridge.moe(x, w, ids, self.w13, self.w2)


def _inputs():
    g = torch.Generator().manual_seed(6)
    return torch.randn(T, H, generator=g), torch.randn(T, E, generator=g)


@pytest.mark.parametrize("mode", ["decomposed", "ort"])
def test_quantized_moe_is_refused_naming_op_and_mode(mode, tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(ox.ExportUnsupportedError) as e:
        ox.export(QuantMoE(), _inputs(), path, mode=mode)
    msg = str(e.value)
    assert "opbridge.moe" in msg and f"mode '{mode}'" in msg and "'w13'" in msg and "fp8" in msg
    assert isinstance(e.value, opbridge.UnsupportedError) and e.value.op == "moe" and e.value.mode == mode
    assert not path.exists()


def test_quantized_moe_exports_in_custom_mode_and_runs():
    model = QuantMoE()
    proto = ox.export(model, _inputs(), mode="custom")
    onnx.checker.check_model(proto, full_check=True)
    node = next(n for n in proto.graph.node if n.op_type == "moe")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["w13_fmt"] == b"fp8" and attrs["w13_block"] == [128, 128] and attrs["w2_fmt"] == b"fp8"
    fp8 = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN}
    assert node.input[3] in fp8 and node.input[5] in fp8  # inputs x, w, ids, w13, w13_scale, w2, w2_scale
    with torch.no_grad():
        want = model(*_inputs())
    assert_float(ox.run(proto, _inputs())[0], want, "custom fp8 moe")


def test_fp8_indexer_is_refused_in_decomposed_mode():
    class Indexer(torch.nn.Module):
        def forward(self, q, k, w):
            return opbridge.indexer_topk(q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn), w, 2,
                                         q_scale=torch.ones_like(w), k_scale=torch.ones(k.shape[0]))

    args = (torch.randn(4, 2, 8), torch.randn(4, 8), torch.randn(4, 2))
    with pytest.raises(ox.ExportUnsupportedError, match=r"opbridge\.indexer_topk: .*mode 'decomposed'.*'q'"):
        ox.export(Indexer(), args, mode="decomposed")


def test_bad_mode_and_opset():
    m = QuantMoE()
    with pytest.raises(ValueError, match=r"argument 'mode'.*'tensorrt'"):
        ox.export(m, _inputs(), mode="tensorrt")
    with pytest.raises(ValueError, match=r"argument 'opset'.*>= 18.*17"):
        ox.export(m, _inputs(), opset=17)
