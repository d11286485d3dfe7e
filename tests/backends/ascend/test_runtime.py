"""Availability, lazy import, device selection and error translation of the Ascend backend."""
from __future__ import annotations

import importlib.abc
import os
import subprocess
import sys
import warnings

import pytest
import torch

import opbridge
from opbridge.backends.ascend import capabilities as caps
from opbridge.backends.ascend import runtime
from opbridge.core.registry import get_backend

from .emulator import install

CANN_IMPORT_ERROR = (
    "libhccl.so: cannot open shared object file: No such file or directory. Please check that the cann package "
    "is installed. Please run 'source set_env.sh' in the CANN installation path.\n"
    "[ERROR] 2026-10-01-12:00:00 (PID:1, Device:-1, RankID:-1) ERR00008 PTA resource not found")


class _Blocker(importlib.abc.MetaPathFinder):
    """Makes ``import torch_npu`` fail the way it does without CANN (or without the package)."""

    def __init__(self, error: Exception):
        self.error = error

    def find_spec(self, name, path=None, target=None):
        if name == "torch_npu":
            raise self.error
        return None


@pytest.fixture
def blocked_import(monkeypatch):
    def block(error: Exception):
        monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
        monkeypatch.setattr(sys, "meta_path", [_Blocker(error)] + sys.meta_path)
        runtime.reset()

    yield block
    runtime.reset()


def test_missing_cann_is_one_actionable_line(blocked_import):
    blocked_import(ImportError(CANN_IMPORT_ERROR))
    avail = get_backend("ascend").availability()
    assert not avail.ok
    assert "\n" not in avail.reason
    assert "libhccl.so" in avail.reason and "set_env.sh" in avail.reason
    with opbridge.use_backend("ascend"), pytest.raises(opbridge.UnsupportedError) as err:
        opbridge.sinkhorn(torch.randn(2, 4, 4))
    assert "\n" not in str(err.value) and "set_env.sh" in str(err.value)
    assert err.value.__cause__ is None and err.value.__context__ is None  # no import traceback attached


def test_missing_torch_npu_says_how_to_install(blocked_import):
    blocked_import(ModuleNotFoundError("No module named 'torch_npu'", name="torch_npu"))
    reason = get_backend("ascend").availability().reason
    assert "\n" not in reason and "pip install 'opbridge[ascend]'" in reason


def test_importing_the_backend_does_not_import_torch_npu():
    code = ("import sys, opbridge; from opbridge.core.registry import get_backend; get_backend('ascend'); "
            "assert 'torch_npu' not in sys.modules; print('lazy')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(opbridge.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.stdout.strip() == "lazy", done.stderr


def test_cpu_tensors_need_the_explicit_test_hook():
    with install("A3"):
        runtime.reset()
        try:
            assert runtime.DEVICE_TYPES == {"npu"}  # the default: Ascend NPUs only
            with opbridge.use_backend("ascend"), pytest.raises(opbridge.UnsupportedError, match="not an Ascend NPU"):
                opbridge.moe_route(torch.randn(4, 16), 2)
        finally:
            runtime.reset()


def test_platform_is_read_from_torch_npu(ascend):
    ascend("950", "2.11.0")
    p = runtime.platform(torch.device("cpu"))
    assert (p.family, p.torch_npu, p.op_plugin, p.cann) == ("950", "2.11.0", "26.1.0", "9.1.0")
    assert "sinks" not in p.schemas["npu_sparse_flash_attention"]
    assert "Ascend 950" in str(p)


def test_fallback_to_reference_is_explicit(ascend, monkeypatch):
    ascend("A3")
    logits = torch.randn(5, 16)
    monkeypatch.setenv("OPBRIDGE_FALLBACK", "reference")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        w, ids = opbridge.moe_route(logits, 2, scoring="sqrtsoftplus")
    assert any("sqrtsoftplus" in str(s.message) and "reference" in str(s.message) for s in seen)
    with opbridge.use_backend("reference"):
        w_ref, ids_ref = opbridge.moe_route(logits, 2, scoring="sqrtsoftplus")
    assert torch.equal(ids, ids_ref) and torch.allclose(w, w_ref)


def test_a_missing_cann_kernel_becomes_unsupported(ascend, monkeypatch):
    # Pretend the table allowed mHC on A3: the (emulated) CANN then has no kernel for it (error 561103).
    ascend("A3")
    monkeypatch.setitem(caps.OPS, "npu_mhc_post", {**caps.OPS["npu_mhc_post"], "socs": ["A3", "950"]})
    x = torch.randn(3, 4, 16).to(torch.bfloat16)
    with pytest.raises(opbridge.UnsupportedError, match="npu_mhc_post: the installed CANN has no kernel.*upgrade CANN"):
        opbridge.mhc_post(x[:, 0], x, torch.rand(3, 4), torch.rand(3, 4, 4))
