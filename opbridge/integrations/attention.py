"""DeepSeek attention through ``sparse_attention``, ``window_indices``, ``indexer_topk`` and ``kv_compress``.

Checked against transformers 5.x:

- **MLA core (V3, V3.2).** transformers expands the latent per head (``kv_b_proj``) and runs dense
  attention under a mask (V3.2: the mask also drops keys the indexer did not pick). opbridge runs
  the absorbed form DeepSeek serves with: ``q_lat[h] = q_nope[h] @ W_uk[h]``, one shared key
  ``[latent | k_rope]`` (``Dqk = kv_lora_rank + rope``, ``d_v = kv_lora_rank``), output
  ``W_uv[h] @ o_lat[h]``. Same function (matrix products re-associated), same scale. The key set of
  a query is what the model's mask allows (V3), intersected with the indexer's top-k (V3.2).
- **V3.2 indexer.** ``sum_h (w_h n^-1/2 D^-1/2) relu(q_h . k)`` over causal keys = ``indexer_topk``
  with the scales folded into the weights (relu is positively homogeneous). A padded (non-causal)
  mask takes ``indexer_logits`` + the mask + top-k instead, which is exact for any mask.
- **V4 compressors.** Gated softmax pooling per window (+ ``position_bias``), CSA with the
  two-series overlap and the previous call's window from the cache: ``kv_compress``; then the
  model's own RMSNorm and RoPE. **V4 indexer**: the same pooling at ``index_head_dim``, then
  ``indexer_topk(compress_rate=m, q_positions)`` (the causal rule ``s < (p+1)//m`` is transformers').
- **V4 attention core.** Shared-KV MQA (K = V) over the sliding window (``window_indices``, cut by
  the model's mask) plus the compressed entries (all causal ones for HCA, the indexer's top-k for
  CSA) in one softmax with the per-head sink: ``sparse_attention(extra_kv=..., sink=...)``.

Each replacement keeps its module's interface, so patched and unpatched modules mix freely.
"""
from __future__ import annotations

from typing import Optional

import torch

import opbridge

from .hf import is_plain_linear, module_of
from .patching import PATCH_ATTR, Rule


# ---- masks and index sets --------------------------------------------------------------------------

def allowed_keys(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A transformers attention mask ``[B, 1, S, L]`` or ``[B, S, L]`` as bool ``[B, S, L]`` (True = may attend)."""
    if mask is None:
        return None
    if mask.dim() == 4:
        mask = mask[:, 0]
    return mask if mask.dtype == torch.bool else mask == 0  # additive masks hold 0 or the dtype's minimum


def causal_keys(B: int, S: int, L: int, device) -> torch.Tensor:
    """Queries are the last S of L keys: query i sees keys ``j <= L - S + i``."""
    j = torch.arange(L, device=device)
    p = L - S + torch.arange(S, device=device)
    return (j.unsqueeze(0) <= p.unsqueeze(1)).unsqueeze(0).expand(B, S, L)


def restrict(idx: torch.Tensor, allowed: Optional[torch.Tensor]) -> torch.Tensor:
    """Indices ``[B, S, k]`` (-1 = none) cut to the keys the mask allows; int32."""
    idx = idx.to(torch.int32)
    if allowed is None:
        return idx
    ok = allowed.expand(idx.shape[0], -1, -1).gather(-1, idx.long().clamp_min(0)) & (idx >= 0)
    return torch.where(ok, idx, -1)


def _cu(B: int, n: int, device) -> torch.Tensor:
    return torch.arange(B + 1, device=device, dtype=torch.int32) * n


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, *, scale: float, d_v: Optional[int] = None,
                     sink: Optional[torch.Tensor] = None,
                     extra: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Batched front of ``opbridge.sparse_attention``: q ``[B, S, H, D]``, kv ``[B, L, D]``, idx ``[B, S, k]``.

    The batch becomes packed sequences (cu_seqlens); ``extra = (kv2 [B, L2, D], idx2 [B, S, k2])``.
    """
    B, S, H, D = q.shape
    L = kv.shape[1]
    dev = q.device
    kw = {}
    if B > 1:
        kw.update(cu_seqlens_q=_cu(B, S, dev), cu_seqlens_k=_cu(B, L, dev))
    if extra is not None:
        ekv, eidx = extra
        kw.update(extra_kv=ekv.reshape(B * ekv.shape[1], D), extra_indices=eidx.reshape(B * S, -1).to(torch.int32))
        if B > 1:
            kw["extra_cu_seqlens_k"] = _cu(B, ekv.shape[1], dev)
    out = opbridge.sparse_attention(q.reshape(B * S, H, D), kv.reshape(B * L, D), idx.reshape(B * S, -1),
                                    scale=float(scale), d_v=d_v, sink=sink, **kw)
    return out.view(B, S, H, -1)


# ---- V3.2 lightning indexer ----------------------------------------------------------------------

def v32_indices(ix, hidden_states, q_resid, position_embeddings, allowed, past_key_values):
    """The indexer's top-k as ``[B, S, k]`` int32, -1 where a query has fewer candidates than k.

    ``allowed`` (bool ``[B, S, L]`` over the L cached keys, or None = causal) is the model's mask.
    """
    mod = module_of(ix)
    B, S, _ = hidden_states.shape
    rope = ix.qk_rope_head_dim
    with torch.no_grad():  # transformers runs the indexer without autograd as well: it only picks keys
        cos, sin = position_embeddings
        q = ix.wq_b(q_resid).view(B, S, ix.n_heads, ix.head_dim)
        q_rot, q_pass = torch.split(q, [rope, ix.head_dim - rope], dim=-1)
        k = ix.k_norm(ix.wk(hidden_states)).unsqueeze(2)
        k_rot, k_pass = torch.split(k, [rope, ix.head_dim - rope], dim=-1)
        q_rot, k_rot = mod.apply_rotary_pos_emb(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
        q = torch.cat([q_rot, q_pass], dim=-1)
        k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)
        if past_key_values is not None:
            k = past_key_values.update_indexer(k, ix.layer_idx)
        L = k.shape[1]
        w = ix.weights_proj(hidden_states.to(ix.weights_proj.weight.dtype)).float()
        w = w * (ix.n_heads ** -0.5 * ix.softmax_scale)
        top = min(ix.index_topk, L)
        kw = {} if B == 1 else dict(cu_seqlens_q=_cu(B, S, q.device), cu_seqlens_k=_cu(B, L, q.device))
        q2, k2, w2 = q.reshape(B * S, ix.n_heads, ix.head_dim), k.reshape(B * L, ix.head_dim), w.reshape(B * S, -1)
        if allowed is None or torch.equal(allowed.expand(B, S, L), causal_keys(B, S, L, q.device)):
            return opbridge.indexer_topk(q2, k2, w2, top, **kw).view(B, S, top)
        # A padded mask is not causal-only: score every key, let the mask decide, pick the top-k here.
        scores = opbridge.indexer_logits(q2, k2, w2, causal=False, **kw).view(B, S, -1)[..., :L]
        scores = scores.masked_fill(~allowed.expand(B, S, L), float("-inf"))
        vals, idx = scores.topk(top, dim=-1)
        return torch.where(vals == float("-inf"), -1, idx).to(torch.int32)


def _fill_for_transformers(idx: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """transformers' indexer always returns k distinct in-range ids; fill -1 slots with masked-out keys.

    -1 only pads rows with fewer allowed keys than k, so there are enough masked keys to fill with,
    and transformers' attention masks them again: its result is unchanged.
    """
    B, S, k = idx.shape
    count = (idx >= 0).sum(-1, keepdim=True)
    masked_first = torch.argsort(allowed.expand(B, S, -1).to(torch.int8), dim=-1, stable=True)
    slot = (torch.arange(k, device=idx.device) - count).clamp_min(0)
    return torch.where(idx >= 0, idx, masked_first.gather(-1, slot).to(idx.dtype))


def v32_indexer_forward(self, hidden_states, q_resid, position_embeddings, attention_mask, position_ids=None,
                        past_key_values=None):
    allowed = allowed_keys(attention_mask)
    if allowed is None:  # as transformers' own indexer: the mask says how many keys there are
        raise ValueError(f"opbridge-patched {type(self).__name__}: attention_mask is required (got None)")
    idx = v32_indices(self, hidden_states, q_resid, position_embeddings, allowed, past_key_values)
    return _fill_for_transformers(idx, allowed).to(torch.int32)


def _check_v32_indexer(m, quantize) -> Optional[str]:
    if not 0 < m.qk_rope_head_dim <= m.head_dim:
        return f"rope dim {m.qk_rope_head_dim} does not fit the head dim {m.head_dim}"
    return None


# ---- MLA core (V3, V3.2) ---------------------------------------------------------------------------

def _mla(self, hidden_states, position_embeddings, attention_mask, past_key_values, interleave: bool,
         indexer_indices):
    mod = module_of(self)
    B, S, _ = hidden_states.shape
    H, nope, rope, dv, r = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim, \
        self.kv_lora_rank
    q_resid = None
    if getattr(self, "q_lora_rank", None) is None:
        q = self.q_proj(hidden_states)
    else:
        q_resid = self.q_a_layernorm(self.q_a_proj(hidden_states))
        q = self.q_b_proj(q_resid)
    q = q.view(B, S, H, nope + rope).transpose(1, 2)
    q_pass, q_rot = torch.split(q, [nope, rope], dim=-1)
    kv_pass, k_rot = torch.split(self.kv_a_proj_with_mqa(hidden_states), [r, rope], dim=-1)
    k_pass = self.kv_a_layernorm(kv_pass).view(B, 1, S, r)
    k_rot = k_rot.view(B, 1, S, rope)
    cos, sin = position_embeddings
    rotate = mod.apply_rotary_pos_emb_interleave if interleave else mod.apply_rotary_pos_emb
    q_rot, k_rot = rotate(q_rot, k_rot, cos, sin)
    if past_key_values is not None:
        k_pass, k_rot = past_key_values.update(k_pass, k_rot, self.layer_idx)
    L = k_pass.shape[2]
    allowed = allowed_keys(attention_mask)
    if allowed is not None:
        allowed = allowed[..., :L]
    if indexer_indices is None:  # dense: every key the mask allows (causal when there is no mask)
        keys = allowed if allowed is not None else causal_keys(B, S, L, hidden_states.device)
        idx = torch.where(keys, torch.arange(L, device=keys.device), -1).expand(B, S, L)
    else:
        idx = indexer_indices(q_resid, allowed, L)
    idx = restrict(idx, allowed)
    # Absorbed MLA: views of kv_b_proj's weight, no copy.
    w = self.kv_b_proj.weight.view(H, nope + dv, r)
    w_uk, w_uv = w[:, :nope], w[:, nope:]
    q_all = torch.cat([torch.einsum("bhsn,hnr->bshr", q_pass, w_uk), q_rot.transpose(1, 2)], dim=-1)
    kv_all = torch.cat([k_pass, k_rot], dim=-1)[:, 0]
    o_lat = sparse_attention(q_all, kv_all, idx, scale=self.scaling, d_v=r)
    out = torch.einsum("bshr,hvr->bshv", o_lat, w_uv).reshape(B, S, H * dv)
    return self.o_proj(out), None


def v3_attention_forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None,
                         **kwargs):
    return _mla(self, hidden_states, position_embeddings, attention_mask, past_key_values,
                bool(self.config.rope_interleave), None)


def v32_attention_forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None,
                          position_ids=None, **kwargs):
    ix = self.indexer

    def indices(q_resid, allowed, L):
        if getattr(ix, PATCH_ATTR, None) is not None:  # ours: skip the fill transformers' format needs
            return v32_indices(ix, hidden_states, q_resid, position_embeddings, allowed, past_key_values)
        mask3 = allowed if allowed is not None else causal_keys(*hidden_states.shape[:2], L, hidden_states.device)
        return ix(hidden_states, q_resid, position_embeddings, mask3, position_ids, past_key_values=past_key_values)

    return _mla(self, hidden_states, position_embeddings, attention_mask, past_key_values, True, indices)


def _check_mla(m, quantize) -> Optional[str]:
    if float(getattr(m, "attention_dropout", 0.0) or 0.0) != 0.0:
        return f"attention_dropout={m.attention_dropout}: sparse_attention has no dropout"
    if not is_plain_linear(m.kv_b_proj):
        return f"kv_b_proj is {type(m.kv_b_proj).__name__} with bias={m.kv_b_proj.bias is not None}, " \
               "not a plain bias-free nn.Linear (absorption reads its weight)"
    want = (m.num_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)
    if tuple(m.kv_b_proj.weight.shape) != want:
        return f"kv_b_proj weight {tuple(m.kv_b_proj.weight.shape)} is not {want}"
    return None


# ---- V4 compression, indexer and attention -----------------------------------------------------------

def v4_pool(comp, hidden_states, cache_layer, name: str, overlap: bool) -> torch.Tensor:
    """Compressed entries ``[B, Lc, head_dim]`` (all so far when a cache layer holds them)."""
    mod = module_of(comp)
    B = hidden_states.shape[0]
    rate, hd = comp.compress_rate, comp.head_dim
    kv, gate = comp.kv_proj(hidden_states), comp.gate_proj(hidden_states)
    if cache_layer is None:
        usable = kv.shape[1] // rate * rate
        kv, gate, first = kv[:, :usable], gate[:, :usable], 0
    else:  # the cache keeps the incomplete window for the next call and says where this chunk starts
        kv, gate, first = cache_layer.store_compression_weights(name, kv, gate)
    windows = kv.shape[1] // rate
    if windows == 0:
        compressed = kv.new_zeros((B, 0, hd))
    else:
        prev = [None] * B
        if overlap and cache_layer is not None:
            # The cache keeps the first half (Ca) of the last window, gate with the bias added, as transformers does.
            last_gate = gate[:, -rate:] + comp.position_bias
            prev_kv, prev_gate = cache_layer.update_overlap_state(name, kv[:, -rate:].unsqueeze(1),
                                                                  last_gate.unsqueeze(1), hd)
            if prev_kv is not None:  # kv_compress takes [rate, 2D]; only the first D channels are read
                prev = [(torch.cat([prev_kv[b], torch.zeros_like(prev_kv[b])], -1),
                         torch.cat([prev_gate[b], torch.zeros_like(prev_gate[b])], -1)) for b in range(B)]
        pooled = []
        for b in range(B):  # kv_compress is single-sequence: windows overlap across the batch otherwise
            pk, pg = prev[b] if prev[b] is not None else (None, None)
            pooled.append(opbridge.kv_compress(kv[b], gate[b], comp.position_bias, rate, overlap=overlap,
                                               prev_kv=pk, prev_gate=pg))
        compressed = comp.kv_norm(torch.stack(pooled))
        positions = (torch.arange(windows, device=compressed.device) * rate + first).unsqueeze(0).expand(B, -1)
        cos, sin = comp.rotary_emb(compressed, position_ids=positions, layer_type=comp.rope_layer_type)
        compressed = mod.apply_rotary_pos_emb(compressed.unsqueeze(1), cos, sin).squeeze(1)
    if cache_layer is not None:
        compressed = cache_layer.update_compressor_states(name, compressed)
    return compressed


def _cache_layer(past_key_values, layer_idx):
    return past_key_values.layers[layer_idx] if past_key_values is not None else None


def v4_indexer_forward(self, hidden_states, q_residual, position_ids, past_key_values, layer_idx):
    mod = module_of(self)
    B, S, _ = hidden_states.shape
    keys = v4_pool(self, hidden_states, _cache_layer(past_key_values, layer_idx), "indexer", overlap=True)
    Lc = keys.shape[1]
    top = min(self.index_topk, Lc)
    if top == 0:
        return torch.empty((B, S, 0), dtype=torch.long, device=hidden_states.device)
    cos, sin = self.rotary_emb(hidden_states, position_ids=position_ids, layer_type=self.rope_layer_type)
    q = self.q_b_proj(q_residual).view(B, S, -1, self.head_dim).transpose(1, 2)
    q = mod.apply_rotary_pos_emb(q, cos, sin).transpose(1, 2)  # [B, S, Hi, D]
    sc = self.scorer
    w = sc.weights_proj(hidden_states).float() * (sc.weights_scaling * sc.softmax_scale)
    kw = {} if B == 1 else dict(cu_seqlens_q=_cu(B, S, q.device), cu_seqlens_k=_cu(B, Lc, q.device))
    pos = position_ids.expand(B, S).reshape(-1).to(torch.int32)
    idx = opbridge.indexer_topk(q.reshape(B * S, q.shape[2], self.head_dim), keys.reshape(B * Lc, -1),
                                w.reshape(B * S, -1), top, compress_rate=self.compress_rate, q_positions=pos, **kw)
    return idx.view(B, S, top).long()


def _hca_indices(position_ids, B: int, S: int, Lc: int, rate: int) -> torch.Tensor:
    """HCA: a query at position p sees every compressed entry w < (p + 1) // rate.

    transformers' rule for a single query (decode) is "every entry so far", whatever its
    position_ids say (they differ from the raw token count in a left-padded batch): kept as is.
    """
    w = torch.arange(Lc, device=position_ids.device)
    if S == 1:
        return w.expand(B, S, Lc)
    limit = ((position_ids + 1) // rate).unsqueeze(-1)
    return torch.where(w < limit, w, -1).expand(B, S, Lc)


def v4_compressed_set(comp, hidden_states, q_residual, position_ids, past_key_values, layer_idx, csa: bool):
    """``(entries [B, Lc, D], indices [B, S, k])``; indices are -1 where a query may not attend."""
    B, S, _ = hidden_states.shape
    entries = v4_pool(comp, hidden_states, _cache_layer(past_key_values, layer_idx), "compressor", overlap=csa)
    if csa:  # the indexer module keeps its own cache state: it runs every call, like transformers'
        idx = comp.indexer(hidden_states, q_residual, position_ids, past_key_values, layer_idx)
    else:
        idx = _hca_indices(position_ids, B, S, entries.shape[1], comp.compress_rate)
    return entries, idx


def _block_bias(idx: torch.Tensor, Lc: int, dtype) -> torch.Tensor:
    """transformers' additive ``[B, 1, S, Lc]`` mask: 0 at the listed entries, -inf elsewhere."""
    B, S, _ = idx.shape
    safe = torch.where(idx >= 0, idx, Lc).long()
    bias = torch.full((B, 1, S, Lc + 1), float("-inf"), dtype=dtype, device=idx.device)
    return bias.scatter(-1, safe.unsqueeze(1), 0.0)[..., :Lc]


def csa_compressor_forward(self, hidden_states, q_residual, position_ids, past_key_values, layer_idx):
    entries, idx = v4_compressed_set(self, hidden_states, q_residual, position_ids, past_key_values, layer_idx, True)
    return entries.unsqueeze(1), _block_bias(idx, entries.shape[1], entries.dtype)


def hca_compressor_forward(self, hidden_states, q_residual, position_ids, past_key_values, layer_idx):
    entries, idx = v4_compressed_set(self, hidden_states, q_residual, position_ids, past_key_values, layer_idx, False)
    if position_ids.shape[1] == 1 or entries.shape[1] == 0:
        return entries.unsqueeze(1), None  # transformers' convention: a decode query sees every entry
    return entries.unsqueeze(1), _block_bias(idx, entries.shape[1], entries.dtype)


def v4_attention_forward(self, hidden_states, position_embeddings, position_ids, attention_mask,
                         past_key_values=None, **kwargs):
    mod = module_of(self)
    B, S, _ = hidden_states.shape
    D = self.head_dim
    cos, sin = position_embeddings[self.rope_layer_type]
    q_residual = self.q_a_norm(self.q_a_proj(hidden_states))
    q = self.q_b_norm(self.q_b_proj(q_residual).view(B, S, -1, D).transpose(1, 2))
    q = mod.apply_rotary_pos_emb(q, cos, sin).transpose(1, 2)  # [B, S, H, D]
    kv = self.kv_norm(self.kv_proj(hidden_states)).view(B, S, 1, D).transpose(1, 2)
    kv = mod.apply_rotary_pos_emb(kv, cos, sin)
    if past_key_values is not None:  # sliding-window cache, K = V
        kv = past_key_values.update(kv, kv, self.layer_idx)[0]
    L = kv.shape[2]
    extra = None
    if self.compressor is not None:
        csa = type(self.compressor).__name__ == "DeepseekV4CSACompressor"
        entries, eidx = v4_compressed_set(self.compressor, hidden_states, q_residual, position_ids, past_key_values,
                                          self.layer_idx, csa)
        if entries.shape[1] > 0:
            extra = (entries, eidx)
    allowed = allowed_keys(attention_mask)
    if allowed is not None:
        if allowed.shape[-1] < L:
            raise ValueError(f"opbridge-patched {type(self).__name__}: attention mask covers {allowed.shape[-1]} "
                             f"keys, the cache returned {L}")
        allowed = allowed[..., :L]
    window = opbridge.window_indices(_cu(B, S, q.device), _cu(B, L, q.device), int(self.sliding_window))
    idx = restrict(window.view(B, S, -1), allowed)
    out = sparse_attention(q, kv[:, 0], idx, scale=self.scaling, sink=self.sinks.float(), extra=extra)
    # K = V carried RoPE into the output's rope slice: rotate back by the query position (-sin).
    out = mod.apply_rotary_pos_emb(out.transpose(1, 2), cos, -sin).transpose(1, 2)
    grouped = self.o_a_proj(out.reshape(B, S, self.config.o_groups, -1)).flatten(2)
    return self.o_b_proj(grouped), None


def _check_v4_pool(m, width: int) -> Optional[str]:
    want = (m.compress_rate, width * m.head_dim)
    if tuple(m.position_bias.shape) != want:
        return f"position_bias {tuple(m.position_bias.shape)} is not {want}"
    return None


def _check_v4_attention(m, quantize) -> Optional[str]:
    if float(m.attention_dropout or 0.0) != 0.0:
        return f"attention_dropout={m.attention_dropout}: sparse_attention has no dropout"
    if tuple(m.sinks.shape) != (m.num_heads,):
        return f"sinks {tuple(m.sinks.shape)} is not [num_heads]"
    if m.compressor is not None and type(m.compressor).__name__ not in ("DeepseekV4CSACompressor",
                                                                        "DeepseekV4HCACompressor"):
        return f"compressor {type(m.compressor).__name__} is not one opbridge maps"
    return None


def _check_v4_indexer(m, quantize) -> Optional[str]:
    if type(m.scorer).__name__ != "DeepseekV4IndexerScorer":
        return f"scorer {type(m.scorer).__name__} is not the lightning-indexer score"
    return _check_v4_pool(m, 2)


def rules(mods: dict) -> list[Rule]:
    out = []
    if "v3" in mods:
        out.append(Rule(mods["v3"].DeepseekV3Attention, "attention", ("sparse_attention",), v3_attention_forward,
                        _check_mla))
    if "v32" in mods:
        M = mods["v32"]
        out.append(Rule(M.DeepseekV32Attention, "attention", ("sparse_attention",), v32_attention_forward,
                        _check_mla))
        out.append(Rule(M.DeepseekV32Indexer, "indexer", ("indexer_topk", "indexer_logits"), v32_indexer_forward,
                        _check_v32_indexer))
    if "v4" in mods:
        M = mods["v4"]
        out.append(Rule(M.DeepseekV4HCACompressor, "compressor", ("kv_compress",), hca_compressor_forward,
                        lambda m, q: _check_v4_pool(m, 1)))
        out.append(Rule(M.DeepseekV4CSACompressor, "compressor", ("kv_compress",), csa_compressor_forward,
                        lambda m, q: _check_v4_pool(m, 2)))
        out.append(Rule(M.DeepseekV4Indexer, "indexer", ("kv_compress", "indexer_topk"), v4_indexer_forward,
                        _check_v4_indexer))
        out.append(Rule(M.DeepseekV4Attention, "attention", ("sparse_attention", "window_indices", "kv_compress"),
                        v4_attention_forward, _check_v4_attention,
                        bypasses=lambda m: (m.compressor,) if m.compressor is not None else ()))
    return out
