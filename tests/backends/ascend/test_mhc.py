"""mHC on the Ascend backend (through the contract emulator) against the float64 reference, OPS.md 5."""
from __future__ import annotations

import pytest
import torch

import opbridge

from .metrics import diff, max_abs, reference

N, C = 4, 32


def _site(g, n=N, c=C):
    phi = torch.randn(n * (n + 2), n * c, generator=g) * 0.1
    return phi, torch.rand(3, generator=g), torch.randn(n * (n + 2), generator=g) * 0.1


def test_sinkhorn_matches_reference(ascend):
    ascend("950")
    logits = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    out = opbridge.sinkhorn(logits, iters=7)
    assert out.dtype == torch.float32 and out.shape == logits.shape
    assert max_abs(out, reference("sinkhorn", logits, iters=7)) < 1e-6


@pytest.mark.parametrize("post_scale", [2.0, 1.5])  # the vendor's h_post carries a fixed factor 2
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mhc_pre_matches_reference(ascend, post_scale, dtype):
    ascend("950")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, N, C, generator=g).to(dtype)
    phi, alpha, bias = _site(g)
    y, post, comb = opbridge.mhc_pre(x, phi, alpha, bias, sinkhorn_iters=12, post_scale=post_scale)
    y_ref, post_ref, comb_ref = reference("mhc_pre", x, phi, alpha, bias, sinkhorn_iters=12, post_scale=post_scale)
    assert y.dtype == dtype and post.shape == (2, 3, N) and comb.shape == (2, 3, N, N)
    assert diff(y, y_ref) < 1e-5
    assert max_abs(post, post_ref) < 1e-4 and max_abs(comb, comb_ref) < 1e-4


def test_mhc_post_and_post_pre_match_reference(ascend):
    ascend("950")
    g = torch.Generator().manual_seed(2)
    residual = torch.randn(5, N, C, generator=g).to(torch.bfloat16)
    f = torch.randn(5, C, generator=g).to(torch.bfloat16)
    post = torch.rand(5, N, generator=g) * 2
    comb = torch.rand(5, N, N, generator=g)  # not symmetric: a transposed comb would show
    out = opbridge.mhc_post(f, residual, post, comb)
    assert out.dtype == residual.dtype
    assert diff(out, reference("mhc_post", f, residual, post, comb)) < 1e-5
    phi, alpha, bias = _site(g)
    new_residual, y, post_next, comb_next = opbridge.mhc_post_pre(f, residual, post, comb, phi, alpha, bias)
    assert diff(new_residual, reference("mhc_post", f, residual, post, comb)) < 1e-5
    # Two vendor passes: the pre reads new_residual as stored, in residual's dtype (OPS 4.5 defines it so;
    # the float64 oracle of the fused op keeps it unrounded, a difference of ~1e-3 in post for bf16).
    y_ref, post_ref, comb_ref = reference("mhc_pre", new_residual, phi, alpha, bias)
    assert diff(y, y_ref) < 1e-5
    assert max_abs(post_next, post_ref) < 1e-4 and max_abs(comb_next, comb_ref) < 1e-4


def test_mhc_outside_the_vendor_ops_is_unsupported(ascend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, N, C, generator=g).to(torch.bfloat16)
    phi, alpha, bias = _site(g)
    ascend("A3")  # the torch_npu mHC ops are documented for Ascend 950 only
    with pytest.raises(opbridge.UnsupportedError, match="npu_mhc_pre is documented for Ascend 950.*Ascend910_9392"):
        opbridge.mhc_pre(x, phi, alpha, bias)
    ascend("950", "2.9.0")  # op-plugin 7.3.0 predates them
    with pytest.raises(opbridge.UnsupportedError, match="npu_mhc_post is not in torch_npu 2.9.0.*26.0.0"):
        opbridge.mhc_post(x[:, 0], x, torch.rand(3, N), torch.rand(3, N, N))
    ascend("950")
    with pytest.raises(opbridge.UnsupportedError, match="npu_mhc_pre takes bfloat16/float16 streams"):
        opbridge.mhc_pre(x.float(), phi, alpha, bias)
    x5 = torch.randn(3, 5, C).to(torch.bfloat16)
    phi5, alpha5, bias5 = _site(g, n=5)
    with pytest.raises(opbridge.UnsupportedError, match=r"n in \[4, 6, 8\]"):
        opbridge.mhc_pre(x5, phi5, alpha5, bias5)
    with pytest.raises(opbridge.UnsupportedError, match="num_iters in \\[1, 100\\]"):
        opbridge.sinkhorn(torch.randn(2, N, N), iters=101)
