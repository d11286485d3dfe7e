"""Sparse MQA decode over a packed FP8 KV cache (DeepSeek V3.2's 656-byte token), forward.

The cache is uint8 ``[rows, ROW]``: per token ``4 * GROUP`` e4m3 channels, then 4 float32 scales
(one per ``GROUP`` = 128 channels), then ``DT`` bfloat16 RoPE channels (V3.2: 64; none for the
528-byte layout). Byte layouts: :mod:`opbridge.core.kv_cache`.

Same program shape as :mod:`.sparse_attention` (one query token x ``BLOCK_H`` heads, gathered
tiles of ``BLOCK_N`` keys shared by all heads, base-2 online softmax over the main and the extra
index list), but the latent part is kept per scale group: the e4m3 bytes convert exactly to q's
dtype and the float32 scale is applied outside the products,

    S   = sum_g scale_g[n] * (q_g . k8_g[n]) + q_rope . k_rope[n]
    acc_g += (P * scale_g) @ k8_g            (four [BLOCK_H, 128] accumulators)

so the logits (and lse) are as exact as with an unquantized cache; dequantizing to bf16 first
would round every key to 8 bits and miss OPS.md's lse tolerance by 10x. Only ``P * scale_g`` is
rounded to q's dtype before the value product, as ``P`` is in the float-cache kernel.

``ROW`` is a compile-time constant, so the compiler knows every part of a token starts 16-byte
aligned and keeps vector loads. Invalid keys (``-1``, out of range, garbage block numbers) are
masked by :func:`key_rows` and never dereferenced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .sparse_attention import CONFIG_FILE, LOG2E, physical_rows
from .sparse_attention_common import config, dot, fit_tiles, key_rows, pow2, smem_limit

N_GROUPS = 4  # float32 scales per token (the kernel holds one accumulator per group)


@dataclass(frozen=True)
class PackedFormat:
    """Byte layout of one packed token (mirrors ``opbridge.core.kv_cache.KVCacheLayout``)."""

    row_bytes: int
    n_fp8: int  # e4m3 channels from byte 0; N_GROUPS float32 scales follow
    n_rope: int  # bfloat16 channels after the scales (0: none)
    group: int = 128

    @property
    def rope_offset(self) -> int:
        return self.n_fp8 + 4 * N_GROUPS


class PackedKeySet:
    """One packed cache as the kernel sees it: typed views of the same bytes (e4m3 values,
    float32 scales, bf16 RoPE), the physical row of each index, per-query row bounds."""

    def __init__(self, rows: torch.Tensor, fmt: PackedFormat, indices: torch.Tensor, kstart: torch.Tensor,
                 klen: torch.Tensor):
        if fmt.n_fp8 != N_GROUPS * fmt.group:
            raise ValueError(f"packed format with {fmt.n_fp8} e4m3 channels: the kernel needs {N_GROUPS} groups")
        if rows.stride(-1) != 1 or rows.stride(0) != fmt.row_bytes:  # the kernel's row size is a constant
            rows = rows.contiguous()
        self.fmt = fmt
        self.values = rows.view(torch.float8_e4m3fn)
        self.scales = rows.view(torch.float32)[:, fmt.n_fp8 // 4:fmt.rope_offset // 4]
        self.rope = rows.view(torch.bfloat16)[:, fmt.rope_offset // 2:] if fmt.n_rope else self.scales
        self.indices = indices if indices.stride(-1) == 1 else indices.contiguous()
        self.kstart, self.klen = kstart, klen

    def args(self) -> list:
        return [self.values, self.scales, self.rope, self.indices, self.indices.stride(0), self.indices.shape[1],
                self.kstart, self.klen]

    @staticmethod
    def paged(cache: torch.Tensor, fmt: PackedFormat, block_table: torch.Tensor, indices: torch.Tensor,
              q_per_batch: int) -> "PackedKeySet":
        """uint8 ``[num_blocks, block_size, row_bytes]`` addressed by logical positions ``[T, k]``."""
        nb, bs, W = cache.shape
        phys = physical_rows(indices, block_table, bs, nb, q_per_batch)
        T = indices.shape[0]
        return PackedKeySet(cache.reshape(nb * bs, W), fmt, phys, torch.zeros(T, dtype=torch.int32,
                                                                                device=indices.device),
                            torch.full((T,), nb * bs, dtype=torch.int32, device=indices.device))


@triton.jit
def _attend_packed(q0, q1, q2, q3, qt, m_i, l_i, a0, a1, a2, a3, kv_ptr, sc_ptr, rope_ptr, idx_ptr, idx_off, n_idx,
                   kstart, klen, qk_scale, ROW: tl.constexpr, GROUP: tl.constexpr, DT: tl.constexpr,
                   HAS_TAIL: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    offs_c = tl.arange(0, GROUP)
    offs_t = tl.arange(0, DT)
    for j0 in range(0, n_idx, BLOCK_N):
        rows, valid = key_rows(idx_ptr, idx_off, j0, n_idx, kstart, klen, BLOCK_N)
        base = kv_ptr + rows[:, None] * ROW + offs_c[None, :]
        sbase = sc_ptr + rows * (ROW // 4)
        # e4m3 -> q's dtype is exact (bf16/fp16/fp32 all hold every e4m3 value); through fp32,
        # the conversion every Triton version lowers on sm_89+ (Hopper has no e4m3 -> bf16 instruction).
        k0 = tl.load(base, mask=valid[:, None], other=0.0).to(tl.float32).to(q0.dtype)
        k1 = tl.load(base + GROUP, mask=valid[:, None], other=0.0).to(tl.float32).to(q0.dtype)
        k2 = tl.load(base + 2 * GROUP, mask=valid[:, None], other=0.0).to(tl.float32).to(q0.dtype)
        k3 = tl.load(base + 3 * GROUP, mask=valid[:, None], other=0.0).to(tl.float32).to(q0.dtype)
        s0 = tl.load(sbase, mask=valid, other=0.0)
        s1 = tl.load(sbase + 1, mask=valid, other=0.0)
        s2 = tl.load(sbase + 2, mask=valid, other=0.0)
        s3 = tl.load(sbase + 3, mask=valid, other=0.0)
        s = dot(q0, tl.trans(k0), IEEE) * s0[None, :]
        s += dot(q1, tl.trans(k1), IEEE) * s1[None, :]
        s += dot(q2, tl.trans(k2), IEEE) * s2[None, :]
        s += dot(q3, tl.trans(k3), IEEE) * s3[None, :]
        if HAS_TAIL:
            kt = tl.load(rope_ptr + rows[:, None] * (ROW // 2) + offs_t[None, :], mask=valid[:, None],
                         other=0.0).to(qt.dtype)
            s += dot(qt, tl.trans(kt), IEEE)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no valid key so far keeps m = -inf; shift by 0 there so exp2 never sees inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        a0 = a0 * alpha[:, None] + dot((p * s0[None, :]).to(k0.dtype), k0, IEEE)
        a1 = a1 * alpha[:, None] + dot((p * s1[None, :]).to(k0.dtype), k1, IEEE)
        a2 = a2 * alpha[:, None] + dot((p * s2[None, :]).to(k0.dtype), k2, IEEE)
        a3 = a3 * alpha[:, None] + dot((p * s3[None, :]).to(k0.dtype), k3, IEEE)
        m_i = m_new
    return m_i, l_i, a0, a1, a2, a3


@triton.jit
def sparse_attn_fp8kv_kernel(
        q_ptr, stride_qt, stride_qh, out_ptr, stride_ot, stride_oh, lse_ptr, stride_lt, sink_ptr,
        kv_ptr, sc_ptr, rope_ptr, idx_ptr, stride_it, n_idx, kstart_ptr, klen_ptr,
        ekv_ptr, esc_ptr, erope_ptr, eidx_ptr, stride_eit, n_eidx, ekstart_ptr, eklen_ptr,
        Hq, qk_scale,
        ROW: tl.constexpr, EROW: tl.constexpr, GROUP: tl.constexpr, DT: tl.constexpr, HAS_TAIL: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_SINK: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # One flat grid axis: head blocks of one query are adjacent, so they find its rows in L2.
    n_hb = tl.cdiv(Hq, BLOCK_H)
    pid = tl.program_id(0)
    t = (pid // n_hb).to(tl.int64)
    heads = (pid % n_hb) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads[:, None] < Hq
    offs_c = tl.arange(0, GROUP)
    offs_t = tl.arange(0, DT)
    q_base = q_ptr + t * stride_qt + heads[:, None].to(tl.int64) * stride_qh + offs_c[None, :]
    q0 = tl.load(q_base, mask=hmask, other=0.0)
    q1 = tl.load(q_base + GROUP, mask=hmask, other=0.0)
    q2 = tl.load(q_base + 2 * GROUP, mask=hmask, other=0.0)
    q3 = tl.load(q_base + 3 * GROUP, mask=hmask, other=0.0)
    qt = q0  # placeholder without a RoPE part
    if HAS_TAIL:
        qt = tl.load(q_ptr + t * stride_qt + heads[:, None].to(tl.int64) * stride_qh + 4 * GROUP + offs_t[None, :],
                     mask=hmask, other=0.0)
    if UPCAST:  # the interpreter's bf16 dot is wrong: compute in fp32 there
        q0, q1, q2, q3, qt = q0.to(tl.float32), q1.to(tl.float32), q2.to(tl.float32), q3.to(tl.float32), \
            qt.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    a0 = tl.zeros([BLOCK_H, GROUP], tl.float32)
    a1 = tl.zeros([BLOCK_H, GROUP], tl.float32)
    a2 = tl.zeros([BLOCK_H, GROUP], tl.float32)
    a3 = tl.zeros([BLOCK_H, GROUP], tl.float32)
    m_i, l_i, a0, a1, a2, a3 = _attend_packed(
        q0, q1, q2, q3, qt, m_i, l_i, a0, a1, a2, a3, kv_ptr, sc_ptr, rope_ptr, idx_ptr, t * stride_it, n_idx,
        tl.load(kstart_ptr + t), tl.load(klen_ptr + t), qk_scale, ROW, GROUP, DT, HAS_TAIL, BLOCK_N, IEEE)
    if HAS_EXTRA:
        m_i, l_i, a0, a1, a2, a3 = _attend_packed(
            q0, q1, q2, q3, qt, m_i, l_i, a0, a1, a2, a3, ekv_ptr, esc_ptr, erope_ptr, eidx_ptr, t * stride_eit,
            n_eidx, tl.load(ekstart_ptr + t), tl.load(eklen_ptr + t), qk_scale, EROW, GROUP, DT, HAS_TAIL, BLOCK_N,
            IEEE)

    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    f = 1.0 / l_safe
    if HAS_SINK:
        sink = tl.load(sink_ptr + heads, mask=heads < Hq, other=0.0).to(tl.float32)
        f = f * (1.0 / (1.0 + tl.exp(sink - lse)))  # sigmoid(lse - sink); 0 where there is no valid key
    o_base = out_ptr + t * stride_ot + heads[:, None].to(tl.int64) * stride_oh + offs_c[None, :]
    ty = out_ptr.dtype.element_ty
    tl.store(o_base, (a0 * f[:, None]).to(ty), mask=hmask)
    tl.store(o_base + GROUP, (a1 * f[:, None]).to(ty), mask=hmask)
    tl.store(o_base + 2 * GROUP, (a2 * f[:, None]).to(ty), mask=hmask)
    tl.store(o_base + 3 * GROUP, (a3 * f[:, None]).to(ty), mask=hmask)
    tl.store(lse_ptr + t * stride_lt + heads, lse, mask=heads < Hq)


def sparse_attention_fp8kv_fwd(q: torch.Tensor, sets: list[PackedKeySet], *, scale: float,
                               sink: Optional[torch.Tensor], interpret: bool = False,
                               **override) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[T, Hq, Dqk]`` (Dqk = the format's channels); every set packed in the same format.

    Returns out ``[T, Hq, n_fp8]`` (dtype of q) and lse float32 ``[T, Hq]``.
    """
    T, Hq, Dqk = q.shape
    fmt = sets[0].fmt
    if any(s.fmt.n_rope != fmt.n_rope or s.fmt.n_fp8 != fmt.n_fp8 for s in sets) or Dqk != fmt.n_fp8 + fmt.n_rope:
        raise ValueError("sparse_attention_fp8kv_fwd: q and every key set need the same channel split")
    q = q if q.stride(-1) == 1 else q.contiguous()
    sink = None if sink is None else sink.contiguous()
    d_v = fmt.n_fp8
    out = torch.empty((T, Hq, d_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((T, Hq), dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    cfg = config(CONFIG_FILE, "fwd_fp8kv", q.device, interpret, **override)
    block_h = min(cfg["BLOCK_H"], pow2(Hq))
    dt = pow2(fmt.n_rope) if fmt.n_rope else 16
    width = (d_v + (dt if fmt.n_rope else 0)) * q.element_size()
    row = max(s.fmt.row_bytes for s in sets)
    # Shared memory: Q and the converted key tile (the dots' operands) plus, when pipelined,
    # num_stages raw tiles of `row` bytes per key.
    cfg = fit_tiles(cfg, lambda bn, st: (block_h + bn) * width + (st * bn * row if st > 1 else 0),
                    smem_limit(q.device))
    a = sets[0].args()
    e = sets[1].args() if len(sets) > 1 else a
    grid = (triton.cdiv(Hq, block_h) * T,)
    sparse_attn_fp8kv_kernel[grid](
        q, q.stride(0), q.stride(1), out, out.stride(0), out.stride(1), lse, lse.stride(0),
        sink if sink is not None else lse, *a, *e, Hq, float(scale) * LOG2E,
        ROW=sets[0].fmt.row_bytes, EROW=sets[-1].fmt.row_bytes, GROUP=fmt.group, DT=dt, HAS_TAIL=fmt.n_rope > 0,
        BLOCK_H=block_h, BLOCK_N=cfg["BLOCK_N"], HAS_EXTRA=len(sets) > 1, HAS_SINK=sink is not None,
        UPCAST=interpret and q.dtype == torch.bfloat16, IEEE=q.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, lse
