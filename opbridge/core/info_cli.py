"""``opbridge info``: what this machine has and which backend each op resolves to."""
from __future__ import annotations

import argparse
import json

from .explain import explain


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    report = explain()
    if args.json:
        print(json.dumps({
            "devices": report.devices,
            "backends": dict(report.backends),
            "settings": dict(report.settings),
            "ops": [{"op": d.op, "device": d.device, "backend": d.backend, "source": d.source, "reason": d.reason}
                    for d in report.decisions],
        }, indent=2))
    else:
        print(report)
    return 0
