"""Mode ``ort``: which ``moe`` calls go to ``com.microsoft::MoE`` and that they compute what opbridge.moe does."""
from __future__ import annotations

import numpy as np
import onnx
import torch

import opbridge
import opbridge.onnx as ox

from .compare import assert_float

T, H, I, E, K = 12, 32, 16, 8, 2


class Routed(torch.nn.Module):
    """Five MoE calls: three fed by routers (softmax; sigmoid + bias + group limit; hash), one fed by
    weights that are a model input (may be negative), one by a router with a negative scaling factor."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w13 = torch.nn.Parameter(torch.randn(E, 2 * I, H, generator=g) * H ** -0.5, requires_grad=False)
        self.w2 = torch.nn.Parameter(torch.randn(E, H, I, generator=g) * I ** -0.5, requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(E, generator=g) * 0.1, requires_grad=False)
        self.tid2eid = torch.randint(0, E, (50, K), generator=g, dtype=torch.int32)

    def forward(self, x, logits, token_ids, user_weights, user_ids):
        moe = opbridge.moe
        w, i = opbridge.moe_route(logits, K)
        a = moe(x, w, i, self.w13, self.w2, swiglu_limit=2.0)  # large x: the limit clips
        w, i = opbridge.moe_route(logits, K, scoring="sigmoid", correction_bias=self.bias, num_groups=4,
                                  topk_groups=2, renormalize=True, scaling_factor=2.5)
        b = moe(x, w, i, self.w13, self.w2)
        w, i = opbridge.moe_route_hash(logits, token_ids, self.tid2eid)
        c = moe(x, w, i, self.w13, self.w2, swiglu_limit=2.0)
        d = moe(x, user_weights, user_ids, self.w13, self.w2)
        w, i = opbridge.moe_route(logits, K, scaling_factor=-1.0)
        e = moe(x, w, i, self.w13, self.w2)
        return a, b, c, d, e


def _inputs(tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g) * 4.0
    ids = torch.randint(-1, E, (tokens, K), generator=g, dtype=torch.int32)
    return (x, torch.randn(tokens, E, generator=g), torch.randint(0, 50, (tokens,), generator=g, dtype=torch.int32),
            torch.randn(tokens, K, generator=g), ids)


def test_router_fed_moe_runs_on_com_microsoft_moe_and_matches():
    model = Routed()
    D = torch.export.Dim.DYNAMIC
    proto = ox.export(model, _inputs(T, 0), mode="ort", dynamic_shapes=tuple({0: D} for _ in range(5)))
    onnx.checker.check_model(proto, full_check=True)
    ms = [n for n in proto.graph.node if n.domain == "com.microsoft"]
    assert [n.op_type for n in ms] == ["MoE"] * 3, "router-fed calls only; user weights and negative scaling decompose"
    assert {n.domain for n in proto.graph.node} == {"", "com.microsoft"}
    for tokens in (T, 3):
        args = _inputs(tokens, tokens)
        with torch.no_grad():
            want = model(*args)
        got = ox.run(proto, args)
        for name, g_, w_ in zip("abcde", got, want):
            assert_float(g_, w_, f"moe {name} T={tokens}")
    # the clipping matters at these magnitudes, so a mapping that ignored swiglu_limit would fail above
    w, i = opbridge.moe_route(args[1], K)
    unclipped = opbridge.moe(args[0], w, i, model.w13, model.w2)
    assert np.abs(unclipped.numpy() - want[0].numpy()).max() > 1e-2

