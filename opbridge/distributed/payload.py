"""What travels in the dispatch: the hidden states as they are, or FP8 with their block scales.

The FP8 payload is one uint8 row per token, ``[fp8 data (H bytes) | float32 scales (4*ceil(H/128) bytes)]``,
so a dispatch stays a single ``all_to_all_single`` (and every backend, NCCL, HCCL and gloo alike,
moves bytes; not all of them move float8 dtypes). Quantisation follows OPS.md section 1,
``opbridge.quantize(x, "fp8", (1, 128))``; it runs once per token, before the rows are copied per
expert, so a token routed to ``k`` experts is quantised once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.formats import QuantTensor, dequantize, quantize

FP8_BLOCK = (1, 128)


@dataclass(frozen=True)
class Payload:
    """How hidden states of width ``hidden`` and dtype ``dtype`` are packed for the wire."""

    hidden: int
    dtype: torch.dtype
    fp8: bool = False

    @property
    def scale_cols(self) -> int:
        return -(-self.hidden // FP8_BLOCK[1])

    @property
    def row_bytes(self) -> int:
        if self.fp8:
            return self.hidden + 4 * self.scale_cols
        return self.hidden * torch.empty((), dtype=self.dtype).element_size()

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, H]`` -> wire rows ``[T, P]`` (``x`` itself unless fp8)."""
        if not self.fp8:
            return x
        q = quantize(x, "fp8", FP8_BLOCK)
        return torch.cat([q.data.view(torch.uint8), q.scale.view(torch.uint8)], dim=1)

    def unpack(self, rows: torch.Tensor) -> torch.Tensor:
        """Wire rows ``[R, P]`` -> hidden states ``[R, H]`` in ``dtype`` (fp8 de-quantised on arrival)."""
        if not self.fp8:
            return rows
        H = self.hidden
        data = rows[:, :H].contiguous().view(torch.float8_e4m3fn)
        scale = rows[:, H:].contiguous().view(torch.float32)
        return dequantize(QuantTensor(data, scale, "fp8", FP8_BLOCK)).to(self.dtype)

    def empty(self, rows: int, device: torch.device) -> torch.Tensor:
        if self.fp8:
            return torch.empty((rows, self.row_bytes), dtype=torch.uint8, device=device)
        return torch.empty((rows, self.hidden), dtype=self.dtype, device=device)
