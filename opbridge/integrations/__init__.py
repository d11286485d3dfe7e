"""Run Hugging Face DeepSeek-V3 / V3.2 / V4 models through opbridge, without changing their code.

``opbridge.integrations.patch(model)`` replaces, module by module, the forwards whose math is an
opbridge op: routers (``moe_route`` / ``moe_route_hash``), routed experts (``moe``), V4
hyper-connections and the final hyper-head (``mhc_pre`` / ``mhc_post_pre`` / ``mhc_post``),
indexers (``indexer_topk``), V4 KV compressors (``kv_compress``) and the attention cores
(``sparse_attention`` with the sliding window and compressed sets). The backend each op runs on
is chosen as for any opbridge call (``opbridge.use_backend``, ``OPBRIDGE_BACKEND``, the device).
It returns a :class:`PatchReport`; ``unpatch(model)`` restores the original forwards.
See docs/porting.md.
"""
from __future__ import annotations

from typing import Optional

import torch

from .patching import QUANT_FORMATS, PatchReport, Site, Skipped, install, is_patched, plan, restore

__all__ = ["patch", "unpatch", "is_patched", "PatchReport", "Site", "Skipped"]


def _rules():
    from . import attention, hf, mhc, moe

    mods = hf.modelling_modules()
    return moe.rules(mods) + mhc.rules(mods) + attention.rules(mods)


def patch(model: torch.nn.Module, quantize: Optional[str] = None) -> PatchReport:
    """Route ``model``'s DeepSeek modules through opbridge ops, in place; returns what was patched and what not.

    Args:
        model: a transformers DeepSeek-V3, V3.2 or V4 model (any head), or any module containing one.
        quantize: ``None`` (weights used as they are, no copy), ``"fp8"`` (expert weights quantised
            to FP8 with 128x128 blocks) or ``"mxfp4"`` (MXFP4, 1x32 blocks). Quantised experts hold
            a snapshot of the weights taken now and are for inference (no gradient to the experts).

    A module is patched only where its math maps exactly onto the ops (see docs/porting.md); other
    modules of the same roles, and modules whose replacement would need an unmapped sub-module,
    are left untouched and listed in ``report.skipped`` with the reason.
    """
    if quantize not in QUANT_FORMATS:
        raise ValueError(f"opbridge.patch: argument 'quantize': expected one of {QUANT_FORMATS}, got {quantize!r}")
    chosen, skipped = plan(model, _rules(), quantize)
    sites = tuple(install(path, m, rule, quantize) for path, m, rule in chosen)
    return PatchReport(sites, tuple(skipped), quantize)


def unpatch(model: torch.nn.Module) -> int:
    """Restore every module :func:`patch` changed; returns how many were restored."""
    return sum(restore(m) for m in model.modules())
