"""Where each (token, slot) copy of one rank goes: the routing layout of expert parallelism.

Pure tensor code on the device of the ids, no communication and no host synchronisation, so it
can be tested in one process and captured in a graph. Experts are placed contiguously: rank ``r``
of a group of ``W`` ranks owns global experts ``[r*El, (r+1)*El)`` with ``El = E / W``; sorting the
copies by global expert therefore also groups them by destination rank, which is the order
``all_to_all_single`` wants.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ExpertShard:
    """Contiguous placement of ``num_experts`` experts over ``world_size`` ranks."""

    num_experts: int
    world_size: int
    rank: int

    @property
    def num_local(self) -> int:
        return self.num_experts // self.world_size

    @property
    def first(self) -> int:
        """Global id of this rank's local expert 0."""
        return self.rank * self.num_local

    def owner(self, expert: int) -> int:
        return expert // self.num_local


@dataclass(frozen=True)
class Layout:
    """The send side of one dispatch, computed from ``topk_ids`` alone.

    ``order`` lists the flat copy indices ``token*k + slot`` sorted by global expert (stable, so
    ``(token, slot)`` order within an expert); copies with no expert (``-1``, or an id outside
    ``[0, E)``) sort last under the virtual expert ``E``. ``counts[e]`` is the number of copies
    for expert ``e`` (``counts[E]``: copies with no expert). With a ``capacity``, copy ``order[i]``
    goes to row ``slot[i]`` of a ``[E * capacity]`` send buffer, or to the discard row
    ``E * capacity`` when its expert already has ``capacity`` copies from this rank.
    """

    num_tokens: int
    top_k: int
    order: torch.Tensor  # int64 [T*k]
    expert: torch.Tensor  # int64 [T*k], global expert of order[i], E for none
    counts: torch.Tensor  # int64 [E+1]
    capacity: Optional[int] = None
    slot: Optional[torch.Tensor] = None  # int64 [T*k] (capacity mode)
    kept: Optional[torch.Tensor] = None  # bool [T*k] (capacity mode)

    @property
    def num_experts(self) -> int:
        return self.counts.numel() - 1

    def send_counts(self) -> torch.Tensor:
        """int64 [E]: copies this rank sends to each global expert (capped in capacity mode)."""
        c = self.counts[:-1]
        return c.clamp(max=self.capacity) if self.capacity is not None else c

    def dropped(self) -> torch.Tensor:
        """int64 scalar: copies not sent because their expert was full (0 when dropless)."""
        c = self.counts[:-1]
        return (c - self.send_counts()).sum() if self.capacity is not None else c.new_zeros(())


def make_layout(topk_ids: torch.Tensor, num_experts: int, capacity: Optional[int] = None) -> Layout:
    """Sort the copies of ``topk_ids [T, k]`` by global expert; with ``capacity``, assign buffer slots."""
    T, k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    # Ids outside [0, E) are "no expert": they are never sent and never index anything (no OOB).
    key = torch.where((flat >= 0) & (flat < num_experts), flat, torch.full_like(flat, num_experts))
    order = torch.argsort(key, stable=True)
    expert = key[order]
    # scatter_add, not bincount: bincount reads the max on the host, which would sync the device.
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    if capacity is None:
        return Layout(T, k, order, expert, counts)
    starts = counts.cumsum(0) - counts
    pos = torch.arange(order.numel(), device=flat.device) - starts[expert]
    kept = (pos < capacity) & (expert < num_experts)
    slot = torch.where(kept, expert * capacity + pos, torch.full_like(pos, num_experts * capacity))
    return Layout(T, k, order, expert, counts, capacity, slot, kept)


def received_ids(recv_counts: torch.Tensor, capacity: Optional[int], num_rows: int) -> torch.Tensor:
    """Local expert id of every received row: int32 ``[R]``, ``-1`` for padding rows.

    ``recv_counts`` int64 ``[W, El]``: copies each source rank sent to each local expert. Dropless
    rows arrive grouped by source, then by local expert; capacity rows arrive as ``[W, El, capacity]``
    with the first ``recv_counts[s, e]`` rows of each ``(s, e)`` block valid.
    """
    W, El = recv_counts.shape
    local = torch.arange(El, device=recv_counts.device)
    if capacity is None:
        return torch.repeat_interleave(local.repeat(W), recv_counts.reshape(-1), output_size=num_rows).int()
    pos = torch.arange(capacity, device=recv_counts.device)
    valid = pos.view(1, 1, -1) < recv_counts.unsqueeze(-1)
    return torch.where(valid, local.view(1, -1, 1), -1).reshape(-1).int()
