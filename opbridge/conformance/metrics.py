"""The metrics of OPS.md section 5 as small pure functions of tensors (all math in float64).

Each returns a plain number; thresholds live in ``data/thresholds.json`` and are applied by
:mod:`.compare`.
"""
from __future__ import annotations

import math

import torch


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64)


def diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - 2*sum(x*y) / sum(x*x + y*y)`` over positions finite in both (DeepGEMM's calc_diff); 0 for two all-zero tensors."""
    x, y = _f64(x).flatten(), _f64(y).flatten()
    keep = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[keep], y[keep]
    den = float((x * x + y * y).sum())
    if den == 0.0:
        return 0.0
    return 1.0 - 2.0 * float((x * y).sum()) / den


def nonfinite_mismatches(x: torch.Tensor, y: torch.Tensor) -> int:
    """Positions where NaN, +inf or -inf differ between ``x`` and ``y`` (OPS.md: they must match exactly)."""
    x, y = _f64(x), _f64(y)
    bad = (torch.isnan(x) != torch.isnan(y)) | (torch.isposinf(x) != torch.isposinf(y)) | \
          (torch.isneginf(x) != torch.isneginf(y))
    return int(bad.sum())


def max_abs_err(x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest ``|x - y|`` over positions finite in both; 0 for empty tensors."""
    x, y = _f64(x), _f64(y)
    keep = torch.isfinite(x) & torch.isfinite(y)
    if not bool(keep.any()):
        return 0.0
    return float((x - y)[keep].abs().max())


def elements_outside(x: torch.Tensor, y: torch.Tensor, abs_tol: float, rel_tol: float) -> int:
    """Elements with ``|x-y| >= abs_tol`` and ``|x-y| >= rel_tol * |y|`` (``y`` the oracle); finite positions only."""
    x, y = _f64(x), _f64(y)
    keep = torch.isfinite(x) & torch.isfinite(y)
    err = (x - y).abs()
    bad = keep & (err >= abs_tol) & (err >= rel_tol * y.abs())
    return int(bad.sum())


def mismatches(x: torch.Tensor, y: torch.Tensor) -> int:
    """Elements that differ (exact comparison; shapes must agree, else every element of the larger counts)."""
    if x.shape != y.shape:
        return max(x.numel(), y.numel(), 1)
    if x.is_floating_point() or y.is_floating_point():
        return int((~((_f64(x) == _f64(y)) | (torch.isnan(_f64(x)) & torch.isnan(_f64(y))))).sum())
    return int((x.long() != y.long()).sum())


def bitwise_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same shape, dtype and bytes (NaN payloads included)."""
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    a, b = x.detach().contiguous().reshape(-1), y.detach().contiguous().reshape(-1)
    if a.numel() == 0:
        return True
    return bool(torch.equal(a.view(torch.uint8), b.view(torch.uint8)))


def route_id_mismatches(got: torch.Tensor, want: torch.Tensor, q: torch.Tensor, tie: float) -> int:
    """moe_route ids: slots whose chosen expert differs from the oracle's by more than a tie.

    Position by position, ``|q[got] - q[want]| < tie`` (two candidates within ``tie`` may swap);
    an id out of range, or repeated within a row, always counts.
    """
    got, want, q = got.long(), want.long(), _f64(q)
    E = q.shape[-1]
    bad = (got < 0) | (got >= E)
    g = got.clamp(0, E - 1)
    close = (q.gather(-1, g) - q.gather(-1, want)).abs() < tie
    bad |= ~close & (got != want)
    s = g.sort(-1).values
    dup = torch.zeros_like(bad)
    dup[..., 1:] = s[..., 1:] == s[..., :-1]
    return int(bad.sum()) + int(dup.sum())


def topk_selection(got: torch.Tensor, scores: torch.Tensor) -> dict[str, float]:
    """indexer_topk: how a selection ``got [R, top_k]`` fares against oracle ``scores [R, W]`` (-inf = not a candidate).

    Returns ``invalid`` (selected entries that are not candidates, out of range or repeated),
    ``padding`` (rows where a -1 precedes a valid entry), ``count`` (rows whose valid count
    differs from ``min(top_k, candidates)``) and ``gap``: the worst
    ``(best unselected candidate - worst selected) / max |score|`` of a row (<= 0 when the
    selection is exactly a top-k; compared with the OPS.md slack).
    """
    got = got.long()
    s = _f64(scores)
    R, W = s.shape
    top_k = got.shape[-1]
    valid = got >= 0
    in_range = valid & (got < W)
    g = got.clamp(0, max(W - 1, 0))
    picked = s.gather(1, g) if W else torch.full_like(got, float("-inf"), dtype=torch.float64)
    invalid = (valid & ~in_range) | (in_range & ~torch.isfinite(picked))
    srt = torch.where(valid, got, -1 - torch.arange(top_k, device=got.device)).sort(-1).values
    invalid[:, 1:] |= (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    padding = (~valid[:, :-1] & valid[:, 1:]).any(-1) if top_k > 1 else torch.zeros(R, dtype=torch.bool)
    cand = torch.isfinite(s)
    expected = cand.sum(-1).clamp_max(top_k)
    count = valid.sum(-1) != expected
    gap = -math.inf
    ok = in_range & torch.isfinite(picked)
    if W and R:
        chosen = torch.zeros_like(cand)
        rows = torch.arange(R, device=got.device).unsqueeze(1).expand_as(got)
        chosen[rows[ok], got[ok]] = True
        unsel = torch.where(cand & ~chosen, s, float("-inf")).amax(-1)
        worst = torch.where(ok, picked, float("inf")).amin(-1)
        scale = torch.where(cand, s.abs(), 0.0).amax(-1).clamp_min(1e-30)
        row_gap = (unsel - worst) / scale
        row_gap = torch.where(torch.isfinite(row_gap), row_gap, float("-inf"))
        gap = float(row_gap.max())
    return {"invalid": int(invalid.sum()), "padding": int(padding.sum()), "count": int(count.sum()), "gap": gap}
