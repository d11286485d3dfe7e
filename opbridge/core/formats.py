"""Quantized tensor formats of OPS.md section 1: block-scaled FP8 and MXFP4 (e2m1 + E8M0).

Plain PyTorch (any device, traceable); the kernels read these layouts directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .errors import OpError, OpTypeError

FP8_MAX = 448.0
FP8_MIN_AMAX = 1e-4
FORMATS = ("fp8", "mxfp4")
FP8_BLOCKS = ((1, 128), (128, 128))
MXFP4_BLOCK = (1, 32)

# e2m1 magnitudes by code (bit 3 is the sign).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


@dataclass(frozen=True)
class QuantTensor:
    """A quantized tensor: ``data`` and ``scale`` in the layout of OPS.md section 1.

    ``fmt`` is ``"fp8"`` (data float8_e4m3fn, same shape as the original; block (1,128) or
    (128,128)) or ``"mxfp4"`` (data uint8 [..., K/2], two e2m1 codes per byte, even element in
    the low nibble; scale uint8 E8M0 [..., K/32]; block (1,32)).
    """

    data: torch.Tensor
    scale: torch.Tensor
    fmt: str
    block: tuple[int, int]

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise OpError("QuantTensor", "fmt", f"one of {FORMATS}", repr(self.fmt))
        object.__setattr__(self, "block", tuple(int(b) for b in self.block))

    @property
    def shape(self) -> torch.Size:
        """The logical (de-quantized) shape."""
        if self.fmt == "mxfp4":
            return torch.Size((*self.data.shape[:-1], self.data.shape[-1] * 2))
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dim(self) -> int:
        return self.data.dim()

    def to(self, device: torch.device | str) -> "QuantTensor":
        return QuantTensor(self.data.to(device), self.scale.to(device), self.fmt, self.block)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)

    def __repr__(self) -> str:
        return f"QuantTensor(fmt={self.fmt!r}, block={self.block}, shape={tuple(self.shape)}, device={self.device})"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(s)))


def _fp8_scales(amax: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    s = amax.clamp_min(FP8_MIN_AMAX) / FP8_MAX
    return _pow2_ceil(s) if ue8m0 else s


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    pad = (-x.shape[dim]) % multiple
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def quantize(x: torch.Tensor, fmt: str, block: Optional[tuple[int, int]] = None, *, ue8m0: bool = False) -> QuantTensor:
    """Quantize ``x`` to ``fmt`` with the given block. Default blocks: fp8 (1,128), mxfp4 (1,32)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise OpTypeError("quantize", "x", "a floating-point tensor", f"{type(x).__name__} {getattr(x, 'dtype', '')}")
    if fmt == "fp8":
        block = tuple(block or (1, 128))
        if block not in FP8_BLOCKS:
            raise OpError("quantize", "block", f"one of {FP8_BLOCKS} for fp8", str(block))
        return _quantize_fp8(x, block, ue8m0)
    if fmt == "mxfp4":
        block = tuple(block or MXFP4_BLOCK)
        if block != MXFP4_BLOCK:
            raise OpError("quantize", "block", f"{MXFP4_BLOCK} for mxfp4", str(block))
        return _quantize_mxfp4(x)
    raise OpError("quantize", "fmt", f"one of {FORMATS}", repr(fmt))


def _quantize_fp8(x: torch.Tensor, block: tuple[int, int], ue8m0: bool) -> QuantTensor:
    xf = x.float()
    K = x.shape[-1]
    if block == (1, 128):
        if x.dim() < 1:
            raise OpError("quantize", "x", "at least 1 dimension", "a scalar")
        xb = _pad_to(xf, -1, 128).unflatten(-1, (-1, 128))  # [..., Kb, 128]
        scale = _fp8_scales(xb.abs().amax(-1), ue8m0)  # [..., Kb]
        q = (xb / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).flatten(-2)[..., :K]
    else:
        if x.dim() not in (2, 3):
            raise OpError("quantize", "x", "[N, K] or [E, N, K] for block (128, 128)", f"shape {tuple(x.shape)}")
        squeeze = x.dim() == 2
        x3 = xf.unsqueeze(0) if squeeze else xf
        E, N, _ = x3.shape
        xp = _pad_to(_pad_to(x3, -1, 128), -2, 128)
        xb = xp.unflatten(-1, (-1, 128)).unflatten(1, (-1, 128))  # [E, Nb, 128, Kb, 128]
        scale = _fp8_scales(xb.abs().amax(dim=(2, 4)), ue8m0)  # [E, Nb, Kb]
        q = (xb / scale[:, :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).flatten(3).flatten(1, 2)[:, :N, :K]
        if squeeze:
            q, scale = q[0], scale[0]
    return QuantTensor(q.to(torch.float8_e4m3fn).contiguous(), scale.contiguous(), "fp8", block)


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code (uint8, sign in bit 3) of already-scaled values; ties go to the even code."""
    mag = v.abs()
    mids = torch.tensor(_E2M1_MIDPOINTS, dtype=mag.dtype, device=mag.device)
    above = torch.bucketize(mag, mids, right=False)  # midpoints strictly below |v|
    at_or_above = torch.bucketize(mag, mids, right=True)  # midpoints at or below |v|
    # At a midpoint the two candidates are adjacent codes; keep the even one.
    code = torch.where(above % 2 == 0, above, at_or_above)
    sign = (v < 0).to(torch.uint8) << 3
    return code.to(torch.uint8) | sign


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=codes.device)
    return table[codes.long()]


# Rows quantized per step, so scratch memory stays small for expert-sized weights.
_MXFP4_CHUNK_ELEMS = 1 << 24


def _quantize_mxfp4(x: torch.Tensor) -> QuantTensor:
    K = x.shape[-1]
    if K % 32 != 0:
        raise OpError("quantize", "x", "last dimension a multiple of 32 for mxfp4", f"{K}")
    rows = x.reshape(-1, K)
    packed = torch.empty((rows.shape[0], K // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty((rows.shape[0], K // 32), dtype=torch.uint8, device=x.device)
    step = max(1, _MXFP4_CHUNK_ELEMS // K)
    for lo in range(0, rows.shape[0], step):
        xb = rows[lo:lo + step].float().unflatten(-1, (-1, 32))
        amax = xb.abs().amax(-1).clamp_min(FP8_MIN_AMAX)
        exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
        codes = e2m1_encode(xb / torch.exp2(exp).unsqueeze(-1)).flatten(-2)
        packed[lo:lo + step] = codes[..., 0::2] | (codes[..., 1::2] << 4)
        scale[lo:lo + step] = (exp + 127).to(torch.uint8)
    lead = x.shape[:-1]
    return QuantTensor(packed.view(*lead, K // 2), scale.view(*lead, K // 32), "mxfp4", MXFP4_BLOCK)


def unpack_e2m1(data: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> codes uint8 [..., K] (even element from the low nibble)."""
    return torch.stack([data & 0xF, data >> 4], dim=-1).flatten(-2)


def dequantize(q: QuantTensor) -> torch.Tensor:
    """The float32 values a QuantTensor stands for."""
    if not isinstance(q, QuantTensor):
        raise OpTypeError("dequantize", "q", "a QuantTensor", type(q).__name__)
    if q.fmt == "mxfp4":
        vals = e2m1_decode(unpack_e2m1(q.data)).unflatten(-1, (-1, 32))
        scale = torch.exp2(q.scale.float() - 127.0)
        return (vals * scale.unsqueeze(-1)).flatten(-2)
    d = q.data.float()
    if q.block == (1, 128):
        s = q.scale.repeat_interleave(128, dim=-1)[..., : d.shape[-1]]
        return d * s
    s = q.scale.repeat_interleave(128, dim=-1)[..., : d.shape[-1]]
    s = s.repeat_interleave(128, dim=-2)[..., : d.shape[-2], :]
    return d * s


def dequantize_if(x):  # noqa: ANN001, ANN201 - tensor or QuantTensor
    """``dequantize(x)`` for a QuantTensor, ``x`` otherwise."""
    return dequantize(x) if isinstance(x, QuantTensor) else x
