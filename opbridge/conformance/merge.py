"""The scoreboard: ops x (backend, device) from several report.json files."""
from __future__ import annotations

from typing import Sequence

from opbridge import OP_NAMES

from .report import load

LEGEND = ("Each cell: cases passed / cases run (run = not `unsupported`), then F = fail, E = error, "
          "X = expected failure (xfail), U = unsupported, when any. `-`: the op was not in that run.")


def _cell(c: dict) -> str:
    run = c["total"] - c["unsupported"]
    text = f"{c['pass']}/{run}"
    extra = [f"{letter}{c[key]}" for letter, key in (("F", "fail"), ("E", "error"), ("X", "xfail"), ("U", "unsupported"))
             if c[key]]
    return text + (" " + " ".join(extra) if extra else "")


def scoreboard(paths: Sequence[str]) -> str:
    reports = [load(p) for p in paths]
    heads = [f"{r['backend']} @ {r.get('device_name') or r['device']} ({r['device']}, {r['tier']})" for r in reports]
    ops = [op for op in OP_NAMES if any(op in r["ops"] for r in reports)]
    lines = ["# opbridge conformance scoreboard", "", LEGEND, "",
             "| op | " + " | ".join(heads) + " |", "|---|" + "---|" * len(reports)]
    for op in ops:
        lines.append(f"| {op} | " + " | ".join(_cell(r["ops"][op]) if op in r["ops"] else "-" for r in reports) + " |")
    lines.append("| **all** | " + " | ".join(f"**{_cell(r['summary'])}**" for r in reports) + " |")
    lines += ["", "Sources:"]
    for p, r in zip(paths, reports):
        env = r["environment"]
        lines.append(f"- `{p}`: {r['backend']} on {r.get('device_name')} ({r['device']}), torch "
                     f"{env['versions']['torch']}, triton {env['versions'].get('triton') or '-'}, "
                     f"commit {env.get('git_commit') or '-'}, {env['created']}")
    return "\n".join(lines) + "\n"
