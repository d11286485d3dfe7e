"""Subprocess entry point: ``python -m opbridge.conformance.worker SPEC.json``.

Runs the listed cases in order and appends one JSON line per event to the spec's ``out`` file:
``{"event": "start", "id": ...}`` before a case and ``{"event": "result", ...}`` after it, each
flushed at once, so the parent knows which case was running if this process dies.
"""
from __future__ import annotations

import importlib
import json
import sys
import time


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    for module in spec.get("preload", []):
        importlib.import_module(module)  # e.g. a module registering or patching a backend under test
    from .catalogue import by_id
    from .execute import run_case

    cases = by_id(spec["tier"])
    with open(spec["out"], "a", buffering=1) as out:
        for case_id in spec["case_ids"]:
            out.write(json.dumps({"event": "start", "id": case_id, "t": time.time()}) + "\n")
            out.flush()
            result = run_case(cases[case_id], spec["backend"], spec["device"], oracle_device=spec.get("oracle_device"))
            out.write(json.dumps({"event": "result", **result.to_json()}) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
