"""The transformers modelling files opbridge knows, imported lazily (transformers is an optional dependency)."""
from __future__ import annotations

import importlib
import sys
import types
from typing import Optional

import torch

FAMILIES = {
    "v3": "transformers.models.deepseek_v3.modeling_deepseek_v3",
    "v32": "transformers.models.deepseek_v32.modeling_deepseek_v32",
    "v4": "transformers.models.deepseek_v4.modeling_deepseek_v4",
}


def modelling_modules() -> dict[str, types.ModuleType]:
    """The DeepSeek modelling modules this transformers installation has (a family it lacks is absent)."""
    try:
        importlib.import_module("transformers")
    except ImportError as e:
        raise ImportError("opbridge.integrations needs Hugging Face transformers (>= 5): "
                          "pip install 'opbridge[transformers]'") from e
    out = {}
    for family, name in FAMILIES.items():
        try:
            out[family] = importlib.import_module(name)
        except ImportError:
            continue
    return out


def module_of(m: torch.nn.Module) -> types.ModuleType:
    """The modelling file that defines ``m``'s class: its own RoPE helpers are the ones to call."""
    return sys.modules[type(m).__module__]


def activation_name(act: torch.nn.Module) -> Optional[str]:
    """'silu', 'sigmoid' or 'sqrtsoftplus' for the activation modules transformers' ACT2FN builds."""
    name = type(act).__name__
    if name in ("SiLUActivation", "SiLU"):
        return "silu"
    if name == "Sigmoid":
        return "sigmoid"
    if name == "SqrtSoftplusActivation":
        return "sqrtsoftplus"
    return None


def is_plain_linear(m: object, bias: bool = False) -> bool:
    return type(m) is torch.nn.Linear and ((m.bias is not None) == bias)
