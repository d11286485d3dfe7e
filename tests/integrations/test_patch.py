"""What patch() touches, what it leaves alone (and says so), and that unpatch() restores the model."""
import pytest
import torch

import opbridge
from opbridge.integrations import is_patched, patch, unpatch
from opbridge.integrations.agreement import diff

from .conftest import prompt

V4_KINDS = {"router": 2, "hash_router": 2, "experts": 4, "mhc": 8, "mhc_head": 1, "decoder_layer": 4,
            "attention": 4, "compressor": 3, "indexer": 2}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_report_lists_every_mapped_module(models):
    model = models["v4"]
    report = patch(model)
    try:
        assert report.kinds() == V4_KINDS
        assert report.skipped == ()
        assert {"moe_route", "moe_route_hash", "moe", "mhc_pre", "mhc_post_pre", "mhc_post", "kv_compress",
                "indexer_topk", "sparse_attention", "window_indices"} <= set(report.ops())
        paths = {s.path for s in report.patched}
        assert "model.layers.0.mlp.gate" in paths and "model.hc_head" in paths
        assert "patched" in str(report) and report.to_dict()["kinds"] == V4_KINDS
        # a second patch leaves the patched modules alone and says why
        again = patch(model)
        assert again.patched == () and len(again.skipped) == len(report.patched)
        assert all("already patched" in s.reason for s in again.skipped)
    finally:
        assert unpatch(model) == len(report.patched)
    assert not any(is_patched(m) for m in model.modules())
    assert not any("forward" in m.__dict__ for m in model.modules())  # the class forwards are back


def test_unpatch_restores_bitwise_and_weights_are_not_copied(models):
    model = models["v3"]
    ids = prompt(batch=1, length=12)
    before = _logits(model, ids)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    patch(model)
    try:
        assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
        experts = model.model.layers[1].mlp.experts
        with torch.no_grad():  # an in-place weight update is seen by the patched forward: no private copy
            experts.gate_up_proj.mul_(2.0)
        patched = _logits(model, ids)
    finally:
        unpatch(model)
    changed = _logits(model, ids)
    with torch.no_grad():
        experts.gate_up_proj.div_(2.0)
    assert diff(patched, changed) < 1e-9 and diff(changed, before) > 1e-6
    assert torch.equal(_logits(model, ids), before)


def test_unknown_variant_is_listed_and_left_alone(models):
    model = models["v4"]
    gate = model.model.layers[2].mlp.gate
    original_cls = type(gate)

    class MyRouter(original_cls):  # a variant with its own code: opbridge cannot know its math
        def forward(self, hidden_states):
            return super().forward(hidden_states)

    gate.__class__ = MyRouter
    try:
        report = patch(model)
        try:
            skipped = {s.path: s for s in report.skipped}
            assert "model.layers.2.mlp.gate" in skipped
            assert "unknown variant" in skipped["model.layers.2.mlp.gate"].reason
            assert not is_patched(gate) and "forward" not in gate.__dict__
            assert report.kinds()["router"] == 1  # the other top-k router is still patched
        finally:
            unpatch(model)
    finally:
        gate.__class__ = original_cls


def test_unmappable_module_is_skipped_with_its_dependents(models):
    """A compressor that cannot be mapped takes its attention (which would run its math) with it."""
    model = models["v4"]
    comp = model.model.layers[2].self_attn.compressor  # HCA
    experts = model.model.layers[3].mlp.experts
    ids = prompt(batch=1, length=20)
    before = _logits(model, ids)
    saved_bias, saved_act = comp.position_bias, experts.act_fn
    comp.position_bias = torch.nn.Parameter(saved_bias.data[:, :-1].clone())  # not [rate, head_dim]
    experts.act_fn = torch.nn.GELU()  # not SiLU-gated: moe cannot express it
    try:
        report = patch(model)
        try:
            reasons = {s.path: s.reason for s in report.skipped}
            assert "position_bias" in reasons["model.layers.2.self_attn.compressor"]
            assert "model.layers.2.self_attn.compressor" in reasons["model.layers.2.self_attn"]
            assert "SiLU" in reasons["model.layers.3.mlp.experts"]
            assert report.kinds()["attention"] == 3 and report.kinds()["experts"] == 3
        finally:
            unpatch(model)
    finally:
        comp.position_bias, experts.act_fn = saved_bias, saved_act
    assert torch.equal(_logits(model, ids), before)


@pytest.mark.parametrize("fmt,limit", [("fp8", 5e-3), ("mxfp4", 5e-2)])
def test_quantized_experts(models, fmt, limit):
    model = models["v4"]
    ids = prompt(batch=1, length=20)
    ref = _logits(model, ids)
    report = patch(model, quantize=fmt)
    try:
        experts = model.model.layers[0].mlp.experts
        assert report.quantize == fmt and isinstance(experts._opbridge_w13, opbridge.QuantTensor)
        assert experts._opbridge_w13.fmt == fmt and experts._opbridge_w2.fmt == fmt
        out = _logits(model, ids)
    finally:
        unpatch(model)
    assert not hasattr(model.model.layers[0].mlp.experts, "_opbridge_w13")
    d = diff(ref, out)
    assert 0 < d < limit  # quantisation is visible, and within the end-to-end budget


def test_bad_quantize_argument(models):
    with pytest.raises(ValueError, match="quantize"):
        patch(models["v3"], quantize="int4")
    assert not any(is_patched(m) for m in models["v3"].modules())


@pytest.mark.parametrize("family,keep", [("v32", "indexer"), ("v4", "compressor"), ("v4", "indexer")])
def test_patched_module_serves_unpatched_neighbours(models, family, keep):
    """Each replacement keeps its module's interface: transformers' own attention can call a patched
    indexer / compressor (their HF-format outputs: in-range ids, additive block masks) and agree."""
    from opbridge.integrations.patching import PATCH_ATTR, restore

    model = models[family]
    ids = prompt(batch=2, length=22, seed=9)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        patch(model)
        try:
            for m in model.modules():
                state = getattr(m, PATCH_ATTR, None)
                if state is not None and state.kind != keep:
                    restore(m)
            assert sum(is_patched(m) for m in model.modules()) > 0
            out = model(input_ids=ids, attention_mask=mask).logits
        finally:
            unpatch(model)
    keep_rows = mask.bool()
    assert diff(ref[keep_rows], out[keep_rows]) < 1e-9
