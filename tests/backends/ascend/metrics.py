"""OPS.md section 5 metrics and the float64 reference run they compare against (test helpers)."""
from __future__ import annotations

import torch

import opbridge


def f64(x):
    """A float64 copy of a floating tensor (the oracle's inputs); anything else unchanged."""
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def reference(name: str, *args, keep: tuple = (), **kwargs):
    """``opbridge.<name>`` on the reference backend with float64 copies of the floating inputs
    (except the keyword arguments named in ``keep``, whose dtype the contract fixes)."""
    with opbridge.use_backend("reference"):
        return getattr(opbridge, name)(*[f64(a) for a in args],
                                       **{k: v if k in keep else f64(v) for k, v in kwargs.items()})


def diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - 2 sum(xy) / sum(x^2 + y^2) in float64 (OPS.md 5); NaN/Inf positions must match exactly."""
    x, y = x.double(), y.double()
    bad_x, bad_y = ~torch.isfinite(x), ~torch.isfinite(y)
    assert torch.equal(bad_x, bad_y), "NaN/Inf positions differ"
    if bad_x.any():
        assert torch.equal(x[bad_x].nan_to_num(), y[bad_y].nan_to_num()), "NaN/Inf values differ"
    x, y = x[~bad_x], y[~bad_y]
    den = (x * x + y * y).sum()
    return 0.0 if den == 0 else float(1 - 2 * (x * y).sum() / den)


def max_abs(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).abs().max()) if x.numel() else 0.0


def assert_route(w, ids, w_ref, ids_ref, q: torch.Tensor) -> None:
    """ids equal except where the two candidates' selection scores q differ by < 1e-6; weights within 1e-5.

    Where ids differ by a near-tie, the weights compared are those of the ids each side chose.
    """
    ids, ids_ref = ids.long(), ids_ref.long()
    differ = ids != ids_ref
    if differ.any():
        qa, qb = q.gather(1, ids)[differ], q.gather(1, ids_ref)[differ]
        assert float((qa - qb).abs().max()) < 1e-6, "ids differ beyond a near-tie"
    assert max_abs(w, w_ref) < 1e-5


def assert_attention(out, ref_out, lse=None, ref_lse=None) -> None:
    """sparse_attention thresholds (OPS.md 5): out diff < 7e-6 and per element abs < 8e-4 or rel < 3/128;
    lse abs < 1e-5 or rel < 2/65536 (-inf where no key is valid)."""
    assert diff(out, ref_out) < 7e-6
    err = (out.double() - ref_out.double()).abs()
    assert bool(((err < 8e-4) | (err < 3 / 128 * ref_out.double().abs())).all())
    if lse is not None:
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
        fin = torch.isfinite(ref_lse)
        e = (lse.double() - ref_lse)[fin].abs()
        assert bool(((e < 1e-5) | (e < 2 / 65536 * ref_lse[fin].abs())).all())


def assert_indexer(idx: torch.Tensor, logits: torch.Tensor) -> None:
    """indexer_topk (OPS.md 5): every selected score >= every unselected candidate's - 1e-3 max|score|;
    the valid counts equal min(top_k, candidates). ``logits``: reference scores, -inf for non-candidates."""
    cand = torch.isfinite(logits)
    top_k = idx.shape[-1]
    scale = float(logits[cand].abs().max()) if cand.any() else 0.0
    for t in range(idx.shape[0]):
        sel = idx[t][idx[t] >= 0].long()
        assert int((idx[t, sel.numel():] == -1).sum()) == top_k - sel.numel(), "-1 padding must end the row"
        assert sel.numel() == min(top_k, int(cand[t].sum())), f"row {t}: wrong number of selections"
        assert sel.unique().numel() == sel.numel() and bool(cand[t, sel].all()), f"row {t}: invalid selection"
        rest = cand[t].clone()
        rest[sel] = False
        if rest.any() and sel.numel():
            assert float(logits[t, sel].min()) >= float(logits[t][rest].max()) - 1e-3 * scale, f"row {t}"
