"""``opbridge bench``: time each op against the device's ceilings and PyTorch-native peers.

    opbridge bench                                  # default backend of the device, small tier
    opbridge bench --backend triton --tier full --out bench/out/h100-triton
    opbridge bench --backend reference --ops moe sinkhorn --no-peers

Writes bench.json, bench.md and (with matplotlib) bench.png under --out.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from opbridge.core.settings import BACKEND_NAMES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKEND_NAMES, help="default: the device's (cuda: triton, npu: ascend, cpu: reference)")
    p.add_argument("--device", help="default: cuda if present, else npu if present, else cpu")
    p.add_argument("--tier", default="small", choices=("small", "full"))
    p.add_argument("--ops", nargs="+", help="only these ops (space or comma separated)")
    p.add_argument("--out", help="output directory (default: bench/out/<backend>-<device type>-<tier>)")
    p.add_argument("--no-peers", action="store_true", help="skip the PyTorch-native peers")
    p.add_argument("--compile", action="store_true", help="also time torch.compile peers on CPU")
    p.add_argument("--time-limit", type=float, help="seconds; workloads not started by then are skipped")


def _device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "npu") and torch.npu.is_available():
        return "npu"
    return "cpu"


def run(args: argparse.Namespace) -> int:
    from .bench import output, runner

    device = args.device or _device()
    kind = device.split(":", 1)[0]
    backend = args.backend or {"cuda": "triton", "npu": "ascend"}.get(kind, "reference")
    if backend == "triton" and kind == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    ops = [o for v in args.ops for o in v.split(",") if o] if args.ops else None
    out_dir = args.out or os.path.join("bench", "out", f"{backend}-{kind}-{args.tier}")
    tty = sys.stderr.isatty()

    def progress(name: str) -> None:
        if tty:
            sys.stderr.write(f"\rbench {backend}/{device}: {name:<60}")
            sys.stderr.flush()

    res = runner.run(backend, device, args.tier, ops, with_peers=not args.no_peers, compile_peers=args.compile,
                     time_limit=args.time_limit, progress=progress)
    if tty:
        sys.stderr.write("\r" + " " * 90 + "\r")
    paths = output.write(res, out_dir)
    print(output.markdown(res))
    if "chart" in res:
        print(f"note: {res['chart']}")
    print("wrote " + ", ".join(paths.values()))
    return 1 if any(r["status"] == "error" for r in res["results"]) else 0
