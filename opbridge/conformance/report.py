"""``report.json`` (everything, machine-readable) and ``report.md`` (a table per op) of one run."""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Iterable, Sequence

from opbridge import OP_NAMES

from .execute import STATUSES, CaseResult

SCHEMA = "opbridge-conformance/1"


def summarize(results: Iterable[CaseResult]) -> dict:
    per_op: dict[str, Counter] = {}
    total: Counter = Counter()
    for r in results:
        per_op.setdefault(r.op, Counter())[r.status] += 1
        total[r.status] += 1
    ops = {op: {s: per_op[op].get(s, 0) for s in STATUSES} | {"total": sum(per_op[op].values())}
           for op in OP_NAMES if op in per_op}
    return {"ops": ops, "total": {s: total.get(s, 0) for s in STATUSES} | {"total": sum(total.values())}}


def failed(results: Iterable[CaseResult]) -> bool:
    return any(r.status in ("fail", "error") for r in results)


def build(results: Sequence[CaseResult], environment: dict, tier: str, cases_json: dict) -> dict:
    s = summarize(results)
    return {
        "schema": SCHEMA, "backend": environment["backend"], "device": environment["device"],
        "device_name": environment.get("device_name"), "tier": tier, "environment": environment,
        "summary": s["total"], "ops": s["ops"], "exit_status": 1 if failed(results) else 0,
        "cases": [{**r.to_json(), "why": cases_json.get(r.id, {}).get("why", "")} for r in results],
    }


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text.replace("|", "\\|")


def _metrics_text(metrics: list) -> str:
    shown = []
    for m in metrics:
        if m["key"] == "count" and m["passed"]:
            continue  # structural checks that held: implied by the status
        v = m["value"]
        v = f"{v:.3g}" if isinstance(v, (int, float)) else v
        shown.append(f"{m['name']}={v}{'' if m['passed'] else ' (' + m['threshold'] + ')'}")
    return ", ".join(shown)


def _time(t) -> str:
    return "" if t is None else f"{t * 1e3:.1f}"


def summary_table(report: dict) -> list[str]:
    lines = ["| op | pass | fail | error | unsupported | xfail | total |", "|---|---:|---:|---:|---:|---:|---:|"]
    for op, c in report["ops"].items():
        lines.append(f"| {op} | {c['pass']} | {c['fail']} | {c['error']} | {c['unsupported']} | {c['xfail']} | {c['total']} |")
    t = report["summary"]
    lines.append(f"| **all** | {t['pass']} | {t['fail']} | {t['error']} | {t['unsupported']} | {t['xfail']} | {t['total']} |")
    return lines


def markdown(report: dict) -> str:
    env = report["environment"]
    v = env["versions"]
    lines = [f"# opbridge conformance: `{report['backend']}` on {report['device_name']} ({report['device']}), "
             f"{report['tier']} tier", ""]
    lines += ["| | |", "|---|---|"]
    rows = [("backend", f"{report['backend']} ({env['backend_available']}; "
                        f"{'deterministic' if env['backend_deterministic'] else 'not deterministic'})"),
            ("device", f"{env.get('device_name')} ({env['device']})"), ("driver", env.get("driver") or "-"),
            ("versions", ", ".join(f"{k} {val}" for k, val in v.items() if val)),
            ("settings", ", ".join(f"{k}={val}" for k, val in env["settings"].items())),
            ("oracle", env["oracle"]), ("commit", env.get("git_commit") or "-"), ("created", env["created"])]
    if env.get("triton_interpret"):
        rows.append(("TRITON_INTERPRET", env["triton_interpret"]))
    lines += [f"| {k} | {_cell(val, 300)} |" for k, val in rows]
    verdict = "FAILED" if report["exit_status"] else "passed"
    lines += ["", f"**Result: {verdict}** (exit status {report['exit_status']}; `fail` and `error` fail a run, "
              f"`unsupported` and `xfail` do not).", "", "## Summary", ""] + summary_table(report)
    by_op: dict[str, list] = {}
    for c in report["cases"]:
        by_op.setdefault(c["op"], []).append(c)
    for op, cases in by_op.items():
        lines += ["", f"## {op}", "", "| case | kind | status | metrics | backend ms | note |",
                  "|---|---|---|---|---:|---|"]
        for c in cases:
            note = c["reason"] if c["status"] != "pass" or c["kind"] == "bad" else ""
            if c["status"] == "pass" and c["kind"] == "bad":
                note = "raised " + note
            lines.append(f"| {c['id'].split('/', 1)[1]} | {c['kind']} | {c['status']} | "
                         f"{_cell(_metrics_text(c['metrics']), 200)} | {_time(c['time_s'])} | {_cell(note.splitlines()[0] if note else '')} |")
    return "\n".join(lines) + "\n"


def write(report: dict, directory: str) -> tuple[str, str]:
    os.makedirs(directory, exist_ok=True)
    jpath, mpath = os.path.join(directory, "report.json"), os.path.join(directory, "report.md")
    with open(jpath, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    with open(mpath, "w") as f:
        f.write(markdown(report))
    return jpath, mpath


def load(path: str) -> dict:
    with open(path) as f:
        report = json.load(f)
    if report.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not an opbridge conformance report (schema {report.get('schema')!r})")
    return report
