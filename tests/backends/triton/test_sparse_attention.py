"""Triton sparse-attention ops (OPS.md section 3) against the reference backend on float64 copies.

Runs on the GPU when there is one, else under TRITON_INTERPRET=1 at tiny sizes (fp16/fp32 dots;
bf16 goes through the kernels' upcast switch). Thresholds are OPS.md section 5's.
"""
from __future__ import annotations

import pytest
import torch

import opbridge
from opbridge.conformance.metrics import diff

F64 = torch.float64
I32 = torch.int32
FP8 = torch.float8_e4m3fn
NEG_INF = float("-inf")


# ---- helpers -------------------------------------------------------------------------------------

def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, dtype=torch.float16, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def _cu(lengths, device="cpu") -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=I32, device=device)


def _f64(x):
    return None if x is None else x.detach().cpu().to(F64)


def _cpu(x):
    return None if x is None else x.detach().cpu()


def assert_attn_close(out, ref, lse=None, ref_lse=None):
    """OPS.md 5: out diff < 7e-6 and per element abs < 8e-4 or rel < 3/128; lse abs < 1e-5 or rel < 2/65536."""
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    assert torch.isfinite(out).all()
    assert diff(out, ref) < 7e-6, diff(out, ref)
    err = (out - ref).abs()
    ok = (err < 8e-4) | (err < 3 / 128 * ref.abs())
    assert bool(ok.all()), float(err.max())
    if lse is not None:
        lse, ref_lse = lse.detach().cpu().double(), ref_lse.detach().cpu().double()
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
        fin = torch.isfinite(ref_lse)
        e = (lse[fin] - ref_lse[fin]).abs()
        assert bool(((e < 1e-5) | (e < 2 / 65536 * ref_lse[fin].abs())).all()), float(e.max())


def _indices(g, Lq_list, Lk_list, top_k, *, p_neg=0.2, p_oob=0.1):
    """Unique random indices per query with -1 holes; ``oob`` marks out-of-range garbage (for the kernel only)."""
    rows = []
    for Lq, Lk in zip(Lq_list, Lk_list):
        for _ in range(Lq):
            n = min(top_k, Lk)
            r = torch.full((top_k,), -1, dtype=I32)
            r[:n] = torch.randperm(Lk, generator=g)[:n].to(I32)
            r = r[torch.randperm(top_k, generator=g)]
            u = torch.rand(top_k, generator=g)
            r[u < p_neg] = -1
            r[(u >= p_neg) & (u < p_neg + p_oob)] = Lk + 1000  # out of the query's sequence: must be masked
            rows.append(r)
    idx = torch.stack(rows)
    lim = torch.tensor([Lk for Lq, Lk in zip(Lq_list, Lk_list) for _ in range(Lq)]).unsqueeze(1)
    clean = torch.where(idx >= lim, -1, idx)  # what the reference sees (it rejects out-of-range values)
    return idx, clean


@pytest.fixture(autouse=True)
def _triton():
    with opbridge.use_backend("triton"):
        yield


def _ref(fn, *args, **kw):
    with opbridge.use_backend("reference"):
        return fn(*args, **kw)


# ---- sparse_attention (varlen prefill) ------------------------------------------------------------

@pytest.mark.parametrize("Hq,Dqk,d_v,dtype", [
    (16, 48, 32, torch.float16),   # V3.2 layout in miniature: value part + key-only (rope) tail
    (32, 32, None, torch.float16),  # V4 layout: K = V
    (16, 48, 32, torch.bfloat16),
])
def test_sparse_attention_varlen(triton_device, Hq, Dqk, d_v, dtype):
    g = _g(1)
    Lq, Lk = [3, 0, 4], [20, 5, 37]
    Tq, Tk, top_k = sum(Lq), sum(Lk), 24
    q = _randn(g, Tq, Hq, Dqk, dtype=dtype, device=triton_device)
    kv = _randn(g, Tk, Dqk, dtype=dtype, device=triton_device)
    idx, clean = _indices(g, Lq, Lk, top_k)
    idx[0] = -1  # a query with no valid key: out 0, lse -inf
    clean[0] = -1
    cu_q, cu_k = _cu(Lq, triton_device), _cu(Lk, triton_device)
    out, lse = opbridge.sparse_attention(q, kv, idx.to(triton_device), scale=0.3, d_v=d_v, cu_seqlens_q=cu_q,
                                         cu_seqlens_k=cu_k, return_lse=True)
    ro, rl = _ref(opbridge.sparse_attention, _f64(q), _f64(kv), clean, scale=0.3, d_v=d_v,
                  cu_seqlens_q=_cpu(cu_q), cu_seqlens_k=_cpu(cu_k), return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == (Tq, Hq, d_v or Dqk)
    assert_attn_close(out, ro, lse, rl)
    assert bool((out[0] == 0).all()) and bool(torch.isinf(lse[0]).all())


def test_sparse_attention_extra_and_sink(triton_device):
    """V4: top-k compressed entries + a sliding window of raw keys in one softmax, with a sink."""
    g = _g(2)
    Hq, D, Lq, Lk, Lk2 = 16, 32, [5, 3], [12, 9], [30, 20]
    Tq = sum(Lq)
    q = _randn(g, Tq, Hq, D, device=triton_device)
    kv = _randn(g, sum(Lk), D, device=triton_device)
    ekv = _randn(g, sum(Lk2), D, device=triton_device)
    idx, clean = _indices(g, Lq, Lk, 8)
    cu_q, cu_k, cu_e = _cu(Lq, triton_device), _cu(Lk, triton_device), _cu(Lk2, triton_device)
    eidx = opbridge.window_indices(cu_q, cu_e, 6)
    sink = torch.randn(Hq, generator=g).to(triton_device)
    kw = dict(scale=D ** -0.5, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, sink=sink, extra_kv=ekv, extra_indices=eidx,
              extra_cu_seqlens_k=cu_e, return_lse=True)
    out, lse = opbridge.sparse_attention(q, kv, idx.to(triton_device), **kw)
    rkw = {k: (_f64(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else _cpu(v))
           if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    ro, rl = _ref(opbridge.sparse_attention, _f64(q), _f64(kv), clean, **rkw)
    assert_attn_close(out, ro, lse, rl)
    # The sink only scales the output: lse is the same as without it, the output differs.
    out2, lse2 = opbridge.sparse_attention(q, kv, idx.to(triton_device), **{**kw, "sink": None})
    assert torch.allclose(lse2, lse) and not torch.allclose(out2, out)


def test_window_indices_matches_reference(triton_device):
    cu_q, cu_k = _cu([3, 1, 4], triton_device), _cu([5, 2, 4], triton_device)
    got = opbridge.window_indices(cu_q, cu_k, 3)
    ref = _ref(opbridge.window_indices, _cpu(cu_q), _cpu(cu_k), 3)
    assert got.dtype == I32 and torch.equal(got.cpu(), ref)
    assert got.cpu()[0].tolist() == [0, 1, 2]  # query 0 of a 3-query suffix of 5 keys sits at position 2
    assert got.cpu()[3].tolist() == [-1, 0, 1]  # the single query of a 2-key sequence sits at position 1


def test_sparse_attention_rejects_float64(triton_device):
    q = torch.randn(2, 16, 32, dtype=F64, device=triton_device)
    kv = torch.randn(4, 32, dtype=F64, device=triton_device)
    with pytest.raises(opbridge.UnsupportedError, match="float64"):
        opbridge.sparse_attention(q, kv, torch.zeros(2, 2, dtype=I32, device=triton_device), scale=1.0)


# ---- sparse_attention_paged (decode) --------------------------------------------------------------

@pytest.mark.parametrize("with_extra", [False, True])
def test_sparse_attention_paged(triton_device, with_extra):
    g = _g(3)
    B, Sq, Hq, Dqk, d_v, bs, nblk, maxb, top_k = 2, 2, 16, 48, 32, 4, 11, 5, 12
    q = _randn(g, B, Sq, Hq, Dqk, device=triton_device)
    cache = _randn(g, nblk, bs, Dqk, device=triton_device)
    table = torch.randperm(nblk, generator=g)[:B * maxb].view(B, maxb).to(I32)
    idx, clean = _indices(g, [B * Sq], [maxb * bs], top_k)
    idx, clean = idx.view(B, Sq, top_k), clean.view(B, Sq, top_k)
    kw = dict(scale=0.2, d_v=d_v, sink=torch.randn(Hq, generator=g).to(triton_device), return_lse=True)
    rkw = dict(kw, sink=_f64(kw["sink"]))
    if with_extra:
        ecache = _randn(g, 6, 8, Dqk, device=triton_device)
        etable = torch.tensor([[5, 0], [2, 3]], dtype=I32)
        eidx = torch.randint(-1, 16, (B, Sq, 5), generator=g, dtype=I32)
        eidx = torch.stack([torch.randperm(16, generator=g)[:5] for _ in range(B * Sq)]).view(B, Sq, 5).to(I32)
        eidx[0, 0, 0] = -1
        kw.update(extra_kv_cache=ecache, extra_block_table=etable.to(triton_device),
                  extra_indices=eidx.to(triton_device))
        rkw.update(extra_kv_cache=_f64(ecache), extra_block_table=etable, extra_indices=eidx)
    out, lse = opbridge.sparse_attention_paged(q, cache, table.to(triton_device), idx.to(triton_device), **kw)
    ro, rl = _ref(opbridge.sparse_attention_paged, _f64(q), _f64(cache), table, clean, **rkw)
    assert out.shape == (B, Sq, Hq, d_v) and lse.shape == (B, Sq, Hq)
    assert_attn_close(out, ro, lse, rl)


def test_paged_garbage_block_table_is_masked(triton_device):
    """Block numbers outside the cache are never dereferenced: those keys count as absent."""
    g = _g(4)
    q = _randn(g, 1, 1, 16, 32, device=triton_device)
    cache = _randn(g, 3, 4, 32, device=triton_device)
    table = torch.tensor([[1, 99, -7]], dtype=I32)
    idx = torch.tensor([[[0, 3, 4, 7, 8, 11, 50]]], dtype=I32)  # blocks 0 ok, 1 and 2 garbage, 50 past table
    out, lse = opbridge.sparse_attention_paged(q, cache, table.to(triton_device), idx.to(triton_device), scale=0.5,
                                               return_lse=True)
    only = torch.tensor([[[0, 3, -1, -1, -1, -1, -1]]], dtype=I32)
    ro, rl = _ref(opbridge.sparse_attention_paged, _f64(q), _f64(cache), torch.tensor([[1, 0, 0]], dtype=I32), only,
                  scale=0.5, return_lse=True)
    assert_attn_close(out, ro, lse, rl)


# ---- backward --------------------------------------------------------------------------------------

@pytest.mark.parametrize("Dqk,d_v,extra", [(48, 32, False), (32, None, True)])
def test_sparse_attention_backward(triton_device, Dqk, d_v, extra):
    g = _g(5)
    Hq, Lq, Lk = 16, [3, 2], [14, 10]
    Tq = sum(Lq)
    dt = torch.float32
    q = _randn(g, Tq, Hq, Dqk, dtype=dt, device=triton_device)
    kv = _randn(g, sum(Lk), Dqk, dtype=dt, device=triton_device)
    sink = torch.randn(Hq, generator=g).to(triton_device)
    idx, clean = _indices(g, Lq, Lk, 8)
    clean[1] = -1
    idx[1] = -1
    cu_q, cu_k = _cu(Lq, triton_device), _cu(Lk, triton_device)
    go = torch.randn(Tq, Hq, d_v or Dqk, generator=g).to(triton_device)
    gl = torch.randn(Tq, Hq, generator=g).to(triton_device)
    ekv = _randn(g, 12, Dqk, dtype=dt, device=triton_device) if extra else None
    cu_e = _cu([7, 5], triton_device) if extra else None
    eidx = opbridge.window_indices(cu_q, cu_e, 4) if extra else None

    def run(backend, conv):
        leaves = [conv(t).requires_grad_(True) for t in (q, kv, sink) + ((ekv,) if extra else ())]
        with opbridge.use_backend(backend):
            out, lse = opbridge.sparse_attention(
                leaves[0], leaves[1], conv(idx if backend == "triton" else clean), scale=0.25, d_v=d_v,
                cu_seqlens_q=conv(cu_q), cu_seqlens_k=conv(cu_k), sink=leaves[2],
                extra_kv=leaves[3] if extra else None, extra_indices=conv(eidx), extra_cu_seqlens_k=conv(cu_e),
                return_lse=True)
            fin = torch.isfinite(lse)
            loss = (out * conv(go)).sum() + (torch.where(fin, lse, 0) * conv(gl)).sum()
            return torch.autograd.grad(loss, leaves)  # the backward dispatches by the same backend

    got = run("triton", lambda t: None if t is None else (t.detach() if t.is_floating_point() else t))
    ref = run("reference", lambda t: None if t is None else (t.detach().cpu().double() if t.is_floating_point()
                                                             else t.cpu()))
    for a, b in zip(got, ref):
        assert diff(a.cpu(), b) < 1e-9, diff(a.cpu(), b)
        assert torch.allclose(a.cpu().double(), b, atol=1e-4, rtol=1e-4)


# ---- indexer ----------------------------------------------------------------------------------------

def _quant_rows(x: torch.Tensor):
    """Per-row fp8 e4m3 quantisation over the last dim: (data, scale) with amax/448 scales."""
    s = x.float().abs().amax(-1).clamp_min(1e-4) / 448
    return (x.float() / s.unsqueeze(-1)).to(FP8), s.float()


def _indexer_inputs(g, Tq, Tk, Hi, D, dtype, device):
    q = _randn(g, Tq, Hi, D, dtype=torch.float32)
    k = _randn(g, Tk, D, dtype=torch.float32)
    w = torch.randn(Tq, Hi, generator=g)
    if dtype == FP8:
        (q, qs), (k, ks) = _quant_rows(q), _quant_rows(k)
        return q.to(device), k.to(device), w.to(device), qs.to(device), ks.to(device)
    return q.to(dtype).to(device), k.to(dtype).to(device), w.to(device), None, None


def _check_topk(idx, scores, top_k):
    """OPS.md 5: selected >= every unselected candidate - 1e-3 * max|score|; valid counts equal; -1 at the end."""
    idx, scores = idx.cpu(), scores.cpu().double()
    for t in range(scores.shape[0]):
        row = idx[t].tolist()
        valid = [i for i in row if i != -1]
        assert row == valid + [-1] * (top_k - len(valid)), row
        assert len(set(valid)) == len(valid)
        cand = torch.isfinite(scores[t])
        assert len(valid) == min(top_k, int(cand.sum()))
        if not valid:
            continue
        sel = torch.tensor(valid)
        assert bool(cand[sel].all())
        rest = cand.clone()
        rest[sel] = False
        if rest.any():
            tol = 1e-3 * float(scores[t][cand].abs().max())
            assert float(scores[t][sel].min()) >= float(scores[t][rest].max()) - tol


@pytest.mark.parametrize("dtype,causal,rate", [(torch.float16, True, 1), (torch.bfloat16, False, 1),
                                               (FP8, True, 2)])
def test_indexer_logits_and_topk(triton_device, dtype, causal, rate):
    g = _g(6)
    Hi, D, Lq, Lk, top_k = 4, 32, [5, 4], [23, 9], 6
    Tq, Tk = sum(Lq), sum(Lk)
    q, k, w, qs, ks = _indexer_inputs(g, Tq, Tk, Hi, D, dtype, triton_device)
    cu_q, cu_k = _cu(Lq, triton_device), _cu(Lk, triton_device)
    pos = None
    if rate > 1:  # raw positions; the compressed keys each stand for `rate` tokens
        pos = torch.tensor([40, 41, 42, 43, 44, 10, 11, 12, 17], dtype=I32, device=triton_device)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal, compress_rate=rate, q_positions=pos,
              q_scale=qs, k_scale=ks)
    rkw = {k_: _cpu(v) if isinstance(v, torch.Tensor) else v for k_, v in kw.items()}  # scales stay float32
    logits = opbridge.indexer_logits(q, k, w, **kw)
    ref = _ref(opbridge.indexer_logits, _f64(q), _f64(k), _f64(w), **rkw)
    assert logits.shape == ref.shape and logits.dtype == torch.float32
    assert torch.equal(torch.isinf(logits.cpu()), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert diff(logits.cpu()[fin], ref[fin]) < 1e-5
    idx = opbridge.indexer_topk(q, k, w, top_k, **kw)
    _check_topk(idx, ref, top_k)


def test_indexer_topk_exact_and_chunked(triton_device):
    """fp32 scores are exact enough to compare the selected set itself; the interpreter config's small
    workspace forces several query chunks and several radix rounds."""
    g = _g(7)
    Tq, Tk, Hi, D, top_k = 9, 70, 4, 16, 11
    q, k, w, _, _ = _indexer_inputs(g, Tq, Tk, Hi, D, torch.float32, triton_device)
    idx = opbridge.indexer_topk(q, k, w, top_k)
    ref = _ref(opbridge.indexer_logits, _f64(q), _f64(k), _f64(w))
    _check_topk(idx, ref, top_k)
    for t in range(Tq):
        cand = torch.isfinite(ref[t])
        n = min(top_k, int(cand.sum()))
        best = set(ref[t].topk(n).indices.tolist())
        assert set(i for i in idx[t].tolist() if i >= 0) == best


def test_indexer_topk_ties(triton_device):
    """All-equal scores (zero weights): exactly min(top_k, candidates) distinct positions, -1 after."""
    Tq, Tk, top_k = 4, 40, 8
    q = torch.randn(Tq, 4, 16).half().to(triton_device)
    k = torch.randn(Tk, 16).half().to(triton_device)
    w = torch.zeros(Tq, 4, device=triton_device)
    idx = opbridge.indexer_topk(q, k, w, top_k).cpu()
    for t in range(Tq):
        p = Tk - Tq + t  # causal: keys 0..p
        row = idx[t].tolist()
        n = min(top_k, p + 1)
        assert len(set(row[:n])) == n and all(0 <= i <= p for i in row[:n]) and row[n:] == [-1] * (top_k - n)


@pytest.mark.parametrize("dtype", [torch.float16, FP8])
def test_indexer_topk_paged(triton_device, dtype):
    g = _g(8)
    B, Sq, Hi, D, bs, nblk, maxb, top_k = 2, 2, 4, 32, 4, 9, 4, 5
    q, kf, w, qs, ks = _indexer_inputs(g, B * Sq, nblk * bs, Hi, D, dtype, triton_device)
    q, w = q.view(B, Sq, Hi, D), w.view(B, Sq, Hi)
    qs = None if qs is None else qs.view(B, Sq, Hi)
    cache = kf.view(nblk, bs, D)
    ks = None if ks is None else ks.view(nblk, bs)
    table = torch.randperm(nblk, generator=g)[:B * maxb].view(B, maxb).to(I32).to(triton_device)
    ctx = torch.tensor([13, 3], dtype=I32, device=triton_device)
    idx = opbridge.indexer_topk_paged(q, cache, table, ctx, w, top_k, q_scale=qs, k_scale=ks)
    assert idx.shape == (B, Sq, top_k)
    flat = cache.cpu().to(F64) * (1 if ks is None else ks.cpu().to(F64).unsqueeze(-1))
    for b in range(B):
        L = int(ctx[b])
        rows = table.cpu()[b].long()[torch.arange(L) // bs] * bs + torch.arange(L) % bs
        kb = flat.reshape(-1, D)[rows]
        qb = q.cpu()[b].to(F64) * (1 if qs is None else qs.cpu()[b].to(F64).unsqueeze(-1))
        sc = (torch.einsum("thd,sd->ths", qb, kb).relu() * w.cpu()[b].to(F64).unsqueeze(-1)).sum(1)
        pos = torch.arange(Sq) + L - Sq
        sc = sc.masked_fill(torch.arange(L)[None, :] > pos[:, None], NEG_INF)
        _check_topk(idx[b], sc, top_k)


# ---- kv_compress ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rate,overlap,prev,dtype", [(8, False, False, torch.float16), (4, True, False, torch.float32),
                                                     (4, True, True, torch.bfloat16), (3, True, False, torch.float16)])
def test_kv_compress(triton_device, rate, overlap, prev, dtype):
    g = _g(9)
    D = 24
    Dc = 2 * D if overlap else D
    T = 5 * rate + rate // 2  # an incomplete last window is dropped
    kv = _randn(g, T, Dc, dtype=dtype, device=triton_device)
    gate = _randn(g, T, Dc, dtype=dtype, device=triton_device, scale=2.0)
    bias = _randn(g, rate, Dc, dtype=dtype, device=triton_device)
    pk = _randn(g, rate, Dc, dtype=dtype, device=triton_device) if prev else None
    pg = _randn(g, rate, Dc, dtype=dtype, device=triton_device) if prev else None
    out = opbridge.kv_compress(kv, gate, bias, rate, overlap=overlap, prev_kv=pk, prev_gate=pg)
    ref = _ref(opbridge.kv_compress, _f64(kv), _f64(gate), _f64(bias), rate, overlap=overlap, prev_kv=_f64(pk),
               prev_gate=_f64(pg))
    assert out.shape == (5, D) and out.dtype == dtype
    assert diff(out.cpu(), ref) < 1e-5


def test_kv_compress_backward_is_the_recompute(triton_device):
    g = _g(10)
    kv = _randn(g, 8, 12, dtype=torch.float32, device=triton_device).requires_grad_(True)
    gate = _randn(g, 8, 12, dtype=torch.float32, device=triton_device).requires_grad_(True)
    bias = _randn(g, 4, 12, dtype=torch.float32, device=triton_device).requires_grad_(True)
    out = opbridge.kv_compress(kv, gate, bias, 4, overlap=True)
    gk, gg, gb = torch.autograd.grad(out.square().sum(), (kv, gate, bias))
    r = [t.detach().cpu().double().requires_grad_(True) for t in (kv, gate, bias)]
    with opbridge.use_backend("reference"):
        ro = opbridge.kv_compress(*r, 4, overlap=True)
        rg = torch.autograd.grad(ro.square().sum(), r)
    for a, b in zip((gk, gg, gb), rg):
        assert torch.allclose(a.cpu().double(), b, atol=1e-5)
