"""Reference sparse-attention ops (OPS.md section 3) against the naive loops of ``naive.py``."""
from __future__ import annotations

import math

import pytest
import torch

import opbridge

from . import naive
from .conftest import F64, _gen, _randn

I32 = torch.int32
NEG_INF = float("-inf")


def _cu(lengths) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=I32)


# ---- indexer -----------------------------------------------------------------------------------

def _check_topk(idx: torch.Tensor, scores: torch.Tensor, top_k: int, *, tol: float = 1e-10,
                exact_set: bool = True) -> None:
    """idx ``[Tq, top_k]`` against naive scores ``[Tq, W]`` (-inf = not a candidate).

    Valid ids first, then -1 padding; ids unique candidates; as many as min(top_k, #candidates);
    the selected set is a best set: equal to the naive best scores up to ties (``exact_set``) or,
    for low-precision inputs, within OPS.md's indexer threshold.
    """
    assert idx.dtype == I32 and idx.shape == (scores.shape[0], top_k)
    for t in range(scores.shape[0]):
        row = idx[t].tolist()
        valid = [i for i in row if i != -1]
        assert row == valid + [-1] * (top_k - len(valid)), (t, row)  # padding at the end
        assert len(set(valid)) == len(valid), (t, row)
        cand = [s for s in range(scores.shape[1]) if scores[t, s] != NEG_INF]
        assert len(valid) == min(top_k, len(cand)), (t, row, len(cand))
        assert all(scores[t, i] != NEG_INF for i in valid), (t, row)
        if not valid:
            continue
        chosen = sorted((float(scores[t, i]) for i in valid), reverse=True)
        best = sorted((float(scores[t, s]) for s in cand), reverse=True)
        if exact_set:
            # Same multiset of scores as the naive best set: a different id only where scores tie.
            assert chosen == pytest.approx(best[:len(valid)], abs=tol), t
        else:
            unchosen = [float(scores[t, s]) for s in cand if s not in valid]
            span = max(abs(v) for v in best)
            if unchosen:
                assert min(chosen) >= max(unchosen) - 1e-3 * span, t


def _assert_logits_close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-10) -> None:
    assert got.shape == want.shape
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got.to(F64)[fin], want[fin], rtol=tol, atol=tol)


def _indexer_inputs(g, lq, lk, Hi=3, D=8, dtype=F64):
    q = _randn(g, sum(lq), Hi, D, dtype=dtype)
    k = _randn(g, sum(lk), D, dtype=dtype)
    w = _randn(g, sum(lq), Hi)  # weights may be negative
    return q, k, w


def test_indexer_single_sequence_causal():
    g = _gen(50)
    q, k, w = _indexer_inputs(g, [6], [11])
    logits = opbridge.indexer_logits(q, k, w)
    want = naive.indexer_logits(q, k, w)
    _assert_logits_close(logits, want)
    # Default positions Lk - Lq + i = 5..10: query i sees keys 0..5+i.
    assert [int(torch.isfinite(want[i]).sum()) for i in range(6)] == [6, 7, 8, 9, 10, 11]
    for top_k in (4, 11, 16):  # 16 > every row's candidate count: -1 padding
        _check_topk(opbridge.indexer_topk(q, k, w, top_k), want, top_k)


def test_indexer_varlen_short_sequences_and_non_causal():
    g = _gen(51)
    lq, lk = [3, 0, 5, 2], [4, 3, 20, 2]  # an empty query sequence, sequences shorter than top_k
    q, k, w = _indexer_inputs(g, lq, lk)
    cu_q, cu_k = _cu(lq), _cu(lk)
    for causal in (True, False):
        kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal)
        want = naive.indexer_logits(q, k, w, **kw)
        assert want.shape == (10, 20)
        _assert_logits_close(opbridge.indexer_logits(q, k, w, **kw), want)
        _check_topk(opbridge.indexer_topk(q, k, w, 6, **kw), want, 6)


@pytest.mark.parametrize("rate", [1, 4])
def test_indexer_causal_boundary_with_compress_rate(rate):
    g = _gen(52)
    lq, lk = [9, 4], [7, 12]  # lk: compressed entries for rate 4
    q, k, w = _indexer_inputs(g, lq, lk)
    cu_q, cu_k = _cu(lq), _cu(lk)
    # Positions around the window boundaries, including ones with no candidate at all ((p+1)//4 == 0).
    pos = torch.tensor([0, 1, 2, 3, 4, 7, 8, 27, 30, 0, 11, 46, 47], dtype=I32)
    if rate == 1:  # keep s < Lk meaningful: positions inside each sequence
        pos = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6, 6, 0, 3, 10, 11], dtype=I32)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, compress_rate=rate, q_positions=pos)
    want = naive.indexer_logits(q, k, w, **kw)
    for t, p in enumerate(pos.tolist()):
        Lk = 7 if t < 9 else 12
        assert int(torch.isfinite(want[t]).sum()) == min(Lk, (p + 1) // rate)  # s < (p+1)//rate and s < Lk
    _assert_logits_close(opbridge.indexer_logits(q, k, w, **kw), want)
    idx = opbridge.indexer_topk(q, k, w, 5, **kw)
    _check_topk(idx, want, 5)
    if rate == 4:
        assert idx[0].tolist() == [-1] * 5 and idx[2].tolist() == [-1] * 5  # p=0, p=2: nothing yet
        assert sorted(idx[3].tolist()) == [-1, -1, -1, -1, 0]  # p=3: entry 0 complete


def test_indexer_fp8_with_scales():
    g = _gen(53)
    lq, lk = [4, 3], [9, 6]
    q, k, w = _indexer_inputs(g, lq, lk, Hi=2, D=16)
    q8, k8 = q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn)
    q_scale = torch.rand(7, 2, generator=g) + 0.5
    k_scale = torch.rand(15, generator=g) + 0.5
    kw = dict(cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), q_scale=q_scale, k_scale=k_scale)
    want = naive.indexer_logits(q8, k8, w, **kw)
    _assert_logits_close(opbridge.indexer_logits(q8, k8, w, **kw), want)
    _check_topk(opbridge.indexer_topk(q8, k8, w, 5, **kw), want, 5)
    # The scales matter: without them the scores differ.
    plain = naive.indexer_logits(q8, k8, w, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk))
    assert (plain[torch.isfinite(plain)] - want[torch.isfinite(want)]).abs().max() > 1e-3


def test_indexer_bf16_within_ops_threshold():
    g = _gen(54)
    lq, lk = [8, 5], [30, 17]
    q, k, w = _indexer_inputs(g, lq, lk, Hi=4, D=32, dtype=torch.bfloat16)
    kw = dict(cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk))
    want = naive.indexer_logits(q, k, w.float(), **kw)
    got = opbridge.indexer_logits(q, k, w.float(), **kw)
    assert got.dtype == torch.float32
    _assert_logits_close(got, want, tol=1e-4)
    _check_topk(opbridge.indexer_topk(q, k, w.float(), 8, **kw), want, 8, exact_set=False)


def _paged(g, keys_per_seq, block_size, num_blocks, max_blocks):
    """Scatter each sequence's keys into a cache through a shuffled block table."""
    D = keys_per_seq[0].shape[-1]
    cache = torch.randn(num_blocks, block_size, D, generator=g, dtype=F64)  # junk where unused
    perm = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.empty(len(keys_per_seq), max_blocks, dtype=I32)
    for b, keys in enumerate(keys_per_seq):
        for j in range(max_blocks):
            table[b, j] = perm[b * max_blocks + j]
        for p in range(keys.shape[0]):
            cache[table[b, p // block_size], p % block_size] = keys[p]
    return cache, table


@pytest.mark.parametrize("rate", [1, 4])
def test_indexer_topk_paged_shuffled_block_table(rate):
    g = _gen(55)
    B, Sq, Hi, D, bs, max_blocks = 4, 2, 2, 8, 4, 4
    lens = [13, 0, 3, 16]  # an empty context (all -1) and one shorter than top_k (-1 padding)
    keys = [_randn(g, L, D) for L in lens]
    cache, table = _paged(g, keys, bs, B * max_blocks + 2, max_blocks)
    q = _randn(g, B, Sq, Hi, D)
    w = _randn(g, B, Sq, Hi)
    ctx = torch.tensor(lens, dtype=I32)
    kw = {}
    if rate == 1:
        pos = torch.tensor([[L - Sq + i for i in range(Sq)] for L in lens], dtype=I32)
    else:
        pos = torch.tensor([[50, 53], [-1, 1], [3, 14], [40, 63]], dtype=I32)
        kw = dict(compress_rate=rate, q_positions=pos)
    top_k = 6
    idx = opbridge.indexer_topk_paged(q, cache, table, ctx, w, top_k, **kw)
    assert idx.shape == (B, Sq, top_k)
    want = naive.indexer_logits(q.flatten(0, 1), torch.cat(keys), w.flatten(0, 1), cu_seqlens_q=_cu([Sq] * B),
                                cu_seqlens_k=_cu(lens), compress_rate=rate, q_positions=pos.flatten())
    _check_topk(idx.flatten(0, 1), want, top_k)


def test_indexer_topk_paged_fp8():
    g = _gen(56)
    B, Sq, Hi, D, bs, max_blocks = 2, 3, 2, 16, 4, 3
    lens = [10, 7]
    keys = [_randn(g, L, D) for L in lens]
    cache, table = _paged(g, keys, bs, 8, max_blocks)
    k_scale = torch.rand(8, bs, generator=g) + 0.5
    q8 = _randn(g, B, Sq, Hi, D).to(torch.float8_e4m3fn)
    q_scale = torch.rand(B, Sq, Hi, generator=g) + 0.5
    w = _randn(g, B, Sq, Hi)
    c8 = cache.to(torch.float8_e4m3fn)
    idx = opbridge.indexer_topk_paged(q8, c8, table, torch.tensor(lens, dtype=I32), w, 4, q_scale=q_scale,
                                      k_scale=k_scale)
    # The logical keys (and their scales) gathered by hand through the table.
    rows = [(int(table[b, p // bs]), p % bs) for b, L in enumerate(lens) for p in range(L)]
    dense_k = torch.stack([c8[blk, s] for blk, s in rows])
    dense_scale = torch.tensor([float(k_scale[blk, s]) for blk, s in rows])
    want = naive.indexer_logits(q8.flatten(0, 1), dense_k, w.flatten(0, 1), cu_seqlens_q=_cu([Sq] * B),
                                cu_seqlens_k=_cu(lens), q_scale=q_scale.flatten(0, 1), k_scale=dense_scale)
    _check_topk(idx.flatten(0, 1), want, 4)


# ---- kv_compress -------------------------------------------------------------------------------

@pytest.mark.parametrize("rate,Tk", [(4, 15), (4, 12), (8, 8), (128, 261)])
def test_kv_compress_without_overlap(rate, Tk):
    g = _gen(60)
    D = 5 if rate < 128 else 2
    kv, gate, pb = _randn(g, Tk, D), _randn(g, Tk, D, scale=2.0), _randn(g, rate, D)
    out = opbridge.kv_compress(kv, gate, pb, rate)
    assert out.shape == (Tk // rate, D)  # the incomplete last window is dropped
    torch.testing.assert_close(out, naive.kv_compress(kv, gate, pb, rate), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("with_prev", [False, True])
@pytest.mark.parametrize("Tk", [13, 4, 16])
def test_kv_compress_with_overlap(with_prev, Tk):
    g = _gen(61)
    rate, D = 4, 3
    kv, gate, pb = _randn(g, Tk, 2 * D), _randn(g, Tk, 2 * D, scale=2.0), _randn(g, rate, 2 * D)
    kw = dict(overlap=True)
    if with_prev:
        kw.update(prev_kv=_randn(g, rate, 2 * D), prev_gate=_randn(g, rate, 2 * D))
    out = opbridge.kv_compress(kv, gate, pb, rate, **kw)
    assert out.shape == (Tk // rate, D)
    torch.testing.assert_close(out, naive.kv_compress(kv, gate, pb, rate, **kw), rtol=1e-10, atol=1e-12)


def test_kv_compress_overlap_prev_changes_only_first_entry():
    g = _gen(62)
    rate, D, Tk = 4, 3, 12
    kv, gate, pb = _randn(g, Tk, 2 * D), _randn(g, Tk, 2 * D), _randn(g, rate, 2 * D)
    a = opbridge.kv_compress(kv, gate, pb, rate, overlap=True)
    b = opbridge.kv_compress(kv, gate, pb, rate, overlap=True, prev_kv=_randn(g, rate, 2 * D),
                             prev_gate=_randn(g, rate, 2 * D))
    assert (a[0] - b[0]).abs().max() > 1e-3
    torch.testing.assert_close(a[1:], b[1:], rtol=0, atol=0)


def test_kv_compress_shorter_than_one_window():
    g = _gen(63)
    for overlap in (False, True):
        kv, gate, pb = _randn(g, 3, 4), _randn(g, 3, 4), _randn(g, 4, 4)
        out = opbridge.kv_compress(kv, gate, pb, 4, overlap=overlap)
        assert out.shape == (0, 2 if overlap else 4)


def test_kv_compress_bf16_within_ops_threshold():
    g = _gen(64)
    rate, D, Tk = 4, 16, 37
    kv, gate, pb = (_randn(g, Tk, 2 * D, dtype=torch.bfloat16), _randn(g, Tk, 2 * D, dtype=torch.bfloat16),
                    _randn(g, rate, 2 * D, dtype=torch.float32))
    prev_kv, prev_gate = _randn(g, rate, 2 * D, dtype=torch.bfloat16), _randn(g, rate, 2 * D, dtype=torch.float32)
    out = opbridge.kv_compress(kv, gate, pb, rate, overlap=True, prev_kv=prev_kv, prev_gate=prev_gate)
    assert out.dtype == torch.bfloat16
    want = naive.kv_compress(kv, gate, pb, rate, overlap=True, prev_kv=prev_kv, prev_gate=prev_gate)
    assert naive.diff(out, want) < 1e-5


# ---- sparse_attention --------------------------------------------------------------------------

def _indices(g, rows_lk, top_k, p_missing=0.25):
    """Unique random positions per row (< that row's Lk), some replaced by -1 anywhere in the row."""
    out = torch.full((len(rows_lk), top_k), -1, dtype=I32)
    for t, Lk in enumerate(rows_lk):
        n = min(top_k, Lk)
        sel = torch.randperm(Lk, generator=g)[:n]
        drop = torch.rand(n, generator=g) < p_missing
        sel = torch.where(drop, -1, sel)
        slots = torch.randperm(top_k, generator=g)[:n]
        out[t, slots] = sel.to(I32)
    return out


def _assert_attention(out, lse, want_out, want_lse, tol=1e-10):
    torch.testing.assert_close(out.to(F64), want_out, rtol=tol, atol=tol)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(lse.to(F64)[fin], want_lse[fin], rtol=tol, atol=tol)


def test_sparse_attention_single_sequence_fp64():
    g = _gen(70)
    Tq, Hq, Dqk, d_v, Tk, top_k = 6, 3, 16, 12, 20, 8
    q, kv = _randn(g, Tq, Hq, Dqk), _randn(g, Tk, Dqk)
    idx = _indices(g, [Tk] * Tq, top_k)
    idx[2] = -1  # a row with no valid index
    out, lse = opbridge.sparse_attention(q, kv, idx, scale=0.3, d_v=d_v, return_lse=True)
    assert out.shape == (Tq, Hq, d_v) and lse.shape == (Tq, Hq)
    want_out, want_lse = naive.sparse_attention(q, kv, idx, scale=0.3, d_v=d_v)
    _assert_attention(out, lse, want_out, want_lse)
    assert bool((out[2] == 0).all()) and bool((lse[2] == NEG_INF).all())
    # return_lse=False gives the same output alone.
    torch.testing.assert_close(opbridge.sparse_attention(q, kv, idx, scale=0.3, d_v=d_v), out, rtol=0, atol=0)
    # A second key set joined into the same softmax, without varlen (d_v defaults to Dqk).
    ekv = _randn(g, 7, Dqk)
    eidx = _indices(g, [7] * Tq, 4)
    kw = dict(scale=0.3, extra_kv=ekv, extra_indices=eidx)
    out, lse = opbridge.sparse_attention(q, kv, idx, return_lse=True, **kw)
    assert out.shape == (Tq, Hq, Dqk)
    _assert_attention(out, lse, *naive.sparse_attention(q, kv, idx, **kw))


def test_sparse_attention_varlen_extra_kv_and_sink():
    g = _gen(71)
    Hq, Dqk, d_v = 2, 16, 16
    lq, lk, lk2 = [3, 4, 2], [9, 5, 12], [4, 6, 3]
    Tq = sum(lq)
    q, kv, ekv = _randn(g, Tq, Hq, Dqk), _randn(g, sum(lk), Dqk), _randn(g, sum(lk2), Dqk)
    rows_lk = [L for L, n in zip(lk, lq) for _ in range(n)]
    rows_lk2 = [L for L, n in zip(lk2, lq) for _ in range(n)]
    idx, eidx = _indices(g, rows_lk, 5), _indices(g, rows_lk2, 3)
    idx[0], eidx[0] = -1, -1  # nothing at all
    idx[4] = -1  # only extra keys
    eidx[5] = -1  # only main keys
    sink = torch.randn(Hq, generator=g)
    kw = dict(scale=0.25, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), extra_kv=ekv, extra_indices=eidx,
              extra_cu_seqlens_k=_cu(lk2))
    want_out, want_lse = naive.sparse_attention(q, kv, idx, sink=sink, **kw)
    out, lse = opbridge.sparse_attention(q, kv, idx, sink=sink, return_lse=True, **kw)
    _assert_attention(out, lse, want_out, want_lse)
    assert bool((out[0] == 0).all()) and bool((lse[0] == NEG_INF).all())
    # The sink only rescales: lse is the same without it, out differs.
    out_ns, lse_ns = opbridge.sparse_attention(q, kv, idx, return_lse=True, **kw)
    _assert_attention(out_ns, lse_ns, *naive.sparse_attention(q, kv, idx, **kw))
    torch.testing.assert_close(lse_ns, lse, rtol=0, atol=0)
    assert (out_ns - out).abs().max() > 1e-3


def test_sparse_attention_sequences_without_keys():
    # The last sequence has no keys (its base offset is Tk) and the extra set has none at all
    # (every sequence shorter than a compression window): out 0 / lse -inf there, no out-of-bounds read.
    g = _gen(74)
    lq, lk = [2, 2], [5, 0]
    q, kv = _randn(g, 4, 2, 8), _randn(g, 5, 8)
    idx = torch.tensor([[0, 3], [-1, 4], [-1, -1], [-1, -1]], dtype=I32)
    kw = dict(scale=0.5, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk))
    out, lse = opbridge.sparse_attention(q, kv, idx, return_lse=True, **kw)
    _assert_attention(out, lse, *naive.sparse_attention(q, kv, idx, **kw))
    assert bool((out[2:] == 0).all()) and bool((lse[2:] == NEG_INF).all())
    kw.update(extra_kv=kv.new_zeros((0, 8)), extra_indices=torch.full((4, 2), -1, dtype=I32),
              extra_cu_seqlens_k=_cu([0, 0]))
    out2, lse2 = opbridge.sparse_attention(q, kv, idx, return_lse=True, **kw)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    torch.testing.assert_close(lse2, lse, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_attention_half_within_ops_thresholds(dtype):
    g = _gen(72)
    Hq, Dqk, d_v, top_k = 4, 64, 48, 16
    lq, lk = [5, 3], [40, 24]
    q, kv = _randn(g, sum(lq), Hq, Dqk, dtype=dtype), _randn(g, sum(lk), Dqk, dtype=dtype)
    idx = _indices(g, [L for L, n in zip(lk, lq) for _ in range(n)], top_k, p_missing=0.1)
    sink = torch.randn(Hq, generator=g)
    kw = dict(scale=1 / math.sqrt(Dqk), d_v=d_v, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), sink=sink)
    out, lse = opbridge.sparse_attention(q, kv, idx, return_lse=True, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32
    want_out, want_lse = naive.sparse_attention(q, kv, idx, **kw)
    assert naive.diff(out, want_out) < 7e-6
    err = (out.to(F64) - want_out).abs()
    assert bool(((err < 8e-4) | (err < 3 / 128 * want_out.abs())).all())
    lerr = (lse.to(F64) - want_lse).abs()
    assert bool(((lerr < 1e-5) | (lerr < 2 / 65536 * want_lse.abs())).all())


def test_window_indices_matches_naive():
    lq, lk = [3, 1, 5, 2], [3, 7, 5, 10]
    cu_q, cu_k = _cu(lq), _cu(lk)
    for window in (1, 4, 12):
        got = opbridge.window_indices(cu_q, cu_k, window)
        assert got.dtype == I32 and got.shape == (sum(lq), window)
        assert got.tolist() == naive.window_indices(cu_q, cu_k, window)
    # Sliding-window attention through sparse_attention = dense causal window attention by hand.
    g = _gen(73)
    q, kv = _randn(g, sum(lq), 2, 8), _randn(g, sum(lk), 8)
    idx = opbridge.window_indices(cu_q, cu_k, 3)
    out = opbridge.sparse_attention(q, kv, idx, scale=0.5, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for b in range(len(lq)):
        for i in range(lq[b]):
            t, p = bq[b] + i, lk[b] - lq[b] + i
            keys = [kv[bk[b] + s] for s in range(max(0, p - 2), p + 1)]
            for h in range(2):
                want, _ = naive.attend(q[t, h], keys, 0.5, 8, None)
                torch.testing.assert_close(out[t, h], want, rtol=1e-10, atol=1e-10)


# ---- sparse_attention_paged --------------------------------------------------------------------

def test_sparse_attention_paged_equals_dense():
    g = _gen(80)
    B, Sq, Hq, Dqk, d_v, bs, max_blocks = 3, 2, 2, 16, 8, 4, 4
    lens, lens2 = [13, 5, 16], [6, 2, 7]
    keys = [_randn(g, L, Dqk) for L in lens]
    keys2 = [_randn(g, L, Dqk) for L in lens2]
    cache, table = _paged(g, keys, bs, B * max_blocks + 3, max_blocks)
    cache2, table2 = _paged(g, keys2, bs, B * 2, 2)
    q = _randn(g, B, Sq, Hq, Dqk)
    idx = _indices(g, [L for L in lens for _ in range(Sq)], 6).view(B, Sq, 6)
    eidx = _indices(g, [L for L in lens2 for _ in range(Sq)], 3).view(B, Sq, 3)
    idx[1, 0] = -1
    eidx[1, 0] = -1  # a query with nothing to attend to
    sink = torch.randn(Hq, generator=g)
    out, lse = opbridge.sparse_attention_paged(q, cache, table, idx, scale=0.3, d_v=d_v, sink=sink,
                                               extra_kv_cache=cache2, extra_block_table=table2,
                                               extra_indices=eidx, return_lse=True)
    assert out.shape == (B, Sq, Hq, d_v) and lse.shape == (B, Sq, Hq)
    dense = dict(scale=0.3, d_v=d_v, cu_seqlens_q=_cu([Sq] * B), cu_seqlens_k=_cu(lens), sink=sink,
                 extra_kv=torch.cat(keys2), extra_indices=eidx.flatten(0, 1), extra_cu_seqlens_k=_cu(lens2))
    want_out, want_lse = naive.sparse_attention(q.flatten(0, 1), torch.cat(keys), idx.flatten(0, 1), **dense)
    _assert_attention(out.flatten(0, 1), lse.flatten(0, 1), want_out, want_lse)
    d_out, d_lse = opbridge.sparse_attention(q.flatten(0, 1), torch.cat(keys), idx.flatten(0, 1), return_lse=True,
                                             **dense)
    torch.testing.assert_close(out.flatten(0, 1), d_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.flatten(0, 1), d_lse, rtol=1e-12, atol=1e-12)
    assert bool((out[1, 0] == 0).all()) and bool((lse[1, 0] == NEG_INF).all())


def test_sparse_attention_paged_without_extra_bf16():
    g = _gen(81)
    B, Sq, Hq, Dqk, bs, max_blocks = 2, 1, 4, 32, 8, 3
    lens = [20, 9]
    keys = [_randn(g, L, Dqk, dtype=torch.bfloat16) for L in lens]
    cache, table = _paged(g, [k.to(F64) for k in keys], bs, 7, max_blocks)
    cache = cache.to(torch.bfloat16)
    q = _randn(g, B, Sq, Hq, Dqk, dtype=torch.bfloat16)
    idx = _indices(g, [L for L in lens for _ in range(Sq)], 8, p_missing=0.1).view(B, Sq, 8)
    out, lse = opbridge.sparse_attention_paged(q, cache, table, idx, scale=0.2, return_lse=True)
    want_out, want_lse = naive.sparse_attention(q.flatten(0, 1), torch.cat(keys), idx.flatten(0, 1), scale=0.2,
                                                cu_seqlens_q=_cu([Sq] * B), cu_seqlens_k=_cu(lens))
    assert naive.diff(out.flatten(0, 1), want_out) < 7e-6
    lerr = (lse.flatten(0, 1).to(F64) - want_lse).abs()
    assert bool(((lerr < 1e-5) | (lerr < 2 / 65536 * want_lse.abs())).all())
