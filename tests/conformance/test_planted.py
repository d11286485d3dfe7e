"""The suite must catch real bugs: each planted bug is reported as a failure of the right op."""
import pytest

from opbridge.conformance import catalogue, runner
from tests.conformance.planted import BUGS, planted_backend

SMALL = catalogue.by_id("small")


def _run(backend, ids):
    return runner.run(runner.RunConfig(backend, isolate=False), [SMALL[i] for i in ids])


@pytest.mark.parametrize("bug", list(BUGS))
def test_planted_bug_is_caught(bug):
    op, fn, must_fail = BUGS[bug]
    with planted_backend(op, fn) as name:
        results = _run(name, must_fail)
    for r in results:
        assert r.op == op
        assert r.status == "fail", f"{bug}: {r.id} {r.status} {r.reason}"
        assert any(not m.passed for m in r.metrics)


def test_planted_backend_without_a_bug_passes_the_same_cases():
    """The control: the same cases through the same temporary backend, with no bug planted."""
    ids = sorted({i for _, _, must in BUGS.values() for i in must})
    with planted_backend() as name:
        results = _run(name, ids)
    assert [(r.id, r.status) for r in results if r.status != "pass"] == []


def test_a_bug_only_fails_its_own_op():
    op, fn, _ = BUGS["mhc_post comb untransposed"]
    with planted_backend(op, fn) as name:
        results = _run(name, ["mhc_post/n6", "mhc_pre/n6", "sinkhorn/n6"])
    assert [r.status for r in results] == ["fail", "pass", "pass"]
