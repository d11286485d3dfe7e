"""The single-process parts of expert parallelism: routing layout, received ids, the FP8 payload."""
from __future__ import annotations

import pytest
import torch

import opbridge
from opbridge.distributed import ExpertShard, Payload, make_layout
from opbridge.distributed.layout import received_ids


def _ids(T=9, k=3, E=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, E, (T, k), generator=g, dtype=torch.int32)
    ids[0, 0] = E + 2  # out of range: treated as "no expert"
    return ids


def test_shard_placement():
    s = ExpertShard(num_experts=12, world_size=4, rank=2)
    assert (s.num_local, s.first) == (3, 6)
    assert [s.owner(e) for e in (0, 2, 3, 11)] == [0, 0, 1, 3]


def test_layout_sorts_copies_by_expert_stably():
    ids, E = _ids(), 6
    lay = make_layout(ids, E)
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < E)
    expected = sorted(range(flat.numel()), key=lambda i: (int(flat[i]) if valid[i] else E, i))
    assert lay.order.tolist() == expected
    assert lay.counts[:E].tolist() == torch.bincount(flat[valid], minlength=E).tolist()
    assert int(lay.counts[E]) == int((~valid).sum())
    assert int(lay.dropped()) == 0 and torch.equal(lay.send_counts(), lay.counts[:E])


def test_layout_capacity_slots():
    ids, E, cap = _ids(T=20, seed=3), 6, 2
    lay = make_layout(ids, E, capacity=cap)
    seen, kept_total = {}, 0
    for i, c in enumerate(lay.order.tolist()):
        e = int(ids.reshape(-1)[c])
        if not 0 <= e < E:
            assert not lay.kept[i] and int(lay.slot[i]) == E * cap
            continue
        pos = seen.get(e, 0)
        seen[e] = pos + 1
        assert bool(lay.kept[i]) == (pos < cap)
        assert int(lay.slot[i]) == (e * cap + pos if pos < cap else E * cap)
        kept_total += pos < cap
    assert int(lay.send_counts().sum()) == kept_total
    assert int(lay.dropped()) == sum(max(n - cap, 0) for n in seen.values()) > 0


def test_received_ids():
    recv = torch.tensor([[2, 0, 1], [0, 3, 1]])  # [W=2, El=3]
    assert received_ids(recv, None, 7).tolist() == [0, 0, 2, 1, 1, 1, 2]
    capped = received_ids(recv.clamp(max=2), 2, 12).tolist()
    assert capped == [0, 0, -1, -1, 2, -1, -1, -1, 1, 1, 2, -1]


@pytest.mark.parametrize("H", [128, 200])
def test_fp8_payload_round_trip(H):
    x = (torch.randn(5, H) * 3).to(torch.bfloat16)
    p = Payload(H, torch.bfloat16, fp8=True)
    wire = p.pack(x)
    assert wire.dtype == torch.uint8 and wire.shape == (5, p.row_bytes) and p.row_bytes == H + 4 * -(-H // 128)
    got = p.unpack(wire[[4, 0, 2]])  # rows survive a gather, as in a dispatch
    want = opbridge.dequantize(opbridge.quantize(x, "fp8", (1, 128))).to(torch.bfloat16)[[4, 0, 2]]
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    plain = Payload(H, torch.bfloat16)
    assert plain.pack(x) is x and plain.row_bytes == 2 * H
