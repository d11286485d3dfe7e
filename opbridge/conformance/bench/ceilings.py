"""The device's ceilings, measured in the same run: bf16 GEMM, fp8 GEMM (torch._scaled_mm), copy bandwidth."""
from __future__ import annotations

from typing import Optional

import torch

from .timing import Budget, measure

_SIZES = {"cuda": (8192, 2**30), "npu": (8192, 2**30)}  # GEMM edge, copy bytes
_CPU = (512, 64 * 2**20)


def _sizes(device: torch.device) -> tuple[int, int]:
    return _SIZES.get(device.type, _CPU)


def bf16_gemm(device: torch.device, budget: Budget) -> dict:
    """bf16 GEMM on accelerators; on CPU float32 (what the reference computes in; CPUs rarely have bf16 matrix units)."""
    n, _ = _sizes(device)
    dt = torch.float32 if device.type == "cpu" else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    t = measure(lambda i: a @ b, 1, device, budget)
    name = f"{'fp32' if dt == torch.float32 else 'bf16'} GEMM {n}^3"
    return {"name": name, "tflops": 2 * n**3 / t.median_ms / 1e9, "timing": t.to_json()}


def fp8_gemm(device: torch.device, budget: Budget) -> dict:
    """torch._scaled_mm, e4m3 x e4m3 -> bf16 with per-tensor scales (rowwise needs newer torch on some builds)."""
    n, _ = _sizes(device)
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return {"name": "fp8 GEMM", "tflops": None, "reason": f"torch._scaled_mm needs a CUDA device (have {device.type})"}
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return {"name": "fp8 GEMM", "tflops": None, "reason": f"fp8 matrix units need sm_89+, this is sm_{major}{minor}"}
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
    one = torch.ones((), device=device)
    try:
        t = measure(lambda i: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), 1, device,
                    budget)
    except (RuntimeError, TypeError) as e:
        return {"name": "fp8 GEMM", "tflops": None, "reason": f"torch._scaled_mm failed: {str(e).splitlines()[0]}"}
    return {"name": f"fp8 GEMM {n}^3 (torch._scaled_mm)", "tflops": 2 * n**3 / t.median_ms / 1e9, "timing": t.to_json()}


def copy_bandwidth(device: torch.device, budget: Budget) -> dict:
    _, nbytes = _sizes(device)
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t = measure(lambda i: dst.copy_(src), 1, device, budget)
    return {"name": f"device copy {nbytes / 2**20:.0f} MiB (read + write)", "gbps": 2 * nbytes / t.median_ms / 1e6,
            "timing": t.to_json()}


def measure_all(device: torch.device, budget: Budget) -> dict:
    return {"bf16_gemm": bf16_gemm(device, budget), "fp8_gemm": fp8_gemm(device, budget),
            "copy": copy_bandwidth(device, budget)}


def peak_tflops(ceilings: dict, fp8: bool) -> Optional[float]:
    if fp8 and ceilings["fp8_gemm"].get("tflops"):
        return ceilings["fp8_gemm"]["tflops"]
    return ceilings["bf16_gemm"].get("tflops")
