"""The reference tests run every op on the reference backend, on seeded random float64 inputs."""
import pytest
import torch

import opbridge

F64 = torch.float64


@pytest.fixture(autouse=True)
def _reference():
    with opbridge.use_backend("reference"):
        yield


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, dtype=F64, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)
