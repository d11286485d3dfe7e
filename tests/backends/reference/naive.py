"""Deliberately naive oracles for the reference backend, written straight from OPS.md.

Everything here is float64 and loops in Python over tokens, experts, heads, sequences and
windows, so it shares no code (and no vectorisation tricks) with opbridge/backends/reference.
Only single dot products use torch, on float64 vectors. Quantized values are decoded by hand
from the layouts of OPS.md section 1 (nothing from opbridge.core.formats).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

F64 = torch.float64
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# ---- metrics of OPS.md section 5 ---------------------------------------------------------------

def diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - 2*sum(x*y) / sum(x*x + y*y)`` in float64."""
    x, y = x.to(F64), y.to(F64)
    den = float((x * x + y * y).sum())
    return 0.0 if den == 0.0 else 1.0 - 2.0 * float((x * y).sum()) / den


def f64(x):
    """A float64 copy of a tensor, or the hand-decoded values of a QuantTensor."""
    if hasattr(x, "fmt"):
        return dequant(x)
    return x.detach().to(F64)


# ---- formats (OPS.md section 1) ----------------------------------------------------------------

def e2m1_nearest_code(v: float) -> int:
    """Nearest e2m1 code of ``v`` (sign in bit 3), ties to the even code, clamped at 6."""
    mag = abs(v)
    best = None
    for code, val in enumerate(E2M1):
        d = abs(mag - val)
        if best is None or d < best[0] or (d == best[0] and code % 2 == 0):
            best = (d, code)
    return best[1] | (8 if v < 0 else 0)


def e2m1_value(code: int) -> float:
    return (-1.0 if code & 8 else 1.0) * E2M1[code & 7]


def _f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


def dequant(q) -> torch.Tensor:
    """The values of a QuantTensor (as float64), decoded element by element from its raw layout.

    OPS.md: ``dequantize(q) -> float32``, value = ``fp8 * s``; the exact product is rounded once
    to float32 (mxfp4 values and ue8m0 scales are powers of two, so there it is exact).
    """
    if q.fmt == "mxfp4":
        data = q.data.reshape(-1, q.data.shape[-1]).tolist()
        scale = q.scale.reshape(-1, q.scale.shape[-1]).tolist()
        rows = []
        for drow, srow in zip(data, scale):
            vals = []
            for i in range(2 * len(drow)):
                byte = drow[i // 2]
                code = byte & 0xF if i % 2 == 0 else byte >> 4  # even element in the low nibble
                vals.append(e2m1_value(code) * 2.0 ** (srow[i // 32] - 127))
            rows.append(vals)
        return torch.tensor(rows, dtype=F64).reshape(q.shape)
    d = q.data.to(F64)
    out = torch.empty_like(d)
    if tuple(q.block) == (1, 128):
        d2, o2, s2 = d.reshape(-1, d.shape[-1]), out.view(-1, d.shape[-1]), q.scale.reshape(-1, q.scale.shape[-1])
        for r in range(d2.shape[0]):
            for c in range(d2.shape[1]):
                o2[r, c] = _f32(float(d2[r, c]) * float(s2[r, c // 128]))
        return out
    d3 = d if d.dim() == 3 else d.unsqueeze(0)
    s3 = q.scale if q.scale.dim() == 3 else q.scale.unsqueeze(0)
    o3 = out if out.dim() == 3 else out.unsqueeze(0)
    for e in range(d3.shape[0]):
        for bn in range(s3.shape[1]):
            for bk in range(s3.shape[2]):
                blk = d3[e, bn * 128:(bn + 1) * 128, bk * 128:(bk + 1) * 128]
                # exact product in float64 (4 + 24 significant bits), then one rounding to float32
                o3[e, bn * 128:(bn + 1) * 128, bk * 128:(bk + 1) * 128] = \
                    (blk * float(s3[e, bn, bk])).to(torch.float32).to(F64)
    return out


# ---- MoE (OPS.md section 2) --------------------------------------------------------------------

def score_row(logits: list[float], scoring: str) -> list[float]:
    if scoring == "softmax":
        m = max(logits)
        ex = [math.exp(v - m) for v in logits]
        tot = sum(ex)
        return [v / tot for v in ex]
    if scoring == "sigmoid":
        return [1.0 / (1.0 + math.exp(-v)) for v in logits]
    assert scoring == "sqrtsoftplus"
    return [math.sqrt(math.log1p(math.exp(v)) if v < 30 else v + math.log1p(math.exp(-v))) for v in logits]


def _finish(w: list[float], renormalize: bool, scaling_factor: float) -> list[float]:
    if renormalize:
        tot = sum(w) + 1e-20
        w = [v / tot for v in w]
    return [v * scaling_factor for v in w]


def moe_route(logits, top_k, *, scoring="softmax", correction_bias=None, num_groups=1, topk_groups=1,
              renormalize=False, scaling_factor=1.0):
    """Returns (weights [T][k] floats, ids [T][k] ints, q [T][E] selection scores)."""
    T, E = logits.shape
    bias = [0.0] * E if correction_bias is None else f64(correction_bias).tolist()
    gsize = E // num_groups
    all_w, all_ids, all_q = [], [], []
    for t in range(T):
        s = score_row(f64(logits[t]).tolist(), scoring)
        q = [s[e] + bias[e] for e in range(E)]
        allowed = set(range(E))
        if num_groups > 1:
            gscore = []
            for g in range(num_groups):
                members = sorted((q[e] for e in range(g * gsize, (g + 1) * gsize)), reverse=True)
                gscore.append(sum(members[:2]))
            best_groups = sorted(range(num_groups), key=lambda g: (-gscore[g], g))[:topk_groups]
            allowed = {e for g in best_groups for e in range(g * gsize, (g + 1) * gsize)}
        ids = sorted(allowed, key=lambda e: (-q[e], e))[:top_k]  # descending q, ties to the lower id
        all_ids.append(ids)
        all_w.append(_finish([s[e] for e in ids], renormalize, scaling_factor))
        all_q.append(q)
    return all_w, all_ids, all_q


def moe_route_hash(logits, token_ids, tid2eid, *, scoring="sqrtsoftplus", renormalize=True, scaling_factor=1.0):
    all_w, all_ids = [], []
    table = tid2eid.tolist()
    for t, tok in enumerate(token_ids.tolist()):
        s = score_row(f64(logits[t]).tolist(), scoring)
        ids = table[tok]
        all_ids.append(ids)
        all_w.append(_finish([s[e] for e in ids], renormalize, scaling_factor))
    return all_w, all_ids


def grouped_gemm(a, b, offsets) -> torch.Tensor:
    a, b = f64(a), f64(b)
    off = offsets.tolist()
    out = torch.zeros(a.shape[0], b.shape[1], dtype=F64)
    for e in range(b.shape[0]):
        for r in range(off[e], off[e + 1]):
            for n in range(b.shape[1]):
                out[r, n] = torch.dot(a[r], b[e, n])
    return out


def grouped_gemm_masked(a, b, masked_m) -> torch.Tensor:
    a, b = f64(a), f64(b)
    out = torch.zeros(a.shape[0], a.shape[1], b.shape[1], dtype=F64)
    for e, m in enumerate(masked_m.tolist()):
        for r in range(m):
            for n in range(b.shape[1]):
                out[e, r, n] = torch.dot(a[e, r], b[e, n])
    return out


def silu(v: float) -> float:
    return v / (1.0 + math.exp(-v))


def moe(x, topk_weights, topk_ids, w13, w2, *, swiglu_limit=None, gate_clamp_both_sides=False) -> torch.Tensor:
    """``gate_clamp_both_sides`` is a deliberately wrong variant, to prove the tests can see the difference."""
    x, w13, w2 = f64(x), f64(w13), f64(w2)
    tw, ids = topk_weights.tolist(), topk_ids.tolist()
    T, H = x.shape
    I = w13.shape[1] // 2
    out = torch.zeros(T, H, dtype=F64)
    for t in range(T):
        for slot, e in enumerate(ids[t]):
            if e == -1:
                continue
            h = [float(torch.dot(w13[e, r], x[t])) for r in range(2 * I)]
            act = []
            for i in range(I):
                g, u = h[i], h[I + i]
                if swiglu_limit is not None:
                    c = swiglu_limit
                    g = min(g, c) if not gate_clamp_both_sides else max(-c, min(g, c))
                    u = max(-c, min(u, c))
                act.append(silu(g) * u)
            act_t = torch.tensor(act, dtype=F64)
            for hh in range(H):
                out[t, hh] += tw[t][slot] * float(torch.dot(w2[e, hh], act_t))
    return out


def moe_permute(x, topk_ids, num_experts):
    """(x_sorted, offsets list, src_index list): by expert, then by (token, slot)."""
    ids = topk_ids.tolist()
    k = topk_ids.shape[1]
    src, offsets = [], [0]
    for e in range(num_experts):
        for t in range(len(ids)):
            for slot in range(k):
                if ids[t][slot] == e:
                    src.append(t * k + slot)
        offsets.append(len(src))
    rows = [x[m // k] for m in src]
    x_sorted = torch.stack(rows) if rows else x.new_zeros((0, x.shape[1]))
    return x_sorted, offsets, src


def moe_combine(y_sorted, src_index, topk_weights, num_tokens) -> torch.Tensor:
    y = f64(y_sorted)
    k = topk_weights.shape[1]
    w = topk_weights.tolist()
    out = torch.zeros(num_tokens, y.shape[1], dtype=F64)
    for m, sidx in enumerate(src_index.tolist()):
        t, slot = divmod(sidx, k)
        out[t] += w[t][slot] * y[m]
    return out


# ---- sparse attention (OPS.md section 3) -------------------------------------------------------

def bounds(cu: Optional[torch.Tensor], total: int) -> list[int]:
    return [0, total] if cu is None else cu.tolist()


def indexer_logits(q, k, weights, *, cu_seqlens_q=None, cu_seqlens_k=None, causal=True, compress_rate=1,
                   q_positions=None, q_scale=None, k_scale=None) -> torch.Tensor:
    """float64 ``[Tq, max_Lk]``, -inf for non-candidates."""
    q, k, w = f64(q), f64(k), f64(weights)
    bq, bk = bounds(cu_seqlens_q, q.shape[0]), bounds(cu_seqlens_k, k.shape[0])
    width = max(bk[b + 1] - bk[b] for b in range(len(bk) - 1))
    out = torch.full((q.shape[0], width), float("-inf"), dtype=F64)
    for b in range(len(bq) - 1):
        Lq, Lk = bq[b + 1] - bq[b], bk[b + 1] - bk[b]
        for i in range(Lq):
            t = bq[b] + i
            p = int(q_positions[t]) if q_positions is not None else Lk - Lq + i
            for s in range(Lk):
                if causal and not s < (p + 1) // compress_rate:
                    continue
                total = 0.0
                for h in range(q.shape[1]):
                    dot = float(torch.dot(q[t, h], k[bk[b] + s]))
                    if q_scale is not None:
                        dot *= float(q_scale[t, h])
                    if k_scale is not None:
                        dot *= float(k_scale[bk[b] + s])
                    total += float(w[t, h]) * max(dot, 0.0)
                out[t, s] = total
    return out


def kv_compress(kv, gate, position_bias, rate, *, overlap=False, prev_kv=None, prev_gate=None) -> torch.Tensor:
    kv, gate, pb = f64(kv).tolist(), f64(gate).tolist(), f64(position_bias).tolist()
    Dc = len(pb[0])
    W = len(kv) // rate
    D = Dc // 2 if overlap else Dc
    out = torch.zeros(W, D, dtype=F64)
    for w in range(W):
        for c in range(D):
            slots = []  # (gate value incl. bias, kv value)
            if not overlap:
                for j in range(rate):
                    t = w * rate + j
                    slots.append((gate[t][c] + pb[j][c], kv[t][c]))
            else:
                for j in range(rate):
                    if w > 0:
                        t = (w - 1) * rate + j
                        slots.append((gate[t][c] + pb[j][c], kv[t][c]))
                    elif prev_kv is not None:
                        slots.append((float(prev_gate[j, c]), float(prev_kv[j, c])))  # bias already added
                for j in range(rate):
                    t = w * rate + j
                    slots.append((gate[t][D + c] + pb[j][D + c], kv[t][D + c]))
            m = max(g for g, _ in slots)
            den = sum(math.exp(g - m) for g, _ in slots)
            out[w, c] = sum(math.exp(g - m) / den * v for g, v in slots)
    return out


def attend(qv: torch.Tensor, keys: list[torch.Tensor], scale: float, d_v: int, sink: Optional[float]):
    """One query head over a list of float64 key rows. Returns (out [d_v], lse float)."""
    if not keys:
        return torch.zeros(d_v, dtype=F64), float("-inf")
    logits = [scale * float(torch.dot(qv, key[: qv.shape[0]])) for key in keys]
    m = max(logits)
    lse = m + math.log(sum(math.exp(v - m) for v in logits))
    out = torch.zeros(d_v, dtype=F64)
    for v, key in zip(logits, keys):
        out += math.exp(v - lse) * key[:d_v]
    if sink is not None:
        out *= math.exp(lse) / (math.exp(lse) + math.exp(sink))
    return out, lse


def sparse_attention(q, kv, indices, *, scale, d_v=None, cu_seqlens_q=None, cu_seqlens_k=None, sink=None,
                     extra_kv=None, extra_indices=None, extra_cu_seqlens_k=None):
    q, kv = f64(q), f64(kv)
    Tq, Hq, Dqk = q.shape
    d_v = d_v or Dqk
    bq, bk = bounds(cu_seqlens_q, Tq), bounds(cu_seqlens_k, kv.shape[0])
    be = bounds(extra_cu_seqlens_k, extra_kv.shape[0]) if extra_kv is not None else None
    ex = f64(extra_kv) if extra_kv is not None else None
    out = torch.zeros(Tq, Hq, d_v, dtype=F64)
    lse = torch.zeros(Tq, Hq, dtype=F64)
    for b in range(len(bq) - 1):
        for t in range(bq[b], bq[b + 1]):
            keys = [kv[bk[b] + j] for j in indices[t].tolist() if j != -1]
            if extra_kv is not None:
                keys += [ex[be[b] + j] for j in extra_indices[t].tolist() if j != -1]
            for h in range(Hq):
                out[t, h], lse[t, h] = attend(q[t, h], keys, scale, d_v, None if sink is None else float(sink[h]))
    return out, lse


def window_indices(cu_seqlens_q, cu_seqlens_k, window) -> list[list[int]]:
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    rows = []
    for b in range(len(bq) - 1):
        Lq, Lk = bq[b + 1] - bq[b], bk[b + 1] - bk[b]
        for i in range(Lq):
            p = Lk - Lq + i
            rows.append([j if j >= 0 else -1 for j in range(p - window + 1, p + 1)])
    return rows


# ---- mHC (OPS.md section 4) --------------------------------------------------------------------

def sinkhorn_one(logits: list[list[float]], iters: int, eps: float) -> list[list[float]]:
    n = len(logits)
    M = []
    for row in logits:
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        tot = sum(ex)
        M.append([v / tot + eps for v in ex])

    def cols(M):
        sums = [sum(M[r][c] for r in range(n)) for c in range(n)]
        return [[M[r][c] / (sums[c] + eps) for c in range(n)] for r in range(n)]

    def rows(M):
        return [[v / (sum(row) + eps) for v in row] for row in M]

    M = cols(M)
    for _ in range(iters - 1):
        M = cols(rows(M))
    return M


def _lead(shape) -> list[tuple]:
    idx = [()]
    for size in shape:
        idx = [i + (j,) for i in idx for j in range(size)]
    return idx


def sinkhorn(logits, *, iters=20, eps=1e-6) -> torch.Tensor:
    x = f64(logits)
    out = torch.empty_like(x)
    for i in _lead(x.shape[:-2]):
        out[i] = torch.tensor(sinkhorn_one(x[i].tolist(), iters, eps), dtype=F64)
    return out


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def mhc_pre(x, phi, alpha, bias, *, sinkhorn_iters=20, eps=1e-6, norm_eps=1e-6, post_scale=2.0):
    x, phi = f64(x), f64(phi)
    a, bb = f64(alpha).tolist(), f64(bias).tolist()
    n, C = x.shape[-2:]
    lead = x.shape[:-2]
    y = torch.zeros(*lead, C, dtype=F64)
    post = torch.zeros(*lead, n, dtype=F64)
    comb = torch.zeros(*lead, n, n, dtype=F64)
    for i in _lead(lead):
        xf = x[i].reshape(n * C)
        r = 1.0 / math.sqrt(sum(v * v for v in xf.tolist()) / (n * C) + norm_eps)
        m = [float(torch.dot(phi[row], xf)) * r for row in range(n * (n + 2))]
        pre = [sigmoid(a[0] * m[j] + bb[j]) + eps for j in range(n)]
        for j in range(n):
            post[i + (j,)] = post_scale * sigmoid(a[1] * m[n + j] + bb[n + j])
        res = [[a[2] * m[2 * n + r_ * n + c] + bb[2 * n + r_ * n + c] for c in range(n)] for r_ in range(n)]
        comb[i] = torch.tensor(sinkhorn_one(res, sinkhorn_iters, eps), dtype=F64)
        for j in range(n):
            y[i] += pre[j] * x[i + (j,)]
    return y, post, comb


def mhc_post(f, residual, post, comb) -> torch.Tensor:
    f, res, post, comb = f64(f), f64(residual), f64(post), f64(comb)
    n = res.shape[-2]
    out = torch.zeros_like(res)
    for i in _lead(res.shape[:-2]):
        for k in range(n):
            out[i + (k,)] = float(post[i + (k,)]) * f[i]
            for j in range(n):
                out[i + (k,)] += float(comb[i + (j, k)]) * res[i + (j,)]  # column k of comb feeds stream k
    return out
