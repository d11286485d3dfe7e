"""Pieces shared by the sparse-attention family of Triton kernels: launch configs and key addressing.

Launch configurations are data (``configs/attn_*.json``), keyed by the GPU architecture
(``sm90``, ``sm100``), with ``default`` for anything else and ``interpret`` for the Triton
interpreter (small blocks keep the CPU emulation fast).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

import torch
import triton
import triton.language as tl

_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


@functools.lru_cache(maxsize=None)
def _load(name: str) -> dict[str, Any]:
    with open(os.path.join(_CONFIG_DIR, name)) as f:
        return json.load(f)


def arch_key(device: torch.device, interpret: bool) -> str:
    if interpret or device.type != "cuda":
        return "interpret"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def config(name: str, kernel: str, device: torch.device, interpret: bool, **override: Any) -> dict[str, Any]:
    """The launch config of ``kernel`` from ``configs/<name>``; keyword overrides win (benchmarks use them)."""
    table = _load(name)[kernel]
    cfg = dict(table.get(arch_key(device, interpret), table["default"]))
    cfg.update({k: v for k, v in override.items() if v is not None})
    return cfg


def smem_limit(device: torch.device) -> int:
    """Shared memory a block may opt into on ``device`` (bytes), less a margin for Triton's own use."""
    if device.type != "cuda":
        return 1 << 30
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 232448)) - 4096


def fit_tiles(cfg: dict, tile_bytes, limit: int, min_n: int = 16) -> dict:
    """Shrink ``BLOCK_N`` then ``num_stages`` until ``tile_bytes(BLOCK_N, num_stages)`` fits ``limit``.

    Keeps one tuned table valid for head dims it was not tuned on (e.g. a longer key-only tail).
    """
    cfg = dict(cfg)
    while tile_bytes(cfg["BLOCK_N"], cfg["num_stages"]) > limit:
        if cfg["BLOCK_N"] > min_n:
            cfg["BLOCK_N"] //= 2
        elif cfg["num_stages"] > 1:
            cfg["num_stages"] -= 1
        else:
            break
    return cfg


def pow2(n: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(max(int(n), 1)))


@triton.jit
def key_rows(idx_ptr, idx_off, j0, n_idx, kstart, klen, BLOCK_N: tl.constexpr):
    """Rows of the KV tensor for indices ``j0 .. j0+BLOCK_N`` of one query, and their validity.

    An index is valid when it is in ``[0, klen)`` (the query's own sequence, which starts at row
    ``kstart``). Invalid ones (``-1``, out of range, garbage) get row 0 and ``valid = False``, so no
    load ever leaves the tensor. Paged caches come here as physical rows (:func:`physical_rows`).
    """
    offs = j0 + tl.arange(0, BLOCK_N)
    idx = tl.load(idx_ptr + idx_off + offs, mask=offs < n_idx, other=-1)
    valid = (idx >= 0) & (idx < klen)
    row = tl.where(valid, kstart.to(tl.int64) + idx, 0)
    return row, valid


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """``a @ b``: exact fp32 products for fp32 inputs (``IEEE``), the tensor-core default otherwise."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def key_part(base, valid, d: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr):
    """Columns ``[0, d)`` (padded to ``D``) of the gathered key rows at ``base``, zero where not ``valid``.
    The column mask only exists for padded widths, so that the loads stay 16-byte vectors. Callers load
    the value part and the key-only tail separately, each right before its product (shorter live
    ranges: loading both first measured ~350 more spilled bytes per thread in the forward on sm_90a)."""
    offs = tl.arange(0, D)
    mask = valid[:, None] if d == D else valid[:, None] & (offs[None, :] < d)
    k = tl.load(base + offs[None, :], mask=mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    return k
