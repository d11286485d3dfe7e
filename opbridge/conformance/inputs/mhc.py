"""Generators for the mHC ops (OPS.md section 4). One site: phi ``[n(n+2), nC]``, alpha ``[3]``, bias ``[n(n+2)]``."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from .common import Rand, dtype, noncontiguous

P = Mapping[str, Any]


def _site(p: P, rng: Rand, n: int, C: int) -> dict:
    # phi ~ N(0, 1/(nC)) keeps the mixing logits m ~ N(0, 1): sigmoid and Sinkhorn see a useful range.
    return dict(phi=rng.normal(n * (n + 2), n * C, scale=1 / math.sqrt(n * C)),
                alpha=rng.uniform(3, lo=0.5, hi=1.5), bias=rng.normal(n * (n + 2), scale=0.5))


def _streams(p: P, rng: Rand, name: str = "x") -> torch.Tensor:
    x = rng.normal(*p["lead"], p["n"], p["C"], dtype=dtype(p.get("dtype", "bf16")))
    return noncontiguous(x) if p.get("noncontig") else x


def _pre_kwargs(p: P) -> dict:
    return dict(sinkhorn_iters=p.get("iters", 20), eps=1e-6, norm_eps=1e-6, post_scale=2.0)


def _post_inputs(p: P, rng: Rand) -> dict:
    lead, n, C = p["lead"], p["n"], p["C"]
    comb = rng.uniform(*lead, n, n, lo=0.05, hi=1.0)
    for _ in range(3):  # roughly doubly stochastic and not symmetric, like a Sinkhorn output
        comb = comb / comb.sum(-1, keepdim=True)
        comb = comb / comb.sum(-2, keepdim=True)
    return dict(f=rng.normal(*lead, C, dtype=dtype(p.get("dtype", "bf16"))), residual=_streams(p, rng, "residual"),
                post=2 * torch.sigmoid(rng.normal(*lead, n)), comb=comb)


def sinkhorn(p: P, rng: Rand) -> dict:
    n = p["n"]
    logits = rng.normal(*p["lead"], n, n, scale=p.get("scale", 1.0), dtype=dtype(p.get("dtype", "fp32")))
    return dict(logits=logits, iters=p.get("iters", 20), eps=1e-6)


def mhc_pre(p: P, rng: Rand) -> dict:
    return dict(x=_streams(p, rng), **_site(p, rng, p["n"], p["C"]), **_pre_kwargs(p))


def mhc_post(p: P, rng: Rand) -> dict:
    return _post_inputs(p, rng)


def mhc_post_pre(p: P, rng: Rand) -> dict:
    return dict(**_post_inputs(p, rng), **_site(p, rng, p["n"], p["C"]), **_pre_kwargs(p))


GENERATORS = {"sinkhorn": sinkhorn, "mhc_pre": mhc_pre, "mhc_post": mhc_post, "mhc_post_pre": mhc_post_pre}
