"""The collectives expert parallelism uses, on any torch.distributed backend (NCCL, HCCL, gloo).

Only ``all_to_all_single`` and ``all_gather`` are used: every process-group backend that torch or
a vendor plugin ships implements both. ``all_to_all`` is wrapped in an autograd function (its
backward is the reverse exchange) so the layer can be trained.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):  # noqa: ANN001, ANN205
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, out_splits: Optional[Sequence[int]], in_splits: Optional[Sequence[int]],
                group) -> torch.Tensor:  # noqa: ANN001
    rows = sum(out_splits) if out_splits is not None else x.shape[0]
    out = x.new_empty((rows, *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=out_splits, input_split_sizes=in_splits,
                           group=group)
    return out


def all_to_all(x: torch.Tensor, out_splits: Optional[Sequence[int]], in_splits: Optional[Sequence[int]],
               group) -> torch.Tensor:  # noqa: ANN001
    """Rows ``x [N, ...]`` split by ``in_splits`` to the ranks; returns the rows received, by source rank.

    ``None`` splits mean equal splits (capacity mode: no host synchronisation needed).
    Differentiable when ``x`` requires grad.
    """
    if x.requires_grad and torch.is_grad_enabled():
        return _AllToAll.apply(x, out_splits, in_splits, group)
    return _all_to_all(x, out_splits, in_splits, group)


def all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
    """``x [n]`` from every rank -> ``[W, n]`` (same ``n`` on every rank)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)
