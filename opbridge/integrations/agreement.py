"""Run a causal LM (prefill + cached greedy decode) and measure how two runs agree (OPS.md section 5 metrics).

One run is the *reference* (the unpatched transformers model, or the patched model on another
backend); the *candidate* decodes teacher-forced on the reference's greedy tokens, so every step
compares logits for the same inputs and "greedy decoding agrees for N steps" means every step's
argmax matches. A mismatch where the reference's two tokens are closer than the two runs' largest
logit difference at that step is a numerical tie and is reported, not failed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from opbridge.conformance.metrics import diff


def max_abs(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.detach().double(), y.detach().double()
    ok = torch.isfinite(x) & torch.isfinite(y)
    return float((x[ok] - y[ok]).abs().max()) if bool(ok.any()) else 0.0


def nonfinite_match(x: torch.Tensor, y: torch.Tensor) -> bool:
    """NaN and +-Inf at the same positions (OPS.md section 5)."""
    x, y = x.detach(), y.detach()
    return bool(torch.equal(torch.isnan(x), torch.isnan(y)) and torch.equal(torch.isposinf(x), torch.isposinf(y))
                and torch.equal(torch.isneginf(x), torch.isneginf(y)))


@dataclass
class Trace:
    """What one run produced: prefill logits, each decoder layer's prefill output, per-step logits, tokens."""

    prefill: torch.Tensor  # [B, S, V]
    layers: list[torch.Tensor]
    steps: list[torch.Tensor] = field(default_factory=list)  # [B, V] logits that chose tokens[t]
    tokens: list[torch.Tensor] = field(default_factory=list)  # [B] token chosen at step t (greedy)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    base = getattr(model, "model", model)
    return list(getattr(base, "layers", []))


@contextlib.contextmanager
def _capture(model: torch.nn.Module, out: list) -> Iterator[None]:
    def hook(_m, _args, output):
        t = output[0] if isinstance(output, (tuple, list)) else output
        out.append(t.detach().float().cpu())

    handles = [layer.register_forward_hook(hook) for layer in decoder_layers(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run(model: torch.nn.Module, input_ids: torch.Tensor, steps: int,
        forced: Optional[list[torch.Tensor]] = None) -> Trace:
    """Prefill ``input_ids`` then ``steps`` cached decode steps; greedy, or fed ``forced`` tokens."""
    layers: list[torch.Tensor] = []
    with _capture(model, layers):
        out = model(input_ids=input_ids, use_cache=True)
    trace = Trace(out.logits.detach().float().cpu(), layers)
    cache, logits = out.past_key_values, out.logits[:, -1]
    for t in range(steps + 1):
        trace.steps.append(logits.detach().float().cpu())
        tok = forced[t] if forced is not None else logits.argmax(-1).cpu()
        trace.tokens.append(logits.argmax(-1).cpu() if forced is not None else tok)
        if t == steps:
            break
        out = model(input_ids=tok.to(input_ids.device).view(-1, 1), past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    return trace


def compare(ref: Trace, cand: Trace) -> dict:
    """Per-layer, prefill-logits and per-step agreement of ``cand`` with ``ref`` (see the module docstring)."""
    layers = [{"layer": i, "diff": diff(a, b), "max_abs": max_abs(a, b)}
              for i, (a, b) in enumerate(zip(ref.layers, cand.layers))]
    steps, mismatches = [], []
    for t, (a, b, tok_ref, tok_cand) in enumerate(zip(ref.steps, cand.steps, ref.tokens, cand.tokens)):
        err = max_abs(a, b)
        step = {"step": t, "diff": diff(a, b), "max_abs": err, "tokens_equal": bool(torch.equal(tok_ref, tok_cand))}
        for r in (tok_ref != tok_cand).nonzero().flatten().tolist():
            gap = float(a[r, tok_ref[r]] - a[r, tok_cand[r]])
            mismatches.append({"step": t, "row": r, "ref": int(tok_ref[r]), "cand": int(tok_cand[r]),
                               "ref_gap": gap, "tie": gap <= err})
        steps.append(step)
    decode_ref = torch.stack(ref.steps)
    decode_cand = torch.stack(cand.steps)
    n_tok = sum(t.numel() for t in ref.tokens)
    return {
        "layers": layers,
        "prefill": {"diff": diff(ref.prefill, cand.prefill), "max_abs": max_abs(ref.prefill, cand.prefill),
                    "nonfinite_match": nonfinite_match(ref.prefill, cand.prefill)},
        "decode": {"diff": diff(decode_ref, decode_cand), "max_abs": max_abs(decode_ref, decode_cand),
                   "nonfinite_match": nonfinite_match(decode_ref, decode_cand), "steps": steps},
        "tokens": {"compared": n_tok, "agree": n_tok - len(mismatches),
                   "agreement": (n_tok - len(mismatches)) / max(n_tok, 1), "mismatches": mismatches,
                   "unexplained": sum(not m["tie"] for m in mismatches)},
    }
