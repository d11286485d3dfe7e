"""The OPS.md section 5 metrics as pure functions."""
import math

import pytest
import torch

from opbridge.conformance import metrics as M


def test_diff_values():
    x = torch.tensor([1.0, 2.0, 3.0])
    assert M.diff(x, x) == pytest.approx(0.0, abs=1e-15)
    assert M.diff(x, -x) == pytest.approx(2.0)
    assert M.diff(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(1.0)
    assert M.diff(torch.zeros(4), torch.zeros(4)) == 0.0
    # 1 - 2xy/(xx+yy) with y = x(1+e) is e^2 / (2 + 2e + e^2): quadratic in the relative error.
    e = 1e-3
    assert M.diff(x.double(), x.double() * (1 + e)) == pytest.approx(e * e / (2 + 2 * e + e * e), rel=1e-6)


def test_diff_computes_in_float64():
    x = torch.randn(10000, dtype=torch.bfloat16)
    y = (x.float() * (1 + 1e-4)).to(torch.float32)
    assert M.diff(x, y) > 0  # not swallowed by bf16/fp32 rounding of the sums


def test_nonfinite_positions_must_match():
    a = torch.tensor([1.0, float("nan"), float("inf"), float("-inf")])
    assert M.nonfinite_mismatches(a, a.clone()) == 0
    b = torch.tensor([1.0, 2.0, float("-inf"), float("-inf")])
    assert M.nonfinite_mismatches(a, b) == 2  # NaN vs finite, +inf vs -inf
    assert M.diff(a, b.nan_to_num(nan=0)) >= 0  # non-finite positions are left out of diff


def test_elements_outside_abs_or_rel():
    want = torch.tensor([1.0, 100.0, 0.0])
    got = torch.tensor([1.0005, 101.0, 0.01])
    # abs 5e-4 ok; 1.0 abs but 1% rel ok; 0.01 abs and infinite rel -> outside
    assert M.elements_outside(got, want, 8e-4, 3 / 128) == 1


def test_bitwise_equal():
    a = torch.tensor([0.0, 1.0, float("nan")])
    assert M.bitwise_equal(a, a.clone())
    assert not M.bitwise_equal(a, torch.tensor([-0.0, 1.0, float("nan")]))  # -0.0 has other bits
    assert not M.bitwise_equal(a, a.double())


def test_route_ids_tie_rule():
    q = torch.tensor([[0.5, 0.5 + 5e-7, 0.1, 0.9]])
    want = torch.tensor([[3, 1]])
    assert M.route_id_mismatches(torch.tensor([[3, 1]]), want, q, 1e-6) == 0
    assert M.route_id_mismatches(torch.tensor([[3, 0]]), want, q, 1e-6) == 0  # 0 and 1 differ by < 1e-6
    assert M.route_id_mismatches(torch.tensor([[3, 2]]), want, q, 1e-6) == 1  # 0.1 is not a tie of 0.5
    assert M.route_id_mismatches(torch.tensor([[1, 3]]), want, q, 1e-6) == 2  # order matters (descending q)
    assert M.route_id_mismatches(torch.tensor([[3, 3]]), torch.tensor([[3, 3]]), q, 1e-6) == 1  # duplicate
    assert M.route_id_mismatches(torch.tensor([[3, 7]]), want, q, 1e-6) >= 1  # out of range


def _scores():
    inf = float("-inf")
    return torch.tensor([[5.0, 4.0, 3.0, inf, inf], [1.0, 9.0, inf, inf, inf]])


def test_topk_selection_exact():
    r = M.topk_selection(torch.tensor([[1, 0, -1], [1, 0, -1]]), _scores())
    assert r["invalid"] == 0 and r["padding"] == 0
    assert r["count"] == 1  # row 0 has 3 candidates, 2 chosen with top_k 3
    r = M.topk_selection(torch.tensor([[2, 0, 1], [0, 1, -1]]), _scores())
    assert r == {"invalid": 0, "padding": 0, "count": 0, "gap": float("-inf")}  # every candidate chosen
    r = M.topk_selection(torch.tensor([[0, 1], [1, 0]]), _scores())
    assert r["gap"] == pytest.approx((3.0 - 4.0) / 5.0)  # best unselected 3 vs worst selected 4, per max |score| 5


def test_topk_selection_violations():
    s = _scores()
    assert M.topk_selection(torch.tensor([[3, 0, 1], [0, 1, -1]]), s)["invalid"] == 1  # -inf key selected
    assert M.topk_selection(torch.tensor([[0, 0, 1], [0, 1, -1]]), s)["invalid"] == 1  # duplicate
    assert M.topk_selection(torch.tensor([[0, 1, 2], [-1, 0, 1]]), s)["padding"] == 1
    low = M.topk_selection(torch.tensor([[0], [0]]), s)  # row 1 keeps 1.0 over 9.0
    assert low["gap"] == pytest.approx((9.0 - 1.0) / 9.0)
    assert math.isinf(M.topk_selection(torch.tensor([[0, 1, 2]]), s[:1])["gap"])  # nothing left unselected
