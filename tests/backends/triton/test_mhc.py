"""Triton mHC ops through the public API against the reference backend on float64 copies (OPS.md 4, 5).

Forward thresholds are OPS.md's: ``y``/``mhc_post`` diff < 1e-5, ``post``/``comb`` max abs err < 1e-4,
``sinkhorn`` max abs err < 1e-6. Gradients are checked against the reference's autograd.
Under TRITON_INTERPRET=1 (no GPU) the kernels run on CPU tensors with tiny shapes.
"""
from __future__ import annotations

import pytest
import torch

import opbridge
from opbridge.conformance.metrics import diff

F64 = torch.float64
KW = dict(sinkhorn_iters=20, eps=1e-6, norm_eps=1e-6, post_scale=2.0)


def maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().to(F64) - b.detach().to(F64)).abs().max())


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, dtype=torch.float32, scale=1.0, device="cpu"):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def _site(g, n, C, device):
    """phi arrives as a transposed (non-contiguous) view, as a checkpoint might hand it over."""
    phi = _randn(g, n * C, n * (n + 2), scale=0.05, device=device).T
    alpha = (torch.rand(3, generator=g) + 0.5).to(device)
    bias = _randn(g, n * (n + 2), scale=0.5, device=device)
    return phi, alpha, bias


def _streams(g, lead, n, C, dtype, device, scale=3.0):
    """``[*lead, n, C]`` as a non-contiguous view (every other column of a wider tensor); the scale keeps
    the RMS factor away from 1, so that a wrong power of it shows."""
    return _randn(g, *lead, n, 2 * C, dtype=dtype, scale=scale, device=device)[..., ::2]


def _f64(*ts):
    return [t.detach().to(F64) for t in ts]


def _ref(op, *args, **kw):
    with opbridge.use_backend("reference"):
        return getattr(opbridge, op)(*args, **kw)


def _tri(op, *args, **kw):
    with opbridge.use_backend("triton"):
        return getattr(opbridge, op)(*args, **kw)


# ---- forward -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,dtype", [(4, torch.float32), (4, torch.bfloat16), (6, torch.float16)])
def test_sinkhorn_forward(triton_device, n, dtype):
    g = _gen(1)
    logits = _randn(g, 3, 5, n, n, dtype=dtype, scale=2.0, device=triton_device)
    out = _tri("sinkhorn", logits)
    want = _ref("sinkhorn", *_f64(logits))
    assert out.dtype == torch.float32 and out.shape == logits.shape
    assert maxabs(out, want) < 1e-6
    out3 = _tri("sinkhorn", logits, iters=3, eps=0.05)  # iterations and eps are honoured
    assert maxabs(out3, _ref("sinkhorn", *_f64(logits), iters=3, eps=0.05)) < 1e-6
    assert maxabs(out3, out) > 1e-3


@pytest.mark.parametrize("n,dtype,T", [(4, torch.bfloat16, 37), (6, torch.float32, 5), (8, torch.float16, 3)])
def test_mhc_pre_forward(triton_device, n, dtype, T):
    g = _gen(2)
    C = 40 if n == 4 else 24
    x = _streams(g, (T,), n, C, dtype, triton_device)
    phi, alpha, bias = _site(g, n, C, triton_device)
    y, post, comb = _tri("mhc_pre", x, phi, alpha, bias, **KW)
    yr, postr, combr = _ref("mhc_pre", *_f64(x, phi, alpha, bias), **KW)
    assert (y.dtype, post.dtype, comb.dtype) == (dtype, torch.float32, torch.float32)
    assert (y.shape, post.shape, comb.shape) == ((T, C), (T, n), (T, n, n))
    assert diff(y, yr) < 1e-5
    assert maxabs(post, postr) < 1e-4 and maxabs(comb, combr) < 1e-4
    # comb is (close to) doubly stochastic and its columns, not rows, are normalised last.
    assert maxabs(comb.sum(-2), torch.ones_like(comb.sum(-2))) < 1e-4


def test_mhc_pre_leading_dims_and_params(triton_device):
    g = _gen(3)
    n, C = 4, 32
    x = _streams(g, (2, 3), n, C, torch.bfloat16, triton_device)
    phi, alpha, bias = _site(g, n, C, triton_device)
    kw = dict(sinkhorn_iters=5, eps=1e-3, norm_eps=1e-4, post_scale=1.0)
    y, post, comb = _tri("mhc_pre", x, phi, alpha, bias, **kw)
    yr, postr, combr = _ref("mhc_pre", *_f64(x, phi, alpha, bias), **kw)
    assert y.shape == (2, 3, C) and post.shape == (2, 3, n) and comb.shape == (2, 3, n, n)
    assert diff(y, yr) < 1e-5 and maxabs(post, postr) < 1e-4 and maxabs(comb, combr) < 1e-4
    assert float(post.max()) <= 1.0  # post_scale honoured


@pytest.mark.parametrize("n,dtype", [(4, torch.bfloat16), (6, torch.float16), (8, torch.float32)])
def test_mhc_post_forward(triton_device, n, dtype):
    g = _gen(4)
    T, C = 9, 48
    f = _randn(g, T, C, dtype=dtype, device=triton_device)
    res = _streams(g, (T,), n, C, dtype, triton_device)
    post = (torch.rand(T, n, generator=g) * 2).to(triton_device)
    comb = torch.rand(T, n, n, generator=g).to(triton_device)
    out = _tri("mhc_post", f, res, post, comb)
    want = _ref("mhc_post", *_f64(f, res, post, comb))
    assert out.dtype == dtype and out.shape == res.shape
    assert diff(out, want) < 1e-5
    # the transpose: column k of comb feeds stream k (a row-major misuse would fail this)
    assert diff(out, _ref("mhc_post", *_f64(f, res, post, comb.transpose(-1, -2)))) > 1e-3


@pytest.mark.parametrize("n,dtype", [(4, torch.bfloat16), (6, torch.float32)])
def test_mhc_post_pre_forward(triton_device, n, dtype):
    g = _gen(5)
    T, C = 21, 32
    f = _randn(g, T, C, dtype=dtype, device=triton_device)
    res = _streams(g, (T,), n, C, dtype, triton_device)
    post = (torch.rand(T, n, generator=g) * 2).to(triton_device)
    comb = torch.rand(T, n, n, generator=g).to(triton_device)
    phi, alpha, bias = _site(g, n, C, triton_device)
    new, y, pn, cn = _tri("mhc_post_pre", f, res, post, comb, phi, alpha, bias, **KW)
    newr = _ref("mhc_post", *_f64(f, res, post, comb))
    # OPS.md 4.5: the next site reads the new residual as returned (in the residual's dtype)
    yr, pnr, cnr = _ref("mhc_pre", *_f64(new, phi, alpha, bias), **KW)
    assert (new.dtype, y.dtype, pn.dtype, cn.dtype) == (dtype, dtype, torch.float32, torch.float32)
    assert diff(new, newr) < 1e-5 and diff(y, yr) < 1e-5
    assert maxabs(pn, pnr) < 1e-4 and maxabs(cn, cnr) < 1e-4
    # the stored new residual is exactly what mhc_post writes
    assert torch.equal(new, _tri("mhc_post", f, res, post, comb))


# ---- backward ------------------------------------------------------------------------------------------

def _grads(op, inputs, weights, backend, **kw):
    """Gradients of sum(w_i * out_i) with respect to every input, through the public op."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with opbridge.use_backend(backend):  # the backward ops dispatch too: keep the choice for backward()
        outs = getattr(opbridge, op)(*leaves, **kw)
        outs = outs if isinstance(outs, tuple) else (outs,)
        loss = sum((o.to(F64) * w.to(F64)).sum() for o, w in zip(outs, weights) if w is not None)
        loss.backward()
    return [leaf.grad for leaf in leaves]


def _weights(g, outs, dtypes, skip=()):
    """Upstream gradients, rounded to the dtype of the Triton outputs so both backends start alike."""
    return [None if i in skip else torch.randn(o.shape, generator=g).to(dt).to(F64).to(o.device)
            for i, (o, dt) in enumerate(zip(outs, dtypes))]


def _check_grads(got, want, dtypes, tol):
    for i, (a, b, dt) in enumerate(zip(got, want, dtypes)):
        assert a is not None and a.dtype == dt, (i, None if a is None else a.dtype)
        assert diff(a, b) < tol, (i, diff(a, b))


def test_sinkhorn_backward(triton_device):
    g = _gen(6)
    logits = _randn(g, 7, 4, 4, scale=2.0, device=triton_device)
    w = _weights(g, [logits], [torch.float32])
    got = _grads("sinkhorn", [logits], w, "triton")
    want = _grads("sinkhorn", _f64(logits), w, "reference")
    assert maxabs(got[0], want[0]) < 1e-6 * max(1.0, float(want[0].abs().max()))
    assert got[0].dtype == torch.float32


@pytest.mark.parametrize("n,dtype,iters,skip", [(4, torch.float32, 20, ()), (4, torch.bfloat16, 4, ()),
                                                (6, torch.float16, 3, (1, 2)), (8, torch.float32, 2, (0,))])
def test_mhc_pre_backward(triton_device, n, dtype, iters, skip):
    g = _gen(7)
    T, C = (3, 16) if iters == 20 else (9, 24)
    x = _streams(g, (T,), n, C, dtype, triton_device)
    phi, alpha, bias = _site(g, n, C, triton_device)
    kw = dict(KW, sinkhorn_iters=iters)
    with opbridge.use_backend("reference"):
        outs = opbridge.mhc_pre(*_f64(x, phi, alpha, bias), **kw)
    w = _weights(g, outs, [dtype, torch.float32, torch.float32], skip)
    got = _grads("mhc_pre", [x, phi, alpha, bias], w, "triton", **kw)
    want = _grads("mhc_pre", _f64(x, phi, alpha, bias), w, "reference", **kw)
    tol = 1e-9 if dtype == torch.float32 else 1e-5
    _check_grads(got, want, [dtype, torch.float32, torch.float32, torch.float32], tol)


@pytest.mark.parametrize("n,dtype", [(4, torch.bfloat16), (8, torch.float32)])
def test_mhc_post_backward(triton_device, n, dtype):
    g = _gen(8)
    T, C = 6, 40
    f = _randn(g, T, C, dtype=dtype, device=triton_device)
    res = _streams(g, (T,), n, C, dtype, triton_device)
    post = (torch.rand(T, n, generator=g) * 2).to(triton_device)
    comb = torch.rand(T, n, n, generator=g).to(triton_device)
    w = _weights(g, [res], [dtype])
    got = _grads("mhc_post", [f, res, post, comb], w, "triton")
    want = _grads("mhc_post", _f64(f, res, post, comb), w, "reference")
    tol = 1e-9 if dtype == torch.float32 else 1e-5
    _check_grads(got, want, [dtype, dtype, torch.float32, torch.float32], tol)


@pytest.mark.parametrize("skip", [(), (0,), (1, 2, 3)])
def test_mhc_post_pre_backward(triton_device, skip):
    g = _gen(9)
    n, T, C, dtype = 4, 5, 24, torch.float32
    f = _randn(g, T, C, dtype=dtype, device=triton_device)
    res = _streams(g, (T,), n, C, dtype, triton_device)
    post = (torch.rand(T, n, generator=g) * 2).to(triton_device)
    comb = torch.rand(T, n, n, generator=g).to(triton_device)
    phi, alpha, bias = _site(g, n, C, triton_device)
    inputs = [f, res, post, comb, phi, alpha, bias]
    kw = dict(KW, sinkhorn_iters=3)
    with opbridge.use_backend("reference"):
        outs = opbridge.mhc_post_pre(*_f64(*inputs), **kw)
    w = _weights(g, outs, [dtype, dtype, torch.float32, torch.float32], skip)
    got = _grads("mhc_post_pre", inputs, w, "triton", **kw)
    want = _grads("mhc_post_pre", _f64(*inputs), w, "reference", **kw)
    if skip == (1, 2, 3):  # only the new residual is used: the next site's parameters get no gradient
        assert all(gr is None or float(gr.abs().max()) == 0 for gr in got[4:])
        got, want = got[:4], want[:4]
    _check_grads(got, want, [torch.float32] * len(got), 1e-9)


# ---- what the backend refuses ------------------------------------------------------------------------

def test_unsupported_calls_name_the_reason(triton_device):
    g = _gen(10)
    n, C = 4, 16
    x = _randn(g, 2, n, C, dtype=F64, device=triton_device)
    phi, alpha, bias = _site(g, n, C, triton_device)
    with pytest.raises(opbridge.UnsupportedError, match="float64"):
        _tri("mhc_pre", x, *_f64(phi, alpha, bias))
    with pytest.raises(opbridge.UnsupportedError, match="phi dtype float64"):
        _tri("mhc_pre", x.float(), phi.double(), alpha, bias)
    x9 = _randn(g, 2, 9, C, device=triton_device)
    phi9, alpha9, bias9 = _site(g, 9, C, triton_device)
    with pytest.raises(opbridge.UnsupportedError, match="n=9"):
        _tri("mhc_pre", x9, phi9, alpha9, bias9)
    with pytest.raises(opbridge.UnsupportedError, match="float64"):
        _tri("sinkhorn", _randn(g, 3, 4, 4, dtype=F64, device=triton_device))
