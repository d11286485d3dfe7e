"""The mHC kernels directly: tile/split configurations, edge sizes, Sinkhorn backward, dx_add.

Every configuration must compute the same function; results are checked against float64 PyTorch math.
"""
from __future__ import annotations

import pytest
import torch

from opbridge.backends.reference import mhc as ref
from opbridge.kernels.triton import mhc_configs
from opbridge.kernels.triton import mhc_post as K_post
from opbridge.kernels.triton import mhc_pre as K_pre
from opbridge.kernels.triton import mhc_pre_backward as K_pre_bwd
from opbridge.kernels.triton import sinkhorn as K_sk
from opbridge.kernels.triton.mhc_configs import config, next_pow2
from opbridge.conformance.metrics import diff

F64 = torch.float64
ARGS = (20, 1e-6, 1e-6, 2.0)  # iters, eps, norm_eps, post_scale
REF_KW = dict(sinkhorn_iters=20, eps=1e-6, norm_eps=1e-6, post_scale=2.0)


def _site(g, n, C, device):
    phi = (torch.randn(n * (n + 2), n * C, generator=g) * 0.05).to(device)
    alpha = (torch.rand(3, generator=g) + 0.5).to(device)
    bias = (torch.randn(n * (n + 2), generator=g) * 0.5).to(device)
    return phi, alpha, bias


@pytest.mark.parametrize("cfg", [
    dict(BT=16, CC=16, NSUB=1),          # many splits
    dict(BT=32, CC=32, NSUB=3),          # one split covering all columns, ragged C
    dict(BT=16, CC=16, NSUB=2, PHI2=1),  # phi split into bf16 hi/lo once per call
    dict(BT=16, CC=16, NSUB=1, SB=2),    # partials summed two splits per step
    dict(BT=16, CC=16, NSUB=1, CONTIG=0),  # splits strided over the streams (the fused op's layout)
])
def test_pre_configs_agree(triton_device, cfg):
    g = torch.Generator().manual_seed(11)
    n, C, T = 4, 40, 35
    x = torch.randn(T, n, C, generator=g).bfloat16().to(triton_device)
    site = _site(g, n, C, triton_device)
    y, post, comb = K_pre.mhc_pre(x, *site, *ARGS, cfg=cfg)
    yr, postr, combr = ref.mhc_pre(x.to(F64), *(p.to(F64) for p in site), **REF_KW)
    assert diff(y, yr) < 1e-5
    assert float((post.to(F64) - postr).abs().max()) < 1e-4
    assert float((comb.to(F64) - combr).abs().max()) < 1e-4
    # Same splits, other coefficient / collapse blocks (ragged, reversed): bit-identical, as the
    # partials are summed in a fixed order and each output element is computed once.
    y2, post2, comb2 = K_pre.mhc_pre(x, *site, *ARGS, cfg=dict(cfg, BT2=8, BT3=4, CC3=16, STEPS3=3))
    assert torch.equal(y, y2) and torch.equal(post, post2) and torch.equal(comb, comb2)


def test_empty_and_single_token(triton_device):
    g = torch.Generator().manual_seed(13)
    n, C = 4, 16
    site = _site(g, n, C, triton_device)
    y, post, comb = K_pre.mhc_pre(torch.empty(0, n, C, device=triton_device), *site, *ARGS)
    assert y.shape == (0, C) and post.shape == (0, n) and comb.shape == (0, n, n)
    x = torch.randn(1, n, C, generator=g).to(triton_device)
    y, post, comb = K_pre.mhc_pre(x, *site, *ARGS)
    yr, postr, combr = ref.mhc_pre(x.to(F64), *(p.to(F64) for p in site), **REF_KW)
    assert diff(y, yr) < 1e-9 and float((comb.to(F64) - combr).abs().max()) < 1e-6
    assert K_post.mhc_post(torch.empty(0, C), torch.empty(0, n, C), torch.empty(0, n),
                           torch.empty(0, n, n)).shape == (0, n, C)


@pytest.mark.parametrize("n", [2, 3, 5, 8, 16])
def test_sinkhorn_kernels_any_n(triton_device, n):
    g = torch.Generator().manual_seed(14)
    L = (torch.randn(6, n, n, generator=g) * 3).to(triton_device)  # 6 matrices: a ragged last block
    for iters, eps in ((1, 1e-6), (6, 0.05)):
        out = K_sk.sinkhorn(L, iters, eps)
        assert float((out.to(F64) - K_sk.sinkhorn_ref(L, iters, eps)).abs().max()) < 1e-6
    Ld = L.to(F64).requires_grad_(True)
    G = torch.randn(6, n, n, generator=g, dtype=F64)
    K_sk.sinkhorn_ref(Ld, 6, 1e-6).backward(G.to(triton_device))
    dL = K_sk.sinkhorn_backward(L, G.float().to(triton_device), 6, 1e-6)
    assert dL.dtype == L.dtype
    assert float((dL.to(F64) - Ld.grad).abs().max()) < 1e-6 * max(1.0, float(Ld.grad.abs().max()))


def test_sinkhorn_nan_rows_like_reference(triton_device):
    L = torch.zeros(2, 4, 4, device=triton_device)
    L[0, 1] = -float("inf")  # softmax of an all -inf row is NaN in torch: the NaNs must land alike
    out = K_sk.sinkhorn(L, 3, 1e-6)
    want = K_sk.sinkhorn_ref(L, 3, 1e-6)
    assert torch.equal(out.isnan(), want.isnan()) and bool(out[0].isnan().any())
    assert not bool(out[1].isnan().any())


def test_pre_backward_dx_add_and_splits(triton_device):
    """dx_add lands in dx; the T split of the dphi pass (partials summed on the host) changes nothing."""
    g = torch.Generator().manual_seed(15)
    n, C, T = 4, 24, 40
    x = torch.randn(T, n, C, generator=g).to(triton_device)
    site = _site(g, n, C, triton_device)
    grads = [torch.randn(T, C, generator=g).to(triton_device), torch.randn(T, n, generator=g).to(triton_device),
             torch.randn(T, n, n, generator=g).to(triton_device)]
    add = torch.randn(T, n, C, generator=g).to(triton_device)
    base = K_pre_bwd.mhc_pre_backward(grads, x, *site, 3, 1e-6, 1e-6, 2.0, cfg=dict(TS=1))
    more = K_pre_bwd.mhc_pre_backward(grads, x, *site, 3, 1e-6, 1e-6, 2.0, dx_add=add, cfg=dict(TS=3))
    torch.testing.assert_close(more[0], base[0] + add, rtol=1e-6, atol=1e-6)
    for a, b in zip(more[1:], base[1:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    none = K_pre_bwd.mhc_pre_backward([None, None, None], x, *site, 3, 1e-6, 1e-6, 2.0, dx_add=add)
    assert torch.equal(none[0], add) and float(none[1].abs().max()) == 0


def test_configs_are_data():
    for name in ("mhc_pre", "mhc_post_pre", "mhc_post", "mhc_post_backward", "mhc_pre_backward", "mhc_sinkhorn"):
        for dev in ("cpu", "cuda"):
            cfg = config(name, 4, torch.device(dev))
            assert cfg and "comment" not in cfg and all(isinstance(v, int) for v in cfg.values())
    cuda = torch.device("cuda")
    table = mhc_configs._load("mhc_pre")
    n8 = config("mhc_pre", 8, cuda)
    assert n8 == dict(table["default"], **table["n8"])  # per-n entries merge over the default
    assert config("mhc_pre", 8, cuda, dict(CC=64))["CC"] == 64  # explicit overrides win
    small = {k: v for k, v in table["small"].items() if k != "max_T"}
    decode = config("mhc_pre", 4, cuda, tokens=table["small"]["max_T"])
    assert all(decode[k] == v for k, v in small.items()) and "max_T" not in decode
    assert config("mhc_pre", 4, cuda, tokens=table["small"]["max_T"] + 1) == config("mhc_pre", 4, cuda)
    assert [next_pow2(v) for v in (1, 3, 4, 6, 24)] == [1, 4, 4, 8, 32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("phi2", [0, 1])
def test_post_pre_is_post_then_pre(triton_device, phi2, dtype):
    """The fused launch writes exactly mhc_post's new residual and computes the next site from that
    rounded value: bit-identical to the two kernels in sequence with the same (strided) GEMM splits."""
    g = torch.Generator().manual_seed(16)
    n, C, T = 4, 40, 35
    res = torch.randn(T, n, C, generator=g).to(dtype).to(triton_device)
    f = torch.randn(T, C, generator=g).to(dtype).to(triton_device)
    post = (torch.rand(T, n, generator=g) * 2).to(triton_device)
    comb = torch.rand(T, n, n, generator=g).to(triton_device)
    site = _site(g, n, C, triton_device)
    cfg = dict(BT=16, CC=16, NSUB=1, PHI2=phi2)
    new, y, pn, cn = K_pre.mhc_post_pre(f, res, post, comb, *site, *ARGS, cfg=cfg)
    new2 = K_post.mhc_post(f, res, post, comb)
    y2, pn2, cn2 = K_pre.mhc_pre(new2, *site, *ARGS, cfg=dict(cfg, CONTIG=0))
    assert torch.equal(new, new2) and torch.equal(y, y2) and torch.equal(pn, pn2) and torch.equal(cn, cn2)
    # Against float64, the next site judged on the returned (rounded) residual, as OPS.md 4.5 reads.
    newr = ref.mhc_post(*(t.to(F64) for t in (f, res, post, comb)))
    yr, pnr, cnr = ref.mhc_pre(new.to(F64), *(p.to(F64) for p in site), **REF_KW)
    assert diff(new, newr) < 1e-5 and diff(y, yr) < 1e-5
    assert float((pn.to(F64) - pnr).abs().max()) < 1e-4 and float((cn.to(F64) - cnr).abs().max()) < 1e-4

