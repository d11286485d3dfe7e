"""``export``: torch.export the module, check every opbridge call against the mode, translate, save.

The module is captured once with ``torch.export`` (opbridge ops stay single nodes thanks to their
fake implementations), every ``torch.ops.opbridge.*`` call is checked against the mode before
any ONNX is built, and ``torch.onnx.export(dynamo=True)`` then translates the program with one
translation function per opbridge op in ``custom_translation_table``.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence

import onnx
import torch

from ..core.opdef import OPS
from . import custom, schema
from .builder import MIN_OPSET, Args, Builder
from .errors import ExportUnsupportedError
from .translations import DECOMPOSED, Translation, load

MODES = ("custom", "decomposed", "ort")
DEFAULT_OPSET = 20


def _example_args(op: str, node: torch.fx.Node) -> Args:
    """The node's arguments as torch.export saw them: example (fake) tensors and Python scalars."""
    def val(v: Any) -> Any:
        return v.meta.get("val") if isinstance(v, torch.fx.Node) else v
    return Args(op, schema.bind(op, [val(v) for v in node.args], {k: val(v) for k, v in node.kwargs.items()}))


def check_program(ep: torch.export.ExportedProgram, mode: str) -> set[str]:
    """Every opbridge op in ``ep``; raises :class:`ExportUnsupportedError` naming the op and the mode for a
    call the mode cannot express. In mode ``ort`` the ``moe`` calls that go to ORT's MoE are re-targeted
    to ``opbridge_onnx::moe_ort`` (see ``opbridge.onnx.ort``).
    """
    from . import ort

    used: set[str] = set()
    for node in ep.graph.nodes:
        op = schema.opbridge_op(node.target) if node.op == "call_function" else None
        if op is None:
            continue
        if op not in OPS:
            raise ExportUnsupportedError(op, mode, "not a public opbridge op (export an inference graph: "
                                                   "backward ops have no ONNX form)")
        used.add(op)
        if mode == "custom":
            continue
        a = _example_args(op, node)
        if mode == "ort" and op == "moe" and ort.moe_applies(node, a):
            node.target = ort.MOE_ORT
            used.add("moe_ort")
            continue
        tr = DECOMPOSED.get(op)
        if tr is None:
            raise ExportUnsupportedError(op, mode, "no decomposition into standard ONNX operators exists")
        reason = tr.why_not(a)
        if reason is not None:
            raise ExportUnsupportedError(op, mode, reason)
    ep.graph_module.recompile()
    return used


def _translation(op: str, tr: Translation, opset: int) -> Callable[..., Any]:
    def translate(*args: Any, **kwargs: Any) -> Any:
        return tr.fn(Builder(opset), Args(op, schema.bind(op, args, kwargs)))
    translate.__name__ = f"opbridge_{op}"
    return translate


def translation_table(used: set[str], mode: str, opset: int) -> dict:
    from . import ort

    table = {}
    for op in used:
        if op == "moe_ort":
            table[ort.MOE_ORT] = _translation("moe", Translation(ort.moe_nodes), opset)
        elif mode == "custom":
            table[OPS[op].op] = custom.translation(op)
        else:
            table[OPS[op].op] = _translation(op, DECOMPOSED[op], opset)
    return table


def export(model: torch.nn.Module, args: Sequence[Any], path: Optional[str | os.PathLike] = None, *,
           mode: str = "custom", opset: int = DEFAULT_OPSET, kwargs: Optional[Mapping[str, Any]] = None,
           dynamic_shapes: Any = None, input_names: Optional[Sequence[str]] = None,
           output_names: Optional[Sequence[str]] = None, optimize: bool = True) -> onnx.ModelProto:
    """Export a module that calls opbridge ops to ONNX; returns the model (and saves it to ``path`` if given).

    Args:
        model: any ``torch.nn.Module``; ``args`` (and ``kwargs``) are example inputs.
        mode: ``"custom"``: each opbridge op is one node of the ``opbridge`` domain (version 1), for
            runtimes that implement the ops (:func:`reference_ops` runs them in
            ``onnx.reference.ReferenceEvaluator``); ``"decomposed"``: standard ONNX operators only;
            ``"ort"``: ``moe`` on onnxruntime's ``com.microsoft::MoE`` where the routing allows it
            (see ``opbridge.onnx.ort``), everything else decomposed.
        opset: the standard ONNX opset version (>= 18).
        dynamic_shapes: as for ``torch.export.export``, e.g. ``({0: torch.export.Dim("T")},)`` for a
            dynamic token count.
    Raises:
        ExportUnsupportedError (an ``opbridge.UnsupportedError``) naming the op and the mode when
        the mode cannot express a call; ValueError for an unknown mode or too old an opset.
    """
    if mode not in MODES:
        raise ValueError(f"opbridge.onnx.export: argument 'mode': expected one of {MODES}, got {mode!r}")
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opbridge.onnx.export: argument 'opset': expected an int >= {MIN_OPSET}, got {opset!r}")
    load()
    ep = torch.export.export(model, tuple(args), kwargs=dict(kwargs or {}), dynamic_shapes=dynamic_shapes,
                             strict=False)
    used = check_program(ep, mode)
    prog = torch.onnx.export(ep, (), dynamo=True, custom_translation_table=translation_table(used, mode, opset),
                             opset_version=opset, input_names=input_names, output_names=output_names,
                             optimize=optimize, verbose=False)
    proto = prog.model_proto
    if path is not None:
        prog.save(os.fspath(path))
    return proto
