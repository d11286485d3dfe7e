"""PyTorch-native peers: what a user would write without opbridge (PLATFORM.md lists the measured ones).

Each peer takes the same :class:`Call` as the op and returns a zero-argument function to time,
or raises :class:`NotApplicable` with the reason. ``torch.compile`` peers compile the eager peer
once (compile time stays out of the timing: the warm-up absorbs it).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

import opbridge

from ..call import Call


class NotApplicable(Exception):
    pass


def _plain(call: Call, *names: str) -> None:
    for n in names:
        v = call.named[n]
        if isinstance(v, opbridge.QuantTensor) or (isinstance(v, torch.Tensor) and v.dtype not in (torch.bfloat16, torch.float16)):
            raise NotApplicable(f"the peer takes bf16/fp16 '{n}' only")


def _grouped_mm_ok(call: Call, device: torch.device) -> None:
    if not hasattr(torch, "_grouped_mm"):
        raise NotApplicable("torch._grouped_mm is not in this torch")
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        raise NotApplicable("torch._grouped_mm needs an sm_90+ CUDA device")


# ---- MoE ---------------------------------------------------------------------------------------

def gemm_loop(call: Call, device) -> Callable[[], object]:
    _plain(call, "a", "b")
    a, b, bounds = call.named["a"], call.named["b"], call.named["offsets"].tolist()

    def fn():
        out = a.new_empty((a.shape[0], b.shape[1]))
        for e in range(b.shape[0]):
            if bounds[e + 1] > bounds[e]:
                out[bounds[e]:bounds[e + 1]] = a[bounds[e]:bounds[e + 1]] @ b[e].T
        return out
    return fn


def gemm_grouped_mm(call: Call, device) -> Callable[[], object]:
    _plain(call, "a", "b")
    _grouped_mm_ok(call, device)
    a, bt, offs = call.named["a"], call.named["b"].transpose(-2, -1), call.named["offsets"][1:].to(torch.int32)
    return lambda: torch._grouped_mm(a, bt, offs=offs)


def _swiglu(h, limit):
    g, u = h.chunk(2, dim=-1)
    if limit is not None:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    return F.silu(g) * u


def moe_loop(call: Call, device) -> Callable[[], object]:
    _plain(call, "x", "w13", "w2")
    a = call.named
    x, w13, w2, ids, tw, lim = a["x"], a["w13"], a["w2"], a["topk_ids"].long(), a["topk_weights"], a["swiglu_limit"]

    def fn():
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(w13.shape[0]):
            rows, slots = (ids == e).nonzero(as_tuple=True)
            if rows.numel():
                y = _swiglu(x[rows] @ w13[e].T, lim) @ w2[e].T
                out.index_add_(0, rows, y.float() * tw[rows, slots].unsqueeze(-1))
        return out.to(x.dtype)
    return fn


def moe_grouped_mm(call: Call, device) -> Callable[[], object]:
    """Sort token copies by expert, two torch._grouped_mm, weighted index_add (PLATFORM.md's 8.0 ms pipeline)."""
    _plain(call, "x", "w13", "w2")
    _grouped_mm_ok(call, device)
    a = call.named
    x, w13t, w2t, lim = a["x"], a["w13"].transpose(-2, -1), a["w2"].transpose(-2, -1), a["swiglu_limit"]
    ids, tw, E, k = a["topk_ids"].long(), a["topk_weights"], a["w13"].shape[0], a["topk_ids"].shape[1]

    def fn():
        flat = ids.flatten()
        order = torch.argsort(torch.where(flat < 0, E, flat), stable=True)
        valid = order[: int((flat >= 0).sum())]
        counts = torch.bincount(flat[valid], minlength=E)
        offs = counts.cumsum(0).to(torch.int32)
        xs = x[valid // k]
        h = torch._grouped_mm(xs, w13t, offs=offs)
        y = torch._grouped_mm(_swiglu(h, lim), w2t, offs=offs)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        out.index_add_(0, valid // k, y.float() * tw.flatten()[valid].unsqueeze(-1))
        return out.to(x.dtype)
    return fn


# ---- sparse attention ------------------------------------------------------------------------

def _attend(q, keys, valid, scale, d_v, sink):
    s = torch.einsum("thd,tjd->thj", q, keys).float() * scale
    s = s.masked_fill(~valid.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    out = torch.einsum("thj,tjd->thd", p.to(q.dtype), keys[..., :d_v])
    if sink is not None:
        out = out * torch.sigmoid(lse - sink).unsqueeze(-1).to(out.dtype)
    return out


def attention_gather_einsum(call: Call, device) -> Callable[[], object]:
    """Gather the selected keys, then einsum / softmax / einsum in PyTorch (PLATFORM.md's 22.2 ms peer)."""
    a = call.named
    q, kv, idx = a["q"], a["kv"], a["indices"]
    if a.get("cu_seqlens_q") is not None:
        raise NotApplicable("the peer handles one sequence")
    d_v, scale, sink = a.get("d_v") or q.shape[-1], a["scale"], a.get("sink")
    extra, eidx = a.get("extra_kv"), a.get("extra_indices")

    def fn():
        keys, valid = kv[idx.long().clamp_min(0)], idx >= 0
        if extra is not None:
            keys = torch.cat([keys, extra[eidx.long().clamp_min(0)]], 1)
            valid = torch.cat([valid, eidx >= 0], 1)
        return _attend(q, keys, valid, scale, d_v, sink)
    return fn


def paged_gather_einsum(call: Call, device) -> Callable[[], object]:
    a = call.named
    if a.get("extra_kv_cache") is not None:
        raise NotApplicable("the peer handles one key set")
    q, cache, table, idx = a["q"], a["kv_cache"], a["block_table"].long(), a["indices"].long()
    bs, d_v, scale, sink = cache.shape[1], a.get("d_v") or q.shape[-1], a["scale"], a.get("sink")
    flat = cache.flatten(0, 1)

    def fn():
        p = idx.clamp_min(0)
        rows = table.gather(1, (p // bs).flatten(1)).view_as(p) * bs + p % bs
        keys = flat[rows].flatten(0, 1)
        return _attend(q.flatten(0, 1), keys, (idx >= 0).flatten(0, 1), scale, d_v, sink)
    return fn


def indexer_einsum_topk(call: Call, device) -> Callable[[], object]:
    a = call.named
    if a.get("cu_seqlens_q") is not None or a["q"].dtype == torch.float8_e4m3fn:
        raise NotApplicable("the peer handles one bf16/fp16 sequence")
    q, k, w, m = a["q"], a["k"], a["weights"], a.get("compress_rate", 1)
    Tq, Tk = q.shape[0], k.shape[0]
    pos = a["q_positions"] if a.get("q_positions") is not None else torch.arange(Tk - Tq, Tk, device=q.device)
    mask = torch.arange(Tk, device=q.device).unsqueeze(0) >= ((pos.long() + 1) // m).unsqueeze(1)
    top_k = a.get("top_k")

    def fn():
        s = (torch.einsum("thd,sd->ths", q, k).relu().float() * w.unsqueeze(-1)).sum(1).masked_fill(mask, float("-inf"))
        return s if top_k is None else s.topk(min(top_k, Tk), dim=-1).indices
    return fn


# ---- mHC ---------------------------------------------------------------------------------------

def _sinkhorn(logits, iters, eps):
    M = logits.softmax(-1) + eps
    M = M / (M.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        M = M / (M.sum(-1, keepdim=True) + eps)
        M = M / (M.sum(-2, keepdim=True) + eps)
    return M


def _mhc_pre(x, phi, alpha, bias, iters, eps, norm_eps, post_scale):
    n = x.shape[-2]
    xf = x.float().flatten(-2)
    m = (xf @ phi.T) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    pre = torch.sigmoid(alpha[0] * m[..., :n] + bias[:n]) + eps
    post = post_scale * torch.sigmoid(alpha[1] * m[..., n:2 * n] + bias[n:2 * n])
    comb = _sinkhorn((alpha[2] * m[..., 2 * n:] + bias[2 * n:]).unflatten(-1, (n, n)), iters, eps)
    return (pre.unsqueeze(-1) * x.float()).sum(-2).to(x.dtype), post, comb


def _mhc_post(f, residual, post, comb):
    mixed = torch.einsum("...jk,...jc->...kc", comb, residual.float())
    return (post.unsqueeze(-1) * f.float().unsqueeze(-2) + mixed).to(residual.dtype)


def _mhc_post_pre(f, residual, post, comb, phi, alpha, bias, iters, eps, norm_eps, post_scale):
    r = _mhc_post(f, residual, post, comb)
    return (r,) + _mhc_pre(r, phi, alpha, bias, iters, eps, norm_eps, post_scale)


def _mhc_fn(call: Call):
    a = call.named
    if call.op == "sinkhorn":
        return _sinkhorn, (a["logits"], a["iters"], a["eps"])
    if call.op == "mhc_post":
        return _mhc_post, (a["f"], a["residual"], a["post"], a["comb"])
    kw = (a["sinkhorn_iters"], a["eps"], a["norm_eps"], a["post_scale"])
    if call.op == "mhc_pre":
        return _mhc_pre, (a["x"], a["phi"], a["alpha"], a["bias"]) + kw
    return _mhc_post_pre, (a["f"], a["residual"], a["post"], a["comb"], a["phi"], a["alpha"], a["bias"]) + kw


def mhc_eager(call: Call, device) -> Callable[[], object]:
    fn, args = _mhc_fn(call)
    return lambda: fn(*args)


def mhc_compiled(call: Call, device) -> Callable[[], object]:
    fn, args = _mhc_fn(call)
    compiled = torch.compile(fn, dynamic=False)
    return lambda: compiled(*args)


def reference_backend(call: Call, device) -> Callable[[], object]:
    """opbridge's own reference backend: plain PyTorch written for clarity."""
    def fn():
        with opbridge.use_backend("reference"):
            return call.run()
    return fn


COMPILED = {"torch.compile"}

PEERS: dict[str, list[tuple[str, Callable]]] = {
    "grouped_gemm": [("torch._grouped_mm", gemm_grouped_mm), ("per-expert loop", gemm_loop)],
    "moe": [("torch._grouped_mm pipeline", moe_grouped_mm), ("per-expert loop", moe_loop)],
    "sparse_attention": [("gather + einsum", attention_gather_einsum)],
    "sparse_attention_paged": [("gather + einsum", paged_gather_einsum)],
    "indexer_topk": [("einsum + topk", indexer_einsum_topk)],
    "indexer_logits": [("einsum", indexer_einsum_topk)],
    # torch.compile for the two PLATFORM.md measured (each compile costs tens of seconds of the run).
    "sinkhorn": [("eager", mhc_eager)],
    "mhc_pre": [("eager", mhc_eager), ("torch.compile", mhc_compiled)],
    "mhc_post": [("eager", mhc_eager), ("torch.compile", mhc_compiled)],
    "mhc_post_pre": [("eager", mhc_eager)],
}


def peers_for(op: str, backend: str) -> list[tuple[str, Callable]]:
    out = list(PEERS.get(op, []))
    if backend != "reference":
        out.append(("opbridge reference (eager PyTorch)", reference_backend))
    return out
