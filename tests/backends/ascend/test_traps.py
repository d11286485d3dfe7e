"""Planted translation bugs: each known way to misuse a CANN op must fail a test, either at the
emulator's contract check (as the real op's parameter check would) or at the numeric comparison.

A bug is planted by swapping one of the backend's convention helpers (or wrapping one vendor op
call) for a wrong variant; the correct code path is exercised by the conformance tests.
"""
from __future__ import annotations

import pytest
import torch

import opbridge
from opbridge.backends.ascend import mhc as ascend_mhc
from opbridge.backends.ascend import moe as ascend_moe
from opbridge.backends.ascend import sparse_attention as ascend_sa

from .emulator import ContractError
from .metrics import diff, max_abs, reference


def _moe_case(seed: int = 0, E: int = 4):
    g = torch.Generator().manual_seed(seed)
    T, H, I, k = 12, 32, 8, 2
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    tw = torch.rand(T, k, generator=g)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * 0.2).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) * 0.2).to(torch.bfloat16)
    return x, tw, ids, w13, w2


def _gemm_case():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(10, 32, generator=g).to(torch.float16)
    b = torch.randn(3, 16, 32, generator=g).to(torch.float16)
    return a, b, torch.tensor([0, 2, 7, 10], dtype=torch.int32)


def test_counts_passed_as_cumulative_group_list_is_caught(ascend, monkeypatch):
    ascend("A3")
    monkeypatch.setattr(ascend_moe, "group_list_from_counts", lambda c: (c.to(torch.int64), 0))
    with pytest.raises(ContractError, match="group_list_type=0"):
        opbridge.moe(*_moe_case())


def test_cumulative_offsets_passed_as_counts_are_caught(ascend, monkeypatch):
    ascend("A3")
    monkeypatch.setattr(ascend_moe, "group_list_from_offsets", lambda off: (off[1:].to(torch.int64), 1))
    with pytest.raises(ContractError, match="group_list_type=1: the sizes must sum"):
        opbridge.grouped_gemm(*_gemm_case())


def test_offsets_with_the_leading_zero_are_caught(ascend, monkeypatch):
    ascend("A3")
    monkeypatch.setattr(ascend_moe, "group_list_from_offsets", lambda off: (off.to(torch.int64), 0))
    with pytest.raises(ContractError, match="one entry per group"):
        opbridge.grouped_gemm(*_gemm_case())


def test_untransposed_expert_weights_are_caught(ascend, monkeypatch):
    ascend("A3")
    monkeypatch.setattr(ascend_moe, "expert_weights_view", lambda w: w)  # [E, N, K] passed as [E, K, N]
    with pytest.raises(ContractError, match="disagree on K"):
        opbridge.grouped_gemm(*_gemm_case())
    # A square weight passes the shape check; the numbers catch it.
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(6, 16, generator=g).half(), torch.randn(2, 16, 16, generator=g).half()
    off = torch.tensor([0, 4, 6], dtype=torch.int32)
    assert diff(opbridge.grouped_gemm(a, b, off), reference("grouped_gemm", a, b, off, out_dtype=torch.float64)) > 1e-2


def test_no_expert_ids_passed_through_are_caught(ascend, monkeypatch):
    ascend("A3")
    monkeypatch.setattr(ascend_moe, "no_expert_to_zero_weight", lambda ids, w: (ids.to(torch.int32), w.float()))
    x, tw, ids, w13, w2 = _moe_case()
    ids[3, 1] = -1
    with pytest.raises(ContractError, match="group_list_type=1: the sizes must sum"):  # the -1 slot left out
        opbridge.moe(x, tw, ids, w13, w2)


def _wrap_vendor_op(monkeypatch, op: str, edit) -> None:
    """Plant a bug in how one vendor op is called: ``edit(kwargs)`` changes the keyword arguments."""
    import sys
    npu = sys.modules["torch_npu"]
    real = getattr(npu, op)

    def planted(*args, **kwargs):
        edit(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(npu, op, planted)


def test_omitted_quant_mode_is_caught_on_op_plugin_7_3(ascend, monkeypatch):
    ascend("A3", "2.9.0")  # before op-plugin 26.0.0 the schema default is quant_mode=0 (static int8)
    _wrap_vendor_op(monkeypatch, "npu_moe_init_routing_v2", lambda kw: kw.pop("quant_mode"))
    with pytest.raises(ContractError, match="quant_mode: only -1 .* got 0"):
        opbridge.moe(*_moe_case())


def _sa_case(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(6, 4, 576, generator=g).to(torch.bfloat16)
    kv = torch.randn(20, 576, generator=g).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(20, generator=g)[:6] for _ in range(6)]).to(torch.int32)
    idx[:, 1] = -1  # holes: valid indices after a -1
    return q, kv, idx


def test_default_attention_mode_is_caught(ascend, monkeypatch):
    ascend("A3")
    _wrap_vendor_op(monkeypatch, "npu_sparse_flash_attention", lambda kw: kw.pop("attention_mode"))
    q, kv, idx = _sa_case()
    with pytest.raises(ContractError, match="attention_mode: only 2"):
        opbridge.sparse_attention(q, kv, idx, scale=0.05, d_v=512)


def test_uncompacted_indices_are_caught(ascend, monkeypatch):
    ascend("A3")
    monkeypatch.setattr(ascend_sa, "valid_first", lambda idx: idx.contiguous())
    q, kv, idx = _sa_case()
    out = opbridge.sparse_attention(q, kv, idx, scale=0.05, d_v=512)
    assert diff(out, reference("sparse_attention", q, kv, idx, scale=0.05, d_v=512)) > 1e-3


def test_per_sequence_lengths_in_tnd_are_caught(ascend, monkeypatch):
    ascend("A3")
    monkeypatch.setattr(ascend_sa, "cumulative_lengths",
                        lambda cu, total, dev: torch.tensor([total], dtype=torch.int32) if cu is None
                        else (cu[1:] - cu[:-1]).to(torch.int32))
    q, kv, idx = _sa_case()
    cu_q, cu_k = torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([0, 8, 20], dtype=torch.int32)
    with pytest.raises(ContractError, match=r"actual_seq_lengths_query \(TND\) must end at the packed row count"):
        opbridge.sparse_attention(q, kv, idx.clamp(max=7), scale=0.05, d_v=512, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def _mhc_case(seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    n, C = 4, 16
    x = torch.randn(3, n, C, generator=g).to(torch.bfloat16)
    phi = torch.randn(n * (n + 2), n * C, generator=g) * 0.1
    return x, phi, torch.rand(3, generator=g), torch.randn(n * (n + 2), generator=g) * 0.1


def test_transposed_comb_is_caught(ascend, monkeypatch):
    ascend("950")
    monkeypatch.setattr(ascend_mhc, "h_res_from_comb", lambda comb: comb.transpose(-1, -2).float().contiguous())
    g = torch.Generator().manual_seed(5)
    residual = torch.randn(3, 4, 16, generator=g).to(torch.bfloat16)
    f = torch.randn(3, 16, generator=g).to(torch.bfloat16)
    post, comb = torch.rand(3, 4, generator=g), torch.rand(3, 4, 4, generator=g)
    out = opbridge.mhc_post(f, residual, post, comb)
    assert diff(out, reference("mhc_post", f, residual, post, comb)) > 1e-3


def test_missing_post_scale_factor_is_caught(ascend, monkeypatch):
    # A translation that forgets npu_mhc_pre's built-in factor 2 (and scales sigmoid by post_scale again).
    ascend("950")
    monkeypatch.setattr(ascend_mhc, "VENDOR_POST_SCALE", 1.0)
    x, phi, alpha, bias = _mhc_case()
    _, post, _ = opbridge.mhc_pre(x, phi, alpha, bias)
    _, post_ref, _ = reference("mhc_pre", x, phi, alpha, bias)
    assert max_abs(post, post_ref) > 0.1
