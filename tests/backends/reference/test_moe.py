"""Reference MoE ops (OPS.md section 2) against the naive loops of ``naive.py``."""
from __future__ import annotations

import pytest
import torch

import opbridge

from . import naive
from .conftest import F64, _gen, _randn


# ---- moe_route ---------------------------------------------------------------------------------

ROUTE_CASES = [
    dict(scoring="softmax"),
    dict(scoring="softmax", renormalize=True),
    dict(scoring="sigmoid", correction_bias=True, renormalize=True, scaling_factor=2.5),
    dict(scoring="sigmoid", correction_bias=True, num_groups=4, topk_groups=2, renormalize=True, scaling_factor=2.5),
    dict(scoring="sqrtsoftplus", correction_bias=True, scaling_factor=1.5),
    dict(scoring="sqrtsoftplus", num_groups=8, topk_groups=3, renormalize=True),
    dict(scoring="softmax", num_groups=2, topk_groups=1),
]


@pytest.mark.parametrize("case", ROUTE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_moe_route_matches_naive_fp64(case):
    g = _gen(10)
    T, E, k = 33, 32, 6
    logits = _randn(g, T, E, scale=2.0)
    kw = dict(case)
    if kw.pop("correction_bias", False):
        kw["correction_bias"] = torch.rand(E, generator=g) * 0.2
    w, ids = opbridge.moe_route(logits, k, **kw)
    nw, nids, _ = naive.moe_route(logits, k, **kw)
    assert ids.dtype == torch.int32 and ids.shape == (T, k)
    assert ids.tolist() == nids  # in descending q
    torch.testing.assert_close(w.to(F64), torch.tensor(nw, dtype=F64), rtol=1e-10, atol=1e-12)


def test_moe_route_group_limit_excludes_other_groups():
    g = _gen(11)
    T, E, G, kg = 40, 16, 4, 2
    logits = _randn(g, T, E, scale=3.0)
    _, ids = opbridge.moe_route(logits, 4, scoring="sigmoid", num_groups=G, topk_groups=kg)
    _, nids, q = naive.moe_route(logits, 4, scoring="sigmoid", num_groups=G, topk_groups=kg)
    assert ids.tolist() == nids
    groups = (ids.long() // (E // G)).tolist()
    assert all(len(set(row)) <= kg for row in groups)
    # The limit matters on this data: the unconstrained top-4 differs for some tokens.
    free = naive.moe_route(logits, 4, scoring="sigmoid")[1]
    assert any(sorted(a) != sorted(b) for a, b in zip(nids, free))


def test_moe_route_group_score_is_sum_of_two_largest():
    # Group 0 has the single best expert, group 1 the best pair: with one group kept, group 1 wins
    # (sum of two largest), though a max-based group score would pick group 0.
    logits = torch.tensor([[5.0, -5.0, -5.0, -5.0, 3.0, 3.0, -5.0, -5.0]], dtype=F64)
    _, ids = opbridge.moe_route(logits, 2, scoring="sigmoid", num_groups=2, topk_groups=1)
    assert ids.tolist() == [[4, 5]]


def test_moe_route_ties_go_to_lower_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [2.0, 1.0, 2.0, 1.0, 2.0, 1.0]], dtype=F64)
    for scoring in ("softmax", "sigmoid", "sqrtsoftplus"):
        w, ids = opbridge.moe_route(logits, 3, scoring=scoring)
        assert ids.tolist() == [[1, 2, 4], [0, 1, 2], [0, 2, 4]], scoring
        assert ids.tolist() == naive.moe_route(logits, 3, scoring=scoring)[1]
    # Equal group scores: the lower group is kept.
    flat = torch.zeros(1, 8, dtype=F64)
    _, ids = opbridge.moe_route(flat, 2, scoring="sigmoid", num_groups=4, topk_groups=1)
    assert ids.tolist() == [[0, 1]]


def test_moe_route_weights_use_s_not_q():
    # A big bias changes the choice but not the weights: they are the raw scores at the ids.
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0]], dtype=F64)
    bias = torch.tensor([0.0, 10.0, 0.0, 0.0])
    w, ids = opbridge.moe_route(logits, 2, scoring="sigmoid", correction_bias=bias)
    assert ids.tolist() == [[1, 0]]
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[0.0, 2.0]], dtype=F64)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_route_low_precision_within_ops_thresholds(dtype):
    g = _gen(12)
    T, E, k = 64, 64, 8
    logits = _randn(g, T, E, dtype=dtype)
    bias = torch.rand(E, generator=g) * 0.1
    kw = dict(scoring="sigmoid", correction_bias=bias, num_groups=8, topk_groups=4, renormalize=True,
              scaling_factor=2.5)
    w, ids = opbridge.moe_route(logits, k, **kw)
    assert w.dtype == torch.float32
    nw, nids, q = naive.moe_route(logits, k, **kw)
    for t in range(T):
        for j in range(k):
            a, b = int(ids[t, j]), nids[t][j]
            # OPS.md 5: ids equal except where two candidates' q differ by < 1e-6.
            assert a == b or abs(q[t][a] - q[t][b]) < 1e-6, (t, j)
            if a == b:
                assert abs(float(w[t, j]) - nw[t][j]) < 1e-5


def test_moe_route_hash_matches_naive():
    g = _gen(13)
    T, E, k, vocab = 20, 16, 4, 50
    logits = _randn(g, T, E)
    tid2eid = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(vocab)]).to(torch.int32)
    token_ids = torch.randint(0, vocab, (T,), generator=g)
    for kw in (dict(), dict(scoring="sigmoid", renormalize=False, scaling_factor=3.0), dict(scoring="softmax")):
        w, ids = opbridge.moe_route_hash(logits, token_ids, tid2eid, **kw)
        nw, nids = naive.moe_route_hash(logits, token_ids, tid2eid, **kw)
        assert ids.dtype == torch.int32 and ids.tolist() == nids
        torch.testing.assert_close(w.to(F64), torch.tensor(nw, dtype=F64), rtol=1e-10, atol=1e-12)


# ---- grouped GEMMs -----------------------------------------------------------------------------

def _offsets(sizes):
    off = [0]
    for s in sizes:
        off.append(off[-1] + s)
    return torch.tensor(off, dtype=torch.int32)


def test_grouped_gemm_fp64_with_empty_groups():
    g = _gen(20)
    sizes = [0, 3, 0, 0, 5, 1, 0]  # first, middle and last groups empty
    M, N, K = sum(sizes), 12, 20
    a, b = _randn(g, M, K), _randn(g, len(sizes), N, K)
    off = _offsets(sizes)
    out = opbridge.grouped_gemm(a, b, off, out_dtype=F64)
    assert out.dtype == F64 and out.shape == (M, N)
    torch.testing.assert_close(out, naive.grouped_gemm(a, b, off), rtol=1e-10, atol=1e-10)


def test_grouped_gemm_all_rows_in_one_group():
    g = _gen(21)
    a, b = _randn(g, 6, 8), _randn(g, 3, 5, 8)
    off = _offsets([0, 6, 0])
    torch.testing.assert_close(opbridge.grouped_gemm(a, b, off, out_dtype=F64), naive.grouped_gemm(a, b, off),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_gemm_half_within_ops_threshold(dtype):
    g = _gen(22)
    sizes = [4, 0, 7, 2]
    a, b = _randn(g, sum(sizes), 64, dtype=dtype), _randn(g, 4, 24, 64, dtype=dtype)
    off = _offsets(sizes)
    out = opbridge.grouped_gemm(a, b, off, out_dtype=dtype)
    assert out.dtype == dtype
    assert naive.diff(out, naive.grouped_gemm(a, b, off)) < 1e-5
    out32 = opbridge.grouped_gemm(a, b, off, out_dtype=torch.float32)  # fp32 accumulate, no output rounding
    torch.testing.assert_close(out32.to(F64), naive.grouped_gemm(a, b, off), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_grouped_gemm_quantized_weights(fmt):
    g = _gen(23)
    sizes = [3, 0, 5]
    N, K = 40, 160  # not multiples of 128: partial (128,128) blocks
    a = _randn(g, sum(sizes), K)
    w = _randn(g, 3, N, K, dtype=torch.float32)
    b = opbridge.quantize(w, fmt, (128, 128) if fmt == "fp8" else None)
    off = _offsets(sizes)
    # fp64 activations: the reference runs in fp64 on the de-quantized weights, so the match is tight.
    torch.testing.assert_close(opbridge.grouped_gemm(a, b, off, out_dtype=F64), naive.grouped_gemm(a, b, off),
                               rtol=1e-10, atol=1e-10)


def test_grouped_gemm_fp8_activations_and_weights():
    g = _gen(24)
    sizes = [2, 4, 0, 3]
    K, N = 256, 32
    a = opbridge.quantize(_randn(g, sum(sizes), K, dtype=torch.float32), "fp8", (1, 128))
    b = opbridge.quantize(_randn(g, 4, N, K, dtype=torch.float32), "fp8", (128, 128))
    off = _offsets(sizes)
    out = opbridge.grouped_gemm(a, b, off, out_dtype=torch.float32)
    torch.testing.assert_close(out.to(F64), naive.grouped_gemm(a, b, off), rtol=1e-5, atol=1e-5)


def test_grouped_gemm_masked_fp64():
    g = _gen(25)
    E, M_max, N, K = 4, 6, 10, 12
    a, b = _randn(g, E, M_max, K), _randn(g, E, N, K)
    masked_m = torch.tensor([0, 6, 2, 0], dtype=torch.int32)
    out = opbridge.grouped_gemm_masked(a, b, masked_m, out_dtype=F64)
    ref = naive.grouped_gemm_masked(a, b, masked_m)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert bool((out[0] == 0).all()) and bool((out[2, 2:] == 0).all()) and bool((out[3] == 0).all())


@pytest.mark.parametrize("fmt", [None, "fp8", "mxfp4"])
def test_grouped_gemm_masked_formats(fmt):
    g = _gen(26)
    E, M_max, N, K = 3, 5, 16, 128
    a = _randn(g, E, M_max, K, dtype=torch.bfloat16)
    w = _randn(g, E, N, K, dtype=torch.bfloat16)
    b = w if fmt is None else opbridge.quantize(w, fmt, (128, 128) if fmt == "fp8" else None)
    masked_m = torch.tensor([5, 0, 3], dtype=torch.int32)
    out = opbridge.grouped_gemm_masked(a, b, masked_m, out_dtype=torch.float32)
    torch.testing.assert_close(out.to(F64), naive.grouped_gemm_masked(a, b, masked_m), rtol=1e-5, atol=1e-5)
    qa = opbridge.quantize(a, "fp8", (1, 128))
    out = opbridge.grouped_gemm_masked(qa, b, masked_m, out_dtype=torch.float32)
    torch.testing.assert_close(out.to(F64), naive.grouped_gemm_masked(qa, b, masked_m), rtol=1e-5, atol=1e-5)


# ---- moe ---------------------------------------------------------------------------------------

def _moe_inputs(g, T=7, H=16, I=8, E=5, k=3, dtype=F64, wscale=0.5):
    x = _randn(g, T, H, dtype=dtype)
    w13 = _randn(g, E, 2 * I, H, dtype=dtype, scale=wscale)
    w2 = _randn(g, E, H, I, dtype=dtype, scale=wscale)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    tw = torch.rand(T, k, generator=g)
    return x, tw, ids, w13, w2


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_moe_fp64_with_missing_ids(id_dtype):
    g = _gen(30)
    x, tw, ids, w13, w2 = _moe_inputs(g)
    ids[1, 0] = -1
    ids[2, 2] = -1
    ids[4] = -1  # a token with no valid id gets zeros
    ids = ids.to(id_dtype)
    out = opbridge.moe(x, tw, ids, w13, w2)
    assert out.dtype == F64 and out.shape == x.shape
    torch.testing.assert_close(out, naive.moe(x, tw, ids, w13, w2), rtol=1e-10, atol=1e-10)
    assert bool((out[4] == 0).all())


def test_moe_top_k_equals_num_experts():
    g = _gen(31)
    E = 4
    x, tw, ids, w13, w2 = _moe_inputs(g, E=E, k=E)
    assert sorted(ids[0].tolist()) == list(range(E))
    torch.testing.assert_close(opbridge.moe(x, tw, ids, w13, w2), naive.moe(x, tw, ids, w13, w2),
                               rtol=1e-10, atol=1e-10)


def test_moe_experts_with_no_tokens_and_repeated_experts():
    g = _gen(32)
    x, tw, _, w13, w2 = _moe_inputs(g, T=4, E=6, k=2)
    ids = torch.tensor([[0, 0], [0, 3], [3, -1], [-1, 0]], dtype=torch.int32)  # experts 1,2,4,5 unused
    torch.testing.assert_close(opbridge.moe(x, tw, ids, w13, w2), naive.moe(x, tw, ids, w13, w2),
                               rtol=1e-10, atol=1e-10)


def test_moe_swiglu_limit_clamps_gate_above_only_and_up_both_sides():
    g = _gen(33)
    x, tw, ids, w13, w2 = _moe_inputs(g, wscale=1.0)
    c = 0.7
    h = torch.einsum("eih,th->tei", w13, x)
    I = w13.shape[1] // 2
    # The data exercises every clamp: gates above c and below -c, ups beyond both sides.
    assert bool((h[..., :I] > c).any() and (h[..., :I] < -c).any())
    assert bool((h[..., I:] > c).any() and (h[..., I:] < -c).any())
    out = opbridge.moe(x, tw, ids, w13, w2, swiglu_limit=c)
    ref = naive.moe(x, tw, ids, w13, w2, swiglu_limit=c)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    wrong = naive.moe(x, tw, ids, w13, w2, swiglu_limit=c, gate_clamp_both_sides=True)
    unclamped = naive.moe(x, tw, ids, w13, w2)
    assert (out - wrong).abs().max() > 1e-3 and (out - unclamped).abs().max() > 1e-3


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_moe_quantized_weights(fmt):
    g = _gen(34)
    x, tw, ids, w13, w2 = _moe_inputs(g, H=64, I=32, dtype=F64)
    ids[0, 1] = -1
    blk = (128, 128) if fmt == "fp8" else None
    q13, q2 = opbridge.quantize(w13.float(), fmt, blk), opbridge.quantize(w2.float(), fmt, blk)
    out = opbridge.moe(x, tw, ids, q13, q2, swiglu_limit=5.0)
    torch.testing.assert_close(out, naive.moe(x, tw, ids, q13, q2, swiglu_limit=5.0), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_half_within_ops_threshold(dtype):
    g = _gen(35)
    x, tw, ids, w13, w2 = _moe_inputs(g, T=9, H=32, I=16, E=4, k=2, dtype=dtype)
    ids[3, 1] = -1
    out = opbridge.moe(x, tw, ids, w13, w2)
    assert out.dtype == dtype
    assert naive.diff(out, naive.moe(x, tw, ids, w13, w2)) < 5e-5


# ---- permute / combine -------------------------------------------------------------------------

@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_moe_permute_matches_naive(id_dtype):
    g = _gen(40)
    T, H, E, k = 9, 6, 5, 3
    x = _randn(g, T, H)
    ids = torch.randint(-1, E, (T, k), generator=g).to(id_dtype)  # -1 and repeats included
    ids[2] = -1
    x_sorted, offsets, src = opbridge.moe_permute(x, ids, E)
    nx, noff, nsrc = naive.moe_permute(x, ids, E)
    assert offsets.dtype == torch.int32 and offsets.tolist() == noff
    assert src.dtype == torch.int64 and src.tolist() == nsrc
    assert torch.equal(x_sorted, nx)
    assert x_sorted.shape[0] == int((ids != -1).sum())


def test_moe_permute_combine_round_trip():
    g = _gen(41)
    T, H, E, k = 8, 5, 4, 2
    x = _randn(g, T, H)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    ids[0, 1] = -1
    ids[5] = -1
    tw = torch.rand(T, k, generator=g, dtype=F64)
    x_sorted, _, src = opbridge.moe_permute(x, ids, E)
    out = opbridge.moe_combine(x_sorted, src, tw, T)
    torch.testing.assert_close(out, naive.moe_combine(x_sorted, src, tw, T), rtol=1e-12, atol=1e-12)
    # Identity "experts": the combine gives back x times the sum of each token's valid weights.
    wsum = (tw * (ids != -1)).sum(1, keepdim=True)
    torch.testing.assert_close(out, x * wsum, rtol=1e-12, atol=1e-12)


def test_moe_combine_bf16():
    g = _gen(42)
    T, H, k = 6, 16, 2
    tw = torch.rand(T, k, generator=g)
    src = torch.tensor([0, 3, 4, 7, 10, 11, 1], dtype=torch.int64)
    y = _randn(g, 7, H, dtype=torch.bfloat16)
    out = opbridge.moe_combine(y, src, tw, T)
    assert out.dtype == torch.bfloat16
    ref = naive.moe_combine(y, src, tw, T)
    torch.testing.assert_close(out.to(F64), ref, rtol=2 ** -8, atol=1e-6)
    assert bool((out[4] == 0).all())  # token 4 has no rows
