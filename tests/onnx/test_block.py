"""A small DeepSeek-V4-style block (mHC, KV compression, indexer, sparse attention with a window,
compressed extra keys and a sink, routed MoE) exported in each mode, checked, run and compared with torch."""
from __future__ import annotations

import onnx
import pytest
import torch

import opbridge.onnx as ox
from opbridge.onnx.example import tiny_block

from .compare import assert_equal, assert_float, assert_max_abs, domains

BLOCK_OPS = {"mhc_pre", "mhc_post", "kv_compress", "indexer_topk", "sparse_attention", "moe_route", "moe"}


@pytest.mark.parametrize("mode", ox.MODES)
def test_block_exports_checks_runs_and_agrees_with_torch(mode):
    """Exported once at T=16 with a dynamic token count, checked, then run at T=16, 5 and 64: custom in
    onnx.reference with reference_ops(), decomposed and ort in onnxruntime CPU."""
    model, args, dynamic = tiny_block(tokens=16)
    proto = ox.export(model, args, mode=mode, dynamic_shapes=dynamic)
    onnx.checker.check_model(proto, full_check=True)
    _check_nodes(mode, proto)
    for tokens in (16, 5, 64):
        args = model.example_inputs(tokens, seed=tokens)
        with torch.no_grad():
            streams, weights, ids, picks = model(*args)
        got = ox.run(proto, args)
        assert len(got) == 4
        assert got[0].shape == (tokens, 4, 32)
        assert_float(got[0], streams, f"{mode} T={tokens} streams")  # the mhc_post threshold, diff < 1e-5
        assert_max_abs(got[1], weights, f"{mode} T={tokens} topk_weights", 1e-5)
        assert_equal(got[2], ids, f"{mode} T={tokens} topk_ids")
        assert_equal(got[3], picks, f"{mode} T={tokens} indexer picks")


def _check_nodes(mode: str, proto: onnx.ModelProto) -> None:
    used = domains(proto)
    if mode == "custom":
        assert used["opbridge"] == BLOCK_OPS
        assert set(used) == {"", "opbridge"}
        assert {(o.domain, o.version) for o in proto.opset_import} >= {("opbridge", 1), ("", ox.DEFAULT_OPSET)}
    elif mode == "decomposed":
        assert set(used) == {""}, "standard operators only"
    else:
        assert set(used) == {"", "com.microsoft"}
        moe = [n for n in proto.graph.node if n.domain == "com.microsoft"]
        assert [n.op_type for n in moe] == ["MoE"]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in moe[0].attribute}
        assert attrs["k"] == 2 and attrs["swiglu_fusion"] == 1 and attrs["activation_type"] == b"swiglu"
        assert attrs["swiglu_limit"] == pytest.approx(3.0)
