"""``opbridge conformance``: check backends against OPS.md op by op; ``opbridge conformance merge``: the scoreboard.

    opbridge conformance                                   # every available backend, small tier
    opbridge conformance --backend triton --device cuda --tier full --report out/h100-triton
    opbridge conformance --backend reference --ops moe,sinkhorn
    opbridge conformance merge a/report.json b/report.json --out SCOREBOARD.md

Exit status 1 if any case fails or errors (``unsupported`` and documented ``xfail`` do not), 2 on
a usage error.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

from opbridge.core.settings import BACKEND_NAMES

from . import catalogue, merge, report
from .catalogue import TIERS
from .execute import CaseResult
from . import runner
from .runner import RunConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", metavar="merge", help="'merge' to build the scoreboard from report.json files")
    p.add_argument("files", nargs="*", help="with 'merge': report.json files")
    p.add_argument("--backend", help=f"comma list of backends ({', '.join(BACKEND_NAMES)}); default: every available one")
    p.add_argument("--device", help="cpu | cuda | cuda:N | npu; default: the backend's usual device")
    p.add_argument("--tier", default="small", choices=TIERS, help="small (CPU-sized) or full (model sizes)")
    p.add_argument("--ops", nargs="+", help="only these ops (space or comma separated)")
    p.add_argument("--cases", nargs="+", metavar="GLOB", help="only case ids matching a glob, e.g. 'moe/*fp8*'")
    p.add_argument("--kinds", nargs="+", choices=catalogue.KINDS, help="only these kinds of case")
    p.add_argument("--report", metavar="DIR", help="write report.json and report.md here")
    p.add_argument("--oracle-device", help="where the float64 reference runs (default: the test device; cpu for npu)")
    p.add_argument("--case-timeout", type=float, default=600.0, help="seconds before a case is killed (default 600)")
    p.add_argument("--time-limit", type=float, help="seconds for the whole run; cases not reached become errors")
    p.add_argument("--preload", nargs="+", default=[], metavar="MODULE",
                   help="import these modules in every worker first (e.g. to register a backend under development)")
    p.add_argument("--no-isolate", action="store_true", help="run in this process (no per-family subprocesses)")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--out", help="with 'merge': also write the scoreboard (Markdown) to this file")


class _Bar:
    """A one-line progress bar on a terminal (stderr); silent otherwise."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done, self.bad = total, label, 0, 0
        self.tty = sys.stderr.isatty()

    def __call__(self, case_id: str, result: Optional[CaseResult]) -> None:
        if result is not None:
            self.done += 1
            self.bad += result.status in ("fail", "error")
        if not self.tty:
            return
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        msg = (f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}"
               f"{f' ({self.bad} failing)' if self.bad else ''} {case_id[:50]:<50}")
        sys.stderr.write(msg)
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\r" + " " * 120 + "\r")
            sys.stderr.flush()


def _ops(values) -> Optional[list[str]]:
    if not values:
        return None
    return [o for v in values for o in v.split(",") if o]


def default_device(backend: str) -> str:
    if backend == "triton":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if backend == "ascend":
        return "npu"
    return "cpu"


def device_type(device: str) -> str:
    """'cuda' of 'cuda:1'; works for 'npu' even where torch cannot parse it (torch_npu not loaded)."""
    return device.split(":", 1)[0]


def _device_ok(device: str) -> Optional[str]:
    kind = device_type(device)
    if kind not in ("cpu", "cuda", "npu"):
        return f"unknown device type '{kind}' (cpu, cuda, cuda:N, npu)"
    if kind == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    if kind == "npu" and not (hasattr(torch, "npu") and torch.npu.is_available()):
        return "no Ascend NPU is visible to torch (is torch_npu imported and CANN installed?)"
    return None


def _run_merge(args: argparse.Namespace) -> int:
    if not args.files:
        print("opbridge conformance merge: give report.json files", file=sys.stderr)
        return 2
    try:
        text = merge.scoreboard(args.files)
    except (OSError, ValueError, KeyError) as e:
        print(f"opbridge conformance merge: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return 0


def run_one(args: argparse.Namespace, backend: str, device: str, cases, out_dir: Optional[str]) -> dict:
    from .environment import collect

    oracle_device = args.oracle_device or ("cpu" if device_type(device) == "npu" else device)
    env = []
    if backend == "triton" and device_type(device) == "cpu":
        env.append(("TRITON_INTERPRET", "1"))
    config = RunConfig(backend=backend, device=device, tier=args.tier, oracle_device=oracle_device,
                       case_timeout=args.case_timeout, time_limit=args.time_limit, preload=tuple(args.preload),
                       isolate=not args.no_isolate, extra_env=tuple(env))
    bar = _Bar(len(cases), f"{backend}/{device}")
    try:
        results = runner.run(config, cases, progress=bar)
    finally:
        bar.close()
    rep = report.build(results, collect(backend, device, oracle_device), args.tier,
                       {c.id: c.to_json() for c in cases})
    print(f"\n## {backend} on {rep['device_name']} ({device}), {args.tier} tier\n")
    print("\n".join(report.summary_table(rep)))
    bad = [c for c in rep["cases"] if c["status"] in ("fail", "error")]
    for c in bad[:20]:
        print(f"  {c['status'].upper()} {c['id']}: {(c['reason'] or '').splitlines()[0][:200] if c['reason'] else ''}")
    if len(bad) > 20:
        print(f"  ... and {len(bad) - 20} more (see report.md)")
    if out_dir:
        j, m = report.write(rep, out_dir)
        print(f"\nwrote {j} and {m}")
    return rep


def run_cli(args: argparse.Namespace) -> int:
    if args.action == "merge":
        return _run_merge(args)
    if args.action is not None or args.files:
        print(f"opbridge conformance: unknown action {args.action!r} (only 'merge' takes positional arguments)",
              file=sys.stderr)
        return 2
    try:
        cases = catalogue.cases(args.tier, ops=_ops(args.ops), kinds=args.kinds, match=args.cases)
    except catalogue.CatalogueError as e:
        print(f"opbridge conformance: {e}", file=sys.stderr)
        return 2
    if args.list:
        for c in cases:
            print(f"{c.id:50s} {c.kind:12s} {c.why or c.expect}")
        return 0
    if not cases:
        print("opbridge conformance: no case matches the selection", file=sys.stderr)
        return 2
    explicit = args.backend is not None
    names = [b for b in (args.backend or ",".join(BACKEND_NAMES)).split(",") if b]
    unknown = [b for b in names if b not in BACKEND_NAMES]
    if unknown:
        print(f"opbridge conformance: unknown backend(s) {', '.join(unknown)}; valid: {', '.join(BACKEND_NAMES)}",
              file=sys.stderr)
        return 2
    from opbridge.core.registry import get_backend

    plan = []
    for b in names:
        device = args.device or default_device(b)
        if b == "triton" and device_type(device) == "cpu" and explicit:
            os.environ.setdefault("TRITON_INTERPRET", "1")  # the only way Triton runs on CPU tensors
        avail = get_backend(b).availability()  # first: it imports vendor stacks (torch_npu adds torch.npu)
        problem = _device_ok(device)
        if problem or not avail.ok:
            why = problem or avail.reason
            if explicit:
                if problem:
                    print(f"opbridge conformance: --device {device}: {problem}", file=sys.stderr)
                    return 2
                print(f"note: backend '{b}' is unavailable ({why}); every case is reported unsupported")
            else:
                print(f"skipping backend '{b}': unavailable ({why})")
                continue
        plan.append((b, device))
    if not plan:
        print("opbridge conformance: no backend is available", file=sys.stderr)
        return 2
    reports = []
    for b, device in plan:
        out_dir = None
        if args.report:
            out_dir = args.report if len(plan) == 1 else os.path.join(args.report, f"{b}-{device_type(device)}")
        reports.append((out_dir, run_one(args, b, device, cases, out_dir)))
    if len(plan) > 1 and args.report:
        paths = [os.path.join(d, "report.json") for d, _ in reports]
        text = merge.scoreboard(paths)
        with open(os.path.join(args.report, "SCOREBOARD.md"), "w") as f:
            f.write(text)
        print("\n" + text)
    return 1 if any(r["exit_status"] for _, r in reports) else 0


def run(args: argparse.Namespace) -> int:  # the CLI contract: run(args) -> int
    return run_cli(args)
