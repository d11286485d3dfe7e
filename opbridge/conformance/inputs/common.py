"""Shared pieces of the input generators: a seeded random source and layout helpers."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64,
          "fp8": torch.float8_e4m3fn}
INT_DTYPES = {"int32": torch.int32, "int64": torch.int64}
FP8_MAX = 448.0


def dtype(name: str) -> torch.dtype:
    return DTYPES[name]


class Rand:
    """Seeded random tensors made on the target device (falls back to CPU generation + copy)."""

    def __init__(self, seed: int, device: str):
        self.device = torch.device(device)
        try:
            self.g = torch.Generator(device=self.device)
            self.gen_device = self.device
        except RuntimeError:
            self.g = torch.Generator()
            self.gen_device = torch.device("cpu")
        self.g.manual_seed(seed)

    def _out(self, t: torch.Tensor, dt: Optional[torch.dtype] = None) -> torch.Tensor:
        return t.to(self.device, dt) if dt is not None else t.to(self.device)

    def normal(self, *shape: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        x = torch.randn(shape, generator=self.g, device=self.gen_device)
        return self._out(x * scale if scale != 1.0 else x, dtype)

    def uniform(self, *shape: int, lo: float = 0.0, hi: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        x = torch.rand(shape, generator=self.g, device=self.gen_device)
        return self._out(x * (hi - lo) + lo, dtype)

    def randint(self, lo: int, hi: int, *shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return self._out(torch.randint(lo, hi, shape, generator=self.g, device=self.gen_device), dtype)

    def perm(self, n: int) -> torch.Tensor:
        return self._out(torch.randperm(n, generator=self.g, device=self.gen_device))

    def distinct(self, rows: int, n: int, k: int) -> torch.Tensor:
        """``k`` distinct values of ``range(n)`` per row, random order (int64 [rows, k])."""
        return torch.rand((rows, n), generator=self.g, device=self.gen_device).topk(k, dim=-1).indices.to(self.device)


def noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values as a view whose last dimension has stride 2 (kernels must not assume stride 1)."""
    buf = x.new_empty((*x.shape[:-1], x.shape[-1] * 2))
    buf[..., 0::2] = x
    buf[..., 1::2] = x  # not garbage: a kernel reading the wrong elements still sees plausible values
    return buf[..., 0::2]


def fp8_rows(x: torch.Tensor, dims: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp8 quantization over the last ``dims`` dims: (e4m3 data, float32 scale) with value = data * scale."""
    red = tuple(range(-dims, 0))
    scale = x.float().abs().amax(dim=red).clamp_min(1e-4) / FP8_MAX
    s = scale.reshape(*scale.shape, *([1] * dims))
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale.float()


def cu_seqlens(lengths: Sequence[int], device: torch.device) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return torch.tensor(out, dtype=torch.int32, device=device)


def causal_selection(rng: Rand, positions: torch.Tensor, num_keys: int, top_k: int, *, rate: int = 1,
                     shuffle: bool = True) -> torch.Tensor:
    """Random distinct candidates per query: key ``s`` is allowed when ``s < min(num_keys, (p+1)//rate)``.

    Returns int32 ``[Lq, top_k]`` with ``-1`` where a row has fewer candidates; with ``shuffle`` the
    ``-1`` entries sit anywhere in the row (kernels must mask, not stop at the first ``-1``).
    """
    Lq = positions.shape[0]
    if Lq == 0:
        return torch.empty((0, top_k), dtype=torch.int32, device=rng.device)
    width = max(num_keys, 1)
    limit = ((positions.long() + 1) // rate).clamp(0, num_keys)
    keys = torch.rand((Lq, width), generator=rng.g, device=rng.gen_device).to(rng.device)
    cols = torch.arange(width, device=rng.device)
    keys = keys.masked_fill(cols.unsqueeze(0) >= limit.unsqueeze(1), -1.0)
    k = min(top_k, width)
    vals, idx = keys.topk(k, dim=-1)
    idx = torch.where(vals < 0, -1, idx)
    if k < top_k:
        idx = torch.cat([idx, idx.new_full((Lq, top_k - k), -1)], dim=-1)
    if shuffle:
        order = torch.rand((Lq, top_k), generator=rng.g, device=rng.gen_device).to(rng.device).argsort(-1)
        idx = idx.gather(1, order)
    return idx.to(torch.int32)


def paged_layout(rng: Rand, lengths: Sequence[int], block_size: int, spare_blocks: int = 3) -> tuple[torch.Tensor, int]:
    """A random block table for sequences of ``lengths`` tokens.

    Blocks are assigned in shuffled order; unused table slots point at random (valid) blocks so a
    kernel that reads past a sequence's length sees plausible garbage, not zeros.
    """
    need = [max(1, math.ceil(n / block_size)) for n in lengths]
    max_blocks = max(need) + 1
    num_blocks = sum(need) + spare_blocks
    order = rng.perm(num_blocks)
    table = rng.randint(0, num_blocks, len(lengths), max_blocks)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = order[at:at + n]
        at += n
    return table.to(torch.int32), num_blocks


