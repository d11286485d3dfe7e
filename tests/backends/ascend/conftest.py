"""The Ascend backend under its contract emulator: ``ascend(family, version)`` presents the emulated
torch_npu of that SoC family and release, lets the backend take CPU tensors (its explicit test
hook, ``runtime.DEVICE_TYPES``), and selects the 'ascend' backend for the rest of the test."""
from __future__ import annotations

import contextlib

import pytest

import opbridge
from opbridge.backends.ascend import runtime

from .emulator import DEVICE, install


@pytest.fixture
def ascend(monkeypatch):
    monkeypatch.setattr(runtime, "DEVICE_TYPES", {"npu", "cpu"})
    stack = contextlib.ExitStack()

    def on(family: str = "A3", version: str = "2.13.0"):
        stack.close()
        stack.enter_context(install(family, version))
        runtime.reset()
        stack.enter_context(opbridge.use_backend("ascend"))
        return DEVICE

    yield on
    stack.close()
    runtime.reset()
