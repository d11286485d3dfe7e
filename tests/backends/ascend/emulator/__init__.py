"""A contract emulator of the torch_npu operators opbridge's Ascend backend calls (test-only).

``install(soc, version)`` defines the operator schemas of that torch_npu release (verbatim, see
``schemas.py``) in a private ``torch.library`` namespace, implements them on CPU from their
documented semantics (``moe_ops``, ``attention_ops``, ``mhc_ops``: argument checks, layouts,
limits, undefined outputs as NaN), and puts a stand-in ``torch_npu`` module in ``sys.modules``.
The library never imports this package; it does not import opbridge.

What it proves: a translation that passes agrees with the vendor ops' *documented* contracts.
What it cannot prove: that CANN's kernels behave as documented, or how fast they are.
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import types
from typing import Iterator

import torch

from . import attention_ops, mhc_ops, moe_ops
from .contract import DEVICE, ContractError, MissingKernel
from .schemas import CANN, SCHEMAS

__all__ = ["install", "ContractError", "MissingKernel", "SOC_NAMES", "VERSIONS", "DEVICE"]

SOC_NAMES = {"A2": "Ascend910B3", "A3": "Ascend910_9392", "950": "Ascend950PR"}
VERSIONS = tuple(SCHEMAS)
_IMPLS = {name: getattr(mod, name) for mod in (moe_ops, attention_ops, mhc_ops)
          for name in dir(mod) if name.startswith("npu_")}
_LIBS: dict[str, torch.library.Library] = {}


def _namespace(version: str) -> str:
    """Define (once per process) the release's schemas with the emulated implementations."""
    ns = "opbridge_emu_npu_" + version.replace(".", "_")
    if ns not in _LIBS:
        lib = torch.library.Library(ns, "DEF")
        for op, schema in SCHEMAS[version].items():
            lib.define(schema)
            lib.impl(op, _with_schema_defaults(_IMPLS[op], getattr(torch.ops, ns).__getattr__(op).default._schema),
                     "CompositeExplicitAutograd")
        _LIBS[ns] = lib
    return ns


def _with_schema_defaults(fn, schema):
    """Call ``fn`` with every argument the caller left out set to *this release's* schema default.

    torch hands a Python kernel only the arguments the caller gave; the emulated op must see the
    defaults of the emulated release (e.g. quant_mode=0 before op-plugin 26.0.0), not the Python ones.
    """
    def impl(*args, **kwargs):
        for a in schema.arguments[len(args):]:
            if a.name not in kwargs and a.has_default_value():
                kwargs[a.name] = a.default_value
        return fn(*args, **kwargs)

    impl.__name__ = fn.__name__
    return impl


def build(family: str = "A3", version: str = "2.13.0") -> types.ModuleType:
    """A stand-in torch_npu module: ``torch_npu.<op>`` is the emulated ``torch.ops`` packet, as on torch_npu."""
    ops = getattr(torch.ops, _namespace(version))
    mod = types.ModuleType("torch_npu")
    mod.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    mod.__version__ = version
    mod.__file__ = __file__
    for op in SCHEMAS[version]:
        setattr(mod, op, getattr(ops, op))
    name = SOC_NAMES[family]
    mod.npu = types.SimpleNamespace(
        is_available=lambda: True, device_count=lambda: 1, current_device=lambda: 0,
        get_device_name=lambda device=None: name,
        utils=types.SimpleNamespace(get_cann_version=lambda module="CANN": CANN[version]))
    return mod


@contextlib.contextmanager
def install(family: str = "A3", version: str = "2.13.0") -> Iterator[types.ModuleType]:
    """Present the emulator as ``torch_npu`` (sys.modules) for the duration of the block."""
    mod = build(family, version)
    saved = sys.modules.get("torch_npu")
    old = (DEVICE.name, DEVICE.family, DEVICE.torch_npu, DEVICE.cann)
    DEVICE.name, DEVICE.family, DEVICE.torch_npu, DEVICE.cann = SOC_NAMES[family], family, version, CANN[version]
    sys.modules["torch_npu"] = mod
    try:
        yield mod
    finally:
        DEVICE.name, DEVICE.family, DEVICE.torch_npu, DEVICE.cann = old
        if saved is None:
            sys.modules.pop("torch_npu", None)
        else:
            sys.modules["torch_npu"] = saved
