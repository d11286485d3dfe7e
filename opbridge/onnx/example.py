"""A tiny DeepSeek-V4-style block that calls the exportable opbridge ops: a factory for ``opbridge export``.

``tiny_block()`` returns ``(module, example_args, dynamic_shapes)`` with a dynamic token count, so

    opbridge export opbridge.onnx.example:tiny_block block.onnx --mode decomposed

works out of the box. The block: mHC pre -> attention (KV compression of the raw keys,
lightning indexer over the compressed entries, sparse attention over a sliding window of raw
keys plus the indexer's picks, with a per-head sink) -> mHC post -> mHC pre -> routed MoE
(sigmoid scores, correction bias, group limit) -> mHC post. Sizes are small on purpose.
"""
from __future__ import annotations

import torch
from torch import nn

import opbridge


class TinyBlock(nn.Module):
    def __init__(self, *, n: int = 4, C: int = 32, heads: int = 2, d: int = 16, index_heads: int = 2,
                 index_dim: int = 8, rate: int = 4, window: int = 4, index_topk: int = 2, experts: int = 8,
                 groups: int = 4, topk_groups: int = 2, top_k: int = 2, inter: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def p(*shape: int, scale: float = 1.0) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=g) * scale, requires_grad=False)

        self.n, self.C, self.heads, self.d = n, C, heads, d
        self.index_heads, self.index_dim, self.rate, self.window = index_heads, index_dim, rate, window
        self.index_topk, self.groups, self.topk_groups, self.top_k = index_topk, groups, topk_groups, top_k
        m = n * (n + 2)
        self.phi1, self.alpha1, self.bias1 = p(m, n * C, scale=0.1), p(3, scale=0.5), p(m, scale=0.5)
        self.phi2, self.alpha2, self.bias2 = p(m, n * C, scale=0.1), p(3, scale=0.5), p(m, scale=0.5)
        self.wq = p(C, heads * d, scale=C ** -0.5)
        self.wkv = p(C, d, scale=C ** -0.5)
        self.wck, self.wcg = p(C, 2 * d, scale=C ** -0.5), p(C, 2 * d, scale=C ** -0.5)
        self.cbias = p(rate, 2 * d, scale=0.5)
        self.wiq = p(C, index_heads * index_dim, scale=C ** -0.5)
        self.wik, self.wig = p(C, index_dim, scale=C ** -0.5), p(C, index_dim, scale=C ** -0.5)
        self.ibias = p(rate, index_dim, scale=0.5)
        self.wiw = p(C, index_heads, scale=C ** -0.5)
        self.sink = p(heads)
        self.wo = p(heads * d, C, scale=(heads * d) ** -0.5)
        self.wr = p(C, experts, scale=C ** -0.5)
        self.rbias = p(experts, scale=0.1)
        self.w13 = p(experts, 2 * inter, C, scale=C ** -0.5)
        self.w2 = p(experts, C, inter, scale=inter ** -0.5)

    def attention(self, y: torch.Tensor) -> torch.Tensor:
        T = y.shape[0]
        q = (y @ self.wq).view(T, self.heads, self.d)
        kv = y @ self.wkv  # raw keys (K = V), one shared head
        ckv = opbridge.kv_compress(y @ self.wck, y @ self.wcg, self.cbias, self.rate, overlap=True)
        # Non-negative indexer queries and keys: every relu(q . k) is then positive, so indexer scores
        # do not tie at 0 and the choice is unique (OPS.md lets ties go either way).
        ik = opbridge.kv_compress((y @ self.wik).abs(), y @ self.wig, self.ibias, self.rate)
        iq = (y @ self.wiq).abs().view(T, self.index_heads, self.index_dim)
        pos = torch.arange(T, dtype=torch.int32, device=y.device)
        picks = opbridge.indexer_topk(iq, ik, y @ self.wiw, self.index_topk, compress_rate=self.rate,
                                      q_positions=pos)
        win = pos.unsqueeze(1) - torch.arange(self.window - 1, -1, -1, dtype=torch.int32, device=y.device)
        win = torch.where(win < 0, -1, win).to(torch.int32)  # causal sliding window p-W+1 .. p
        out = opbridge.sparse_attention(q, kv, win, scale=self.d ** -0.5, sink=self.sink, extra_kv=ckv,
                                        extra_indices=picks)
        return out.flatten(1) @ self.wo, picks

    def forward(self, streams: torch.Tensor):
        y, post, comb = opbridge.mhc_pre(streams, self.phi1, self.alpha1, self.bias1)
        f, picks = self.attention(y)
        streams = opbridge.mhc_post(f, streams, post, comb)
        y, post, comb = opbridge.mhc_pre(streams, self.phi2, self.alpha2, self.bias2)
        weights, ids = opbridge.moe_route(y @ self.wr, self.top_k, scoring="sigmoid", correction_bias=self.rbias,
                                          num_groups=self.groups, topk_groups=self.topk_groups, renormalize=True,
                                          scaling_factor=2.5)
        f = opbridge.moe(y, weights, ids, self.w13, self.w2, swiglu_limit=3.0)
        streams = opbridge.mhc_post(f, streams, post, comb)
        return streams, weights, ids, picks.sort(-1).values  # picks sorted: their order is unspecified

    def example_inputs(self, tokens: int = 16, seed: int = 1) -> tuple[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(tokens, self.n, self.C, generator=g),)


def tiny_block(tokens: int = 16):
    """``(module, example_args, dynamic_shapes)``: the token count (dim 0 of the streams) is dynamic."""
    m = TinyBlock().eval()
    return m, m.example_inputs(tokens), ({0: torch.export.Dim.DYNAMIC},)
