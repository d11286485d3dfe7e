"""Triton MoE ops (OPS.md section 2) against the reference backend on float64 copies.

Runs on the GPU when there is one, else on CPU tensors under TRITON_INTERPRET=1 (CI) at tiny sizes.
The metric and thresholds are OPS.md section 5's; the full-size GPU check is bench/moe_gpu.py.
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import opbridge
from opbridge.core.formats import QuantTensor, dequantize, quantize
from opbridge.kernels.triton.grouped_gemm import rne_bf16, rne_e4m3
from opbridge.conformance.metrics import diff

F64 = torch.float64
BF16 = torch.bfloat16


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _f64(t):
    return dequantize(t).double() if isinstance(t, QuantTensor) else t.double()


def _to(t, dev):
    return t.to(dev) if isinstance(t, (torch.Tensor, QuantTensor)) else t


def triton_call(fn, *args, **kwargs):
    with opbridge.use_backend("triton"):
        return getattr(opbridge, fn)(*args, **kwargs)


def reference_call(fn, *args, **kwargs):
    with opbridge.use_backend("reference"):
        return getattr(opbridge, fn)(*args, **kwargs)


# ---- routing --------------------------------------------------------------------------------------------

ROUTE_CASES = [  # (E, k, kwargs): E=32 with 4 groups takes the [BT, G, GS] path, E=24 the per-group loop
    (16, 4, dict(scoring="softmax")),
    (16, 3, dict(scoring="softmax", renormalize=True, scaling_factor=2.0)),
    (32, 6, dict(scoring="sigmoid", bias=True, num_groups=4, topk_groups=2, renormalize=True, scaling_factor=2.5)),
    (24, 5, dict(scoring="sqrtsoftplus", bias=True, num_groups=8, topk_groups=3, renormalize=True)),
    (8, 2, dict(scoring="sigmoid", num_groups=8, topk_groups=2)),
]


@pytest.mark.parametrize("E,k,kw", ROUTE_CASES)
def test_moe_route_matches_reference(triton_device, E, k, kw):
    kw = dict(kw)
    g = _g(E + k)
    logits = torch.randn(13, E, generator=g) * 3
    bias = torch.randn(E, generator=g) * 0.1 if kw.pop("bias", False) else None
    w, ids = triton_call("moe_route", logits.to(triton_device), k, correction_bias=_to(bias, triton_device), **kw)
    rw, rids = reference_call("moe_route", logits.double(), k, correction_bias=bias, **kw)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids.cpu(), rids)
    assert (w.cpu().double() - rw).abs().max() < 1e-5


def test_moe_route_ties_go_to_the_lower_id(triton_device):
    logits = torch.zeros(3, 16)
    logits[1, [3, 9, 12]] = 1.0  # three equal winners, then ten-way ties
    w, ids = triton_call("moe_route", logits.to(triton_device), 5, scoring="sigmoid")
    assert ids[0].tolist() == [0, 1, 2, 3, 4]
    assert ids[1].tolist() == [3, 9, 12, 0, 1]


def test_moe_route_tiny_scores_keep_their_digits(triton_device):
    # sqrt(softplus(-30)) ~ 3e-7: a naive log(1 + exp(x)) returns 0 here, an error far above 1e-5 after sqrt
    logits = torch.full((2, 8), -30.0)
    logits[:, 0] = -25.0
    w, ids = triton_call("moe_route", logits.to(triton_device), 2, scoring="sqrtsoftplus")
    rw, _ = reference_call("moe_route", logits.double(), 2, scoring="sqrtsoftplus")
    assert (w.cpu().double() - rw).abs().max() < 1e-9 and float(w[0, 0]) > 0


def test_moe_route_hash(triton_device):
    g = _g(3)
    logits = torch.randn(6, 16, generator=g)
    tok = torch.tensor([0, 3, 5, 1, 99, -2])  # the last two are outside the table: ids -1, weights 0
    t2e = torch.randint(0, 16, (6, 3), generator=g, dtype=torch.int32)
    w, ids = triton_call("moe_route_hash", logits.to(triton_device), tok.to(triton_device), t2e.to(triton_device))
    rw, rids = reference_call("moe_route_hash", logits[:4].double(), tok[:4], t2e)
    assert torch.equal(ids[:4].cpu(), rids) and (w[:4].cpu().double() - rw).abs().max() < 1e-5
    assert (ids[4:] == -1).all() and (w[4:] == 0).all()


# ---- permute / combine ----------------------------------------------------------------------------------

def _ids(T, k, E, seed, bad=True):
    ids = torch.randint(-1, E, (T, k), generator=_g(seed), dtype=torch.int32)
    if bad:
        ids[0, 0] = E + 3  # out of range both ways: skipped like -1, never dereferenced
        ids[1, 0] = -7
    return ids


def test_moe_permute_and_combine(triton_device):
    T, k, E, H = 37, 3, 5, 24
    ids = _ids(T, k, E, 0)
    x = torch.randn(T, H, generator=_g(1)).to(BF16)
    xs, off, src = triton_call("moe_permute", x.to(triton_device), ids.to(triton_device), E)
    clean = torch.where((ids >= 0) & (ids < E), ids, -1)
    rxs, roff, rsrc = reference_call("moe_permute", x, clean, E)
    assert torch.equal(off.cpu(), roff) and torch.equal(src.cpu(), rsrc) and torch.equal(xs.cpu(), rxs)
    assert src.dtype == torch.int64 and off.dtype == torch.int32
    tw = torch.rand(T, k, generator=_g(2))
    y = torch.randn(xs.shape[0], H, generator=_g(3))
    out = triton_call("moe_combine", y.to(triton_device), src, tw.to(triton_device), T)
    ref = reference_call("moe_combine", y.double(), rsrc, tw.double(), T)
    assert diff(out.cpu(), ref) < 1e-5


# ---- grouped GEMMs -------------------------------------------------------------------------------------

def _quant(t, fmt):
    if fmt == "fp8a":
        return quantize(t, "fp8", (1, 128))
    if fmt == "fp8":
        return quantize(t, "fp8", (128, 128))
    if fmt == "mxfp4":
        return quantize(t, "mxfp4")
    return t.to({"bf16": BF16, "fp16": torch.float16}[fmt])


GEMM_CASES = [  # (a format, b format, threshold of OPS.md 5)
    ("bf16", "bf16", 1e-5), ("fp16", "fp16", 1e-5), ("fp8a", "fp8", 1e-3), ("bf16", "fp8", 1e-3),
    ("bf16", "mxfp4", 1e-2), ("fp8a", "mxfp4", 1e-2),
]


@pytest.mark.parametrize("fa,fb,limit", GEMM_CASES)
def test_grouped_gemm(triton_device, fa, fb, limit):
    counts = [5, 0, 17, 9]  # an empty group and partial tiles
    M, N, K = sum(counts), 48, 256
    offsets = torch.tensor([0, 5, 5, 22, 31], dtype=torch.int32)
    g = _g(7)
    a = _quant(torch.randn(M, K, generator=g), fa)
    b = _quant(torch.randn(4, N, K, generator=g) / 16, fb)
    out = triton_call("grouped_gemm", _to(a, triton_device), _to(b, triton_device), offsets.to(triton_device))
    ref = reference_call("grouped_gemm", _f64(a), _f64(b), offsets, out_dtype=F64)
    assert out.shape == (M, N) and out.dtype == BF16 and torch.isfinite(out).all()
    assert diff(out.cpu(), ref) < limit


def test_grouped_gemm_fp32_out_and_bad_offsets(triton_device):
    a = torch.randn(20, 64, generator=_g(8)).to(BF16)
    b = torch.randn(3, 32, 64, generator=_g(9)).to(BF16)
    off = torch.tensor([0, 8, 8, 20], dtype=torch.int32)
    out = triton_call("grouped_gemm", a.to(triton_device), b.to(triton_device), off.to(triton_device),
                      out_dtype=torch.float32)
    ref = reference_call("grouped_gemm", a.double(), b.double(), off, out_dtype=F64)
    assert out.dtype == torch.float32 and diff(out.cpu(), ref) < 1e-6
    # Offsets that decrease and run past M: the result is undefined, but rows outside [0, M) are masked
    # (the last group's tiles stop at row M) and rows only the first group covers are still right.
    bad = torch.tensor([0, 8, 3, 999], dtype=torch.int32)
    out = triton_call("grouped_gemm", a.to(triton_device), b.to(triton_device), bad.to(triton_device))
    assert out.shape == (20, 32) and diff(out[:3].cpu(), ref[:3]) < 1e-5


@pytest.mark.parametrize("fa,fb,limit", [("bf16", "bf16", 1e-5), ("fp8a", "fp8", 1e-3), ("bf16", "mxfp4", 1e-2)])
def test_grouped_gemm_masked(triton_device, fa, fb, limit):
    E, M_max, N, K = 4, 20, 32, 128
    g = _g(10)
    a = _quant(torch.randn(E, M_max, K, generator=g), fa)
    b = _quant(torch.randn(E, N, K, generator=g) / 11, fb)
    masked = torch.tensor([3, 0, 20, 11], dtype=torch.int32)
    out = triton_call("grouped_gemm_masked", _to(a, triton_device), _to(b, triton_device), masked.to(triton_device))
    ref = reference_call("grouped_gemm_masked", _f64(a), _f64(b), masked, out_dtype=F64)
    assert diff(out.cpu(), ref) < limit
    assert (out[1] == 0).all() and (out[0, 3:] == 0).all() and (out[3, 11:] == 0).all()


def test_grouped_gemm_masked_clamps_bad_counts(triton_device):
    a = torch.randn(3, 8, 64, generator=_g(11)).to(BF16)
    b = torch.randn(3, 16, 64, generator=_g(12)).to(BF16)
    masked = torch.tensor([99, -4, 5], dtype=torch.int32)  # past M_max and negative: clamped to [0, M_max]
    out = triton_call("grouped_gemm_masked", a.to(triton_device), b.to(triton_device), masked.to(triton_device))
    ref = reference_call("grouped_gemm_masked", a.double(), b.double(), torch.tensor([8, 0, 5], dtype=torch.int32),
                         out_dtype=F64)
    assert diff(out.cpu(), ref) < 1e-5 and (out[1] == 0).all()


# ---- the MoE layer -------------------------------------------------------------------------------------

def _moe_inputs(T, H, I, E, k, seed=0, dtype=BF16):
    g = _g(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.randint(-1, E, (T, k), generator=g, dtype=torch.int32)
    ids[2] = -1  # a token with no expert gets zeros
    tw = torch.rand(T, k, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=g) / I ** 0.5
    return x, tw, ids, w13, w2


@pytest.mark.parametrize("dtype,limit", [(BF16, None), (BF16, 0.5), (torch.float16, 10.0)])
def test_moe_16bit(triton_device, dtype, limit):
    x, tw, ids, w13, w2 = _moe_inputs(9, 64, 32, 4, 3, dtype=dtype)
    w13, w2 = w13.to(dtype), w2.to(dtype)
    d = triton_device
    out = triton_call("moe", x.to(d), tw.to(d), ids.to(d), w13.to(d), w2.to(d), swiglu_limit=limit)
    ref = reference_call("moe", x.double(), tw.double(), ids, w13.double(), w2.double(), swiglu_limit=limit)
    assert out.dtype == dtype and diff(out.cpu(), ref) < 5e-5
    assert (out[2] == 0).all()


def _fp8_recipe(x, tw, ids, w13, w2):
    """The DeepSeek-V3 recipe in float64: activations quantized fp8 (1,128) before each GEMM."""
    qd = lambda t: dequantize(quantize(t.float(), "fp8", (1, 128))).double()  # noqa: E731
    h = torch.einsum("th,eih->tei", qd(x), _f64(w13))
    gte, up = h.chunk(2, dim=-1)
    y = torch.einsum("tei,ehi->teh", qd(torch.nn.functional.silu(gte) * up), _f64(w2))
    sel = torch.zeros(ids.shape[0], w13.shape[0], dtype=F64)
    for s in range(ids.shape[1]):
        v = ids[:, s] >= 0
        sel[v, ids[v, s].long()] += tw[v, s].double()
    return torch.einsum("te,teh->th", sel, y)


def test_moe_fp8_weights(triton_device):
    x, tw, ids, w13, w2 = _moe_inputs(9, 128, 128, 3, 2, seed=1)
    q13, q2 = quantize(w13, "fp8", (128, 128)), quantize(w2, "fp8", (128, 128))
    d = triton_device
    out = triton_call("moe", x.to(d), tw.to(d), ids.to(d), q13.to(d), q2.to(d)).cpu()
    # The kernel computes the recipe exactly (up to fp32 sums and the bf16 output) ...
    assert diff(out, _fp8_recipe(x, tw, ids, q13, q2)) < 1e-5
    # ... and the recipe's two activation quantisations put it near OPS.md's fp8 threshold on Gaussian
    # data (~9e-4, see docs/triton-moe.md), so against the unquantised-activation reference we allow 2e-3.
    ref = reference_call("moe", x.double(), tw.double(), ids, _f64(q13), _f64(q2))
    assert diff(out, ref) < 2e-3 and (out[2] == 0).all()


def test_moe_mxfp4_weights(triton_device):
    x, tw, ids, w13, w2 = _moe_inputs(9, 64, 64, 3, 2, seed=2)
    f13, f2 = quantize(w13, "mxfp4"), quantize(w2, "mxfp4")
    d = triton_device
    out = triton_call("moe", x.to(d), tw.to(d), ids.to(d), f13.to(d), f2.to(d), swiglu_limit=1.0).cpu()
    ref = reference_call("moe", x.double(), tw.double(), ids, _f64(f13), _f64(f2), swiglu_limit=1.0)
    assert diff(out, ref) < 1e-2 and diff(out, ref) < 5e-5  # weights are exact in bf16: only roundings remain


# ---- backward -------------------------------------------------------------------------------------------

def test_grouped_gemm_backward(triton_device):
    a = torch.randn(20, 64, generator=_g(20)).to(BF16)
    b = (torch.randn(3, 32, 64, generator=_g(21)) / 8).to(BF16)
    off = torch.tensor([0, 7, 7, 20], dtype=torch.int32)
    go = torch.randn(20, 32, generator=_g(22)).to(BF16)
    at, bt = a.to(triton_device).clone().requires_grad_(), b.to(triton_device).clone().requires_grad_()
    triton_call("grouped_gemm", at, bt, off.to(triton_device)).backward(go.to(triton_device))
    ar, br = a.double().requires_grad_(), b.double().requires_grad_()
    reference_call("grouped_gemm", ar, br, off, out_dtype=F64).backward(go.double())
    assert diff(at.grad.cpu(), ar.grad) < 1e-5 and diff(bt.grad.cpu(), br.grad) < 1e-5
    assert (bt.grad[1] == 0).all()  # an empty group gets a zero gradient


def test_grouped_gemm_masked_backward(triton_device):
    a = torch.randn(3, 8, 64, generator=_g(23)).to(BF16)
    b = (torch.randn(3, 16, 64, generator=_g(24)) / 8).to(BF16)
    mm = torch.tensor([8, 0, 5], dtype=torch.int32)
    go = torch.randn(3, 8, 16, generator=_g(25)).to(BF16)
    at, bt = a.to(triton_device).clone().requires_grad_(), b.to(triton_device).clone().requires_grad_()
    triton_call("grouped_gemm_masked", at, bt, mm.to(triton_device)).backward(go.to(triton_device))
    ar, br = a.double().requires_grad_(), b.double().requires_grad_()
    reference_call("grouped_gemm_masked", ar, br, mm, out_dtype=F64).backward(go.double())
    assert diff(at.grad.cpu(), ar.grad) < 1e-5 and diff(bt.grad.cpu(), br.grad) < 1e-5


@pytest.mark.parametrize("limit", [None, 0.5])
def test_moe_backward(triton_device, limit):
    x, tw, ids, w13, w2 = _moe_inputs(7, 64, 32, 3, 2, seed=5)
    w13, w2 = w13.to(BF16), w2.to(BF16)
    go = torch.randn(7, 64, generator=_g(6)).to(BF16)
    d = triton_device
    leaves = [t.to(d).clone().requires_grad_() for t in (x, tw, w13, w2)]
    triton_call("moe", leaves[0], leaves[1], ids.to(d), leaves[2], leaves[3], swiglu_limit=limit).backward(go.to(d))
    ref = [t.double().requires_grad_() for t in (x, tw, w13, w2)]
    reference_call("moe", ref[0], ref[1], ids, ref[2], ref[3], swiglu_limit=limit).backward(go.double())
    for name, got, want in zip(("x", "topk_weights", "w13", "w2"), leaves, ref):
        assert got.grad.dtype == got.dtype, name
        assert diff(got.grad.cpu(), want.grad) < 1e-4, name


def test_moe_combine_backward(triton_device):
    T, k, H = 5, 2, 16
    src = torch.tensor([0, 3, 4, 7, 8, 9], dtype=torch.int64)
    y = torch.randn(6, H, generator=_g(30)).requires_grad_()
    tw = torch.rand(T, k, generator=_g(31)).requires_grad_()
    yt, twt = y.detach().to(triton_device).requires_grad_(), tw.detach().to(triton_device).requires_grad_()
    triton_call("moe_combine", yt, src.to(triton_device), twt, T).sum().backward()
    reference_call("moe_combine", y, src, tw, T).sum().backward()
    assert torch.allclose(yt.grad.cpu(), y.grad) and torch.allclose(twt.grad.cpu(), tw.grad)


# ---- what the backend refuses, and why ------------------------------------------------------------------

def test_unsupported_calls_say_why(triton_device):
    d = triton_device
    x, tw, ids, w13, w2 = _moe_inputs(4, 64, 32, 2, 2)
    with pytest.raises(opbridge.UnsupportedError, match="x dtype float32"):
        triton_call("moe", x.float().to(d), tw.to(d), ids.to(d), w13.to(d), w2.to(d))
    q2 = quantize(w2, "fp8", (128, 128))  # I=32: the fused (1,128) activation quantisation needs I % 128 == 0
    with pytest.raises(opbridge.UnsupportedError, match="I % 128"):
        triton_call("moe", x.to(d), tw.to(d), ids.to(d), w13.to(BF16).to(d), q2.to(d))
    a = quantize(torch.randn(8, 128), "fp8", (1, 128))
    bad = QuantTensor(a.data, a.scale[:, :0], "fp8", (1, 128))  # a scale the kernel would read past
    b = torch.randn(2, 16, 128).to(BF16)
    with pytest.raises(opbridge.UnsupportedError, match="scale"):
        triton_call("grouped_gemm", _to(bad, d), b.to(d), torch.tensor([0, 4, 8], dtype=torch.int32, device=d))
    with pytest.raises(opbridge.UnsupportedError, match="differs"):
        triton_call("grouped_gemm", torch.randn(8, 128).to(BF16).to(d), b.half().to(d),
                    torch.tensor([0, 4, 8], dtype=torch.int32, device=d))


# ---- interpreter rounding helpers and configuration data -------------------------------------------------

@triton.jit
def _round_kernel(x_ptr, b_ptr, f_ptr, N: tl.constexpr):
    o = tl.arange(0, N)
    x = tl.load(x_ptr + o)
    tl.store(b_ptr + o, rne_bf16(x))
    tl.store(f_ptr + o, rne_e4m3(tl.minimum(tl.maximum(x, -448.0), 448.0)))


def test_interpreter_rounding_helpers_match_torch():
    # The interpreter's own fp32 -> bf16 / fp8 casts truncate; CI's numbers rest on these helpers.
    x = torch.cat([torch.randn(1000, generator=_g(40)) * 30, torch.randn(24, generator=_g(41)) * 0.01])
    b, f = torch.empty_like(x), torch.empty_like(x)
    if torch.cuda.is_available():
        x, b, f = x.cuda(), b.cuda(), f.cuda()
    _round_kernel[(1,)](x, b, f, N=1024)
    assert torch.equal(b, x.to(BF16).float())
    assert torch.equal(f, x.clamp(-448, 448).to(torch.float8_e4m3fn).float())


def test_config_tables():
    from opbridge.kernels.triton import moe_configs as C

    for arch in ("sm_90", "sm_100"):
        t = C.table(arch)
        assert t["arch"] == arch and t["measured"] is (arch == "sm_90")
        for key in ("gemm1/bf16", "gemm1/fp8", "gemm1/mxfp4", "gemm2/bf16", "gemm2/fp8", "gemm2/mxfp4", "gemm/bf16"):
            rows = t["gemm"][key]
            assert rows[-1].get("max_m") is None  # a catch-all row
            assert all(r["BM"] >= 16 and r["BN"] >= 16 and r["BK"] >= 32 for r in rows)
    cpu = torch.device("cpu")
    assert C.gemm_config(cpu, "gemm1", "fp8", 10, quant_out=True)["BN"] == 128
    assert C.gemm_config(cpu, "gemm", "mxfp4", 10, mxfp4=True)["BK"] >= 64
