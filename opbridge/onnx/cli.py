"""``opbridge export MODULE:FACTORY out.onnx --mode custom|decomposed|ort``.

``FACTORY`` is a callable in ``MODULE`` taking no arguments. It returns ``(module, args)`` or
``(module, args, dynamic_shapes)``, or a module with an ``example_inputs()`` method.
``--verify`` runs the exported model on the example inputs (``onnx.reference`` with opbridge's
reference ops for ``custom``, onnxruntime CPU otherwise) and compares every output with the torch
module: floats by ``1 - 2*sum(x*y)/sum(x*x + y*y) < --tol``, integers exactly.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections import Counter
from typing import Any

import numpy as np
import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("factory", metavar="MODULE:FACTORY", help="e.g. opbridge.onnx.example:tiny_block")
    p.add_argument("output", metavar="OUT.onnx", help="where to write the model")
    p.add_argument("--mode", choices=("custom", "decomposed", "ort"), default="custom",
                   help="custom: one 'opbridge' node per op; decomposed: standard ONNX only; "
                        "ort: MoE on com.microsoft::MoE, the rest decomposed (default: custom)")
    p.add_argument("--opset", type=int, default=None, help="standard ONNX opset version (default: 20)")
    p.add_argument("--static", action="store_true", help="ignore the factory's dynamic_shapes")
    p.add_argument("--verify", action="store_true", help="run the exported model and compare with torch")
    p.add_argument("--tol", type=float, default=1e-5, help="--verify threshold on the relative diff (1e-5)")


def load_factory(spec: str) -> tuple[torch.nn.Module, tuple, Any]:
    if ":" not in spec:
        raise ValueError(f"expected MODULE:FACTORY, got {spec!r}")
    mod_name, attr = spec.split(":", 1)
    made = getattr(importlib.import_module(mod_name), attr)()
    if isinstance(made, torch.nn.Module):
        return made, tuple(made.example_inputs()), None
    if isinstance(made, tuple) and len(made) in (2, 3) and isinstance(made[0], torch.nn.Module):
        return made[0], tuple(made[1]), made[2] if len(made) == 3 else None
    raise TypeError(f"{spec}() must return (module, args[, dynamic_shapes]) or a module with example_inputs(), "
                    f"got {type(made).__name__}")


def _flat_outputs(out: Any) -> list[np.ndarray]:
    leaves = torch.utils._pytree.tree_leaves(out)
    return [t.detach().cpu().numpy() for t in leaves if isinstance(t, torch.Tensor)]


def compare(got: np.ndarray, want: np.ndarray, tol: float) -> tuple[bool, str]:
    """(ok, description) for one output: floats by the relative diff of OPS.md section 5, ints exactly."""
    if got.shape != want.shape:
        return False, f"shape {got.shape} != {want.shape}"
    if not np.issubdtype(want.dtype, np.floating):
        bad = int((got != want).sum())
        return bad == 0, f"{bad} of {want.size} elements differ"
    g, w = got.astype(np.float64), want.astype(np.float64)
    if not np.array_equal(np.isfinite(g), np.isfinite(w)) or not np.array_equal(g[~np.isfinite(g)], w[~np.isfinite(w)]):
        return False, "non-finite positions differ"
    g, w = g[np.isfinite(g)], w[np.isfinite(w)]
    den = float((g * g + w * w).sum())
    d = 0.0 if den == 0 else 1 - 2 * float((g * w).sum()) / den
    return d < tol, f"diff {d:.2e}, max abs err {float(np.abs(g - w).max(initial=0)):.2e}"


def run(args: argparse.Namespace) -> int:
    from . import DEFAULT_OPSET, export
    from .runtime import run as run_onnx, runtime_for

    try:
        model, example, dynamic = load_factory(args.factory)
    except (ValueError, TypeError, ImportError, AttributeError) as e:
        print(f"opbridge export: {e}", file=sys.stderr)
        return 2
    model.eval()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed" notices
    proto = export(model, example, args.output, mode=args.mode, opset=args.opset or DEFAULT_OPSET,
                   dynamic_shapes=None if args.static else dynamic)
    domains = Counter(n.domain or "ai.onnx" for n in proto.graph.node)
    print(f"wrote {args.output}: mode {args.mode}, {len(proto.graph.node)} nodes "
          f"({', '.join(f'{d}: {c}' for d, c in sorted(domains.items()))}), runs on {runtime_for(proto)}")
    if not args.verify:
        return 0
    with torch.no_grad():
        want = _flat_outputs(model(*example))
    got = run_onnx(proto, example)
    ok = True
    for i, (g, w) in enumerate(zip(got, want)):
        good, text = compare(g, w, args.tol)
        ok &= good
        print(f"  output {i}: {'ok' if good else 'MISMATCH'} ({text})")
    return 0 if ok else 1
