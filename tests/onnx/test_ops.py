"""Every opbridge op (the one-call samples of tests/core/samples.py, float32) exported in one module per mode:
``custom`` runs in onnx.reference with reference_ops(), ``decomposed`` in onnxruntime CPU; each op's outputs
are compared with the torch call under its OPS.md threshold."""
from __future__ import annotations

import onnx
import pytest
import torch
from torch.utils import _pytree as pytree

import opbridge
import opbridge.onnx as ox
from tests.core.samples import call, samples

from .compare import assert_equal, assert_float, assert_lse, assert_max_abs, assert_topk, domains


class AllOps(torch.nn.Module):
    """Calls each sample op once; the sample tensors are the module's inputs."""

    def __init__(self, cases: dict[str, tuple[tuple, dict]]):
        super().__init__()
        self.names = list(cases)
        self.inputs: list[torch.Tensor] = []
        seen: dict[int, int] = {}
        self.specs = []
        for name in self.names:
            leaves, spec = pytree.tree_flatten(cases[name])
            slots = []
            for x in leaves:
                if isinstance(x, torch.Tensor):
                    if id(x) not in seen:
                        seen[id(x)] = len(self.inputs)
                        self.inputs.append(x)
                    slots.append(("input", seen[id(x)]))
                else:
                    slots.append(("const", x))
            self.specs.append((slots, spec))

    def forward(self, *tensors: torch.Tensor):
        outs = []
        for name, (slots, spec) in zip(self.names, self.specs):
            leaves = [tensors[v] if kind == "input" else v for kind, v in slots]
            args, kwargs = pytree.tree_unflatten(leaves, spec)
            res = call(name, args, kwargs)
            outs.extend(res if isinstance(res, tuple) else (res,))
        return tuple(outs)


def _paged_logits(args: tuple, kwargs: dict) -> torch.Tensor:
    """indexer_topk_paged's candidate scores ``[B*Sq, L]``, through the public unpaged indexer_logits."""
    q, k_cache, block_table, context_lens, weights, _ = args
    B, Sq = q.shape[:2]
    bs = k_cache.shape[1]
    L = block_table.shape[1] * bs
    rows = []
    for b in range(B):
        ctx = int(context_lens[b])
        pos = torch.arange(ctx)
        keys = k_cache.flatten(0, 1)[block_table[b].long()[pos // bs] * bs + pos % bs]
        qpos = (torch.arange(Sq) + ctx - Sq).to(torch.int32)
        s = opbridge.indexer_logits(q[b], keys, weights[b], compress_rate=kwargs.get("compress_rate", 1),
                                    q_positions=qpos)
        rows.append(torch.cat([s, s.new_full((Sq, L - s.shape[1]), float("-inf"))], 1))
    return torch.cat(rows)


def check_op(name: str, got: list, want: tuple, args: tuple, kwargs: dict, mode: str) -> None:
    what = f"{mode} {name}"
    if name in ("moe_route", "moe_route_hash"):
        assert_max_abs(got[0], want[0], f"{what} weights", 1e-5)
        assert_equal(got[1], want[1], f"{what} ids")
    elif name in ("grouped_gemm", "grouped_gemm_masked", "moe", "moe_combine", "kv_compress", "mhc_post",
                  "indexer_logits"):
        assert_float(got[0], want[0], what)
    elif name == "moe_permute":
        assert_float(got[0], want[0], f"{what} x_sorted")
        assert_equal(got[1], want[1], f"{what} offsets")
        assert_equal(got[2], want[2], f"{what} src_index")
    elif name == "indexer_topk":
        logits = opbridge.indexer_logits(*args[:3], **kwargs)
        assert_topk(got[0], logits, what)
    elif name == "indexer_topk_paged":
        assert_topk(got[0].reshape(-1, got[0].shape[-1]), _paged_logits(args, kwargs), what)
    elif name in ("sparse_attention", "sparse_attention_paged"):
        assert_float(got[0], want[0], f"{what} out", 7e-6)
        assert_lse(got[1], want[1], f"{what} lse")
    elif name == "window_indices":
        assert_equal(got[0], want[0], what)
    elif name == "sinkhorn":
        assert_max_abs(got[0], want[0], what, 1e-6)
    elif name in ("mhc_pre", "mhc_post_pre"):
        *head, y, post, comb = got
        w_head, w_y, w_post, w_comb = want[:-3], *want[-3:]
        for g_, w_ in zip(head, w_head):
            assert_float(g_, w_, f"{what} new_residual")
        assert_float(y, w_y, f"{what} y")
        assert_max_abs(post, w_post, f"{what} post", 1e-4)
        assert_max_abs(comb, w_comb, f"{what} comb", 1e-4)
    else:  # a new op without a check here must not pass silently
        raise AssertionError(f"no check for {name}")


@pytest.mark.parametrize("mode", ["custom", "decomposed"])
def test_every_op(mode):
    cases = samples(torch.float32)
    assert set(cases) == set(opbridge.OP_NAMES)
    model = AllOps(cases)
    proto = ox.export(model, model.inputs, mode=mode)
    onnx.checker.check_model(proto, full_check=True)
    used = domains(proto)
    if mode == "custom":
        assert used["opbridge"] == set(opbridge.OP_NAMES)
        _check_custom_attributes(proto)
    else:
        assert set(used) == {""}
    with torch.no_grad():
        want = model(*model.inputs)
    got = ox.run(proto, model.inputs)
    assert len(got) == len(want)
    i = 0
    for name in model.names:
        res = call(name, *cases[name])
        n = len(res) if isinstance(res, tuple) else 1
        check_op(name, got[i:i + n], want[i:i + n], *cases[name], mode)
        i += n



def _check_custom_attributes(proto: onnx.ModelProto) -> None:
    """Scalars travel as attributes; absent optionals and plain-weight format fields are left out."""
    nodes = {n.op_type: n for n in proto.graph.node if n.domain == "opbridge"}
    attrs = {op: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for op, n in nodes.items()}
    assert attrs["sparse_attention"] == {"scale": pytest.approx(0.25), "d_v": 8}
    assert attrs["sparse_attention_paged"] == {"scale": pytest.approx(0.25)}  # d_v=None: left out
    assert attrs["grouped_gemm"] == {"out_dtype": onnx.TensorProto.FLOAT}
    assert attrs["moe_route"] == {"top_k": 2, "scoring": b"sigmoid", "num_groups": 2, "topk_groups": 1,
                                  "renormalize": 1, "scaling_factor": pytest.approx(2.5)}
    assert attrs["moe"] == {"activation": b"swiglu", "swiglu_limit": pytest.approx(10.0)}  # plain weights: no fmt
    assert attrs["kv_compress"] == {"rate": 4, "overlap": 1}
    sa = nodes["sparse_attention"]
    # inputs q, kv, indices, cu_seqlens_q, cu_seqlens_k, sink; the absent extra_* are dropped from the end
    assert len(sa.input) == 6 and all(sa.input) and len(sa.output) == 2
    ik = nodes["indexer_topk"]  # q, k, weights, cu_q, cu_k, then q_positions absent: an empty name
    assert list(ik.input[5:]) in ([], [""] * len(ik.input[5:]))
