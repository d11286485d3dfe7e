"""Quantized formats (OPS.md section 1) against values decoded by hand from the raw layouts."""
from __future__ import annotations

import math

import pytest
import torch

import opbridge
from opbridge.core.formats import e2m1_decode, e2m1_encode
from tests.backends.reference import naive

FP8_MAX = 448.0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _blocks_1x128(x: torch.Tensor):
    """Yield (row index, block index, float64 values) of every (1,128) block of x."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float64)
    for r in range(x2.shape[0]):
        for kb in range(math.ceil(x2.shape[1] / 128)):
            yield r, kb, x2[r, kb * 128:(kb + 1) * 128]


def _fp8_rel_bound(v: torch.Tensor, s: float) -> torch.Tensor:
    """Largest error of rounding v to the nearest e4m3 value times s: half a step at v's binade.

    e4m3fn: 3 mantissa bits, normal exponents from -6 (subnormal step 2**-9).
    """
    mag = (v.abs() / s).clamp_min(2.0 ** -6)
    step = torch.exp2(torch.floor(torch.log2(mag)) - 3)
    return step / 2 * s * (1 + 1e-6)


# ---- fp8 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_1x128_scales_and_round_trip(ue8m0):
    g = _gen(1)
    # K not a multiple of 128 (a short last block), leading dims, rows of very different magnitude,
    # and one all-zero row (amax below the 1e-4 floor).
    x = torch.randn(2, 3, 300, generator=g) * torch.logspace(-3, 3, 3).view(1, 3, 1)
    x[1, 1] = 0.0
    q = opbridge.quantize(x, "fp8", (1, 128), ue8m0=ue8m0)
    assert q.data.dtype == torch.float8_e4m3fn and q.data.shape == x.shape
    assert q.scale.dtype == torch.float32 and q.scale.shape == (2, 3, 3)
    scales = q.scale.reshape(-1, 3)
    data = q.data.to(torch.float64).reshape(-1, 300)
    for r, kb, blk in _blocks_1x128(x):
        s_raw = max(float(blk.abs().max()), 1e-4) / FP8_MAX
        s = float(scales[r, kb])
        if ue8m0:
            assert s == 2.0 ** math.ceil(math.log2(s_raw)), (r, kb, s, s_raw)
        else:
            assert s == pytest.approx(s_raw, rel=1e-6)
        d = data[r, kb * 128:(kb + 1) * 128]
        assert float(d.abs().max()) <= FP8_MAX
        if float(blk.abs().max()) > 1e-4 and not ue8m0:
            assert float(d.abs().max()) == FP8_MAX  # the block's amax maps to the top of the range
        if ue8m0 and float(blk.abs().max()) > 1e-4:
            assert float(d.abs().max()) >= FP8_MAX / 2  # the scale was rounded up by less than 2x
        err = (d * s - blk).abs()
        assert bool((err <= _fp8_rel_bound(blk, s)).all()), float(err.max())
    deq = opbridge.dequantize(q)
    assert deq.dtype == torch.float32 and deq.shape == x.shape
    torch.testing.assert_close(deq.to(torch.float64), naive.dequant(q), rtol=0, atol=0)
    assert bool((deq[1, 1] == 0).all())


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("shape", [(2, 200, 300), (130, 256)])
def test_fp8_128x128_scales_and_round_trip(shape, ue8m0):
    g = _gen(2)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(torch.bfloat16)
    q = opbridge.quantize(x, "fp8", (128, 128), ue8m0=ue8m0)
    x3 = x.to(torch.float64).reshape(-1, *shape[-2:])
    N, K = shape[-2:]
    nb, kb = math.ceil(N / 128), math.ceil(K / 128)
    assert q.data.shape == x.shape and q.scale.shape == (*shape[:-2], nb, kb)
    s3 = q.scale.reshape(-1, nb, kb)
    d3 = q.data.to(torch.float64).reshape(x3.shape)
    for e in range(x3.shape[0]):
        for i in range(nb):
            for j in range(kb):
                blk = x3[e, i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
                s_raw = max(float(blk.abs().max()), 1e-4) / FP8_MAX
                s = float(s3[e, i, j])
                if ue8m0:
                    assert s == 2.0 ** math.ceil(math.log2(s_raw))
                else:
                    assert s == pytest.approx(s_raw, rel=1e-6)
                    assert float(d3[e, i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].abs().max()) == FP8_MAX
                d = d3[e, i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
                assert bool(((d * s - blk).abs() <= _fp8_rel_bound(blk, s)).all())
    torch.testing.assert_close(opbridge.dequantize(q).to(torch.float64), naive.dequant(q), rtol=0, atol=0)


def test_fp8_blocks_are_independent():
    # A huge value in one block must not change the scale (hence precision) of its neighbours.
    x = torch.ones(1, 256)
    x[0, 200] = 1000.0
    q = opbridge.quantize(x, "fp8", (1, 128))
    assert float(q.scale[0, 0]) == pytest.approx(1.0 / FP8_MAX, rel=1e-6)
    assert float(q.scale[0, 1]) == pytest.approx(1000.0 / FP8_MAX, rel=1e-6)
    assert bool((opbridge.dequantize(q)[0, :128] == 1.0).all())


# ---- e2m1 / mxfp4 ------------------------------------------------------------------------------

def test_e2m1_every_code_decodes_and_encodes_back():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = e2m1_decode(codes)
    expected = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert vals.tolist() == expected
    assert [naive.e2m1_value(c) for c in range(16)] == expected
    back = e2m1_encode(vals).tolist()
    for c in range(16):
        # -0.0 carries no sign through "v < 0"; either zero code decodes to 0.
        assert back[c] == (0 if c == 8 else c), (c, back[c])
    # Negative values get the sign in bit 3, magnitude bits as for the positive value.
    neg = e2m1_encode(torch.tensor([-0.5, -6.0, -100.0])).tolist()
    assert neg == [9, 15, 15]


def test_e2m1_ties_go_to_the_even_code():
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    # Expected by hand: 0.25->0 (code 0), 0.75->1.0 (2), 1.25->1.0 (2), 1.75->2.0 (4),
    # 2.5->2.0 (4), 3.5->4.0 (6), 5.0->4.0 (6).
    want = [0, 2, 2, 4, 4, 6, 6]
    got = e2m1_encode(torch.tensor(mids)).tolist()
    assert got == want
    assert [naive.e2m1_nearest_code(v) for v in mids] == want
    neg = e2m1_encode(torch.tensor([-v for v in mids])).tolist()
    assert neg[1:] == [c | 8 for c in want[1:]]
    assert neg[0] in (0, 8)  # -0.25 rounds to a zero
    # Just off a midpoint the nearest code wins regardless of parity.
    assert e2m1_encode(torch.tensor([0.2500001, 0.7499999, 4.9999, 5.0001])).tolist() == [1, 1, 6, 7]


def test_e2m1_random_values_match_nearest_code():
    g = _gen(3)
    v = torch.randn(2000, generator=g, dtype=torch.float32) * 3
    got = e2m1_encode(v).tolist()
    want = [naive.e2m1_nearest_code(float(x)) for x in v]
    assert got == want


def test_mxfp4_packing_order_even_element_low_nibble():
    # amax 6 gives scale 2**0 exactly, so the values are encoded as they are.
    vals = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0] * 2 + [-0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0, 0.0] * 2
    x = torch.tensor([vals])
    q = opbridge.quantize(x, "mxfp4")
    assert q.data.dtype == torch.uint8 and q.data.shape == (1, 16)
    assert q.scale.dtype == torch.uint8 and q.scale.tolist() == [[127]]
    codes = [naive.e2m1_nearest_code(v) for v in vals]
    assert q.data[0].tolist() == [codes[2 * i] | (codes[2 * i + 1] << 4) for i in range(16)]
    assert q.data[0, 0].item() == 0x10  # element 0 (code 0) low, element 1 (code 1) high
    assert opbridge.dequantize(q)[0].tolist() == vals


def test_mxfp4_scales_and_round_trip():
    g = _gen(4)
    # Rows of different magnitude, one row of zeros (amax floor 1e-4), K = 3 blocks of 32.
    x = torch.randn(2, 4, 96, generator=g) * torch.tensor([1e-3, 0.3, 7.0, 1e3]).view(1, 4, 1)
    x[1, 2] = 0.0
    q = opbridge.quantize(x, "mxfp4")
    assert q.data.shape == (2, 4, 48) and q.scale.shape == (2, 4, 3)
    assert q.fmt == "mxfp4" and tuple(q.block) == (1, 32)
    x2 = x.reshape(-1, 96).to(torch.float64)
    s2 = q.scale.reshape(-1, 3).tolist()
    d2 = q.data.reshape(-1, 48).tolist()
    for r in range(x2.shape[0]):
        for b in range(3):
            blk = x2[r, b * 32:(b + 1) * 32]
            e = math.ceil(math.log2(max(float(blk.abs().max()), 1e-4) / 6))
            assert s2[r][b] == e + 127, (r, b)
            for i in range(32):
                col = b * 32 + i
                byte = d2[r][col // 2]
                code = byte & 0xF if col % 2 == 0 else byte >> 4
                assert code == naive.e2m1_nearest_code(float(blk[i]) / 2.0 ** e) or \
                    (float(blk[i]) == 0 and code in (0, 8)), (r, col)
    deq = opbridge.dequantize(q)
    assert deq.dtype == torch.float32
    torch.testing.assert_close(deq.to(torch.float64), naive.dequant(q), rtol=0, atol=0)
    # Every value is within half of the widest e2m1 step (2) times the block scale.
    scale = torch.exp2(q.scale.to(torch.float64) - 127).repeat_interleave(32, -1)
    assert bool(((deq.to(torch.float64) - x.to(torch.float64)).abs() <= scale).all())


def test_quantize_rejects_bad_arguments():
    with pytest.raises(opbridge.OpError, match="quantize.*block"):
        opbridge.quantize(torch.randn(4, 128), "fp8", (1, 64))
    with pytest.raises(opbridge.OpError, match="quantize.*fmt"):
        opbridge.quantize(torch.randn(4, 128), "int4")
    with pytest.raises(opbridge.OpError, match="quantize.*x"):
        opbridge.quantize(torch.randn(4, 48), "mxfp4")
    with pytest.raises(TypeError, match="quantize.*x"):
        opbridge.quantize(torch.ones(4, 128, dtype=torch.int32), "fp8")
