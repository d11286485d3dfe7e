"""Triton sparse_attention_paged over packed FP8 KV caches (core/kv_cache.py layouts).

The Triton kernel reads the packed bytes; the oracle is the reference backend run in float64 on
the dequantized cache (``dequantize_kv_cache``), with OPS.md section 5's sparse-attention
thresholds. Tiny shapes under TRITON_INTERPRET=1 (fp16/fp32 dots; bf16 goes through the upcast
switch); the V3.2 decode shape runs on the GPU in bench/fp8kv_gpu.py.
"""
from __future__ import annotations

import pytest
import torch

import opbridge
from opbridge.core.kv_cache import LAYOUTS, dequantize_kv_cache, quantize_kv_cache

from .test_sparse_attention import _f64, _g, _indices, _randn, _ref, assert_attn_close

I32 = torch.int32


@pytest.fixture(autouse=True)
def _triton():
    with opbridge.use_backend("triton"):
        yield


def _cache(g, layout, nblk, bs, device, spread=True):
    """A packed cache whose scale groups span different magnitudes (so the scales matter).

    At most unit scale, like the float-cache tests: OPS.md's absolute error floor (8e-4) assumes
    O(1) values, and fp16/bf16 rounding of P alone exceeds it for values ~10 that cancel."""
    L = LAYOUTS[layout]
    kv = torch.randn(nblk, bs, L.dqk, generator=g)
    if spread:
        kv[..., :512] *= torch.tensor([0.05, 1.0, 0.3, 0.6]).repeat_interleave(128)
    return quantize_kv_cache(kv, layout=layout).to(device)


@pytest.mark.parametrize("layout,dtype,with_extra,with_sink", [
    ("fp8_ds_mla", torch.float16, False, True),    # V3.2: 656-byte tokens, RoPE tail
    ("fp8_ds_mla", torch.bfloat16, False, False),
    ("fp8_ds_v4", torch.float16, True, True),      # 528-byte tokens, extra (window) set in the same softmax
    ("fp8_ds_v4", torch.float32, True, False),
])
def test_paged_fp8_matches_reference_on_dequantized_cache(triton_device, layout, dtype, with_extra, with_sink):
    g = _g(11)
    L = LAYOUTS[layout]
    B, Sq, Hq, bs, nblk, maxb, top_k = 2, 2, 16, 4, 9, 4, 12
    q = _randn(g, B, Sq, Hq, L.dqk, dtype=dtype, device=triton_device, scale=0.5)
    cache = _cache(g, layout, nblk, bs, triton_device)
    table = torch.randperm(nblk, generator=g)[:B * maxb].view(B, maxb).to(I32)
    idx, clean = _indices(g, [B * Sq], [maxb * bs], top_k)  # -1 holes and out-of-range garbage
    idx, clean = idx.view(B, Sq, top_k), clean.view(B, Sq, top_k)
    scale = L.dqk ** -0.5
    kw = dict(scale=scale, d_v=512, return_lse=True, kv_cache_layout=layout)  # V3.2: values = the 512 latents
    rkw = dict(scale=scale, d_v=512, return_lse=True)
    if with_sink:
        sink = torch.randn(Hq, generator=g)
        kw["sink"], rkw["sink"] = sink.to(triton_device), _f64(sink)
    if with_extra:
        ecache = _cache(g, layout, 5, 8, triton_device)
        etable = torch.tensor([[4, 0], [2, 3]], dtype=I32)
        eidx = torch.stack([torch.randperm(16, generator=g)[:6] for _ in range(B * Sq)]).view(B, Sq, 6).to(I32)
        eidx[1, 1, :] = -1
        kw.update(extra_kv_cache=ecache, extra_block_table=etable.to(triton_device),
                  extra_indices=eidx.to(triton_device), extra_kv_cache_layout=layout)
        rkw.update(extra_kv_cache=_f64(dequantize_kv_cache(ecache.cpu(), layout=layout)), extra_block_table=etable,
                   extra_indices=eidx)
    out, lse = opbridge.sparse_attention_paged(q, cache, table.to(triton_device), idx.to(triton_device), **kw)
    assert out.shape == (B, Sq, Hq, 512) and out.dtype == dtype and lse.dtype == torch.float32
    deq = _f64(dequantize_kv_cache(cache.cpu(), layout=layout))
    ro, rl = _ref(opbridge.sparse_attention_paged, _f64(q), deq, table, clean, **rkw)
    assert_attn_close(out, ro, lse, rl)
    # The reference backend's own packed path agrees with the same oracle.
    pkw = {k: v for k, v in kw.items() if k not in ("sink", "extra_kv_cache", "extra_block_table", "extra_indices")}
    pkw.update({k: rkw[k] for k in ("sink", "extra_block_table", "extra_indices") if k in rkw})
    if with_extra:
        pkw["extra_kv_cache"] = ecache.cpu()
    po, pl = _ref(opbridge.sparse_attention_paged, _f64(q), cache.cpu(), table, clean, **pkw)
    torch.testing.assert_close(po, ro, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pl, rl, rtol=1e-10, atol=1e-12)


def test_paged_fp8_garbage_block_numbers_and_empty_rows(triton_device):
    """Block numbers outside the cache and all -1 rows are masked: no read, out 0, lse -inf."""
    g = _g(12)
    q = _randn(g, 1, 2, 16, 576, device=triton_device, scale=0.5)
    cache = _cache(g, "fp8_ds_mla", 3, 4, triton_device)
    table = torch.tensor([[1, 99, -7]], dtype=I32)
    idx = torch.tensor([[[0, 3, 4, 7, 8, 11, 50], [-1] * 7]], dtype=I32)
    out, lse = opbridge.sparse_attention_paged(q, cache, table.to(triton_device), idx.to(triton_device), scale=0.05,
                                               d_v=512, return_lse=True, kv_cache_layout="fp8_ds_mla")
    only = torch.tensor([[[0, 3, -1, -1, -1, -1, -1], [-1] * 7]], dtype=I32)
    ro, rl = _ref(opbridge.sparse_attention_paged, _f64(q), _f64(dequantize_kv_cache(cache.cpu())),
                  torch.tensor([[1, 0, 0]], dtype=I32), only, scale=0.05, d_v=512, return_lse=True)
    assert_attn_close(out, ro, lse, rl)
    assert bool((out[0, 1] == 0).all()) and bool(torch.isneginf(lse[0, 1]).all())


def test_paged_fp8_strided_cache_rows(triton_device):
    """A cache view whose tokens are not back to back (padded rows) gives the same result."""
    g = _g(13)
    q = _randn(g, 1, 1, 16, 512, device=triton_device, scale=0.5)
    cache = _cache(g, "fp8_ds_v4", 2, 4, triton_device)
    wide = torch.zeros(2, 4, 544, dtype=torch.uint8, device=triton_device)
    wide[..., :528] = cache
    table = torch.tensor([[1, 0]], dtype=I32, device=triton_device)
    idx = torch.tensor([[[5, 0, 2, 7]]], dtype=I32, device=triton_device)
    a = opbridge.sparse_attention_paged(q, cache, table, idx, scale=0.05, kv_cache_layout="fp8_ds_v4")
    b = opbridge.sparse_attention_paged(q, wide[..., :528], table, idx, scale=0.05, kv_cache_layout="fp8_ds_v4")
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw,why", [
    (dict(d_v=256), "needs d_v = 512"),
    (dict(), "needs d_v = 512"),  # d_v defaults to Dqk = 576: RoPE channels are not values
    (dict(d_v=512, extra_kv_cache="float"), "packed"),
])
def test_paged_fp8_unsupported_calls_say_why(triton_device, kw, why):
    g = _g(14)
    q = _randn(g, 1, 1, 16, 576, device=triton_device)
    cache = _cache(g, "fp8_ds_mla", 2, 4, triton_device)
    table = torch.tensor([[0, 1]], dtype=I32, device=triton_device)
    idx = torch.tensor([[[0, 1]]], dtype=I32, device=triton_device)
    if kw.get("extra_kv_cache") == "float":
        kw = dict(d_v=512, extra_kv_cache=_randn(g, 2, 4, 576, device=triton_device), extra_block_table=table,
                  extra_indices=idx)
    with pytest.raises(opbridge.UnsupportedError, match=why):
        opbridge.sparse_attention_paged(q, cache, table, idx, scale=0.1, kv_cache_layout="fp8_ds_mla", **kw)
