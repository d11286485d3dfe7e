"""How a patch is planned, installed and undone, and the report it returns.

A *rule* says, for one exact Hugging Face module class, which opbridge ops its replacement
forward calls and under which conditions the model's math maps onto them exactly. Planning
walks the model, checks every module against the rules, drops a module whose replacement
would bypass a sub-module that cannot itself be mapped (so nothing is ever half-patched),
then installs: the replacement is bound as an *instance* attribute ``forward`` (the class and
every other instance stay untouched), and :func:`unpatch` deletes it again. Weights are read
from the module at every call, never copied; only ``quantize=`` stores quantised expert weights
next to the originals.
"""
from __future__ import annotations

import types
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

PATCH_ATTR = "_opbridge_patch"  # set on every patched module; holds its PatchState
QUANT_FORMATS = (None, "fp8", "mxfp4")
_NO_FORWARD = object()  # the module had no instance-level forward before the patch

# Class-name endings of the module roles opbridge maps. A module of a DeepSeek modelling file
# (or a subclass of a known class) with one of these roles but no exact rule is reported as an
# unknown variant and left alone.
ROLE_SUFFIXES = ("Router", "Experts", "HyperConnection", "HyperHead", "Indexer", "Compressor", "Attention")
HF_MODULE_PREFIXES = ("transformers.models.deepseek_v3.", "transformers.models.deepseek_v32.",
                      "transformers.models.deepseek_v4.")


@dataclass(frozen=True)
class Rule:
    """How one exact module class is routed through opbridge.

    ``check(module, quantize)`` returns None when the module's math maps exactly, else the reason
    it does not. ``bypasses(module)`` lists sub-modules whose forward the replacement does not
    call (it reads their parameters and runs their math itself): each must be mapped too.
    ``prepare(module, quantize)`` returns extra attributes to attach (quantised weights).
    """

    cls: type
    kind: str
    ops: tuple[str, ...]
    forward: Callable[..., Any]
    check: Callable[[torch.nn.Module, Optional[str]], Optional[str]] = lambda m, q: None
    bypasses: Callable[[torch.nn.Module], tuple[torch.nn.Module, ...]] = lambda m: ()
    prepare: Optional[Callable[[torch.nn.Module, Optional[str]], dict[str, Any]]] = None


@dataclass(frozen=True)
class Site:
    """One patched module."""

    path: str
    cls: str
    kind: str
    ops: tuple[str, ...]


@dataclass(frozen=True)
class Skipped:
    """One module of a mapped role that was left as it is, and why."""

    path: str
    cls: str
    reason: str


@dataclass(frozen=True)
class PatchReport:
    """What :func:`opbridge.integrations.patch` did: the patched sites and the modules it left alone."""

    patched: tuple[Site, ...]
    skipped: tuple[Skipped, ...]
    quantize: Optional[str] = None

    def kinds(self) -> dict[str, int]:
        """Number of patched modules per kind (router, experts, mhc, attention, ...)."""
        out: dict[str, int] = {}
        for s in self.patched:
            out[s.kind] = out.get(s.kind, 0) + 1
        return out

    def ops(self) -> tuple[str, ...]:
        """Every opbridge op some patched forward calls."""
        return tuple(sorted({op for s in self.patched for op in s.ops}))

    def to_dict(self) -> dict[str, Any]:
        return {"quantize": self.quantize, "kinds": self.kinds(), "ops": list(self.ops()),
                "patched": [asdict(s) for s in self.patched], "skipped": [asdict(s) for s in self.skipped]}

    def __str__(self) -> str:
        kinds = ", ".join(f"{k} x{n}" for k, n in sorted(self.kinds().items())) or "nothing"
        lines = [f"opbridge patch: {len(self.patched)} modules patched ({kinds})"
                 + (f", experts quantised to {self.quantize}" if self.quantize else "")]
        if self.skipped:
            lines.append(f"left unpatched ({len(self.skipped)}):")
            lines += [f"  {s.path} [{s.cls}]: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


@dataclass(frozen=True)
class PatchState:
    """What :func:`unpatch` needs to restore one module."""

    kind: str
    previous_forward: Any
    attrs: tuple[str, ...] = field(default_factory=tuple)


def is_patched(module: torch.nn.Module) -> bool:
    return getattr(module, PATCH_ATTR, None) is not None


def _unknown_variant(module: torch.nn.Module, known: dict[type, Rule]) -> Optional[str]:
    cls = type(module)
    for k in known:
        if isinstance(module, k) and cls is not k:
            return f"subclass of {k.__name__} with its own code: unknown variant, left unpatched"
    if cls.__module__.startswith(HF_MODULE_PREFIXES) and cls.__name__.endswith(ROLE_SUFFIXES):
        return "no opbridge mapping for this module class: unknown variant, left unpatched"
    return None


def plan(model: torch.nn.Module, rules: Iterable[Rule], quantize: Optional[str],
         extra_skips: Callable[[str, torch.nn.Module], Optional[str]] = lambda p, m: None
         ) -> tuple[list[tuple[str, torch.nn.Module, Rule]], list[Skipped]]:
    """Decide, without touching the model, which modules get which rule and which are left alone."""
    by_cls = {r.cls: r for r in rules}
    chosen: dict[int, tuple[str, torch.nn.Module, Rule]] = {}
    skipped: list[Skipped] = []
    paths = {id(m): p for p, m in model.named_modules()}
    for path, m in model.named_modules():
        cls = type(m).__name__
        rule = by_cls.get(type(m))
        if rule is None:
            why = _unknown_variant(m, by_cls)
            if why:
                skipped.append(Skipped(path, cls, why))
            continue
        if is_patched(m):
            skipped.append(Skipped(path, cls, "already patched by opbridge (unpatch first)"))
            continue
        why = rule.check(m, quantize) or extra_skips(path, m)
        if why:
            skipped.append(Skipped(path, cls, why))
            continue
        chosen[id(m)] = (path, m, rule)
    # A replacement that bypasses a sub-module is only installed when that sub-module is mapped as well.
    changed = True
    while changed:
        changed = False
        for key, (path, m, rule) in list(chosen.items()):
            missing = [d for d in rule.bypasses(m) if id(d) not in chosen]
            if missing:
                d = missing[0]
                skipped.append(Skipped(path, type(m).__name__,
                                       f"its replacement runs the math of {paths.get(id(d), '?')} "
                                       f"[{type(d).__name__}], which is not mapped"))
                del chosen[key]
                changed = True
    return list(chosen.values()), skipped


def install(path: str, module: torch.nn.Module, rule: Rule, quantize: Optional[str]) -> Site:
    extra = rule.prepare(module, quantize) if rule.prepare is not None else {}
    for name, value in extra.items():
        object.__setattr__(module, name, value)  # plain attributes: never parameters or buffers
    previous = module.__dict__.get("forward", _NO_FORWARD)
    object.__setattr__(module, "forward", types.MethodType(rule.forward, module))
    object.__setattr__(module, PATCH_ATTR, PatchState(rule.kind, previous, tuple(extra)))
    return Site(path, type(module).__name__, rule.kind, rule.ops)


def restore(module: torch.nn.Module) -> bool:
    state: Optional[PatchState] = getattr(module, PATCH_ATTR, None)
    if state is None:
        return False
    if state.previous_forward is _NO_FORWARD:
        module.__dict__.pop("forward", None)
    else:
        object.__setattr__(module, "forward", state.previous_forward)
    for name in state.attrs:
        module.__dict__.pop(name, None)
    module.__dict__.pop(PATCH_ATTR, None)
    return True
