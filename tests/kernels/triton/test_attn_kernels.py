"""Kernel-level checks of the sparse-attention family: launch-config variants the backend does not
pick by default, and the radix top-k on crafted rows (ties, negatives, lengths around top_k)."""
from __future__ import annotations

import pytest
import torch

from opbridge.kernels.triton import indexer as K_idx
from opbridge.kernels.triton import sparse_attention as K_sa
from opbridge.kernels.triton.sparse_attention_common import config

INTERP = not torch.cuda.is_available()


def _select(x, limit, top_k, **cfg):
    """The top-k pipeline (threshold, filter, select) on a score matrix; cfg overrides the interpret config."""
    c = config("attn_indexer.json", "topk", x.device, INTERP, **cfg)
    R, W = x.shape
    cap = max(1, min(W, max(2 * top_k, top_k + c["cap_extra"])))
    out = torch.full((R, top_k), 123, dtype=torch.int32, device=x.device)
    bufs = (torch.empty((R, cap), device=x.device), torch.empty((R, cap), dtype=torch.int32, device=x.device),
            torch.empty(R, dtype=torch.int32, device=x.device), torch.empty(R, dtype=torch.int32, device=x.device))
    K_idx.select_topk(x, 0, R, limit, out, top_k, *bufs, c)
    return out, bufs[3]


def test_config_lookup_and_override(triton_device):
    cfg = config("attn_sparse.json", "fwd", torch.device(triton_device), INTERP, BLOCK_N=64)
    assert cfg["BLOCK_N"] == 64 and {"BLOCK_H", "num_warps", "num_stages"} <= set(cfg)


@pytest.mark.parametrize("rows", [
    [3.0, -1.0, 3.0, 3.0, 0.5, -7.0, 3.0, 2.0, 3.0],  # ties at the threshold
    [-1.0, -2.0, -3.0, -0.0, 0.0, -1e-30, 1e-30],     # negatives and signed zeros
])
@pytest.mark.parametrize("top_k", [1, 4, 7, 12])
def test_radix_topk_small_rows(triton_device, rows, top_k):
    x = torch.tensor([rows], dtype=torch.float32, device=triton_device)
    L = x.shape[1]
    limit = torch.tensor([L], dtype=torch.int32, device=triton_device)
    out, _ = _select(x, limit, top_k, BLOCK=4)
    got = out[0].cpu().tolist()
    n = min(top_k, L)
    assert got[n:] == [-1] * (top_k - n)
    assert len(set(got[:n])) == n and all(0 <= i < L for i in got[:n])
    vals = sorted((rows[i] for i in got[:n]), reverse=True)
    assert vals == sorted(rows, reverse=True)[:n]


@pytest.mark.parametrize("ties,cap_extra", [(True, 4), (False, 4), (False, 400)])
def test_topk_many_rows(triton_device, ties, cap_extra):
    """Rows of lengths 0, below, at and above top_k and longer than the sample; heavy ties overflow
    the candidate list (whole-row fallback), distinct scores go through the candidates."""
    g = torch.Generator().manual_seed(0)
    R, W, top_k = 6, 300, 20
    if ties:
        x = (torch.randint(-40, 40, (R, W), generator=g).float() / 8).to(triton_device)
    else:
        x = torch.randn(R, W, generator=g).to(triton_device)
    limit = torch.tensor([0, 5, 20, 21, 300, 157], dtype=torch.int32, device=triton_device)
    out, count = _select(x, limit, top_k, BLOCK=64, cap_extra=cap_extra)
    if not ties and cap_extra == 400:  # every long row had a complete candidate list
        assert all(int(count[r]) >= top_k for r in (4, 5))
    for r in range(R):
        L = int(limit[r])
        n = min(top_k, L)
        row = out[r].cpu().tolist()
        assert row[n:] == [-1] * (top_k - n)
        sel = row[:n]
        assert len(set(sel)) == n and all(0 <= i < L for i in sel)
        got = sorted(x[r, sel].cpu().tolist(), reverse=True)
        assert got == sorted(x[r, :L].cpu().tolist(), reverse=True)[:n]


@pytest.mark.parametrize("trans,block_q", [(False, 2), (True, 1), (False, 4)])
def test_indexer_scores_variants(triton_device, trans, block_q):
    g = torch.Generator().manual_seed(1)
    T, Tk, Hi, D = 5, 37, 4, 16
    q = torch.randn(T, Hi, D, generator=g).half().to(triton_device)
    k = torch.randn(Tk, D, generator=g).half().to(triton_device)
    w = torch.randn(T, Hi, generator=g).to(triton_device)
    limit = torch.tensor([37, 0, 12, 36, 5], dtype=torch.int32, device=triton_device)
    cu = torch.tensor([0, T], device=triton_device)
    keys = K_idx.Keys(k, None, kstart=torch.zeros(T, dtype=torch.int32, device=triton_device))
    out = torch.full((T, Tk), 7.0, device=triton_device)
    K_idx.indexer_scores(q, keys, w, None, limit, cu, out, 0, T, write_masked=True, interpret=INTERP, TRANS=trans,
                         BLOCK_Q=block_q, BLOCK_N=16, TILES=1)
    ref = (torch.einsum("thd,sd->ths", q.double().cpu(), k.double().cpu()).relu() * w.double().cpu()[..., None]).sum(1)
    cols = torch.arange(Tk)
    ref = ref.masked_fill(cols[None, :] >= limit.cpu()[:, None], float("-inf"))
    assert torch.equal(torch.isinf(out.cpu()), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert torch.allclose(out.cpu()[fin].double(), ref[fin], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("block_n,lazy", [(16, False), (32, False), (16, True)])
def test_sparse_fwd_block_n_small_hq_lazy(triton_device, block_n, lazy):
    """Hq below the head block (masked heads), a key tile wider than the index list, and the lazy
    rescale on logits spread widely enough (scale 2) that the running max moves by more than 2^8."""
    g = torch.Generator().manual_seed(2)
    T, Hq, D, Tk, scale = 3, 5, 32, 40, 2.0
    q = torch.randn(T, Hq, D, generator=g).half().to(triton_device)
    kv = torch.randn(Tk, D, generator=g).half().to(triton_device)
    idx = torch.stack([torch.randperm(Tk, generator=g)[:36] for _ in range(T)]).to(torch.int32)
    idx[0, ::3] = -1
    idx[2, :30] = -1
    idx = idx.to(triton_device)
    ks, kl = K_sa.varlen_bounds(None, None, T, Tk, q.device)
    out, lse = K_sa.sparse_attention_fwd(q, [K_sa.KeySet(kv, idx, ks, kl)], scale=scale, d_v=D, sink=None,
                                         interpret=INTERP, BLOCK_N=block_n, LAZY=lazy)
    qd, kd = q.double().cpu(), kv.double().cpu()
    for t in range(T):
        v = [i for i in idx[t].tolist() if i >= 0]
        s = torch.einsum("hd,jd->hj", qd[t], kd[v]) * scale
        ref = torch.softmax(s, -1) @ kd[v]
        assert torch.allclose(out[t].cpu().double(), ref, atol=2e-3)
        assert torch.allclose(lse[t].cpu().double(), torch.logsumexp(s, -1), atol=1e-5)


@pytest.mark.parametrize("exact_below", [0, 9, 1000])
@pytest.mark.parametrize("extra", [False, True])
def test_sparse_fwd_exact_rows_launch_pair(triton_device, exact_below, extra):
    """Rows below EXACT_BELOW valid keys (main + extra set together) go to the second launch, which
    splits p into two 16-bit parts; every row must be written once, by the right launch, and match
    the float64 softmax. exact_below 0: one launch; 1000: every row in the exact launch."""
    g = torch.Generator().manual_seed(5)
    T, Hq, D, Tk, Te, scale = 6, 4, 32, 40, 12, 0.3
    q = torch.randn(T, Hq, D, generator=g).half().to(triton_device)
    kv = torch.randn(Tk, D, generator=g).half().to(triton_device)
    ekv = torch.randn(Te, D, generator=g).half().to(triton_device)
    idx = torch.stack([torch.randperm(Tk, generator=g)[:24] for _ in range(T)]).to(torch.int32)
    counts = [0, 1, 3, 8, 20, 24]  # valid main keys per row, around the threshold
    for t, c in enumerate(counts):
        idx[t, c:] = -1
    eidx = torch.stack([torch.randperm(Te, generator=g)[:4] for _ in range(T)]).to(torch.int32)
    eidx[:, 1:] = -1  # one extra key per row: row 3 has 8 + 1 = 9 keys in all
    sets = [K_sa.KeySet(kv, idx.to(triton_device), *K_sa.varlen_bounds(None, None, T, Tk, q.device))]
    if extra:
        sets.append(K_sa.KeySet(ekv, eidx.to(triton_device), *K_sa.varlen_bounds(None, None, T, Te, q.device)))
    out, lse = K_sa.sparse_attention_fwd(q, sets, scale=scale, d_v=D, sink=None, interpret=INTERP,
                                         EXACT_BELOW=exact_below)
    qd, kd, ed = q.double().cpu(), kv.double().cpu(), ekv.double().cpu()
    for t in range(T):
        keys = kd[[i for i in idx[t].tolist() if i >= 0]]
        if extra:
            keys = torch.cat([keys, ed[[i for i in eidx[t].tolist() if i >= 0]]])
        if keys.shape[0] == 0:
            assert torch.all(out[t].cpu() == 0) and torch.all(torch.isneginf(lse[t].cpu()))
            continue
        s = qd[t] @ keys.T * scale
        assert torch.allclose(out[t].cpu().double(), torch.softmax(s, -1) @ keys, atol=2e-3), t
        assert torch.allclose(lse[t].cpu().double(), torch.logsumexp(s, -1), atol=1e-5), t
