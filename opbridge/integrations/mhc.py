"""DeepSeek-V4 manifold-constrained hyper-connections through ``mhc_pre``, ``mhc_post_pre`` and ``mhc_post``.

Checked against transformers 5.x ``modeling_deepseek_v4``:

- ``HyperConnection``: weightless RMSNorm of the flattened streams (eps ``rms_norm_eps``), then
  ``fn`` (= phi, rows pre | post | comb), ``scale`` (= alpha), ``base`` (= bias);
  ``pre = sigmoid(.) + hc_eps``, ``post = 2 sigmoid(.)``, ``comb = Sinkhorn(softmax_rows(.) + hc_eps)``
  with ``hc_sinkhorn_iters`` and ``hc_eps``, collapse ``sum_j pre_j x_j``: exactly ``mhc_pre``.
- ``DecoderLayer``: ``post * f + comb^T @ streams`` after each sub-layer (``matmul(comb.transpose)``):
  exactly ``mhc_post``; the attention's post and the FFN's pre are fused into ``mhc_post_pre``.
- ``HyperHead`` (the final collapse): only the ``pre`` rows (``hc_fn [n, n*C]``, ``hc_scale [1]``,
  ``hc_base [n]``). It is ``mhc_pre`` with zero ``post`` and ``comb`` rows, built per call from the
  live parameters (a few KiB; gradients reach ``hc_fn``); those outputs are discarded.

transformers rounds ``post`` / ``comb`` to the stream dtype before mixing; opbridge keeps them in
float32 (fp32 accumulate, OPS.md 4.3), so bf16 models differ at rounding level only.
"""
from __future__ import annotations

from typing import Optional

import torch

import opbridge

from .patching import Rule


def _site(hc) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The mHC parameters are kept in float32 by transformers (_keep_in_fp32_modules_strict): .float() is a no-op.
    return hc.fn.float(), hc.scale.float(), hc.base.float()


def _pre_kwargs(hc) -> dict:
    return dict(sinkhorn_iters=int(hc.hc_sinkhorn_iters), eps=float(hc.hc_eps), norm_eps=float(hc.input_norm.eps),
                post_scale=2.0)


def hyper_connection_forward(self, hidden_streams):
    phi, alpha, bias = _site(self)
    collapsed, post, comb = opbridge.mhc_pre(hidden_streams, phi, alpha, bias, **_pre_kwargs(self))
    return post, comb, collapsed


def _check_hc(m, quantize) -> Optional[str]:
    n = m.hc_mult
    if m.fn.dim() != 2 or m.fn.shape[0] != n * (n + 2) or m.fn.shape[1] % n:
        return f"fn {tuple(m.fn.shape)} is not [n*(n+2), n*C] for n={n}"
    if tuple(m.base.shape) != (n * (n + 2),) or tuple(m.scale.shape) != (3,):
        return f"base {tuple(m.base.shape)} / scale {tuple(m.scale.shape)} are not [n*(n+2)] / [3]"
    if type(m.input_norm).__name__ != "DeepseekV4UnweightedRMSNorm":
        return f"input norm {type(m.input_norm).__name__} is not the weightless RMSNorm of mhc_pre"
    if int(m.hc_sinkhorn_iters) < 1:
        return f"hc_sinkhorn_iters={m.hc_sinkhorn_iters} < 1"
    return None


def hyper_head_forward(self, x):
    n = self.hc_mult
    fn = self.hc_fn.float()
    rest = n * (n + 1)
    phi = torch.cat([fn, fn.new_zeros((rest, fn.shape[1]))])
    alpha = torch.cat([self.hc_scale.float(), fn.new_ones(2)])
    bias = torch.cat([self.hc_base.float(), fn.new_zeros(rest)])
    y, _, _ = opbridge.mhc_pre(x, phi, alpha, bias, sinkhorn_iters=1, eps=float(self.eps),
                               norm_eps=float(self.input_norm.eps))
    return y


def _check_head(m, quantize) -> Optional[str]:
    n = m.hc_mult
    if m.hc_fn.dim() != 2 or m.hc_fn.shape[0] != n or m.hc_fn.shape[1] % n:
        return f"hc_fn {tuple(m.hc_fn.shape)} is not [n, n*C] for n={n}"
    if tuple(m.hc_base.shape) != (n,) or m.hc_scale.numel() != 1:
        return f"hc_base {tuple(m.hc_base.shape)} / hc_scale {tuple(m.hc_scale.shape)} are not [n] / [1]"
    if type(m.input_norm).__name__ != "DeepseekV4UnweightedRMSNorm":
        return f"input norm {type(m.input_norm).__name__} is not the weightless RMSNorm of mhc_pre"
    return None


def decoder_layer_forward(self, hidden_states, input_ids=None, **kwargs):
    # hidden_states: [B, S, n, C] streams. attn_hc runs as a module (patched or not: same interface).
    post, comb, collapsed = self.attn_hc(hidden_states)
    attn_output, _ = self.self_attn(self.input_layernorm(collapsed), **kwargs)
    phi, alpha, bias = _site(self.ffn_hc)
    hidden_states, collapsed, post, comb = opbridge.mhc_post_pre(attn_output, hidden_states, post, comb, phi, alpha,
                                                                 bias, **_pre_kwargs(self.ffn_hc))
    mlp_output = self.mlp(self.post_attention_layernorm(collapsed), input_ids=input_ids)
    return opbridge.mhc_post(mlp_output, hidden_states, post, comb)


def _check_layer(m, quantize) -> Optional[str]:
    for name in ("attn_hc", "ffn_hc", "self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
        if not hasattr(m, name):
            return f"no '{name}' sub-module"
    return None


def rules(mods: dict) -> list[Rule]:
    if "v4" not in mods:
        return []
    M = mods["v4"]
    return [
        Rule(M.DeepseekV4HyperConnection, "mhc", ("mhc_pre",), hyper_connection_forward, _check_hc),
        Rule(M.DeepseekV4HyperHead, "mhc_head", ("mhc_pre",), hyper_head_forward, _check_head),
        Rule(M.DeepseekV4DecoderLayer, "decoder_layer", ("mhc_post_pre", "mhc_post"), decoder_layer_forward,
             _check_layer, bypasses=lambda m: (m.ffn_hc,)),
    ]
