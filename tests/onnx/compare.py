"""Comparisons for exported models, with the thresholds of OPS.md section 5 (float32 inputs)."""
from __future__ import annotations

import numpy as np
import onnx
import torch


def diff(x: np.ndarray, y: np.ndarray) -> float:
    """``1 - 2*sum(x*y) / sum(x*x + y*y)`` in float64 over the finite positions (OPS.md section 5)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    fin = np.isfinite(y)
    x, y = x[fin], y[fin]
    den = (x * x + y * y).sum()
    return 0.0 if den == 0 else float(1 - 2 * (x * y).sum() / den)


def assert_float(got, want, what: str, threshold: float = 1e-5) -> None:
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    got = np.asarray(got)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert np.array_equal(np.isfinite(got), np.isfinite(want)), f"{what}: non-finite positions differ"
    inf = ~np.isfinite(want)
    assert np.array_equal(got[inf], want[inf]), f"{what}: non-finite values differ"
    d = diff(got, want)
    assert d < threshold, f"{what}: diff {d:.3e} >= {threshold}"


def assert_max_abs(got, want, what: str, tol: float) -> None:
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    assert np.asarray(got).shape == want.shape, what
    err = float(np.abs(np.asarray(got, np.float64) - want.astype(np.float64)).max(initial=0))
    assert err < tol, f"{what}: max abs err {err:.3e} >= {tol}"


def assert_lse(got, want, what: str) -> None:
    """``lse``: abs err < 1e-5 or rel err < 2/65536 per element; -inf where there is no key."""
    want = want.detach().numpy().astype(np.float64)
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape, what
    assert np.array_equal(np.isneginf(got), np.isneginf(want)), f"{what}: -inf positions differ"
    fin = np.isfinite(want)
    err = np.abs(got[fin] - want[fin])
    ok = (err < 1e-5) | (err < 2 / 65536 * np.abs(want[fin]))
    assert ok.all(), f"{what}: {int((~ok).sum())} elements off, max abs err {err.max():.3e}"


def assert_equal(got, want, what: str) -> None:
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    got = np.asarray(got)
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape}/{got.dtype} vs {want.shape}/{want.dtype}"
    bad = int((got != want).sum())
    assert bad == 0, f"{what}: {bad} of {want.size} elements differ"


def assert_topk(indices, logits: torch.Tensor, what: str) -> None:
    """``indexer_topk`` metric: every pick is a candidate scoring >= every unpicked candidate - 1e-3 * max |score|;
    the count of valid picks equals min(top_k, candidates). ``logits``: float ``[Tq, width]``, -inf = no candidate."""
    idx = torch.from_numpy(np.asarray(indices)).long()
    s = logits.double()
    cand = torch.isfinite(s)
    top_k = idx.shape[1]
    valid = idx >= 0
    assert torch.equal(valid.sum(1), cand.sum(1).clamp(max=top_k)), f"{what}: valid counts differ"
    tol = 1e-3 * s[cand].abs().max().item() if cand.any() else 0.0
    for t in range(idx.shape[0]):
        picked = idx[t][valid[t]]
        assert len(set(picked.tolist())) == len(picked), f"{what}: duplicate picks in row {t}"
        assert bool(cand[t, picked].all()), f"{what}: row {t} picks a non-candidate"
        rest = cand[t].clone()
        rest[picked] = False
        if rest.any() and len(picked):
            assert s[t, picked].min() >= s[t, rest].max() - tol, f"{what}: row {t} misses a better candidate"


def domains(model: onnx.ModelProto) -> dict[str, set[str]]:
    """Op types used per domain ('' = the standard domain)."""
    out: dict[str, set[str]] = {}
    for n in model.graph.node:
        out.setdefault(n.domain, set()).add(n.op_type)
    return out
