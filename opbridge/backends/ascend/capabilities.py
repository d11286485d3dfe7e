"""The Ascend capability table (``capabilities.json``) and the questions the backend asks of it.

A :class:`Platform` describes one NPU as seen through the installed torch_npu: its SoC family,
the torch_npu / op-plugin / CANN versions, and the argument names of every vendor op schema
torch_npu carries (probed, so a torch_npu version missing from the table still works). The
``*_reason`` functions return ``None`` or a one-line reason naming the vendor op and the limit;
the op modules turn reasons into ``UnsupportedError`` through the registry.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

_DATA: dict[str, Any] = json.loads((Path(__file__).with_name("capabilities.json")).read_text())
OP_PLUGIN_ORDER: tuple[str, ...] = tuple(_DATA["op_plugin_order"])
OPS: Mapping[str, Mapping[str, Any]] = _DATA["ops"]
FEATURES: Mapping[str, Mapping[str, Any]] = _DATA["features"]
LIMITS: Mapping[str, Mapping[str, Any]] = _DATA["limits"]
FAMILY_TITLES: Mapping[str, str] = {f["family"]: f["title"] for f in _DATA["soc_families"]}


def family_of(device_name: str) -> str:
    """SoC family ('A2', 'A3', '950') of a torch_npu device name such as 'Ascend910B3'; '' if unknown."""
    for fam in _DATA["soc_families"]:
        if any(device_name.startswith(p) for p in fam["prefixes"]):
            return fam["family"]
    return ""


def _version_key(v: str) -> tuple[int, ...]:
    """'2.7.1.post8' -> (2, 7, 1, 8); '2.13.0+gitabc' -> (2, 13, 0, 0); 'rc' parts sort before releases."""
    v = v.split("+")[0]
    nums = [int(x) for x in re.findall(r"\d+", v.split("post")[0].split("rc")[0])][:3]
    nums += [0] * (3 - len(nums))
    post = re.search(r"post(\d+)", v)
    return (*nums, int(post.group(1)) if post else 0)


def cann_key(v: str) -> tuple[int, ...]:
    """'8.3.RC1' -> (8, 3, -99); '9.1.0' -> (9, 1, 0): release candidates sort before the release."""
    out = []
    for part in v.split(".")[:3]:
        m = re.fullmatch(r"(?i)rc(\d+)", part)
        out.append(int(m.group(1)) - 100 if m else int(re.sub(r"\D", "", part) or 0))
    return tuple(out + [0] * (3 - len(out)))


def op_plugin_of(torch_npu_version: str) -> tuple[str, str]:
    """(op-plugin branch, CANN version) for a torch_npu version, from the compatibility table.

    An exact release is looked up; a newer post-release of a listed (major, minor, patch) takes
    the newest listed entry below it; a version newer than every entry is taken to be 'master'.
    Anything else is ('unknown', 'unknown'): the schema probe still decides what exists.
    """
    key = _version_key(torch_npu_version)
    best: Optional[tuple[tuple[int, ...], str, str]] = None
    newest = max(_version_key(v) for row in _DATA["versions"] for v in row["torch_npu"])
    for row in _DATA["versions"]:
        for v in row["torch_npu"]:
            k = _version_key(v)
            if k == key:
                return row["op_plugin"], row["cann"]
            if k[:3] == key[:3] and k <= key and (best is None or k > best[0]):
                best = (k, row["op_plugin"], row["cann"])
    if best is not None:
        return best[1], best[2]
    if key > newest:
        return "master", "unknown"
    return "unknown", "unknown"


def _branch_index(branch: str) -> int:
    return OP_PLUGIN_ORDER.index(branch) if branch in OP_PLUGIN_ORDER else -1


def _first_releases(branch: str) -> str:
    for row in _DATA["versions"]:
        if row["op_plugin"] == branch:
            return f"torch_npu {' / '.join(row['torch_npu'])}, CANN {row['cann']}"
    return "no released torch_npu listed"


@dataclass(frozen=True)
class Platform:
    """One Ascend device as torch_npu presents it."""

    device_name: str  # torch_npu.npu.get_device_name(), e.g. 'Ascend910B3'
    family: str  # 'A2' | 'A3' | '950' | '' (not in the table)
    torch_npu: str  # torch_npu.__version__
    op_plugin: str  # op-plugin branch from the version table, or 'master' / 'unknown'
    cann: str  # CANN version reported by torch_npu, else the table's, else 'unknown'
    schemas: Mapping[str, frozenset[str]] = field(default_factory=dict)  # vendor op -> argument names

    @property
    def soc(self) -> str:
        title = FAMILY_TITLES.get(self.family, "an SoC outside opbridge's Ascend table")
        return f"{title} '{self.device_name}'"

    def versions(self) -> str:
        return f"torch_npu {self.torch_npu} (op-plugin {self.op_plugin}, CANN {self.cann})"

    def __str__(self) -> str:
        return f"{self.soc}, {self.versions()}"


def _socs(families) -> str:
    return ", ".join(FAMILY_TITLES.get(f, f) for f in families) or "no SoC"


def op_reason(p: Platform, op: str) -> Optional[str]:
    """Why vendor ``op`` cannot run on ``p`` (schema missing, SoC not documented, CANN too old), or None."""
    info = OPS[op]
    if op not in p.schemas:
        since = info["since"]
        return (f"{op} is not in {p.versions()}; it ships from op-plugin {since} "
                f"({_first_releases(since)})")
    if p.family not in info["socs"]:
        return f"{op} is documented for {_socs(info['socs'])} only; this device is {p.soc}"
    need = info.get("cann")
    if need and p.cann != "unknown" and cann_key(p.cann) < cann_key(need):
        return f"{op} needs CANN >= {need} (its aclnn kernel); found CANN {p.cann}"
    return None


def feature_reason(p: Platform, name: str) -> Optional[str]:
    """Why a feature of a vendor op (an argument, a dtype, a shape range) is unavailable on ``p``, or None."""
    f = FEATURES[name]
    op = f["op"]
    if "socs" in f and p.family not in f["socs"]:
        return f"{op}: {f['what']}: not available on {p.soc}"
    arg = f.get("argument")
    if arg is not None:
        if arg not in p.schemas.get(op, frozenset()):
            return (f"{op}: {f['what']} needs its '{arg}' argument, absent from {p.versions()} "
                    f"(op-plugin {f['since']})")
    elif "since" in f and _branch_index(p.op_plugin) >= 0 and _branch_index(p.op_plugin) < _branch_index(f["since"]):
        return f"{op}: {f['what']}: needs op-plugin {f['since']} ({_first_releases(f['since'])}); found {p.versions()}"
    return None


def has_feature(p: Platform, name: str) -> bool:
    return feature_reason(p, name) is None


def limit(op: str, key: str, family: str = "") -> Any:
    """A documented limit; per-SoC limits are dicts keyed by family (None when the SoC has no entry)."""
    v = LIMITS[op][key]
    if isinstance(v, dict) and set(v) <= set(FAMILY_TITLES):
        return v.get(family)
    return v
