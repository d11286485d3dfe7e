"""Generators for the MoE ops (OPS.md section 2)."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

import opbridge

from .common import INT_DTYPES, Rand, dtype, noncontiguous

P = Mapping[str, Any]


def _float(p: P, rng: Rand, *shape: int, scale: float = 1.0, key: str = "dtype", default: str = "bf16") -> torch.Tensor:
    return rng.normal(*shape, scale=scale, dtype=dtype(p.get(key, default)))


def quantize_experts(w: torch.Tensor, fmt: str) -> opbridge.QuantTensor:
    """``opbridge.quantize`` one expert at a time (blocks never span experts, so the result is the same).

    Quantizing a full-tier weight at once needs tens of GB of scratch (mxfp4 of 704M values asked
    for a 36.75 GiB buffer on an H100 run); per expert it stays a few GB.
    """
    block = (128, 128) if fmt == "fp8" else (1, 32)
    parts = [opbridge.quantize(w[e], fmt, block) for e in range(w.shape[0])]
    return opbridge.QuantTensor(torch.stack([p.data for p in parts]), torch.stack([p.scale for p in parts]), fmt, block)


def _weight(rng: Rand, fmt: str, E: int, N: int, K: int, scale: float) -> Any:
    """An expert weight ``[E, N, K]`` in ``fmt``: bf16 / fp16 tensor, or fp8 (128,128) / mxfp4 (1,32) QuantTensor."""
    w = rng.normal(E, N, K, scale=scale)
    if fmt in ("fp8", "mxfp4"):
        return quantize_experts(w, fmt)
    return w.to(dtype(fmt))


def _activation(rng: Rand, fmt: str, *shape: int) -> Any:
    a = rng.normal(*shape)
    if fmt == "fp8":
        return opbridge.quantize(a, "fp8", (1, 128))
    return a.to(dtype(fmt))


def route_ids(p: P, rng: Rand, T: int, E: int, k: int) -> torch.Tensor:
    """topk_ids ``[T, k]`` by ``p['routing']``.

    random: k distinct experts per token; with_-1: random, then a quarter of the slots and every
    fifth token entirely set to -1 (expert parallelism); one_expert: slot 0 of every token on one
    expert, other slots -1; empty_experts: only odd experts below E-2 (so expert 0, the last
    expert and every even one get no rows); none: all -1.
    """
    mode = p.get("routing", "random")
    if mode == "one_expert":
        ids = torch.full((T, k), -1, dtype=torch.int64, device=rng.device)
        ids[:, 0] = E // 2
    elif mode == "empty_experts":
        ids = rng.distinct(T, _odd_inner(E), k) * 2 + 1
    else:
        ids = rng.distinct(T, E, k)
    if mode == "with_-1":
        ids = torch.where(rng.uniform(T, k) < 0.25, -1, ids)
        ids[::5] = -1
    if mode == "none":
        ids = torch.full((T, k), -1, dtype=torch.int64, device=rng.device)
    return ids.to(INT_DTYPES[p.get("ids_dtype", "int32")])


def _odd_inner(E: int) -> int:
    """How many odd expert ids lie in [1, E-3] (the experts an 'empty' layout uses)."""
    return max(1, (E - 2) // 2)


def _counts(p: P, rng: Rand, E: int, M: int) -> list[int]:
    mode = p.get("groups", "random")
    if mode == "one":
        counts = [0] * E
        counts[E // 2] = M
        return counts
    if mode == "empty":  # odd experts below E-2 only: expert 0, the last and every even one are empty
        experts = rng.randint(0, _odd_inner(E), M) * 2 + 1
    else:
        experts = rng.randint(0, E, M)
    return torch.bincount(experts, minlength=E).tolist()


def moe_route(p: P, rng: Rand) -> dict:
    T, E, k = p["T"], p["E"], p["k"]
    logits = rng.normal(T, E, scale=p.get("logit_scale", 2.0))
    if p.get("ties"):
        logits = (logits * 2).round() / 2  # many exactly equal logits: ties to the lower id
    logits = logits.to(dtype(p.get("dtype", "fp32")))
    if p.get("noncontig"):
        logits = noncontiguous(logits)
    bias = rng.normal(E, scale=p.get("bias_scale", 0.1)) if p.get("bias") else None
    return dict(logits=logits, top_k=k, scoring=p.get("scoring", "softmax"), correction_bias=bias,
                num_groups=p.get("num_groups", 1), topk_groups=p.get("topk_groups", 1),
                renormalize=p.get("renormalize", False), scaling_factor=p.get("scaling_factor", 1.0))


def moe_route_hash(p: P, rng: Rand) -> dict:
    T, E, k, vocab = p["T"], p["E"], p["k"], p["vocab"]
    logits = rng.normal(T, E, scale=p.get("logit_scale", 2.0), dtype=dtype(p.get("dtype", "fp32")))
    idt = INT_DTYPES[p.get("ids_dtype", "int32")]
    token_ids = rng.randint(0, vocab, T, dtype=idt)
    tid2eid = rng.distinct(vocab, E, k).to(idt)
    return dict(logits=logits, token_ids=token_ids, tid2eid=tid2eid, scoring=p.get("scoring", "sqrtsoftplus"),
                renormalize=p.get("renormalize", True), scaling_factor=p.get("scaling_factor", 1.0))


def grouped_gemm(p: P, rng: Rand) -> dict:
    E, M, N, K = p["E"], p["M"], p["N"], p["K"]
    counts = _counts(p, rng, E, M)
    offsets = torch.tensor([0] + counts, device=rng.device).cumsum(0).to(torch.int32)
    a = _activation(rng, p.get("a_fmt", "bf16"), M, K)
    if p.get("noncontig"):
        a = noncontiguous(a)
    b = _weight(rng, p.get("b_fmt", "bf16"), E, N, K, 1 / math.sqrt(K))
    return dict(a=a, b=b, offsets=offsets, out_dtype=dtype(p.get("out_dtype", "bf16")))


def grouped_gemm_masked(p: P, rng: Rand) -> dict:
    E, M_max, N, K = p["E"], p["M_max"], p["N"], p["K"]
    mode = p.get("masked", "random")
    if mode == "zeros":
        masked = torch.zeros(E, dtype=torch.int32, device=rng.device)
    elif mode == "full":
        masked = torch.full((E,), M_max, dtype=torch.int32, device=rng.device)
    else:
        masked = rng.randint(0, M_max + 1, E, dtype=torch.int32)
        masked[0], masked[-1] = 0, M_max  # both ends of the range in every random case
    a = _activation(rng, p.get("a_fmt", "bf16"), E, M_max, K)
    b = _weight(rng, p.get("b_fmt", "bf16"), E, N, K, 1 / math.sqrt(K))
    return dict(a=a, b=b, masked_m=masked, out_dtype=dtype(p.get("out_dtype", "bf16")))


def moe(p: P, rng: Rand) -> dict:
    T, H, I, E, k = p["T"], p["H"], p["I"], p["E"], p["k"]
    x = _float(p, rng, T, H)
    if p.get("noncontig"):
        x = noncontiguous(x)
    fmt = p.get("w_fmt", p.get("dtype", "bf16"))
    # w_scale > 1 pushes the gate/up projections past swiglu_limit so the clamp is exercised.
    w13 = _weight(rng, fmt, E, 2 * I, H, p.get("w_scale", 1.0) / math.sqrt(H))
    w2 = _weight(rng, fmt, E, H, I, 1 / math.sqrt(I))
    ids = route_ids(p, rng, T, E, k)
    weights = rng.uniform(T, k, lo=0.05, hi=1.0)
    return dict(x=x, topk_weights=weights, topk_ids=ids, w13=w13, w2=w2, activation="swiglu",
                swiglu_limit=p.get("swiglu_limit"))


def moe_permute(p: P, rng: Rand) -> dict:
    T, H, E, k = p["T"], p["H"], p["E"], p["k"]
    return dict(x=_float(p, rng, T, H), topk_ids=route_ids(p, rng, T, E, k), num_experts=E)


def moe_combine(p: P, rng: Rand) -> dict:
    T, H, E, k = p["T"], p["H"], p["E"], p["k"]
    ids = route_ids(p, rng, T, E, k).reshape(-1).long()
    valid = (ids >= 0).nonzero().squeeze(-1)
    src_index = valid[ids[valid].sort(stable=True).indices]  # rows grouped by expert, as moe_permute makes them
    y = _float(p, rng, src_index.numel(), H)
    return dict(y_sorted=y, src_index=src_index, topk_weights=rng.uniform(T, k, lo=0.05, hi=1.0), num_tokens=T)


GENERATORS = {
    "moe_route": moe_route, "moe_route_hash": moe_route_hash, "grouped_gemm": grouped_gemm,
    "grouped_gemm_masked": grouped_gemm_masked, "moe": moe, "moe_permute": moe_permute, "moe_combine": moe_combine,
}
