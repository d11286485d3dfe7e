"""Packed FP8 KV-cache formats for the paged decode path (``sparse_attention_paged``).

One token of the cache is a fixed number of bytes (uint8 ``[..., bytes_per_token]``), little-endian:

``fp8_ds_mla`` (DeepSeek V3.2 MLA, ``Dqk = 576 = 512 latent + 64 RoPE``), **656 bytes**, the
byte layout of FlashMLA's V3.2 sparse FP8 decode cache::

    bytes   0 .. 511   512 x float8_e4m3fn   latent channels 0..511, quantized
    bytes 512 .. 527     4 x float32         scale of channels 128*g .. 128*g+127, g = 0..3
    bytes 528 .. 655    64 x bfloat16        RoPE channels 512..575, not quantized

``fp8_ds_v4`` (``Dqk = d_v = 512``, no separate RoPE part), **528 bytes**::

    bytes   0 .. 511   512 x float8_e4m3fn   channels 0..511
    bytes 512 .. 527     4 x float32         scale per 128 channels

``fp8_ds_v4`` is opbridge's own layout (the V3.2 one without the RoPE part). It is NOT FlashMLA's
584-byte MODEL1 cache (448 e4m3 + 64 bf16 RoPE + 7 e8m0 scales per 64 channels, scales stored per
block after the tokens); that one is not implemented.

Quantization (OPS.md section 1's fp8 rule, block ``(1, 128)``): ``s_g = max(amax_g, 1e-4) / 448``
(rounded up to a power of two with ``ue8m0=True``, as FlashMLA's own quantizer does), stored
value ``e4m3(clamp(x / s_g, -448, 448))``. Dequantized value: ``float32(e4m3) * s_g`` computed in
float32 (a backend must give this exact value before any rounding of its own); RoPE channels are
``float32(bf16)``. Inputs must be finite.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import checks as C
from .errors import OpError
from .formats import quantize

NATIVE = "native"
FP8 = torch.float8_e4m3fn
GROUP = 128  # channels per float32 scale


@dataclass(frozen=True)
class KVCacheLayout:
    """Where each part of one packed token lives (all offsets and sizes in bytes unless named)."""

    name: str
    n_fp8: int  # quantized channels (first in the token and first in the row of values)
    n_rope: int  # trailing bfloat16 channels (0: none)

    @property
    def n_scales(self) -> int:
        return self.n_fp8 // GROUP

    @property
    def dqk(self) -> int:
        """Channels of one dequantized token (the key width)."""
        return self.n_fp8 + self.n_rope

    @property
    def scale_offset(self) -> int:
        return self.n_fp8

    @property
    def rope_offset(self) -> int:
        return self.n_fp8 + 4 * self.n_scales

    @property
    def bytes_per_token(self) -> int:
        return self.rope_offset + 2 * self.n_rope


LAYOUTS = {
    "fp8_ds_mla": KVCacheLayout("fp8_ds_mla", n_fp8=512, n_rope=64),
    "fp8_ds_v4": KVCacheLayout("fp8_ds_v4", n_fp8=512, n_rope=0),
}
LAYOUT_NAMES = (NATIVE, *LAYOUTS)


def packed_layout(name: str) -> Optional[KVCacheLayout]:
    """The packed layout called ``name``; None for an unpacked (float) cache.

    ``""`` is accepted as ``"native"``: it is how the custom op carries the default, so graphs
    exported before the option existed (no attribute) keep their meaning.
    """
    return None if name in ("", NATIVE) else LAYOUTS[name]


def get_layout(op: str, arg: str, name: object) -> Optional[KVCacheLayout]:
    """Validate a layout name given by a user of ``op`` (argument ``arg``); None for ``"native"``."""
    C.choice(op, arg, name, LAYOUT_NAMES)
    return packed_layout(name)  # type: ignore[arg-type]


def _packed_only(op: str, layout: str) -> KVCacheLayout:
    C.choice(op, "layout", layout, tuple(LAYOUTS))
    return LAYOUTS[layout]


def quantize_kv_cache(kv: torch.Tensor, *, layout: str = "fp8_ds_mla", ue8m0: bool = False) -> torch.Tensor:
    """Pack float KV tokens ``[..., Dqk]`` into the uint8 cache format ``layout``: ``[..., bytes_per_token]``.

    ``fp8_ds_mla``: Dqk 576 -> 656 bytes per token (bytes 0..511 e4m3 latent, 512..527 four float32
    scales, one per 128 channels, 528..655 the 64 RoPE channels as bfloat16). ``fp8_ds_v4``:
    Dqk 512 -> 528 bytes (no RoPE part). Scale ``s = max(amax, 1e-4) / 448`` per 128 channels,
    a power of two with ``ue8m0=True``. See the module docstring for the full byte layout.
    Typical use: ``kv_cache[num_blocks, block_size, 656] = quantize_kv_cache(kv_bf16)``.
    """
    op = "quantize_kv_cache"
    L = _packed_only(op, layout)
    C.tensor(op, "kv", kv, C.FLOAT_DTYPES)
    if kv.dim() < 1 or kv.shape[-1] != L.dqk:
        raise OpError(op, "kv", f"last dim {L.dqk} (Dqk of layout '{layout}')", f"shape {tuple(kv.shape)}")
    lead = kv.shape[:-1]
    q = quantize(kv[..., :L.n_fp8], "fp8", (1, GROUP), ue8m0=bool(ue8m0))
    parts = [q.data.contiguous().view(torch.uint8), q.scale.float().contiguous().view(torch.uint8)]
    if L.n_rope:
        parts.append(kv[..., L.n_fp8:].to(torch.bfloat16).contiguous().view(torch.uint8))
    out = torch.cat(parts, dim=-1)
    return out.view(*lead, L.bytes_per_token)


def dequantize_kv_cache(cache: torch.Tensor, *, layout: str = "fp8_ds_mla") -> torch.Tensor:
    """Unpack a uint8 cache ``[..., bytes_per_token]`` of ``layout`` to float32 ``[..., Dqk]``.

    Latent channel ``c``: ``float32(e4m3) * scale[c // 128]`` (float32 product); RoPE channels:
    ``float32(bf16)``. Inverse of :func:`quantize_kv_cache` up to the fp8 rounding.
    """
    op = "dequantize_kv_cache"
    L = _packed_only(op, layout)
    C.tensor(op, "cache", cache, (torch.uint8,))
    if cache.dim() < 1 or cache.shape[-1] != L.bytes_per_token:
        raise OpError(op, "cache", f"last dim {L.bytes_per_token} (bytes per token of layout '{layout}')",
                      f"shape {tuple(cache.shape)}")
    c = cache.contiguous()
    lead = c.shape[:-1]
    vals = c[..., :L.n_fp8].view(FP8).float()
    scales = c[..., L.scale_offset:L.rope_offset].view(torch.float32)  # [..., n_scales]
    lat = (vals.unflatten(-1, (L.n_scales, GROUP)) * scales.unsqueeze(-1)).flatten(-2)
    if not L.n_rope:
        return lat.view(*lead, L.dqk)
    rope = c[..., L.rope_offset:].view(torch.bfloat16).float()
    return torch.cat([lat, rope], dim=-1).view(*lead, L.dqk)
