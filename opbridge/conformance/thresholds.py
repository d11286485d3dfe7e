"""Thresholds (``data/thresholds.json``) and per-backend exceptions (``data/exceptions.json``) as data."""
from __future__ import annotations

import fnmatch
import functools
import json
import operator
from dataclasses import dataclass
from importlib import resources
from typing import Mapping, Optional

_CMP = {"<": operator.lt, "<=": operator.le, "==": operator.eq}


@dataclass(frozen=True)
class Threshold:
    key: str
    cmp: str
    limit: float
    source: str

    def ok(self, value: float) -> bool:
        return bool(_CMP[self.cmp](value, self.limit))

    def __str__(self) -> str:
        return f"{self.cmp} {self.limit:g}"


@dataclass(frozen=True)
class ExpectedFailure:
    pattern: str
    reason: str
    devices: tuple[str, ...] = ()  # device types it applies to; empty: all

    def applies(self, case_id: str, device: str) -> bool:
        dev_type = device.split(":")[0]
        return fnmatch.fnmatchcase(case_id, self.pattern) and (not self.devices or dev_type in self.devices)


class DataError(ValueError):
    pass


def _load(name: str) -> dict:
    return json.loads(resources.files("opbridge.conformance").joinpath(f"data/{name}").read_text())


@functools.lru_cache(maxsize=None)
def base_thresholds() -> Mapping[str, Threshold]:
    raw = _load("thresholds.json")
    out = {}
    for key, v in raw.items():
        if key == "about":
            continue
        if v.get("cmp") not in _CMP or not v.get("source"):
            raise DataError(f"thresholds.json: '{key}' needs cmp in {tuple(_CMP)} and a source")
        out[key] = Threshold(key, v["cmp"], float(v["limit"]), v["source"])
    return out


@functools.lru_cache(maxsize=None)
def exceptions(backend: str) -> dict:
    raw = _load("exceptions.json").get(backend, {})
    failures = []
    for e in raw.get("expected_failures", []):
        if not e.get("case") or not str(e.get("reason", "")).strip():
            raise DataError(f"exceptions.json: backend '{backend}': every expected failure needs 'case' and a 'reason'")
        failures.append(ExpectedFailure(e["case"], e["reason"], tuple(e.get("devices", ()))))
    loosened = {}
    base = base_thresholds()
    for key, v in raw.get("loosened_thresholds", {}).items():
        if key not in base:
            raise DataError(f"exceptions.json: backend '{backend}': unknown threshold '{key}'")
        if not str(v.get("reason", "")).strip():
            raise DataError(f"exceptions.json: backend '{backend}': loosening '{key}' needs a reason")
        if float(v["limit"]) < base[key].limit:
            raise DataError(f"exceptions.json: backend '{backend}': '{key}' is tighter than the base; edit thresholds.json")
        loosened[key] = Threshold(key, base[key].cmp, float(v["limit"]),
                                  f"loosened for {backend}: {v['reason']} (base {base[key]})")
    return {"expected_failures": tuple(failures), "loosened": loosened}


def thresholds_for(backend: str) -> Mapping[str, Threshold]:
    return {**base_thresholds(), **exceptions(backend)["loosened"]}


def expected_failure(backend: str, case_id: str, device: str = "") -> Optional[ExpectedFailure]:
    for e in exceptions(backend)["expected_failures"]:
        if e.applies(case_id, device):
            return e
    return None
