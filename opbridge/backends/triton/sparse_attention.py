"""Triton implementations of the sparse_attention ops (wired to opbridge/kernels/triton/). Filled by the Triton backend issues."""
from . import BACKEND  # noqa: F401
