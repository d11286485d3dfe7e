"""Tiny random DeepSeek models for the integration tests.

transformers (>= 5.23, which has deepseek_v4) is required here: without it these tests fail at
collection instead of being skipped, so CI cannot go green without running them.
"""
import pytest
import torch
import transformers  # noqa: F401  (required, see above)

from opbridge.integrations.models import build_model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core runner the spinning threads cost."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    """One float32 tiny model per family, built once per test module (tests must leave them unpatched)."""
    return {fam: build_model(fam, "tiny", seed=0) for fam in ("v3", "v32", "v4")}


def prompt(batch: int = 2, length: int = 22, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
