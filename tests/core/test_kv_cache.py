"""Packed FP8 KV-cache formats (opbridge.core.kv_cache) and their use by the reference sparse_attention_paged."""
from __future__ import annotations

import struct

import pytest
import torch

import opbridge
from opbridge.core.kv_cache import LAYOUTS, dequantize_kv_cache, quantize_kv_cache

I32 = torch.int32

# Hand-encoded e4m3fn bytes (sign | 4-bit exponent, bias 7 | 3-bit mantissa) of exact values.
E4M3 = {0.0: 0x00, 1.0: 0x38, 0.5: 0x30, -2.0: 0xC0, 3.5: 0x46, 448.0: 0x7E, -448.0: 0xFE, 240.0: 0x77,
        2.0 ** -9: 0x01, -224.0: 0xF6}


def _f32(x: float) -> bytes:
    return struct.pack("<f", x)


def _bf16(x: float) -> bytes:
    return struct.pack("<f", x)[2:]  # the high half of an exactly representable float32


def _hand_token():
    """One V3.2 token with its bytes packed by hand from the documented layout."""
    x = [0.0] * 576
    expected = bytearray(656)
    # Groups 0..2: power-of-two scales s = amax / 448 (exact), values v * s with known e4m3 codes.
    for g, s in enumerate((1.0, 2.0 ** -6, 2.0 ** 3)):
        vals = {0: 448.0, 1: 1.0, 5: 0.5, 17: -2.0, 64: 3.5, 100: 240.0, 126: 2.0 ** -9, 127: -448.0}
        for c, v in vals.items():
            x[128 * g + c] = v * s
            expected[128 * g + c] = E4M3[v]
        expected[512 + 4 * g:516 + 4 * g] = _f32(s)
    # Group 3: amax 3 -> the float32 scale 3/448 is not a power of two; -1.5 / s = -224 -> 0xF6.
    s3 = torch.tensor(3.0) / 448  # float32, as the documented formula
    x[384], x[385] = 3.0, -1.5
    expected[384], expected[385] = E4M3[448.0], E4M3[-224.0]
    expected[524:528] = _f32(s3.item())
    # RoPE: bf16-exact values, little-endian.
    for j, v in enumerate((1.0, -2.5, 0.15625, 96.0)):
        x[512 + j] = v
        expected[528 + 2 * j:530 + 2 * j] = _bf16(v)
    for j in range(4, 64):
        expected[528 + 2 * j:530 + 2 * j] = _bf16(0.0)
    return torch.tensor(x, dtype=torch.float32), bytes(expected), s3


def test_fp8_ds_mla_bytes_match_a_hand_packed_token():
    x, expected, s3 = _hand_token()
    packed = quantize_kv_cache(x.to(torch.float64))
    assert packed.dtype == torch.uint8 and packed.shape == (656,)
    got = bytes(packed.tolist())
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a == b, f"byte {i}: got {a:#04x}, expected {b:#04x}"
    deq = dequantize_kv_cache(packed)
    assert deq.dtype == torch.float32 and deq.shape == (576,)
    # Exact where the scale is a power of two (groups 0..2) and for the RoPE part.
    assert torch.equal(deq[:384], x[:384])
    assert torch.equal(deq[512:], x[512:])
    assert deq[384].item() == (448.0 * s3).item() and deq[385].item() == (-224.0 * s3).item()


def test_fp8_ds_v4_bytes_are_the_mla_token_without_rope():
    x, expected, _ = _hand_token()
    packed = quantize_kv_cache(x[:512].view(1, 1, 512), layout="fp8_ds_v4")
    assert packed.shape == (1, 1, 528)
    assert bytes(packed.flatten().tolist()) == expected[:528]


def test_ue8m0_rounds_scales_up_to_powers_of_two():
    x = torch.zeros(576)
    x[0], x[1] = 3.0, -1.5
    packed = quantize_kv_cache(x, ue8m0=True)
    assert bytes(packed[512:516].tolist()) == _f32(2.0 ** -7)  # 3/448 = 2^-7.2 -> 2^-7
    assert bytes(packed[516:520].tolist()) == _f32(2.0 ** -22)  # all-zero group: 1e-4/448 = 2^-22.1 -> 2^-22
    deq = dequantize_kv_cache(packed)
    assert deq[0].item() == 3.0 and deq[1].item() == -1.5  # 384 and -192 are e4m3 values


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_trip_error_bounds(layout, dtype):
    L = LAYOUTS[layout]
    g = torch.Generator().manual_seed(0)
    # Groups of very different magnitudes, plus an all-zero group (amax floor 1e-4).
    mags = torch.tensor([1e-3, 1.0, 30.0, 0.0]).repeat_interleave(128)
    lat = torch.randn(3, 5, 512, generator=g) * mags
    kv = torch.cat([lat, torch.randn(3, 5, L.n_rope, generator=g)], -1).to(dtype)
    packed = quantize_kv_cache(kv, layout=layout)
    assert packed.shape == (3, 5, L.bytes_per_token) and packed.dtype == torch.uint8
    deq = dequantize_kv_cache(packed, layout=layout)
    assert deq.shape == (3, 5, L.dqk) and deq.dtype == torch.float32
    x = kv.float()
    s = x[..., :512].abs().unflatten(-1, (4, 128)).amax(-1).clamp_min(1e-4) / 448  # [3, 5, 4]
    s_ch = s.repeat_interleave(128, -1)
    err = (deq[..., :512] - x[..., :512]).abs()
    # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 of the value, 2^-10 * s for subnormals.
    bound = torch.maximum(x[..., :512].abs() * 2.0 ** -4, s_ch * 2.0 ** -10) * (1 + 1e-6)
    assert bool((err <= bound).all()), float((err / bound).max())
    assert float(err[..., 384:].max()) == 0.0  # the zero group stays zero
    assert float(err.max()) > 0  # it did quantize
    # Stored scales are the documented ones.
    stored = packed[..., 512:528].contiguous().view(torch.float32)
    torch.testing.assert_close(stored, s, rtol=0, atol=0)
    if L.n_rope:
        assert torch.equal(deq[..., 512:], x[..., 512:].to(torch.bfloat16).float())


def test_dequantize_reads_a_strided_cache_view():
    kv = torch.randn(4, 2, 576)
    packed = quantize_kv_cache(kv)
    wide = torch.zeros(4, 2, 700, dtype=torch.uint8)
    wide[..., :656] = packed
    torch.testing.assert_close(dequantize_kv_cache(wide[..., :656]), dequantize_kv_cache(packed))


@pytest.mark.parametrize("call,exc,arg", [
    (lambda: quantize_kv_cache(torch.randn(2, 576), layout="fp8_e5m2"), opbridge.OpError, "'layout'"),
    (lambda: quantize_kv_cache(torch.randn(2, 576), layout="native"), opbridge.OpError, "'layout'"),
    (lambda: quantize_kv_cache(torch.randn(2, 512)), opbridge.OpError, "'kv'"),
    (lambda: quantize_kv_cache(torch.randn(2, 576), layout="fp8_ds_v4"), opbridge.OpError, "'kv'"),
    (lambda: quantize_kv_cache(torch.ones(2, 576, dtype=I32)), TypeError, "'kv'"),
    (lambda: quantize_kv_cache([0.0] * 576), TypeError, "'kv'"),
    (lambda: dequantize_kv_cache(torch.zeros(2, 655, dtype=torch.uint8)), opbridge.OpError, "'cache'"),
    (lambda: dequantize_kv_cache(torch.zeros(2, 656)), TypeError, "'cache'"),
    (lambda: dequantize_kv_cache(torch.zeros(2, 656, dtype=torch.uint8), layout="x"), opbridge.OpError, "'layout'"),
])
def test_bad_inputs_name_op_and_argument(call, exc, arg):
    with pytest.raises(exc) as e:
        call()
    assert str(e.value).startswith(("opbridge.quantize_kv_cache:", "opbridge.dequantize_kv_cache:")), str(e.value)
    assert f"argument {arg}" in str(e.value)


# ---- sparse_attention_paged with a packed cache (core validation + reference backend) -------------

def _paged_case(layout: str, seed: int = 0):
    L = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    B, Sq, Hq, bs, nblk, maxb, top_k = 2, 2, 4, 4, 6, 3, 5
    kv = torch.randn(nblk, bs, L.dqk, generator=g)
    cache = quantize_kv_cache(kv, layout=layout)
    q = torch.randn(B, Sq, Hq, L.dqk, generator=g, dtype=torch.float64)
    table = torch.randperm(nblk, generator=g)[:B * maxb].view(B, maxb).to(I32)
    idx = torch.stack([torch.randperm(maxb * bs, generator=g)[:top_k] for _ in range(B * Sq)]).view(B, Sq, top_k)
    idx = idx.to(I32)
    idx[1, 0, :2] = -1
    return q, cache, table, idx


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reference_paged_packed_equals_dequantized_cache(layout):
    q, cache, table, idx = _paged_case(layout)
    deq = dequantize_kv_cache(cache, layout=layout)
    sink = torch.randn(q.shape[2], dtype=torch.float64)
    with opbridge.use_backend("reference"):
        out, lse = opbridge.sparse_attention_paged(q, cache, table, idx, scale=0.07, d_v=512, sink=sink,
                                                   return_lse=True, kv_cache_layout=layout)
        ro, rl = opbridge.sparse_attention_paged(q, deq.double(), table, idx, scale=0.07, d_v=512, sink=sink,
                                                 return_lse=True)
        # the extra set may be packed too (V4: window + compressed entries in one softmax)
        eo, el = opbridge.sparse_attention_paged(q, cache, table, idx, scale=0.07, d_v=512, return_lse=True,
                                                 kv_cache_layout=layout, extra_kv_cache=cache,
                                                 extra_block_table=table.flip(1).contiguous(),
                                                 extra_indices=idx.flip(2).contiguous(),
                                                 extra_kv_cache_layout=layout)
        fo, fl = opbridge.sparse_attention_paged(q, deq.double(), table, idx, scale=0.07, d_v=512, return_lse=True,
                                                 extra_kv_cache=deq.double(),
                                                 extra_block_table=table.flip(1).contiguous(),
                                                 extra_indices=idx.flip(2).contiguous())
    assert out.dtype == torch.float64 and out.shape == (2, 2, 4, 512)
    torch.testing.assert_close(out, ro, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, rl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eo, fo, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(el, fl, rtol=1e-12, atol=1e-12)


def _bad(**over):
    q, cache, table, idx = _paged_case("fp8_ds_mla")
    kw = dict(q=q, kv_cache=cache, block_table=table, indices=idx, scale=0.1, kv_cache_layout="fp8_ds_mla")
    kw.update(over)
    return kw


@pytest.mark.parametrize("over,exc,arg", [
    (dict(kv_cache_layout="fp8"), opbridge.OpError, "'kv_cache_layout'"),
    (dict(kv_cache_layout=""), opbridge.OpError, "'kv_cache_layout'"),
    (dict(kv_cache=torch.zeros(6, 4, 656)), TypeError, "'kv_cache'"),
    (dict(kv_cache=torch.zeros(6, 4, 655, dtype=torch.uint8)), opbridge.OpError, "'kv_cache'"),
    (dict(kv_cache=torch.zeros(6, 4, 528, dtype=torch.uint8)), opbridge.OpError, "'kv_cache'"),
    (dict(q=torch.zeros(2, 2, 4, 512, dtype=torch.float64)), opbridge.OpError, "'q'"),
    (dict(kv_cache_layout="native"), TypeError, "'kv_cache'"),  # a uint8 cache needs a packed layout
    (dict(extra_kv_cache_layout="fp8_ds_mla"), opbridge.OpError, "'extra_kv_cache_layout'"),
    (dict(extra_kv_cache=torch.zeros(3, 4, 576), extra_block_table=torch.zeros(2, 1, dtype=I32),
          extra_indices=torch.zeros(2, 2, 1, dtype=I32), extra_kv_cache_layout="fp8_ds_mla"),
     TypeError, "'extra_kv_cache'"),
])
def test_paged_packed_validation(over, exc, arg):
    kw = _bad(**over)
    with pytest.raises(exc) as e:
        opbridge.sparse_attention_paged(kw.pop("q"), kw.pop("kv_cache"), kw.pop("block_table"), kw.pop("indices"),
                                        **kw)
    assert "sparse_attention_paged" in str(e.value) and arg in str(e.value)


def test_packed_call_passes_opcheck_and_compiles():
    """The new schema arguments trace: fake tensors, torch.compile(fullgraph) with a packed cache."""
    from opbridge.core.opdef import OPS

    q, cache, table, idx = _paged_case("fp8_ds_mla")
    q = q.float()
    op = OPS["sparse_attention_paged"]
    kw = dict(scale=0.1, d_v=512, sink=None, extra_kv_cache=None, extra_block_table=None, extra_indices=None,
              kv_cache_layout="fp8_ds_mla", extra_kv_cache_layout="")
    torch.library.opcheck(op.op, tuple(op.flatten((q, cache, table, idx), kw)),
                          test_utils=("test_schema", "test_faketensor"))

    def f(q, cache):
        return opbridge.sparse_attention_paged(q, cache, table, idx, scale=0.1, d_v=512, kv_cache_layout="fp8_ds_mla")

    got = torch.compile(f, fullgraph=True, backend="eager")(q, cache)
    torch.testing.assert_close(got, f(q, cache))
    assert got.shape == (2, 2, 4, 512)
