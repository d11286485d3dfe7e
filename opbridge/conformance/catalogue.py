"""The case catalogue: ``data/cases_<family>.json`` resolved for a tier, plus determinism twins.

Cases are data. Each names an op, a kind (``model``: a DeepSeek model shape; ``edge``; ``bad``:
an invalid call that must raise a documented error), the parameters its generator reads, and
per-tier overrides (``small`` runs on 2 CPU cores in minutes, ``full`` has the real sizes). For
every op, the first model case also gets a ``determinism`` twin: the same call made twice must
give bitwise-identical results when the backend claims determinism.
"""
from __future__ import annotations

import fnmatch
import functools
import json
import zlib
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterable, Mapping, Optional, Sequence

from opbridge import OP_NAMES
from opbridge.core.opdef import OPS

TIERS = ("small", "full")
KINDS = ("model", "edge", "bad", "determinism", "grad")
FAMILIES = {
    "moe": ("moe_route", "moe_route_hash", "grouped_gemm", "grouped_gemm_masked", "moe", "moe_permute", "moe_combine"),
    "sparse_attention": ("indexer_topk", "indexer_logits", "indexer_topk_paged", "kv_compress", "sparse_attention",
                         "sparse_attention_paged", "window_indices"),
    "mhc": ("sinkhorn", "mhc_pre", "mhc_post", "mhc_post_pre"),
}
FAMILY_OF = {op: fam for fam, ops in FAMILIES.items() for op in ops}
ERRORS = ("OpError", "OpTypeError")


@dataclass(frozen=True)
class Case:
    op: str
    name: str
    kind: str
    params: Mapping[str, Any]
    why: str = ""
    mutate: tuple = ()
    expect: Optional[Mapping[str, str]] = None
    validate: bool = False  # bad case that needs the data-dependent checks (OPBRIDGE_VALIDATE=1)
    tier: str = "small"

    @property
    def id(self) -> str:
        return f"{self.op}/{self.name}"

    @property
    def family(self) -> str:
        return FAMILY_OF[self.op]

    @property
    def seed(self) -> int:
        return int(self.params.get("seed", zlib.crc32(self.id.encode())))

    def to_json(self) -> dict:
        out = {"id": self.id, "op": self.op, "name": self.name, "kind": self.kind, "params": dict(self.params),
               "why": self.why}
        if self.kind == "bad":
            out.update(mutate=list(self.mutate), expect=dict(self.expect or {}), validate=self.validate)
        return out


class CatalogueError(ValueError):
    pass


@functools.lru_cache(maxsize=None)
def _raw(family: str) -> tuple[dict, ...]:
    text = resources.files("opbridge.conformance").joinpath(f"data/cases_{family}.json").read_text()
    return tuple(json.loads(text)["cases"])


def _resolve(raw: Mapping[str, Any], tier: str) -> Case:
    where = f"{raw.get('op')}/{raw.get('name')}"
    op, kind = raw["op"], raw["kind"]
    if op not in OP_NAMES:
        raise CatalogueError(f"case {where}: unknown op '{op}'")
    if kind not in KINDS:
        raise CatalogueError(f"case {where}: unknown kind '{kind}'")
    params = {**raw.get("params", {}), **raw.get(tier, {})}
    expect = raw.get("expect")
    if kind == "bad":
        if not raw.get("mutate") or not expect or expect.get("error") not in ERRORS or not expect.get("arg"):
            raise CatalogueError(f"case {where}: a bad case needs 'mutate' and 'expect' {{error: {ERRORS}, arg}}")
    elif kind == "model" and not ("small" in raw and "full" in raw):
        raise CatalogueError(f"case {where}: a model case needs 'small' and 'full' sizes")
    if kind != "bad" and not raw.get("why"):
        raise CatalogueError(f"case {where}: say why the case exists ('why')")
    return Case(op=op, name=raw["name"], kind=kind, params=params, why=raw.get("why", ""),
                mutate=tuple(raw.get("mutate", ())), expect=expect, validate=bool(raw.get("validate")), tier=tier)


def _quantized(params: Mapping[str, Any]) -> bool:
    return any(params.get(k) in ("fp8", "mxfp4") for k in ("a_fmt", "b_fmt", "w_fmt")) or \
        bool(params.get("kv_cache_layout"))


@functools.lru_cache(maxsize=None)
def _all(tier: str) -> tuple[Case, ...]:
    if tier not in TIERS:
        raise CatalogueError(f"unknown tier '{tier}'; valid tiers: {', '.join(TIERS)}")
    cases: list[Case] = []
    for family in FAMILIES:
        cases += [_resolve(raw, tier) for raw in _raw(family) if tier in raw.get("tiers", TIERS)]
    seen: set[str] = set()
    for c in cases:
        if c.id in seen:
            raise CatalogueError(f"duplicate case id {c.id}")
        seen.add(c.id)
    twins = []
    for op in OP_NAMES:
        first = next((c for c in cases if c.op == op and c.kind == "model"), None)
        if first is not None:
            twins.append(Case(op=op, name=f"det-{first.name}", kind="determinism", params=first.params,
                              why=f"two identical calls of {first.id} are bitwise equal", tier=tier))
    # Gradient twins (OPS.md 4.4): the first unquantized model case of each differentiable op, its
    # backward against the reference's autograd on float64 copies.
    for op in OP_NAMES:
        if not OPS[op].differentiable:
            continue
        first = next((c for c in cases if c.op == op and c.kind == "model" and not _quantized(c.params)), None)
        if first is not None:
            twins.append(Case(op=op, name=f"grad-{first.name}", kind="grad", params=first.params,
                              why=f"gradients of {first.id} wrt {', '.join(OPS[op].differentiable)}", tier=tier))
    # Keep each op's cases together, in the order of OPS.md.
    order = {op: i for i, op in enumerate(OP_NAMES)}
    return tuple(sorted(cases + twins, key=lambda c: order[c.op]))


def cases(tier: str = "small", ops: Optional[Iterable[str]] = None, kinds: Optional[Iterable[str]] = None,
          match: Optional[Sequence[str]] = None) -> list[Case]:
    """The cases of ``tier``, optionally only for ``ops``, ``kinds``, or case ids matching a glob in ``match``."""
    selected = list(_all(tier))
    if ops is not None:
        ops = list(ops)
        unknown = [o for o in ops if o not in OP_NAMES]
        if unknown:
            raise CatalogueError(f"unknown op(s) {', '.join(unknown)}; valid ops: {', '.join(OP_NAMES)}")
        selected = [c for c in selected if c.op in ops]
    if kinds is not None:
        kinds = set(kinds)
        selected = [c for c in selected if c.kind in kinds]
    if match:
        selected = [c for c in selected if any(fnmatch.fnmatchcase(c.id, m) for m in match)]
    return selected


def by_id(tier: str) -> dict[str, Case]:
    return {c.id: c for c in _all(tier)}
