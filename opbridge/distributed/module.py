"""``ExpertParallelMoE``: the routed experts of one MoE layer, sharded over a process group."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..core.errors import OpError
from .comm import all_gather_rows
from .ep import _group_info, ep_moe


class ExpertParallelMoE(nn.Module):
    """The ``num_experts`` routed experts of a MoE layer, ``num_experts / W`` of them on each of the ``W`` ranks.

    Parameters are this rank's shard: ``w13 [El, 2I, H]`` (gate rows, then up rows) and
    ``w2 [El, H, I]`` for global experts ``rank*El .. rank*El+El-1``. ``forward(x, topk_weights,
    topk_ids)`` takes global expert ids (from ``opbridge.moe_route`` / ``moe_route_hash``) and
    returns what ``opbridge.moe`` over all experts returns, plus ``shared_experts(x)`` if given.
    It is a collective: every rank of the group calls it. See :func:`opbridge.distributed.ep_moe`
    for the options.

    ``tokens_per_expert`` (a buffer, int64 ``[El]``) counts the copies each local expert received
    since the last :meth:`reset_stats`; :meth:`expert_load` gathers the global ``[E]`` view.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, group=None,  # noqa: ANN001
                 activation: str = "swiglu", swiglu_limit: Optional[float] = None, dispatch_fp8: bool = False,
                 capacity: Optional[int] = None, shared_experts: Optional[nn.Module] = None,
                 overlap_shared: bool = False, validate: bool = True,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        world, rank = _group_info(group)
        if num_experts % world:
            raise OpError("ExpertParallelMoE", "num_experts", f"a multiple of the group size {world}",
                          str(num_experts))
        self.group, self.num_experts, self.world_size, self.rank = group, num_experts, world, rank
        self.num_local_experts = num_experts // world
        self.first_expert = rank * self.num_local_experts
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.options = dict(activation=activation, swiglu_limit=swiglu_limit, dispatch_fp8=dispatch_fp8,
                            capacity=capacity, overlap_shared=overlap_shared, validate=validate)
        El = self.num_local_experts
        fk = dict(device=device, dtype=dtype)
        self.w13 = nn.Parameter(torch.empty((El, 2 * intermediate_size, hidden_size), **fk))
        self.w2 = nn.Parameter(torch.empty((El, hidden_size, intermediate_size), **fk))
        self.shared_experts = shared_experts
        self.register_buffer("tokens_per_expert", torch.zeros(El, dtype=torch.int64, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.w13.normal_(0.0, 1.0 / math.sqrt(self.hidden_size))
            self.w2.normal_(0.0, 1.0 / math.sqrt(self.intermediate_size))

    @classmethod
    def from_global(cls, w13: torch.Tensor, w2: torch.Tensor, *, group=None, **kwargs) -> "ExpertParallelMoE":  # noqa: ANN001
        """Build this rank's module from the full ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` (kept: this rank's slice)."""
        E, two_i, H = w13.shape
        kwargs.setdefault("device", w13.device)
        kwargs.setdefault("dtype", w13.dtype)
        m = cls(E, H, two_i // 2, group=group, **kwargs)
        lo, hi = m.first_expert, m.first_expert + m.num_local_experts
        with torch.no_grad():
            m.w13.copy_(w13[lo:hi])
            m.w2.copy_(w2[lo:hi])
        return m

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """``x [..., H]`` with ``topk_weights`` / ``topk_ids`` ``[..., k]`` (leading dims are flattened to tokens)."""
        lead = x.shape[:-1] if isinstance(x, torch.Tensor) and x.dim() > 2 else None
        if lead is not None:
            x, topk_weights, topk_ids = (t.reshape(-1, t.shape[-1]) for t in (x, topk_weights, topk_ids))
        out, st = ep_moe(x, topk_weights, topk_ids, self.w13, self.w2, group=self.group,
                         num_experts=self.num_experts, shared_experts=self.shared_experts, return_stats=True,
                         **self.options)
        with torch.no_grad():
            self.tokens_per_expert += st.tokens_per_expert.to(self.tokens_per_expert.device)
        return out if lead is None else out.reshape(*lead, out.shape[-1])

    def reset_stats(self) -> None:
        self.tokens_per_expert.zero_()

    def expert_load(self) -> torch.Tensor:
        """Copies received by every global expert since the last reset: int64 ``[E]`` (collective)."""
        return all_gather_rows(self.tokens_per_expert, self.group).reshape(-1)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, local={self.first_expert}..{self.first_expert + self.num_local_experts - 1}"
                f" of {self.world_size} ranks, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                + ", ".join(f"{k}={v}" for k, v in self.options.items()))
