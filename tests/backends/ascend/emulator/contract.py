"""What every emulated vendor op shares: the emulated device, and how a violated contract fails.

A real torch_npu op that gets arguments outside its documented contract raises a RuntimeError
from its aclnn parameter check; the emulator does the same (:class:`ContractError`), naming the
op and the documented rule. Outputs the docs call undefined are filled with NaN (floats) or
``UNDEFINED_INT`` (integers), so a caller that reads them gets visibly wrong results.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

HALF = (torch.float16, torch.bfloat16)
FLOAT = (torch.float16, torch.bfloat16, torch.float32)
INT_MAX64 = 9223372036854775807  # the schemas' pre_tokens / next_tokens default
UNDEFINED_INT = -987654321


class ContractError(RuntimeError):
    """An argument outside the vendor op's documented contract."""


class MissingKernel(RuntimeError):
    """The op's schema exists but the emulated SoC has no kernel for it (CANN error 561103)."""


@dataclass
class Device:
    """The emulated NPU: its name as torch_npu reports it and its SoC family."""

    name: str = "Ascend910_9392"
    family: str = "A3"
    torch_npu: str = "2.13.0"
    cann: str = "9.1.0"


DEVICE = Device()

# The SoC families each emulated op's documentation (or production use) names; a call on another
# family fails like a missing kernel.
SOCS = {
    "npu_moe_gating_top_k": ("A2", "A3", "950"),
    "npu_moe_init_routing_v2": ("A2", "A3", "950"),
    "npu_grouped_matmul": ("A2", "A3", "950"),
    "npu_swiglu": ("A2",),
    "npu_moe_token_unpermute": ("A2", "A3", "950"),
    "npu_lightning_indexer": ("A2", "A3", "950"),
    "npu_sparse_flash_attention": ("A2", "A3", "950"),
    "npu_mhc_pre": ("950",),
    "npu_mhc_sinkhorn": ("950",),
    "npu_mhc_post": ("950",),
}


def need(cond: object, op: str, rule: str) -> None:
    if not cond:
        raise ContractError(f"{op}: {rule}")


def need_kernel(op: str) -> None:
    if DEVICE.family not in SOCS[op]:
        raise MissingKernel(f"{op}: error code 561103, no kernel binary for {DEVICE.name} "
                            f"(documented for {', '.join(SOCS[op])})")


def need_int32(op: str, name: str, t: object, dims: int = 1) -> None:
    need(isinstance(t, torch.Tensor) and t.dtype == torch.int32 and t.dim() == dims, op,
         f"{name} must be an int32 tensor with {dims} dimension(s)")


def undefined(shape, dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype)
    return torch.full(shape, UNDEFINED_INT, dtype=dtype)


def cumulative(op: str, name: str, lengths: torch.Tensor, total: int) -> list[int]:
    """A prefix-sum length list (TND): non-negative, non-decreasing, ending at the packed row count."""
    need_int32(op, name, lengths)
    v = lengths.tolist()
    need(len(v) > 0 and v[0] >= 0 and all(b >= a for a, b in zip(v, v[1:])), op,
         f"{name} (TND) holds cumulative lengths: non-negative and non-decreasing, got {v}")
    need(v[-1] == total, op, f"{name} (TND) must end at the packed row count {total}, got {v[-1]}")
    return [0] + v
