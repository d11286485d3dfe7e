"""Time each workload on the backend, its peers and the device ceilings; return one JSON-able dict."""
from __future__ import annotations

import json
import time
import zlib
from importlib import resources
from typing import Callable, Optional, Sequence

import torch

import opbridge

from ..environment import collect
from ..inputs import build
from . import ceilings as C
from .costs import cost
from .peers import COMPILED, NotApplicable, peers_for
from .timing import FULL, SMALL, Budget, measure, sets_needed, synchronize


def workloads(tier: str, ops: Optional[Sequence[str]] = None) -> list[dict]:
    data = json.loads(resources.files("opbridge.conformance").joinpath("data/bench.json").read_text())
    if tier not in ("small", "full"):
        raise ValueError(f"unknown tier '{tier}'")
    return [w for w in data[tier] if ops is None or w["op"] in ops]


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _rates(flops: float, nbytes: float, ms: float) -> dict:
    return {"tflops": flops / ms / 1e9 if flops else None, "gbps": nbytes / ms / 1e6 if nbytes else None}


def _roofline(flops: float, nbytes: float, ceilings: dict, fp8: bool) -> tuple[Optional[float], str]:
    """(floor time in ms, 'compute' or 'memory'): the larger of FLOPs at the GEMM ceiling and bytes at copy bandwidth."""
    peak = C.peak_tflops(ceilings, fp8)
    bw = ceilings["copy"].get("gbps")
    if not peak or not bw:
        return None, "-"
    t_flops, t_bytes = flops / (peak * 1e9), nbytes / (bw * 1e6)
    return max(t_flops, t_bytes), "compute" if t_flops >= t_bytes else "memory"


def _uses_fp8(call) -> bool:
    return any(isinstance(v, opbridge.QuantTensor) and v.fmt == "fp8" for v in call.named.values()) or \
        any(isinstance(v, torch.Tensor) and v.dtype == torch.float8_e4m3fn for v in call.named.values())


def bench_workload(w: dict, backend: str, device: torch.device, budget: Budget, ceilings: dict,
                   with_peers: bool, compile_peers: bool) -> dict:
    op, params = w["op"], w["params"]
    seed = zlib.crc32(f"bench/{op}/{w['name']}".encode())
    rec: dict = {"op": op, "case": w["name"], "params": params, "backend": backend}
    try:
        first = build(op, params, str(device), seed)
        sets = sets_needed(first.nbytes(), device)
        calls = [first] + [build(op, params, str(device), seed + i) for i in range(1, sets)]
    except Exception as e:  # noqa: BLE001
        rec.update(status="error", reason=f"input generation failed: {_short(e)}")
        return rec

    def run(i: int):
        with opbridge.use_backend(backend):
            return calls[i].run()

    try:
        out = run(0)
        synchronize(device)
    except opbridge.UnsupportedError as e:
        rec.update(status="unsupported", reason=e.reason)
        return rec
    except Exception as e:  # noqa: BLE001
        rec.update(status="error", reason=_short(e))
        return rec
    flops, nbytes = cost(first, out)
    t = measure(run, sets, device, budget)
    roof, bound = _roofline(flops, nbytes, ceilings, _uses_fp8(first))
    rec.update(status="ok", flops=flops, bytes=nbytes, timing=t.to_json(), **_rates(flops, nbytes, t.median_ms),
               roofline_ms=roof, fraction_of_roofline=(roof / t.median_ms) if roof else None, bound=bound)
    rec["peers"] = []
    if with_peers:
        for name, make in peers_for(op, backend):
            rec["peers"].append(_peer(name, make, calls, device, budget, t.median_ms, compile_peers))
    return rec


def _peer(name: str, make: Callable, calls, device, budget: Budget, op_ms: float, compile_peers: bool) -> dict:
    if name in COMPILED and device.type == "cpu" and not compile_peers:
        return {"name": name, "status": "skipped", "reason": "torch.compile peers run on GPUs/NPUs (pass --compile on CPU)"}
    try:
        fns = [make(c, device) for c in calls]
        t = measure(lambda i: fns[i](), len(fns), device, budget)
    except NotApplicable as e:
        return {"name": name, "status": "n/a", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
        return {"name": name, "status": "error", "reason": _short(e)}
    return {"name": name, "status": "ok", "timing": t.to_json(), "speedup_vs_peer": t.median_ms / op_ms}


def run(backend: str, device: str, tier: str, ops: Optional[Sequence[str]] = None, *, with_peers: bool = True,
        compile_peers: bool = False, budget: Optional[Budget] = None, time_limit: Optional[float] = None,
        progress: Optional[Callable[[str], None]] = None) -> dict:
    dev = torch.device(device)
    budget = budget or (SMALL if tier == "small" else FULL)
    t0 = time.perf_counter()
    ceil = C.measure_all(dev, budget)
    results = []
    for w in workloads(tier, ops):
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            results.append({"op": w["op"], "case": w["name"], "params": w["params"], "backend": backend,
                            "status": "skipped", "reason": "the run's time limit was reached"})
            continue
        if progress:
            progress(f"{w['op']}/{w['name']}")
        results.append(bench_workload(w, backend, dev, budget, ceil, with_peers, compile_peers))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {"schema": "opbridge-bench/1", "backend": backend, "device": device, "tier": tier,
            "environment": collect(backend, device), "budget": budget.__dict__, "ceilings": ceil,
            "results": results, "wall_s": time.perf_counter() - t0}
