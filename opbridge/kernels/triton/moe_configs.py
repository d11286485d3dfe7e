"""Launch configurations of the MoE kernels, read from ``configs/moe_<arch>.json``.

A table maps ``"<role>/<kind>"`` to a list of configurations ordered by ``max_m`` (the expected
rows per expert: ``M / E`` for a grouped GEMM, ``T*k / E`` for the MoE layer, ``M_max`` for the
masked layout); the first entry whose ``max_m`` is at least the expected rows is used.

roles: ``gemm`` (grouped / masked GEMM), ``gemm1`` (MoE up-projection with SwiGLU),
``gemm2`` (MoE down-projection with the top-k weight), ``wgrad`` (weight gradients);
kinds: ``bf16`` (also fp16 and the dequantising fp8 paths), ``fp8`` (fp8 x fp8), ``mxfp4``.
``autotune_moe.py`` writes these files; sm_90 is measured, sm_100 is written by hand (unmeasured).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"

# Tiny tiles for the interpreter: CI runs on CPU, where every program instance costs Python time.
_INTERPRET = {
    "gemm": dict(BM=16, BN=32, BK=32, GROUP_M=4),
    "gemm1": dict(BM=16, BN=32, BK=32, GROUP_M=4),
    "gemm2": dict(BM=16, BN=32, BK=32, GROUP_M=4),
    "wgrad": dict(BM=16, BN=32, BK=32),
}
_FALLBACK = {"BM": 64, "BN": 128, "BK": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


def arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return "sm_100" if major == 10 else f"sm_{major}{minor}"


@functools.lru_cache(maxsize=None)
def table(arch_name: str) -> dict:
    path = CONFIG_DIR / f"moe_{arch_name}.json"
    if not path.exists():
        path = CONFIG_DIR / "moe_sm_90.json"  # the measured table is the best guess for other NVIDIA parts
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def kind_of(a_fp8: bool, b_kind: int) -> str:
    if b_kind == 2:
        return "mxfp4"
    return "fp8" if (a_fp8 and b_kind == 1) else "bf16"


def gemm_config(device: torch.device, role: str, kind: str, expected_m: float, *, fp8_blocks: bool = False,
                quant_out: bool = False, mxfp4: bool = False) -> dict:
    """The configuration for one GEMM launch, with the constraints of its operand formats applied."""
    if device.type != "cuda":
        cfg = dict(_INTERPRET[role])
    else:
        cfg = dict(_FALLBACK)
        for entry in table(arch(device)).get("gemm", {}).get(f"{role}/{kind}", []):
            cfg = {k: v for k, v in entry.items() if k != "max_m"}
            if expected_m <= entry.get("max_m", float("inf")):
                break
    if fp8_blocks:  # one fp8 scale block per K step
        cfg["BK"] = min(cfg["BK"], 128)
    if mxfp4:  # whole E8M0 scale groups per K step
        cfg["BK"] = max(cfg["BK"], 64)
    if quant_out:  # the (1,128) output scale comes from one tile's columns
        cfg["BN"] = 128
    return cfg


def route_config(device: torch.device, num_experts: int) -> dict:
    if device.type != "cuda":
        return {"BT": 4, "num_warps": 4}
    entries = table(arch(device)).get("route", [])
    for entry in entries:
        if num_experts <= entry.get("max_e", 1 << 30):
            return entry
    return {}
