"""Patched vs unpatched transformers DeepSeek models on the reference backend: same logits, same greedy tokens."""
import pytest
import torch

import opbridge
from opbridge.core import registry
from opbridge.integrations import patch, unpatch
from opbridge.integrations.agreement import compare, run

from .conftest import prompt

# Every family's patched forward must actually route these ops (a silent no-op patch would agree trivially).
EXPECTED_OPS = {
    "v3": {"moe_route", "moe", "sparse_attention"},
    "v32": {"moe_route", "moe", "sparse_attention", "indexer_topk"},
    "v4": {"moe_route", "moe_route_hash", "moe", "mhc_pre", "mhc_post_pre", "mhc_post", "kv_compress", "indexer_topk",
           "sparse_attention", "window_indices"},
}
FP32_MAX_DIFF = 1e-9  # observed ~3e-13: transformers and the reference backend both compute in float32


@pytest.fixture
def dispatched(monkeypatch):
    seen = []
    real = registry.dispatch

    def spy(op, device, args, kwargs):
        seen.append(op)
        return real(op, device, args, kwargs)

    monkeypatch.setattr(registry, "dispatch", spy)
    return seen


def _check(ref, cand, limit=FP32_MAX_DIFF):
    res = compare(ref, cand)
    assert res["prefill"]["nonfinite_match"] and res["decode"]["nonfinite_match"]
    assert res["prefill"]["diff"] < limit, res["prefill"]
    assert res["decode"]["diff"] < limit, res["decode"]
    assert all(layer["diff"] < limit for layer in res["layers"]), res["layers"]
    assert len(res["layers"]) == len(ref.layers) > 0
    assert res["tokens"]["mismatches"] == [] and res["tokens"]["compared"] == sum(t.numel() for t in ref.tokens)
    return res


@pytest.mark.parametrize("family", ["v3", "v32", "v4"])
def test_prefill_and_cached_decode_agree(models, family, dispatched):
    model = models[family]
    ids = prompt(batch=2)
    ref = run(model, ids, steps=3)
    assert dispatched == []  # the unpatched model never calls opbridge
    report = patch(model)
    try:
        with opbridge.use_backend("reference"):
            cand = run(model, ids, steps=3, forced=ref.tokens)
    finally:
        unpatch(model)
    assert EXPECTED_OPS[family] <= set(dispatched), sorted(set(dispatched))
    assert report.skipped == ()
    _check(ref, cand)


@pytest.mark.parametrize("family", ["v32", "v4"])
def test_left_padded_batch_agrees(models, family, dispatched):
    """A padded mask: V3.2's indexer takes the indexer_logits path; V4's window is cut by the mask."""
    model = models[family]
    ids = prompt(batch=2, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        patch(model)
        try:
            b = model(input_ids=ids, attention_mask=mask).logits
        finally:
            unpatch(model)
    if family == "v32":
        assert "indexer_logits" in dispatched
    keep = mask.bool()
    from opbridge.integrations.agreement import diff
    assert diff(a[keep], b[keep]) < FP32_MAX_DIFF
    assert torch.equal(a[keep].argmax(-1), b[keep].argmax(-1))


@pytest.mark.parametrize("family", ["v32", "v4"])
def test_left_padded_generate_agrees(models, family):
    """transformers' generate on a left-padded batch: per-row position_ids differ from the raw token
    count, which is where V4's HCA decode rule ("every entry so far") and its causal rule part ways."""
    model = models[family]
    ids = prompt(batch=2, length=17, seed=7)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    a = model.generate(ids, **kw)
    patch(model)
    try:
        b = model.generate(ids, **kw)
    finally:
        unpatch(model)
    assert torch.equal(a.sequences, b.sequences)
    from opbridge.integrations.agreement import diff
    assert diff(torch.stack(a.logits), torch.stack(b.logits)) < FP32_MAX_DIFF
