"""Shared test set-up.

Without a CUDA device the Triton kernels run under Triton's interpreter on CPU tensors; the
variable must be set before triton is first imported, hence here at the top.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

for _var in ("OPBRIDGE_BACKEND", "OPBRIDGE_FALLBACK", "OPBRIDGE_VALIDATE"):
    os.environ.pop(_var, None)  # tests set what they need


@pytest.fixture
def triton_device() -> str:
    """Where Triton kernels run in this test session: the GPU, or the CPU under TRITON_INTERPRET=1."""
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"
