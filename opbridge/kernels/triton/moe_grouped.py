"""Op-level launchers for ``grouped_gemm`` / ``grouped_gemm_masked`` and their backward (OPS.md 2.2, 2.3, 4.4)."""
from __future__ import annotations

import torch

from .grouped_gemm import B_FP8, B_MXFP4, B_NATIVE, Operand, launch, launch_wgrad
from .moe_configs import gemm_config, kind_of


def _cfg(dev: torch.device, role: str, a: Operand, b: Operand, expected_m: float) -> dict:
    return gemm_config(dev, role, kind_of(a.kind == B_FP8, b.kind), expected_m,
                       fp8_blocks=B_FP8 in (a.kind, b.kind), mxfp4=b.kind == B_MXFP4)


def grouped_gemm(a: Operand, b: Operand, offsets: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    M = a.data.shape[0]
    E, N = b.data.shape[0], b.data.shape[1]
    dev = a.data.device
    # Rows outside [offsets[0], offsets[E]) are not computed; valid offsets cover all M rows.
    out = torch.empty((M, N), dtype=out_dtype, device=dev)
    launch(a, b, out, offsets, _cfg(dev, "gemm", a, b, M / max(E, 1)), m_rows=M, interpret=dev.type != "cuda")
    return out


def grouped_gemm_masked(a: Operand, b: Operand, masked_m: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    E, M_max = a.data.shape[0], a.data.shape[1]
    N = b.data.shape[1]
    dev = a.data.device
    out = torch.empty((E, M_max, N), dtype=out_dtype, device=dev)  # every row is written (zeros past masked_m)
    launch(a, b, out, masked_m, _cfg(dev, "gemm", a, b, M_max), masked=True, interpret=dev.type != "cuda")
    return out


def _wgrad_cfg(dev: torch.device, expected_m: float) -> dict:
    return gemm_config(dev, "wgrad", "bf16", expected_m)


def grouped_gemm_backward(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor, masked: bool,
                          need_a: bool = True, need_b: bool = True):
    """Grads of ``out = a @ b[e].T`` per group (unquantized operands): ``da = g @ b[e]``, ``db[e] = g_e^T a_e``."""
    dev = a.device
    interp = dev.type != "cuda"
    g = g.to(a.dtype)
    E, N, K = b.shape
    da = db = None
    if masked:
        M_max = a.shape[1]
        if need_a:
            da = torch.empty_like(a)
            bt = Operand(b.transpose(1, 2))  # [E, K, N]: the same kernel computes g @ b[e]
            launch(Operand(g), bt, da, groups, _cfg(dev, "gemm", Operand(g), bt, M_max), masked=True,
                   interpret=interp)
        if need_b:
            db32 = torch.empty((E, N, K), dtype=torch.float32, device=dev)
            launch_wgrad(g, a, db32, groups, _wgrad_cfg(dev, M_max), masked=True, interpret=interp)
            db = db32.to(b.dtype)
        return da, db
    M = a.shape[0]
    if need_a:
        da = torch.zeros_like(a)  # rows outside the groups get no gradient
        bt = Operand(b.transpose(1, 2))
        launch(Operand(g), bt, da, groups, _cfg(dev, "gemm", Operand(g), bt, M / max(E, 1)), m_rows=M,
               interpret=interp)
    if need_b:
        db32 = torch.empty((E, N, K), dtype=torch.float32, device=dev)
        launch_wgrad(g, a, db32, groups, _wgrad_cfg(dev, M / max(E, 1)), m_rows=M, interpret=interp)
        db = db32.to(b.dtype)
    return da, db


__all__ = ["Operand", "B_NATIVE", "B_FP8", "B_MXFP4", "grouped_gemm", "grouped_gemm_masked", "grouped_gemm_backward"]
