"""Expert-parallel MoE over a torch.distributed process group: dispatch, expert compute, combine.

Each rank holds ``El = E / W`` experts (contiguous global ids, see :class:`ExpertShard`) and its own
tokens. One call of :func:`ep_moe`:

1. agreement: a fixed-size ``all_gather`` of each rank's metadata, so a wrong shard, a wrong group
   size or a bad argument on any rank raises the same error on every rank instead of hanging;
2. layout: the ``(token, slot)`` copies sorted by global expert (= by destination rank);
3. counts: ``all_to_all_single`` of the per-expert copy counts ``[W, El]``;
4. dispatch: ``all_to_all_single`` of the copies' hidden states (or their FP8 + scales), received
   grouped by source rank then local expert;
5. expert compute: ``opbridge.moe`` on the received rows with *local* ids (weight 1, one slot each),
   so the backend's fused MoE path runs unchanged on every device;
6. combine: the reverse ``all_to_all_single`` of the expert outputs, then the weighted sum per token
   at the token's home rank (fp32 accumulate), plus the shared experts.

Dropless (default): the exchange sizes are exact, which needs one device->host copy of the counts
per call. With ``capacity=c`` every (source rank, expert) pair gets exactly ``c`` rows, copies
past ``c`` in ``(token, slot)`` order are dropped, and nothing synchronises with the host
(CUDA-graph friendly); padding rows carry the id ``-1``, which ``opbridge.moe`` skips.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..core import checks as C
from ..core import settings
from ..core.errors import OpError, OpTypeError
from ..core.moe import ACTIVATIONS, check_moe_args
from ..core.moe import moe as _moe
from .agreement import Meta, agree, dtype_code, float_code
from .comm import all_to_all
from .layout import ExpertShard, Layout, make_layout, received_ids
from .overlap import SharedExperts
from .payload import Payload

OP = "ep_moe"


@dataclass(frozen=True)
class Dispatched:
    """What one rank received in a dispatch, and what the combine needs to send it back."""

    shard: ExpertShard
    layout: Layout
    group: Any
    recv_counts: torch.Tensor  # int64 [W, El]: copies from each source rank for each local expert
    send_splits: Optional[list[int]]  # rows sent to each rank (dropless); None = equal splits
    recv_splits: Optional[list[int]]
    x: torch.Tensor  # [R, H] received hidden states (de-quantised), dtype of the sender's x
    local_ids: torch.Tensor  # int32 [R]: local expert of each row, -1 for padding rows


@dataclass(frozen=True)
class EPStats:
    """Token statistics of one call on this rank (device tensors; read them when convenient)."""

    tokens_per_expert: torch.Tensor  # int64 [El]: copies received per local expert
    sent_per_rank: torch.Tensor  # int64 [W]: copies sent to each rank
    received_per_rank: torch.Tensor  # int64 [W]: copies received from each rank
    dropped: torch.Tensor  # int64 []: copies not sent because the expert's capacity was full


def _group_info(group) -> tuple[int, int]:  # noqa: ANN001
    if not dist.is_available() or not dist.is_initialized():
        raise OpError(OP, "group", "an initialised torch.distributed process group "
                      "(torch.distributed.init_process_group, e.g. under torchrun)", "none initialised")
    return dist.get_world_size(group), dist.get_rank(group)


def _requires_grad(*ts: object) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


def _check_local(x, topk_weights, topk_ids, w13, w2, *, world: int, num_experts: Optional[int],  # noqa: ANN001
                 activation: str, swiglu_limit: Optional[float], dispatch_fp8: bool,
                 capacity: Optional[int]) -> Meta:
    """This rank's own argument checks (raise locally; :func:`agree` spreads the error to all ranks)."""
    S = check_moe_args(OP, x, topk_weights, topk_ids, w13, w2, experts="El")
    El = S["El"]
    if El < 1:
        raise OpError(OP, "w13", "at least one local expert per rank", f"shape {tuple(w13.shape)}")
    C.choice(OP, "activation", activation, ACTIVATIONS)
    if swiglu_limit is not None and not swiglu_limit > 0:
        raise OpError(OP, "swiglu_limit", "a positive float or None", repr(swiglu_limit))
    if capacity is not None:
        C.positive_int(OP, "capacity", capacity)
    if not isinstance(dispatch_fp8, bool):
        raise OpTypeError(OP, "dispatch_fp8", "a bool", type(dispatch_fp8).__name__)
    C.same_device(OP, x=x, topk_weights=topk_weights, topk_ids=topk_ids, w13=w13, w2=w2)
    x_grad, w_grad = _requires_grad(x), _requires_grad(w13, w2)
    if dispatch_fp8 and x_grad:
        raise OpError(OP, "dispatch_fp8", "False when x requires grad (the FP8 payload is not differentiable)",
                      "True")
    if num_experts is not None:
        C.positive_int(OP, "num_experts", num_experts)
        if num_experts != El * world:
            ranks = f"{num_experts // El} ranks" if num_experts % El == 0 else "no whole number of ranks"
            raise OpError(OP, "group", f"a group of {ranks} for num_experts={num_experts} with {El} local experts "
                          f"per rank (w13.shape[0])", f"a group of {world} ranks ({El * world} experts in all)")
    if settings.validate():
        C.in_range(OP, "topk_ids", topk_ids, -1, El * world, "expert ids (-1 = none)")
    return Meta(world_size=world, local_experts=El, hidden=S["H"], intermediate=S["I"], top_k=S["k"],
                dtype=dtype_code(x.dtype), dispatch_fp8=int(dispatch_fp8), capacity=-1 if capacity is None else capacity,
                activation=ACTIVATIONS.index(activation), swiglu_limit=float_code(swiglu_limit),
                grad=int(x_grad) + 2 * int(w_grad))


def _agreement_device(group, x) -> torch.device:  # noqa: ANN001
    if isinstance(x, torch.Tensor):
        return x.device
    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    return acc if acc is not None else torch.device("cpu")


def setup(x, topk_weights, topk_ids, w13, w2, *, group=None, num_experts: Optional[int] = None,  # noqa: ANN001
          activation: str = "swiglu", swiglu_limit: Optional[float] = None, dispatch_fp8: bool = False,
          capacity: Optional[int] = None, validate: bool = True) -> ExpertShard:
    """Check the arguments on this rank and (``validate``) agree on them with the whole group (collective)."""
    world, rank = _group_info(group)
    error: Optional[BaseException] = None
    meta = None
    try:
        meta = _check_local(x, topk_weights, topk_ids, w13, w2, world=world, num_experts=num_experts,
                            activation=activation, swiglu_limit=swiglu_limit, dispatch_fp8=dispatch_fp8,
                            capacity=capacity)
    except (OpError, OpTypeError) as e:
        if not validate:
            raise
        error = e
    if validate:
        agree(OP, group, _agreement_device(group, x), meta, error)
    return ExpertShard(meta.local_experts * world, world, rank)


# ---- the three stages ----------------------------------------------------------------------------

def dispatch(x: torch.Tensor, topk_ids: torch.Tensor, shard: ExpertShard, *, group=None,  # noqa: ANN001
             dispatch_fp8: bool = False, capacity: Optional[int] = None) -> Dispatched:
    """Send every ``(token, slot)`` copy of ``x`` to the rank owning its expert (collective)."""
    W, El = shard.world_size, shard.num_local
    layout = make_layout(topk_ids, shard.num_experts, capacity)
    send_counts = layout.send_counts().view(W, El)
    recv_counts = all_to_all(send_counts.reshape(-1), None, None, group).view(W, El)
    payload = Payload(x.shape[1], x.dtype, dispatch_fp8)
    wire = payload.pack(x)
    k = layout.top_k
    if capacity is None:
        send_splits, recv_splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()  # host sync
        rows = wire[layout.order[:sum(send_splits)] // k]
        recv = all_to_all(rows, recv_splits, send_splits, group)
    else:
        send_splits = recv_splits = None
        E = shard.num_experts
        # One spare row takes the dropped copies, so the scatter needs no compaction (no host sync).
        buf = wire.new_zeros((E * capacity + 1, wire.shape[1]))
        buf = buf.index_copy(0, layout.slot, wire[layout.order // k])
        recv = all_to_all(buf[:E * capacity], None, None, group)
    ids = received_ids(recv_counts, capacity, recv.shape[0])
    return Dispatched(shard, layout, group, recv_counts, send_splits, recv_splits, payload.unpack(recv), ids)


def expert_compute(d: Dispatched, w13, w2, *, activation: str = "swiglu",  # noqa: ANN001
                   swiglu_limit: Optional[float] = None) -> torch.Tensor:
    """``opbridge.moe`` over this rank's experts for the received rows: ``[R, H]`` (unweighted)."""
    R = d.x.shape[0]
    if R == 0 and not _requires_grad(d.x, w13, w2):
        return d.x.new_zeros((0, d.x.shape[1]))
    ones = torch.ones((R, 1), dtype=torch.float32, device=d.x.device)
    return _moe(d.x, ones, d.local_ids.view(R, 1), w13, w2, activation=activation, swiglu_limit=swiglu_limit)


def combine(y: torch.Tensor, d: Dispatched, topk_weights: torch.Tensor) -> torch.Tensor:
    """Send the expert outputs home and sum them per token with the routing weights (collective).

    Returns ``[T, H]`` in float32 (float64 for float64 inputs), not yet cast to the model dtype.
    """
    lay = d.layout
    T, k = lay.num_tokens, lay.top_k
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    w = topk_weights.reshape(-1).to(acc)
    out = torch.zeros((T, y.shape[1]), dtype=acc, device=y.device)
    if lay.capacity is None:
        back = all_to_all(y, d.send_splits, d.recv_splits, d.group)  # [M, H], in layout order
        idx = lay.order[:back.shape[0]]
        return out.index_add(0, idx // k, back.to(acc) * w[idx].unsqueeze(1))
    back = all_to_all(y, None, None, d.group)  # [E * capacity, H]
    back = torch.cat([back, back.new_zeros((1, back.shape[1]))])  # the discard row reads zeros
    weight = w[lay.order] * lay.kept.to(acc)
    return out.index_add(0, lay.order // k, back[lay.slot].to(acc) * weight.unsqueeze(1))


def stats(d: Dispatched) -> EPStats:
    sent = d.layout.send_counts().view(d.shard.world_size, d.shard.num_local).sum(1)
    return EPStats(d.recv_counts.sum(0), sent, d.recv_counts.sum(1), d.layout.dropped())


# ---- the whole layer -----------------------------------------------------------------------------

def ep_moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13, w2, *,  # noqa: ANN001
           group=None, num_experts: Optional[int] = None, activation: str = "swiglu",  # noqa: ANN001
           swiglu_limit: Optional[float] = None, dispatch_fp8: bool = False, capacity: Optional[int] = None,
           shared_experts: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, overlap_shared: bool = False,
           validate: bool = True, return_stats: bool = False):
    """Expert-parallel ``opbridge.moe``: the same math (OPS.md 2.4) with the experts sharded over ``group``.

    Collective: every rank of ``group`` (default: the world) calls it, each with its own tokens.

    Args:
        x: ``[T, H]`` this rank's tokens (``T`` may differ between ranks, and may be 0).
        topk_weights: float ``[T, k]``; topk_ids: int32/int64 ``[T, k]`` *global* expert ids, ``-1`` = none.
        w13, w2: this rank's experts, ``[El, 2I, H]`` and ``[El, H, I]`` (global experts
            ``rank*El .. rank*El+El-1``); tensors or QuantTensors as ``opbridge.moe`` accepts.
        num_experts: the global expert count, checked against ``El * group size`` when given.
        dispatch_fp8: send FP8 ``(1,128)`` blocks plus scales instead of ``x.dtype`` rows; de-quantised on
            arrival (about half the bytes of bf16; not differentiable).
        capacity: ``None`` = dropless. An int ``c`` = at most ``c`` copies per (source rank, expert), fixed-size
            exchanges with no host synchronisation; later copies are dropped (they add nothing).
        shared_experts: a callable ``x -> [T, H]`` added to the output; with ``overlap_shared=True`` it runs
            on a second stream (where the device has streams) while the all-to-alls are in flight (off by
            default: measured slower than serial on one H200 node, see docs/distributed.md).
        validate: agree on the arguments across ranks first (one small all_gather); a mismatch raises the
            same ``OpError`` on every rank rather than hanging.
        return_stats: also return :class:`EPStats`.

    Returns ``[T, H]`` in ``x.dtype`` (and the stats).
    """
    shard = setup(x, topk_weights, topk_ids, w13, w2, group=group, num_experts=num_experts, activation=activation,
                  swiglu_limit=swiglu_limit, dispatch_fp8=dispatch_fp8, capacity=capacity, validate=validate)
    shared = SharedExperts(shared_experts, x, overlap_shared)
    d = dispatch(x, topk_ids, shard, group=group, dispatch_fp8=dispatch_fp8, capacity=capacity)
    y = expert_compute(d, w13, w2, activation=activation, swiglu_limit=swiglu_limit)
    out = combine(y, d, topk_weights)
    s = shared.result()
    if s is not None:
        out = out + s.to(out.dtype)
    out = out.to(x.dtype)
    return (out, stats(d)) if return_stats else out
