"""One rank of the gloo expert-parallel tests: ``python ep_worker.py RANK WORLD PORT OUT_DIR``.

Every rank builds the same global problem from a shared seed (all experts, every rank's tokens),
runs the expert-parallel layer on its own tokens and shard, and compares with single-process
``opbridge.moe`` over all experts on the same tokens. Results go to ``OUT_DIR/rank<R>.json`` as
``{check: [ok, detail]}``; the test process asserts on them. Each check runs on every rank, in
the same order (they are collectives).
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn

import opbridge
from opbridge.distributed import (ExpertParallelMoE, combine, dispatch, ep_moe, expert_compute, setup)
from opbridge.conformance.metrics import diff

E_PER_RANK, H, I, K = 2, 128, 32, 3
BF16_DIFF, FP8_DIFF, FP32_DIFF = 5e-5, 1e-3, 1e-10  # OPS.md 5: bf16 moe, fp8 moe; fp32 has no rounding step


class Problem:
    """All experts and every rank's tokens, identical on every rank (same seed)."""

    def __init__(self, world: int, seed: int, dtype: torch.dtype, tokens: list[int], hidden: int = H,
                 skew: float = 0.0, avoid_last_rank: bool = False, holes: float = 0.15):
        g = torch.Generator().manual_seed(seed)
        self.E = E_PER_RANK * world
        self.W13 = (torch.randn(self.E, 2 * I, hidden, generator=g) / hidden ** 0.5).to(dtype)
        self.W2 = (torch.randn(self.E, hidden, I, generator=g) / I ** 0.5).to(dtype)
        self.x, self.w, self.ids, self.logits = [], [], [], []
        for T in tokens:
            x = torch.randn(T, hidden, generator=g).to(dtype)
            logits = torch.randn(T, self.E, generator=g)
            logits[:, :E_PER_RANK] += skew  # uneven load: rank 0's experts are popular
            w, ids = opbridge.moe_route(logits, K, scoring="softmax", renormalize=True)
            ids = ids.clone()
            if avoid_last_rank:  # the last rank's experts are never chosen
                ids[ids >= self.E - E_PER_RANK] = -1
            ids[torch.rand(T, K, generator=g) < holes] = -1  # "no expert" slots
            self.x.append(x), self.w.append(w), self.ids.append(ids), self.logits.append(logits)

    def shard(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo = rank * E_PER_RANK
        return self.W13[lo:lo + E_PER_RANK].clone(), self.W2[lo:lo + E_PER_RANK].clone()

    def reference(self, rank: int, ids: torch.Tensor | None = None, x: torch.Tensor | None = None) -> torch.Tensor:
        x = self.x[rank] if x is None else x
        return opbridge.moe(x, self.w[rank], self.ids[rank] if ids is None else ids, self.W13, self.W2)

    def received(self, rank: int, world: int) -> torch.Tensor:
        """Copies each of ``rank``'s local experts receives from all ranks."""
        allids = torch.cat([i.reshape(-1) for i in self.ids]).long()
        counts = torch.bincount(allids[allids >= 0], minlength=self.E)
        return counts[rank * E_PER_RANK:(rank + 1) * E_PER_RANK]


def tokens_for(world: int, empty_rank: int | None = None) -> list[int]:
    t = [13, 6, 9, 4][:world]
    if empty_rank is not None:
        t[empty_rank] = 0
    return t


# ---- checks: each returns a short detail string or raises AssertionError ------------------------

def check_bf16_uneven(rank, world):
    p = Problem(world, 1, torch.bfloat16, tokens_for(world), skew=3.0)
    w13, w2 = p.shard(rank)
    out, st = ep_moe(p.x[rank], p.w[rank], p.ids[rank], w13, w2, num_experts=p.E, return_stats=True)
    d = diff(out, p.reference(rank))
    assert out.dtype == torch.bfloat16 and out.shape == p.x[rank].shape, (out.dtype, out.shape)
    assert d < BF16_DIFF, f"diff {d:.3g}"
    assert torch.equal(st.tokens_per_expert, p.received(rank, world)), (st.tokens_per_expert, p.received(rank, world))
    loads = [int(p.received(r, world).sum()) for r in range(world)]
    assert loads[0] > 2 * max(loads[1:]), f"load not uneven: {loads}"
    return f"diff {d:.2e} loads {loads}"


def check_fp32_empty(rank, world):
    # The last rank receives nothing (its experts are never chosen) and rank 1 has no tokens.
    p = Problem(world, 2, torch.float32, tokens_for(world, empty_rank=1), avoid_last_rank=True)
    w13, w2 = p.shard(rank)
    out, st = ep_moe(p.x[rank], p.w[rank], p.ids[rank], w13, w2, return_stats=True)
    d = diff(out, p.reference(rank))
    assert d < FP32_DIFF, f"diff {d:.3g}"
    assert out.shape == (p.x[rank].shape[0], H)
    if rank == world - 1:
        assert int(st.tokens_per_expert.sum()) == 0 and int(st.received_per_rank.sum()) == 0
    if rank == 1:
        assert int(st.sent_per_rank.sum()) == 0
    return f"diff {d:.2e} received {st.tokens_per_expert.tolist()}"


def check_fp64(rank, world):
    p = Problem(world, 3, torch.float64, tokens_for(world))
    w13, w2 = p.shard(rank)
    d = diff(ep_moe(p.x[rank], p.w[rank], p.ids[rank], w13, w2), p.reference(rank))
    assert d < 1e-24, f"diff {d:.3g}"
    return f"diff {d:.2e}"


def check_hash_routing(rank, world):
    p = Problem(world, 4, torch.bfloat16, tokens_for(world))
    g = torch.Generator().manual_seed(40)
    vocab = 50
    tid2eid = torch.stack([torch.randperm(p.E, generator=g)[:K] for _ in range(vocab)]).int()
    token_ids = [torch.randint(0, vocab, (x.shape[0],), generator=g) for x in p.x]
    w, ids = opbridge.moe_route_hash(p.logits[rank], token_ids[rank], tid2eid)
    w13, w2 = p.shard(rank)
    out = ep_moe(p.x[rank], w, ids, w13, w2)
    d = diff(out, opbridge.moe(p.x[rank], w, ids, p.W13, p.W2))
    assert d < BF16_DIFF, f"diff {d:.3g}"
    return f"diff {d:.2e}"


def check_fp8_dispatch(rank, world):
    p = Problem(world, 5, torch.bfloat16, tokens_for(world, empty_rank=world - 1), hidden=256)  # + an empty payload
    w13, w2 = p.shard(rank)
    out = ep_moe(p.x[rank], p.w[rank], p.ids[rank], w13, w2, dispatch_fp8=True)
    d_ref = diff(out, p.reference(rank))
    qdq = opbridge.dequantize(opbridge.quantize(p.x[rank], "fp8", (1, 128))).to(torch.bfloat16)
    d_qdq = diff(out, p.reference(rank, x=qdq))
    assert d_ref < FP8_DIFF, f"diff vs bf16 reference {d_ref:.3g}"
    assert d_qdq < BF16_DIFF, f"diff vs reference on fp8-rounded x {d_qdq:.3g}"
    assert d_ref > d_qdq or p.x[rank].shape[0] == 0  # the payload really was quantised
    return f"diff {d_ref:.2e} (vs fp8-rounded x {d_qdq:.2e})"


def _dropped_ids(ids: torch.Tensor, capacity: int) -> torch.Tensor:
    """Capacity semantics, written independently: per expert keep the first `capacity` copies in (token, slot) order."""
    out, seen = ids.clone(), {}
    for t in range(ids.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            if e < 0:
                continue
            seen[e] = seen.get(e, 0) + 1
            if seen[e] > capacity:
                out[t, s] = -1
    return out


def check_capacity(rank, world):
    p = Problem(world, 6, torch.bfloat16, tokens_for(world), skew=2.0)
    w13, w2 = p.shard(rank)
    cap = 2
    out, st = ep_moe(p.x[rank], p.w[rank], p.ids[rank], w13, w2, capacity=cap, return_stats=True)
    kept = _dropped_ids(p.ids[rank], cap)
    n_dropped = int(((p.ids[rank] >= 0) & (kept < 0)).sum())
    d = diff(out, p.reference(rank, ids=kept))
    assert d < BF16_DIFF, f"diff {d:.3g}"
    assert int(st.dropped) == n_dropped, (int(st.dropped), n_dropped)
    drops = [int(((i >= 0) & (_dropped_ids(i, cap) < 0)).sum()) for i in p.ids]
    assert sum(drops) > 0, "the case should drop copies"
    big = ep_moe(p.x[rank], p.w[rank], p.ids[rank], w13, w2, capacity=64)  # nothing dropped: = dropless
    assert diff(big, p.reference(rank)) < BF16_DIFF
    return f"diff {d:.2e} dropped {n_dropped}"


def check_out_of_range_ids(rank, world):
    # Without OPBRIDGE_VALIDATE, ids outside [-1, E) are "no expert" (never sent, never indexed).
    p = Problem(world, 7, torch.float32, tokens_for(world))
    ids = p.ids[rank].clone()
    if ids.numel():
        ids[0, 0] = p.E + 5
        ids[-1, -1] = -7
    w13, w2 = p.shard(rank)
    clean = torch.where((ids >= 0) & (ids < p.E), ids, -1)
    d = diff(ep_moe(p.x[rank], p.w[rank], ids, w13, w2), p.reference(rank, ids=clean))
    assert d < FP32_DIFF, f"diff {d:.3g}"
    return f"diff {d:.2e}"


class SharedMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, dtype: torch.dtype):
        super().__init__()
        g = torch.Generator().manual_seed(99)
        self.up = nn.Parameter((torch.randn(inter, hidden, generator=g) / hidden ** 0.5).to(dtype))
        self.down = nn.Parameter((torch.randn(hidden, inter, generator=g) / inter ** 0.5).to(dtype))

    def forward(self, x):
        return torch.relu(x @ self.up.T) @ self.down.T


def check_module_shared(rank, world):
    p = Problem(world, 8, torch.bfloat16, tokens_for(world), skew=1.0)
    shared = SharedMLP(H, 16, torch.bfloat16)
    m = ExpertParallelMoE.from_global(p.W13, p.W2, shared_experts=shared)
    assert m.num_local_experts == E_PER_RANK and m.first_expert == rank * E_PER_RANK
    with torch.no_grad():
        out = m(p.x[rank], p.w[rank], p.ids[rank])
        # Leading dims are flattened to tokens: [1, T, H] gives the same rows.
        out2 = m(p.x[rank][None], p.w[rank][None], p.ids[rank][None])[0]
    ref = (p.reference(rank).float() + shared(p.x[rank]).float()).to(torch.bfloat16)
    d = diff(out, ref)
    assert d < BF16_DIFF and torch.equal(out, out2), f"diff {d:.3g}"
    load = m.expert_load()
    want = torch.cat([p.received(r, world) for r in range(world)]) * 2
    assert torch.equal(load, want), (load, want)
    m.reset_stats()
    assert int(m.expert_load().sum()) == 0
    return f"diff {d:.2e} load {load.tolist()}"


def check_autograd(rank, world, avoid_last_rank=False, seed=9):
    p = Problem(world, seed, torch.float32, tokens_for(world), avoid_last_rank=avoid_last_rank)
    g = torch.Generator().manual_seed(seed + 100)
    upstream = [torch.randn(x.shape, generator=g) for x in p.x]
    m = ExpertParallelMoE.from_global(p.W13, p.W2)
    x = p.x[rank].clone().requires_grad_(True)
    tw = p.w[rank].clone().requires_grad_(True)
    (m(x, tw, p.ids[rank]) * upstream[rank]).sum().backward()
    # Single process: all ranks' tokens through all experts.
    W13, W2 = p.W13.clone().requires_grad_(True), p.W2.clone().requires_grad_(True)
    xs = [xi.clone().requires_grad_(True) for xi in p.x]
    ws = [wi.clone().requires_grad_(True) for wi in p.w]
    sum((opbridge.moe(xs[r], ws[r], p.ids[r], W13, W2) * upstream[r]).sum() for r in range(world)).backward()
    lo = rank * E_PER_RANK

    def rel(a, b):
        return float((a - b).norm() / (b.norm() + 1e-30))

    errs = {"x": rel(x.grad, xs[rank].grad), "topk_weights": rel(tw.grad, ws[rank].grad),
            "w13": rel(m.w13.grad, W13.grad[lo:lo + E_PER_RANK]), "w2": rel(m.w2.grad, W2.grad[lo:lo + E_PER_RANK])}
    if avoid_last_rank and rank == world - 1:
        assert float(m.w13.grad.abs().sum()) == 0.0  # received nothing, still took part in backward
        errs.pop("w13"), errs.pop("w2")
    assert all(e < 1e-5 for e in errs.values()), errs
    return " ".join(f"{k} {v:.1e}" for k, v in errs.items())


def check_autograd_empty_rank(rank, world):
    return check_autograd(rank, world, avoid_last_rank=True, seed=10)


def check_stages(rank, world):
    p = Problem(world, 11, torch.bfloat16, tokens_for(world))
    w13, w2 = p.shard(rank)
    shard = setup(p.x[rank], p.w[rank], p.ids[rank], w13, w2)
    d = dispatch(p.x[rank], p.ids[rank], shard)
    y = expert_compute(d, w13, w2)
    out = combine(y, d, p.w[rank]).to(torch.bfloat16)
    assert torch.equal(out, ep_moe(p.x[rank], p.w[rank], p.ids[rank], w13, w2))
    assert d.x.shape[0] == int(p.received(rank, world).sum())
    return f"received {d.x.shape[0]} rows"


def _expect_error(fn, cls, *needles):
    try:
        fn()
    except cls as e:
        msg = str(e)
        missing = [n for n in needles if n not in msg]
        assert not missing, f"message lacks {missing}: {msg}"
        return msg
    raise AssertionError(f"no {cls.__name__} raised")


def check_errors(rank, world):
    p = Problem(world, 12, torch.float32, tokens_for(world))
    w13, w2 = p.shard(rank)
    x, w, ids = p.x[rank], p.w[rank], p.ids[rank]
    msgs = []
    # Shards of different sizes: rank 0 holds 1 expert, the others 2.
    bad13, bad2 = (w13[:1], w2[:1]) if rank == 0 else (w13, w2)
    msgs.append(_expect_error(lambda: ep_moe(x, w, ids, bad13, bad2), opbridge.OpError,
                              "local experts", "rank 0: 1", "rank 1: 2"))
    # The model was sharded for twice as many ranks as the group has.
    msgs.append(_expect_error(lambda: ep_moe(x, w, ids, w13, w2, num_experts=p.E * 2), opbridge.OpError,
                              "'group'", f"a group of {2 * world} ranks", f"got a group of {world} ranks"))
    # A bad argument on the last rank only: it raises its own error, the others name it.
    last = world - 1
    bad_ids = ids.float() if rank == last else ids
    cls = opbridge.OpTypeError
    needles = ("topk_ids",) if rank == last else ("topk_ids", f"on rank {last}")
    msgs.append(_expect_error(lambda: ep_moe(x, w, bad_ids, w13, w2), cls, *needles))
    # Different hidden sizes.
    if rank == 0:
        xh, w13h, w2h = x[:, :64], w13[:, :, :64], w2[:, :64]
    else:
        xh, w13h, w2h = x, w13, w2
    msgs.append(_expect_error(lambda: ep_moe(xh, w, ids, w13h, w2h), opbridge.OpError, "hidden size"))
    # FP8 payload with autograd.
    xg = x.clone().requires_grad_(True)
    msgs.append(_expect_error(lambda: ep_moe(xg, w, ids, w13, w2, dispatch_fp8=True), opbridge.OpError,
                              "dispatch_fp8"))
    # Data check under OPBRIDGE_VALIDATE=1: an id out of range on rank 0 only.
    bad = ids.clone()
    if rank == 0 and bad.numel():
        bad[0, 0] = p.E
    os.environ["OPBRIDGE_VALIDATE"] = "1"
    try:
        msgs.append(_expect_error(lambda: ep_moe(x, w, bad, w13, w2), opbridge.OpError, "topk_ids"))
    finally:
        os.environ.pop("OPBRIDGE_VALIDATE")
    # The group is still usable afterwards (no collective was left half-done).
    d = diff(ep_moe(x, w, ids, w13, w2), p.reference(rank))
    assert d < FP32_DIFF, f"after errors: diff {d:.3g}"
    return " || ".join(msgs)


CHECKS = [check_bf16_uneven, check_fp32_empty, check_fp64, check_hash_routing, check_fp8_dispatch,
          check_capacity, check_out_of_range_ids, check_module_shared, check_autograd, check_autograd_empty_rank,
          check_stages, check_errors]


def main() -> None:
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=45))
    results = {}
    for check in CHECKS:
        t0 = time.perf_counter()
        try:
            detail = check(rank, world)
            results[check.__name__] = [True, f"{detail} ({time.perf_counter() - t0:.2f}s)"]
        except Exception:  # noqa: BLE001 - recorded for the test to report
            results[check.__name__] = [False, traceback.format_exc(limit=6)]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
