"""Timing: device events (CUDA, or torch.npu on Ascend) or the wall clock on CPU; warm-up; median.

Inputs are rotated over several sets so that together they exceed twice the device's L2, or a
timed call would read its inputs from cache.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

# Ascend 910B has 192 MB of L2; used when torch.npu cannot tell.
_NPU_L2_BYTES = 192 * 2**20


@dataclass(frozen=True)
class Budget:
    """How long to time one variant: at least ``min_reps`` calls and ``min_time_s``, at most ``max_reps``."""

    warmup_reps: int = 3
    min_reps: int = 10
    max_reps: int = 100
    min_time_s: float = 0.3


SMALL = Budget(warmup_reps=1, min_reps=3, max_reps=10, min_time_s=0.02)
FULL = Budget()


@dataclass(frozen=True)
class Timing:
    median_ms: float
    q20_ms: float
    q80_ms: float
    reps: int
    sets: int
    method: str

    def to_json(self) -> dict:
        return {"median_ms": self.median_ms, "q20_ms": self.q20_ms, "q80_ms": self.q80_ms, "reps": self.reps,
                "input_sets": self.sets, "method": self.method}


def l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    if device.type == "npu":
        return _NPU_L2_BYTES
    return 0  # CPU: a smoke test; caches are not modelled


def sets_needed(set_bytes: int, device: torch.device, cap: int = 16) -> int:
    l2 = l2_bytes(device)
    if l2 == 0 or set_bytes <= 0:
        return 1
    return max(1, min(cap, math.ceil(2 * l2 / set_bytes)))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize()  # type: ignore[attr-defined]


def _events(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.Event(enable_timing=True), "cuda events"
    if device.type == "npu":
        return lambda: torch.npu.Event(enable_timing=True), "npu events"  # type: ignore[attr-defined]
    return None, "wall clock"


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def measure(fn: Callable[[int], Any], sets: int, device: torch.device, budget: Budget) -> Timing:
    """Median time of ``fn(i)`` (``i`` = input set, rotated) in milliseconds."""
    make_event, method = _events(device)
    for i in range(max(budget.warmup_reps, sets)):
        fn(i % sets)
    synchronize(device)
    times: list[float] = []
    t_begin = time.perf_counter()
    pairs = []
    i = 0
    while i < budget.max_reps and (i < budget.min_reps or time.perf_counter() - t_begin < budget.min_time_s):
        if make_event is None:
            t0 = time.perf_counter()
            fn(i % sets)
            times.append((time.perf_counter() - t0) * 1e3)
        else:
            start, end = make_event(), make_event()
            start.record()
            fn(i % sets)
            end.record()
            pairs.append((start, end))
            if len(pairs) % 8 == 0:
                synchronize(device)  # keep the wall-clock budget honest
        i += 1
    if pairs:
        synchronize(device)
        times = [s.elapsed_time(e) for s, e in pairs]
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times), sets, method)
