"""The case catalogue and the threshold / exception data."""
import pytest

from opbridge import OP_NAMES
from opbridge.conformance import catalogue, thresholds
from opbridge.conformance.catalogue import CatalogueError, _resolve


@pytest.mark.parametrize("tier", catalogue.TIERS)
def test_every_op_has_model_bad_and_determinism_cases(tier):
    cases = catalogue.cases(tier)
    for op in OP_NAMES:
        kinds = {c.kind for c in cases if c.op == op}
        assert {"model", "bad", "determinism"} <= kinds, (op, kinds)
    assert len({c.id for c in cases}) == len(cases)


def test_model_structure_is_kept_at_both_tiers():
    small, full = catalogue.by_id("small"), catalogue.by_id("full")
    for cid in ("moe_route/v3", "mhc_pre/v4-pro", "sparse_attention/v32-h128", "indexer_topk/v4-csa"):
        s, f = small[cid].params, full[cid].params
        shared = set(s) & set(f)
        assert {k for k in shared if s[k] != f[k]} <= {"T", "M", "seqs", "top_k", "lead", "window", "extra_top_k"}
    assert small["moe_route/v3"].params | {"T": 0} == {"E": 256, "k": 8, "scoring": "sigmoid", "bias": True,
                                                        "num_groups": 8, "topk_groups": 4, "renormalize": True,
                                                        "scaling_factor": 2.5, "dtype": "fp32", "T": 0}
    assert full["sparse_attention/v32-h128"].params["top_k"] == 2048
    assert full["indexer_topk/v4-csa"].params["top_k"] == 512
    assert (full["mhc_pre/v4-pro"].params["C"], full["mhc_pre/v4-flash"].params["C"]) == (7168, 4096)
    assert full["moe/v4-pro-bf16"].params["swiglu_limit"] == 10.0


def test_selection_filters():
    assert {c.op for c in catalogue.cases("small", ops=["sinkhorn"])} == {"sinkhorn"}
    assert {c.kind for c in catalogue.cases("small", kinds=["bad"])} == {"bad"}
    assert [c.id for c in catalogue.cases("small", match=["moe/v3-*"])] == ["moe/v3-bf16", "moe/v3-fp8"]
    with pytest.raises(CatalogueError, match="unknown op"):
        catalogue.cases("small", ops=["nope"])


def test_bad_catalogue_entries_are_rejected():
    with pytest.raises(CatalogueError, match="why"):
        _resolve({"op": "moe", "name": "x", "kind": "edge", "params": {}}, "small")
    with pytest.raises(CatalogueError, match="small"):
        _resolve({"op": "moe", "name": "x", "kind": "model", "why": "w", "params": {}}, "small")
    with pytest.raises(CatalogueError, match="expect"):
        _resolve({"op": "moe", "name": "x", "kind": "bad", "params": {}, "mutate": [{"arg": "x", "value": 1}],
                  "expect": {"error": "ValueError", "arg": "x"}}, "small")


def test_thresholds_are_ops_md_section_5():
    th = thresholds.base_thresholds()
    expected = {"gemm.half": 1e-5, "gemm.fp8": 1e-3, "gemm.mxfp4": 1e-2, "moe.half": 5e-5, "moe.fp8": 1e-3,
                "moe.mxfp4": 1e-2, "route.tie": 1e-6, "route.weights": 1e-5, "indexer.slack": 1e-3,
                "attention.diff": 7e-6, "attention.abs": 8e-4, "attention.rel": 3 / 128, "lse.abs": 1e-5,
                "lse.rel": 2 / 65536, "mhc.diff": 1e-5, "mhc.coeff": 1e-4, "sinkhorn.abs": 1e-6,
                "kv_compress.diff": 1e-5}
    assert {k: th[k].limit for k in expected} == expected
    assert all(t.source for t in th.values())


def test_exceptions_need_reasons(monkeypatch):
    real = thresholds._load

    def with_exceptions(data):
        monkeypatch.setattr(thresholds, "_load", lambda name: data if name == "exceptions.json" else real(name))
        thresholds.exceptions.cache_clear()

    try:
        with_exceptions({"triton": {"expected_failures": [{"case": "moe/*", "reason": " "}]}})
        with pytest.raises(thresholds.DataError, match="reason"):
            thresholds.exceptions("triton")
        with_exceptions({"triton": {"loosened_thresholds": {"gemm.half": {"limit": 2e-5}}}})
        with pytest.raises(thresholds.DataError, match="reason"):
            thresholds.exceptions("triton")
        with_exceptions({"triton": {"loosened_thresholds": {"gemm.half": {"limit": 2e-5, "reason": "split-K"}}}})
        loosened = thresholds.thresholds_for("triton")["gemm.half"]
        assert loosened.limit == 2e-5 and "split-K" in loosened.source
        assert thresholds.thresholds_for("reference")["gemm.half"].limit == 1e-5
    finally:
        thresholds.exceptions.cache_clear()


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_per_expert_quantization_equals_whole_tensor(fmt):
    import torch

    import opbridge
    from opbridge.conformance.inputs.moe import quantize_experts

    w = torch.randn(3, 130, 160)
    whole = opbridge.quantize(w, fmt, (128, 128) if fmt == "fp8" else (1, 32))
    parts = quantize_experts(w, fmt)
    assert parts.block == whole.block and parts.scale.shape == whole.scale.shape
    assert torch.equal(parts.data.view(torch.uint8), whole.data.view(torch.uint8))
    assert torch.equal(parts.scale, whole.scale)


def test_every_small_case_builds_its_inputs():
    """Generators and mutations accept every case of the small tier (no backend call)."""
    from opbridge.conformance.inputs import build
    from opbridge.conformance.mutations import mutate

    for c in catalogue.cases("small"):
        call = build(c.op, c.params, "cpu", c.seed)
        if c.kind == "bad":
            mutate(call, c.mutate)
