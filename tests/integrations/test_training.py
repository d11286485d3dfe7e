"""Training through a patched V4 model (reference backend): the unpatched gradients, and a step that learns."""
import torch

from opbridge.integrations import patch, unpatch
from opbridge.integrations.agreement import diff
from opbridge.integrations.models import build_model

from .conftest import prompt

GRAD_MAX_DIFF = 1e-8  # observed ~1e-11 in float32


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def test_v4_gradients_match_and_a_step_lowers_the_loss():
    model = build_model("v4", "tiny", seed=3).train()
    ids = prompt(batch=2, length=20, seed=4)
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    report = patch(model)
    try:
        loss, grads = _loss_and_grads(model, ids)
        assert abs(float(loss) - float(loss_ref)) < 1e-5
        checked = 0
        for name, g_ref in grads_ref.items():
            g = grads[name]
            assert (g is None) == (g_ref is None), name  # the indexer picks keys: no gradient either way
            if g_ref is None or float(g_ref.abs().max()) == 0.0:
                continue
            assert diff(g, g_ref) < GRAD_MAX_DIFF, (name, diff(g, g_ref))
            checked += 1
        # the gradient reaches the parameters only opbridge ops touch: router, experts, mHC, compressor, sinks
        for name in ("model.layers.0.mlp.gate.weight", "model.layers.3.mlp.experts.gate_up_proj",
                     "model.layers.1.attn_hc.fn", "model.hc_head.hc_fn", "model.layers.1.self_attn.sinks",
                     "model.layers.2.self_attn.compressor.position_bias"):
            assert grads[name] is not None and float(grads[name].abs().max()) > 0, name
        assert checked > 50
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.05 * p.grad
        new_loss = model(input_ids=ids, labels=ids).loss.detach()
    finally:
        unpatch(model)
    assert report.skipped == ()
    assert float(new_loss) < float(loss) - 1e-3
