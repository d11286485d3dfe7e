"""The capability table as data, and its agreement with the (independently written) emulator."""
from __future__ import annotations

import pytest
import torch

import opbridge
from opbridge.backends.ascend import capabilities as caps

from .emulator import VERSIONS, ContractError, MissingKernel


@pytest.mark.parametrize("name,family", [("Ascend910B3", "A2"), ("Ascend910_9392", "A3"), ("Ascend950PR", "950"),
                                         ("Ascend950DT", "950"), ("Ascend310P3", "")])
def test_soc_family_from_the_device_name(name, family):
    assert caps.family_of(name) == family


@pytest.mark.parametrize("version,branch", [("2.13.0", "master"), ("2.9.0.post6", "26.1.0"), ("2.9.0", "7.3.0"),
                                            ("2.9.0.post3", "26.0.0"), ("2.7.1", "7.2.0"), ("2.12.0+gitabc", "26.1.0"),
                                            ("2.99.0", "master"), ("1.11.0", "unknown")])
def test_op_plugin_branch_from_the_torch_npu_version(version, branch):
    assert caps.op_plugin_of(version)[0] == branch


def test_every_vendor_op_names_its_socs_and_first_branch():
    for op, info in caps.OPS.items():
        assert info["since"] in caps.OP_PLUGIN_ORDER, op
        assert set(info["socs"]) <= set(caps.FAMILY_TITLES), op


def _calls():
    """One small call per mapped op, inside every emulated SoC's documented limits where possible."""
    g = torch.Generator().manual_seed(0)

    def r(*s, dt=torch.bfloat16):
        return torch.randn(*s, generator=g).to(dt)

    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    ids = i32(0, 1, 2, 3, 1, -1, 3, 0).view(4, 2)
    n, C = 4, 16
    x = r(3, n, C)
    site = (r(n * (n + 2), n * C, dt=torch.float32) * 0.1, torch.rand(3, generator=g), r(n * (n + 2), dt=torch.float32))
    post, comb = torch.rand(3, n, generator=g), torch.rand(3, n, n, generator=g)
    idx = i32(0, 5, -1, 2, 1, 7, 3, 4).view(4, 2)
    return {
        "moe_route": ((r(4, 16), 2), dict(scoring="sigmoid", num_groups=4, topk_groups=2, renormalize=True)),
        "moe_route_hash": ((r(4, 16), i32(0, 2, 1, 2), i32(0, 1, 2, 3, 4, 5).view(3, 2)), dict(scoring="sigmoid")),
        "grouped_gemm": ((r(5, 32), r(3, 8, 32), i32(0, 1, 1, 5)), {}),
        "grouped_gemm_masked": ((r(3, 2, 32), r(3, 8, 32), i32(2, 0, 1)), {}),
        "moe": ((r(4, 32), torch.rand(4, 2, generator=g), ids, r(4, 16, 32), r(4, 32, 8)), {}),
        "moe_permute": ((r(4, 32), ids, 4), {}),
        "indexer_topk": ((r(4, 8, 128), r(9, 128), torch.rand(4, 8, generator=g), 3), {}),
        "indexer_topk_paged": ((r(1, 2, 8, 128), r(2, 16, 128), i32(1, 0).view(1, 2), i32(20),
                                torch.rand(1, 2, 8, generator=g), 3), {}),
        "sparse_attention": ((r(4, 8, 576), r(9, 576), idx), dict(scale=0.1, d_v=512)),
        "sparse_attention_paged": ((r(1, 4, 8, 576), r(2, 16, 576), i32(1, 0).view(1, 2), idx.view(1, 4, 2)),
                                   dict(scale=0.1, d_v=512)),
        "sinkhorn": ((torch.randn(2, n, n, generator=g),), {}),
        "mhc_pre": ((x, *site), {}),
        "mhc_post": ((r(3, C), x, post, comb), {}),
        "mhc_post_pre": ((r(3, C), x, post, comb, *site), {}),
    }


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("family", ["A2", "A3", "950"])
def test_the_table_never_lets_through_what_the_vendor_contract_rejects(ascend, family, version):
    """For every SoC and release: each mapped op either runs or is refused with a reason naming a vendor op.

    The table (from the docs, inside the library) and the emulator (from the docs, in the tests) are
    written separately; a call the table allows but the documented op rejects fails here.
    """
    ascend(family, version)
    ran = 0
    for name, (args, kwargs) in _calls().items():
        try:
            getattr(opbridge, name)(*args, **kwargs)
            ran += 1
        except opbridge.UnsupportedError as e:  # refused by the table, before any vendor call
            assert "npu_" in e.reason and "has no kernel" not in e.reason, (name, e.reason)
        except (ContractError, MissingKernel) as e:  # pragma: no cover - the failure this test exists for
            pytest.fail(f"{name} on {family} / torch_npu {version}: the backend passed an out-of-contract call: {e}")
    assert ran >= 8  # the MoE and attention paths run everywhere; mHC only on 950 with op-plugin >= 26.0.0
