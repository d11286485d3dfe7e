"""MoE ops on the Ascend backend (through the contract emulator) against the float64 reference, OPS.md 5."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import opbridge

from .metrics import assert_route, diff, max_abs, reference


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _selection_scores(logits, scoring, bias):
    x = logits.double()
    s = {"softmax": lambda: x.softmax(-1), "sigmoid": x.sigmoid,
         "sqrtsoftplus": lambda: F.softplus(x).sqrt()}[scoring]()
    return s if bias is None else s + bias.double()


@pytest.mark.parametrize("family", ["A3", "950"])
@pytest.mark.parametrize("scoring,renormalize", [("sigmoid", True), ("sigmoid", False), ("softmax", False),
                                                 ("softmax", True)])
def test_moe_route_matches_reference(ascend, family, scoring, renormalize):
    ascend(family)
    g = _g()
    T, E, k = 24, 32, 6
    logits = torch.randn(T, E, generator=g).to(torch.bfloat16)
    bias = torch.randn(E, generator=g) * 0.1
    kw = dict(scoring=scoring, correction_bias=bias, num_groups=8, topk_groups=3, renormalize=renormalize,
              scaling_factor=2.5)
    w, ids = opbridge.moe_route(logits, k, **kw)
    w_ref, ids_ref = reference("moe_route", logits, k, keep=("correction_bias",), **kw)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert_route(w, ids, w_ref, ids_ref, _selection_scores(logits, scoring, bias))


def test_moe_route_without_groups_or_bias(ascend):
    ascend("A2")
    logits = torch.randn(9, 12, generator=_g(1))
    w, ids = opbridge.moe_route(logits, 3, scoring="softmax")
    w_ref, ids_ref = reference("moe_route", logits, 3, scoring="softmax")
    assert_route(w, ids, w_ref, ids_ref, _selection_scores(logits, "softmax", None))


@pytest.mark.parametrize("scoring,renormalize", [("sigmoid", True), ("softmax", False), ("sigmoid", False)])
def test_moe_route_hash_matches_reference(ascend, scoring, renormalize):
    ascend("A3")
    g = _g(2)
    T, E, k, vocab = 10, 16, 4, 50
    logits = torch.randn(T, E, generator=g)
    token_ids = torch.randint(0, vocab, (T,), generator=g, dtype=torch.int32)
    tid2eid = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(vocab)]).to(torch.int32)
    kw = dict(scoring=scoring, renormalize=renormalize, scaling_factor=1.5)
    w, ids = opbridge.moe_route_hash(logits, token_ids, tid2eid, **kw)
    w_ref, ids_ref = reference("moe_route_hash", logits, token_ids, tid2eid, **kw)
    assert torch.equal(ids, ids_ref)
    assert max_abs(w, w_ref) < 1e-5


def test_routing_outside_the_vendor_op_is_unsupported(ascend):
    ascend("A3")
    logits = torch.randn(4, 16)
    with pytest.raises(opbridge.UnsupportedError, match="npu_moe_gating_top_k.*sqrtsoftplus"):
        opbridge.moe_route(logits, 2, scoring="sqrtsoftplus")
    with pytest.raises(opbridge.UnsupportedError, match="more than 2 experts per group"):
        opbridge.moe_route(logits, 2, scoring="sigmoid", num_groups=8, topk_groups=2)
    ascend("A3", "2.11.0")  # op-plugin 26.1.0: the gating op has no hash routing yet
    with pytest.raises(opbridge.UnsupportedError, match="npu_moe_gating_top_k.*'tid2eid'.*2.11.0"):
        opbridge.moe_route_hash(logits, torch.zeros(4, dtype=torch.int32), torch.zeros(3, 2, dtype=torch.int32),
                                scoring="sigmoid")


@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                             (torch.float16, torch.bfloat16)])
def test_grouped_gemm_matches_reference(ascend, dtype, out_dtype):
    ascend("A3")
    g = _g(3)
    a = torch.randn(21, 64, generator=g).to(dtype)
    b = torch.randn(5, 40, 64, generator=g).to(dtype)
    offsets = torch.tensor([0, 4, 4, 13, 21, 21], dtype=torch.int32)  # empty groups in the middle and at the end
    out = opbridge.grouped_gemm(a, b, offsets, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (21, 40)
    assert diff(out, reference("grouped_gemm", a, b, offsets, out_dtype=torch.float64)) < 1e-5


def test_grouped_gemm_masked_zeroes_rows_past_masked_m(ascend):
    ascend("950")
    g = _g(4)
    a = torch.randn(4, 6, 32, generator=g).to(torch.bfloat16)
    a[2, 3:] = float("nan")  # rows past masked_m may hold anything; they must not leak
    b = torch.randn(4, 24, 32, generator=g).to(torch.bfloat16)
    masked_m = torch.tensor([6, 0, 3, 1], dtype=torch.int32)
    out = opbridge.grouped_gemm_masked(a, b, masked_m)
    ref = reference("grouped_gemm_masked", a.nan_to_num(), b, masked_m, out_dtype=torch.float64)
    assert diff(out, ref) < 1e-5
    assert bool((out[2, 3:] == 0).all()) and bool((out[1] == 0).all())


@pytest.mark.parametrize("family", ["A2", "A3"])  # A2: npu_swiglu; A3: the activation composed from torch ops
@pytest.mark.parametrize("swiglu_limit", [None, 0.6])
def test_moe_matches_reference(ascend, family, swiglu_limit):
    ascend(family)
    g = _g(5)
    T, H, I, E, k = 20, 64, 32, 6, 3
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    ids[1, 2] = -1  # expert parallelism: slots owned elsewhere
    ids[7] = -1  # a token with no local expert gets zeros
    tw = torch.rand(T, k, generator=g)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * 0.2).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) * 0.2).to(torch.bfloat16)
    out = opbridge.moe(x, tw, ids, w13, w2, swiglu_limit=swiglu_limit)
    ref = reference("moe", x, tw, ids, w13, w2, swiglu_limit=swiglu_limit)
    assert out.dtype == x.dtype
    assert diff(out, ref) < 5e-5
    assert bool((out[7] == 0).all())


def test_moe_with_a_single_expert(ascend):
    # One expert: GMM documents that a counts list (group_list_type=1) may not have length 1.
    ascend("A3")
    g = _g(6)
    x = torch.randn(5, 32, generator=g).to(torch.float16)
    ids = torch.zeros(5, 1, dtype=torch.int64)
    tw = torch.rand(5, 1, generator=g)
    w13 = (torch.randn(1, 16, 32, generator=g) * 0.2).half()
    w2 = (torch.randn(1, 32, 8, generator=g) * 0.2).half()
    assert diff(opbridge.moe(x, tw, ids, w13, w2), reference("moe", x, tw, ids, w13, w2)) < 5e-5


def test_moe_permute_and_combine_match_reference(ascend):
    ascend("A3")
    g = _g(7)
    T, H, E, k = 9, 16, 5, 2
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
    ids[2, 0] = ids[5, 1] = -1
    x_sorted, offsets, src = opbridge.moe_permute(x, ids, E)
    x_ref, off_ref, src_ref = reference("moe_permute", x, ids, E)
    assert torch.equal(offsets, off_ref) and torch.equal(src, src_ref)
    assert torch.equal(x_sorted.double(), x_ref)
    tw = torch.rand(T, k, generator=g)
    y = torch.randn(x_sorted.shape, generator=g).to(torch.bfloat16)
    out = opbridge.moe_combine(y, src, tw, T)
    assert diff(out, reference("moe_combine", y, src, tw, T)) < 1e-5


def test_quantized_weights_are_unsupported_with_the_vendor_limit(ascend):
    ascend("A3")
    a = torch.randn(8, 128).to(torch.bfloat16)
    b = opbridge.quantize(torch.randn(2, 128, 128), "fp8", (128, 128))
    with pytest.raises(opbridge.UnsupportedError, match="npu_grouped_matmul.*FP8"):
        opbridge.grouped_gemm(a, b, torch.tensor([0, 3, 8], dtype=torch.int32))
