"""DeepSeek sparse attention on the Ascend backend (through the contract emulator) against the float64
reference, with the thresholds of OPS.md 5."""
from __future__ import annotations

import pytest
import torch

import opbridge

from .metrics import assert_attention, assert_indexer, reference

HEADS = {"A2": 4, "A3": 4, "950": 8}  # indexer heads each SoC accepts (950: 8/16/24/32/64)
CU_Q = torch.tensor([0, 4, 10], dtype=torch.int32)
CU_K = torch.tensor([0, 9, 30], dtype=torch.int32)


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("family", ["A3", "950"])  # float32 weights on A3; cast to the query dtype on 950
@pytest.mark.parametrize("causal", [True, False])
def test_indexer_topk_matches_reference(ascend, family, causal):
    ascend(family)
    g = _g()
    Hi = HEADS[family]
    q = torch.randn(10, Hi, 128, generator=g).to(torch.bfloat16)
    k = torch.randn(30, 128, generator=g).to(torch.bfloat16)
    w = torch.randn(10, Hi, generator=g)
    kw = dict(cu_seqlens_q=CU_Q, cu_seqlens_k=CU_K, causal=causal)
    idx = opbridge.indexer_topk(q, k, w, 7, **kw)
    assert idx.dtype == torch.int32 and idx.shape == (10, 7)
    assert_indexer(idx, reference("indexer_logits", q, k, w, **kw))


def test_indexer_topk_rounds_top_k_up_to_a_sparse_count(ascend):
    ascend("A3")
    g = _g(1)
    q = torch.randn(3, 2, 128, generator=g).to(torch.float16)
    k = torch.randn(40, 128, generator=g).to(torch.float16)
    w = torch.rand(3, 2, generator=g)
    idx = opbridge.indexer_topk(q, k, w, 2100)  # not a documented sparse_count: 3072 is asked and cut
    assert idx.shape == (3, 2100)
    assert_indexer(idx, reference("indexer_logits", q, k, w))
    with pytest.raises(opbridge.UnsupportedError, match="npu_lightning_indexer.*8192"):
        opbridge.indexer_topk(q, k, w, 9000)


def _packed_keys(k_cache, block_table, context_lens):
    """The paged cache as packed sequences (cu_seqlens), to score the paged indexer with indexer_logits."""
    seqs = [k_cache[block_table[b].long()].reshape(-1, k_cache.shape[-1])[:n]
            for b, n in enumerate(context_lens.tolist())]
    cu = torch.tensor([0] + torch.tensor([s.shape[0] for s in seqs]).cumsum(0).tolist(), dtype=torch.int32)
    return torch.cat(seqs), cu


@pytest.mark.parametrize("family", ["A3", "950"])
def test_indexer_topk_paged_matches_reference(ascend, family):
    ascend(family)
    g = _g(2)
    B, Sq, Hi = 2, 3, HEADS[family]
    q = torch.randn(B, Sq, Hi, 128, generator=g).to(torch.bfloat16)
    k_cache = torch.randn(6, 16, 128, generator=g).to(torch.bfloat16)
    block_table = torch.tensor([[3, 0, 5], [1, 4, 2]], dtype=torch.int32)
    context_lens = torch.tensor([20, 37], dtype=torch.int32)
    w = torch.randn(B, Sq, Hi, generator=g)
    idx = opbridge.indexer_topk_paged(q, k_cache, block_table, context_lens, w, 6)
    keys, cu_k = _packed_keys(k_cache, block_table, context_lens)
    cu_q = torch.arange(0, B * Sq + 1, Sq, dtype=torch.int32)
    logits = reference("indexer_logits", q.flatten(0, 1), keys, w.flatten(0, 1), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert_indexer(idx.flatten(0, 1), logits)


def _sparse_indices(g, top_k: int, lengths: list[int]) -> torch.Tensor:
    """Distinct valid positions per row, with -1 holes in the middle and one row with none."""
    idx = torch.stack([torch.randperm(n, generator=g)[:top_k] for n in lengths]).to(torch.int32)
    idx[:, 2] = -1
    idx[1] = -1
    return idx


@pytest.mark.parametrize("family", ["A3", "950"])
@pytest.mark.parametrize("Dqk", [576, 512])  # V3.2 (512 latent + 64 rope) and V4 (K = V = 512)
@pytest.mark.parametrize("with_sink", [False, True])
def test_sparse_attention_matches_reference(ascend, family, Dqk, with_sink):
    ascend(family)
    g = _g(3)
    q = torch.randn(10, 4, Dqk, generator=g).to(torch.bfloat16)
    kv = torch.randn(30, Dqk, generator=g).to(torch.bfloat16)
    indices = _sparse_indices(g, 8, [9] * 4 + [21] * 6)
    sink = torch.randn(4, generator=g) if with_sink else None
    kw = dict(scale=Dqk ** -0.5, d_v=512, cu_seqlens_q=CU_Q, cu_seqlens_k=CU_K, sink=sink, return_lse=True)
    out, lse = opbridge.sparse_attention(q, kv, indices, **kw)
    ref_out, ref_lse = reference("sparse_attention", q, kv, indices, **kw)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_attention(out, ref_out, lse, ref_lse)
    assert bool((out[1] == 0).all()) and bool(torch.isinf(lse[1]).all())


@pytest.mark.parametrize("family", ["A3", "950"])
def test_sparse_attention_paged_matches_reference(ascend, family):
    ascend(family)
    g = _g(4)
    B, Sq, H = 2, 3, 8
    q = torch.randn(B, Sq, H, 576, generator=g).to(torch.bfloat16)
    kv_cache = torch.randn(6, 16, 576, generator=g).to(torch.bfloat16)
    block_table = torch.tensor([[3, 0, 5], [1, 4, 2]], dtype=torch.int32)
    indices = _sparse_indices(g, 7, [48] * (B * Sq)).view(B, Sq, 7)
    kw = dict(scale=0.05, d_v=512, sink=torch.randn(H, generator=g), return_lse=True)
    out, lse = opbridge.sparse_attention_paged(q, kv_cache, block_table, indices, **kw)
    ref_out, ref_lse = reference("sparse_attention_paged", q, kv_cache, block_table, indices, **kw)
    assert_attention(out.flatten(0, 1), ref_out.flatten(0, 1), lse.flatten(0, 1), ref_lse.flatten(0, 1))


def test_attention_outside_the_vendor_ops_is_unsupported(ascend):
    ascend("A3")
    q = torch.randn(4, 3, 576).to(torch.bfloat16)
    kv = torch.randn(8, 576).to(torch.bfloat16)
    idx = torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(opbridge.UnsupportedError, match=r"npu_sparse_flash_attention supports \[1, 2, 4.*got 3"):
        opbridge.sparse_attention(q, kv, idx, scale=0.1, d_v=512)
    q4 = torch.randn(4, 4, 576).to(torch.bfloat16)
    with pytest.raises(opbridge.UnsupportedError, match="one key set"):
        opbridge.sparse_attention(q4, kv, idx, scale=0.1, d_v=512, extra_kv=kv, extra_indices=idx)
    with pytest.raises(opbridge.UnsupportedError, match="d_v=512"):
        opbridge.sparse_attention(q4, kv, idx, scale=0.1)
    qi = torch.randn(4, 2, 64).to(torch.bfloat16)
    with pytest.raises(opbridge.UnsupportedError, match="npu_lightning_indexer supports head dim D=128"):
        opbridge.indexer_topk(qi, torch.randn(8, 64).to(torch.bfloat16), torch.rand(4, 2), 2)
    with pytest.raises(opbridge.UnsupportedError, match="query positions.*compress_rate=4.*not expressible"):
        opbridge.indexer_topk(torch.randn(4, 2, 128).half(), torch.randn(8, 128).half(), torch.rand(4, 2), 2,
                              compress_rate=4, q_positions=torch.arange(4, dtype=torch.int32))
    with pytest.raises(opbridge.UnsupportedError, match="window_indices=reference"):
        opbridge.window_indices(CU_Q, CU_K, 4)
    ascend("950")
    with pytest.raises(opbridge.UnsupportedError, match=r"npu_lightning_indexer supports \[8, 16, 24, 32, 64\]"):
        opbridge.indexer_topk(torch.randn(4, 4, 128).half(), torch.randn(8, 128).half(), torch.rand(4, 4), 2)
    ascend("A3", "2.9.0")  # op-plugin 7.3.0 (torch_npu 2.9.0) is the first to ship both DSA ops
    assert opbridge.sparse_attention(q4, kv, idx, scale=0.1, d_v=512).shape == (4, 4, 512)
