"""Reference mHC ops (OPS.md section 4) against the naive loops of ``naive.py``."""
from __future__ import annotations

import pytest
import torch

import opbridge

from . import naive
from .conftest import F64, _gen, _randn


def _site(g, n, C, dtype=F64):
    """One mHC site's parameters; phi comes as a transposed (non-contiguous) view."""
    phi = _randn(g, n * C, n * (n + 2), dtype=dtype, scale=0.3).T
    alpha = (torch.rand(3, generator=g, dtype=F64) + 0.5).to(dtype)
    bias = _randn(g, n * (n + 2), dtype=dtype, scale=0.5)
    assert not phi.is_contiguous()
    return phi, alpha, bias


def _streams(g, lead, n, C, dtype=F64, scale=1.0):
    """``[*lead, n, C]`` as a non-contiguous view: leading dims transposed, every other column."""
    base = _randn(g, *reversed(lead), n, 2 * C, dtype=dtype, scale=scale)
    x = base.permute(*reversed(range(len(lead))), len(lead), len(lead) + 1)[..., ::2]
    assert x.shape == (*lead, n, C) and not x.is_contiguous()
    return x


# ---- sinkhorn ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("iters", [1, 20])
def test_sinkhorn_matches_naive(n, iters):
    g = _gen(90)
    logits = _randn(g, 2, 3, n, n, scale=2.0)
    out = opbridge.sinkhorn(logits, iters=iters)
    want = naive.sinkhorn(logits, iters=iters)
    assert out.dtype == F64 and out.shape == logits.shape
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    # The last step normalises columns: every column sums to S/(S+eps) ~ 1.
    torch.testing.assert_close(out.sum(-2), torch.ones(2, 3, n, dtype=F64), rtol=0, atol=1e-5)
    rows = out.sum(-1)
    if iters == 20:
        torch.testing.assert_close(rows, torch.ones(2, 3, n, dtype=F64), rtol=0, atol=1e-3)
    else:  # one column step leaves rows unbalanced on this data: the test can tell iterations apart
        assert (rows - 1).abs().max() > 1e-2


def test_sinkhorn_eps_and_non_contiguous():
    g = _gen(91)
    logits = _randn(g, 4, 4, 5).transpose(0, 2)[:, :4]  # [5, 4, 4] view, non-contiguous
    assert not logits.is_contiguous()
    for eps in (1e-6, 0.05):
        torch.testing.assert_close(opbridge.sinkhorn(logits, iters=7, eps=eps),
                                   naive.sinkhorn(logits, iters=7, eps=eps), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinkhorn_low_precision_within_ops_threshold(dtype):
    g = _gen(92)
    logits = _randn(g, 16, 4, 4, dtype=dtype)
    out = opbridge.sinkhorn(logits)
    assert out.dtype == torch.float32
    assert (out.to(F64) - naive.sinkhorn(logits)).abs().max() < 1e-6


# ---- mhc_pre -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_mhc_pre_matches_naive_fp64(n, lead):
    g = _gen(93)
    C = 12
    x = _streams(g, lead, n, C)
    phi, alpha, bias = _site(g, n, C)
    kw = dict(sinkhorn_iters=20, eps=1e-6, norm_eps=1e-6, post_scale=2.0)
    y, post, comb = opbridge.mhc_pre(x, phi, alpha, bias, **kw)
    ny, npost, ncomb = naive.mhc_pre(x, phi, alpha, bias, **kw)
    assert y.shape == (*lead, C) and post.shape == (*lead, n) and comb.shape == (*lead, n, n)
    for got, want in ((y, ny), (post, npost), (comb, ncomb)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_mhc_pre_options():
    g = _gen(94)
    n, C = 4, 8
    x = _streams(g, (3,), n, C, scale=3.0)
    phi, alpha, bias = _site(g, n, C)
    kw = dict(sinkhorn_iters=3, eps=1e-3, norm_eps=0.5, post_scale=1.0)
    got = opbridge.mhc_pre(x, phi, alpha, bias, **kw)
    want = naive.mhc_pre(x, phi, alpha, bias, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # The options reach the math: defaults give a different result.
    assert (opbridge.mhc_pre(x, phi, alpha, bias)[2] - got[2]).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mhc_pre_low_precision_within_ops_thresholds(dtype):
    g = _gen(95)
    n, C = 4, 64
    x = _streams(g, (2, 3), n, C, dtype=dtype)
    phi, alpha, bias = _site(g, n, C, dtype=torch.float32)
    y, post, comb = opbridge.mhc_pre(x, phi, alpha, bias)
    assert y.dtype == dtype and post.dtype == torch.float32 and comb.dtype == torch.float32
    ny, npost, ncomb = naive.mhc_pre(x, phi, alpha, bias)
    assert naive.diff(y, ny) < 1e-5
    assert (post.to(F64) - npost).abs().max() < 1e-4
    assert (comb.to(F64) - ncomb).abs().max() < 1e-4


# ---- mhc_post ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("lead", [(4,), (2, 3)])
def test_mhc_post_matches_naive_fp64(n, lead):
    g = _gen(96)
    C = 10
    residual = _streams(g, lead, n, C)
    f = _randn(g, *lead, 2 * C)[..., 1::2]  # strided view
    post = torch.rand(*lead, n, generator=g, dtype=F64) * 2
    comb = torch.rand(*lead, n, n, generator=g, dtype=F64).transpose(-1, -2)  # transposed view
    out = opbridge.mhc_post(f, residual, post, comb)
    assert out.dtype == F64 and out.shape == residual.shape
    want = naive.mhc_post(f, residual, post, comb)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    # Direction of comb matters (column k feeds stream k): the transposed mix is different.
    wrong = naive.mhc_post(f, residual, post, comb.transpose(-1, -2))
    assert (out - wrong).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mhc_post_half_within_ops_threshold(dtype):
    g = _gen(97)
    n, C = 4, 64
    residual = _streams(g, (6,), n, C, dtype=dtype)
    f = _randn(g, 6, C, dtype=dtype)
    post = torch.rand(6, n, generator=g) * 2
    comb = naive.sinkhorn(_randn(g, 6, n, n)).float()
    out = opbridge.mhc_post(f, residual, post, comb)
    assert out.dtype == dtype
    assert naive.diff(out, naive.mhc_post(f, residual, post, comb)) < 1e-5


# ---- mhc_post_pre ------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [4, 8])
def test_mhc_post_pre_matches_naive_fp64(n):
    g = _gen(98)
    lead, C = (2, 3), 8
    residual = _streams(g, lead, n, C)
    f = _randn(g, *lead, C)
    post = torch.rand(*lead, n, generator=g, dtype=F64) * 2
    comb = naive.sinkhorn(_randn(g, *lead, n, n))
    phi, alpha, bias = _site(g, n, C)
    kw = dict(sinkhorn_iters=10, eps=1e-6, norm_eps=1e-6, post_scale=2.0)
    got = opbridge.mhc_post_pre(f, residual, post, comb, phi, alpha, bias, **kw)
    assert len(got) == 4
    new_res = naive.mhc_post(f, residual, post, comb)
    want = (new_res,) + naive.mhc_pre(new_res, phi, alpha, bias, **kw)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_mhc_post_pre_bf16_within_ops_thresholds():
    g = _gen(99)
    n, C = 4, 32
    residual = _streams(g, (5,), n, C, dtype=torch.bfloat16)
    f = _randn(g, 5, C, dtype=torch.bfloat16)
    post = torch.rand(5, n, generator=g) * 2
    comb = naive.sinkhorn(_randn(g, 5, n, n)).float()
    phi, alpha, bias = _site(g, n, C, dtype=torch.float32)
    new_res, y, post2, comb2 = opbridge.mhc_post_pre(f, residual, post, comb, phi, alpha, bias)
    want_res = naive.mhc_post(f, residual, post, comb)
    assert new_res.dtype == torch.bfloat16 and naive.diff(new_res, want_res) < 1e-5
    # The pre half runs on the bf16 residual the op returned (what the next layer sees).
    ny, npost, ncomb = naive.mhc_pre(new_res, phi, alpha, bias)
    assert naive.diff(y, ny) < 1e-5
    assert (post2.to(F64) - npost).abs().max() < 1e-4 and (comb2.to(F64) - ncomb).abs().max() < 1e-4
