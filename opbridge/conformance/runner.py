"""Run a selection of cases, one op family per subprocess, and survive crashes.

A case that kills its process (a segfault, a device fault, a compile error that aborts) or
outlives ``case_timeout`` is recorded as that case's ``error`` with the tail of the worker's
output; a new worker then carries on with the next case. ``isolate=False`` runs everything in
this process (used by the pytest plugin and by tests that register a backend in-process).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import opbridge

from .catalogue import FAMILIES, Case
from .execute import CaseResult, run_case


@dataclass(frozen=True)
class RunConfig:
    backend: str
    device: str = "cpu"
    tier: str = "small"
    oracle_device: Optional[str] = None
    case_timeout: float = 600.0
    time_limit: Optional[float] = None  # whole run; cases not reached are errors ("not run")
    preload: tuple[str, ...] = ()
    isolate: bool = True
    extra_env: tuple[tuple[str, str], ...] = field(default_factory=tuple)


Progress = Callable[[str, Optional[CaseResult]], None]  # (case id, result or None when it starts)


def worker_env(config: RunConfig) -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(opbridge.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(dict(config.extra_env))
    return env


def _tail(path: str, n: int = 2500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def _error(case: Case, reason: str) -> CaseResult:
    return CaseResult(case.id, case.op, case.kind, "error", reason, params=dict(case.params))


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class _Family:
    """Runs one family's cases in successive workers until every case has a result."""

    def __init__(self, config: RunConfig, cases: Sequence[Case], workdir: str, name: str, progress: Optional[Progress],
                 deadline: Optional[float]):
        self.config, self.cases, self.workdir, self.name = config, list(cases), workdir, name
        self.progress, self.deadline = progress, deadline
        self.results: dict[str, CaseResult] = {}

    def run(self) -> list[CaseResult]:
        attempt = 0
        while True:
            remaining = [c for c in self.cases if c.id not in self.results]
            if not remaining:
                break
            if self.deadline is not None and time.monotonic() >= self.deadline:
                for c in remaining:
                    self.results[c.id] = _error(c, "not run: the run's time limit was reached")
                break
            attempt += 1
            started = self._spawn(remaining, attempt)
            if not started:  # the worker died before its first case: do not loop on it
                break
        return [self.results[c.id] for c in self.cases]

    def _spawn(self, remaining: list[Case], attempt: int) -> bool:
        base = os.path.join(self.workdir, f"{self.name}-{attempt}")
        spec = {"backend": self.config.backend, "device": self.config.device, "tier": self.config.tier,
                "oracle_device": self.config.oracle_device, "case_ids": [c.id for c in remaining],
                "out": base + ".jsonl", "preload": list(self.config.preload)}
        with open(base + ".spec.json", "w") as f:
            json.dump(spec, f)
        by_id = {c.id: c for c in remaining}
        with open(base + ".log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "opbridge.conformance.worker", base + ".spec.json"],
                                    stdout=log, stderr=subprocess.STDOUT, env=worker_env(self.config),
                                    start_new_session=True)
            offset, current, started_any, killed_for = 0, None, False, None
            while True:
                done = proc.poll() is not None
                offset, events = self._read(base + ".jsonl", offset)
                for ev in events:
                    if ev["event"] == "start":
                        current, started_any = (ev["id"], time.monotonic()), True
                        if self.progress:
                            self.progress(ev["id"], None)
                    else:
                        r = CaseResult.from_json(ev)
                        self.results[r.id] = r
                        current = None
                        if self.progress:
                            self.progress(r.id, r)
                if done:
                    break
                now = time.monotonic()
                if current is not None and now - current[1] > self.config.case_timeout:
                    killed_for = f"timed out after {self.config.case_timeout:.0f} s"
                    _kill(proc)
                elif self.deadline is not None and now >= self.deadline:
                    killed_for = "stopped: the run's time limit was reached"
                    _kill(proc)
                else:
                    time.sleep(0.05)
        code = proc.returncode
        if current is not None and current[0] not in self.results:
            why = killed_for or f"the worker process died ({_describe_exit(code)}) while running this case"
            r = _error(by_id[current[0]], f"{why}; worker output tail:\n{_tail(base + '.log')}")
            self.results[r.id] = r
            if self.progress:
                self.progress(r.id, r)
        elif not started_any:
            for c in remaining:
                self.results[c.id] = _error(c, f"the worker process failed before running any case "
                                               f"({_describe_exit(code)}); output tail:\n{_tail(base + '.log')}")
        return started_any

    @staticmethod
    def _read(path: str, offset: int) -> tuple[int, list[dict]]:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return offset, []
        end = data.rfind(b"\n") + 1  # only complete lines
        events = [json.loads(line) for line in data[:end].decode().splitlines() if line.strip()]
        return offset + end, events


def run(config: RunConfig, cases: Sequence[Case], progress: Optional[Progress] = None) -> list[CaseResult]:
    """Results for ``cases`` in their order."""
    deadline = time.monotonic() + config.time_limit if config.time_limit else None
    if not config.isolate:
        out = []
        for c in cases:
            if deadline is not None and time.monotonic() >= deadline:
                out.append(_error(c, "not run: the run's time limit was reached"))
                continue
            if progress:
                progress(c.id, None)
            r = run_case(c, config.backend, config.device, oracle_device=config.oracle_device)
            out.append(r)
            if progress:
                progress(c.id, r)
        return out
    results: dict[str, CaseResult] = {}
    with tempfile.TemporaryDirectory(prefix="opbridge-conformance-") as workdir:
        for family in FAMILIES:
            fam_cases = [c for c in cases if c.family == family]
            if fam_cases:
                for r in _Family(config, fam_cases, workdir, family, progress, deadline).run():
                    results[r.id] = r
    return [results[c.id] for c in cases]
