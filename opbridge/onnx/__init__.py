"""ONNX export of models that call opbridge ops, in three modes (see docs/onnx.md).

- ``custom``: each opbridge op becomes one node ``opbridge::<op name>`` (domain version 1) with
  its scalars as attributes; :func:`reference_ops` runs those nodes in
  ``onnx.reference.ReferenceEvaluator`` (on opbridge's reference backend).
- ``decomposed``: standard ONNX operators only, so any runtime can run the model.
- ``ort``: ``moe`` on onnxruntime's ``com.microsoft::MoE`` where the routing allows, the rest decomposed.

Needs ``onnx`` and ``onnxscript`` (and ``onnxruntime`` to run ``decomposed``/``ort`` models).
"""
from .errors import ExportUnsupportedError
from .custom import reference_ops
from .exporter import DEFAULT_OPSET, MODES, export
from .runtime import run

__all__ = ["export", "reference_ops", "run", "MODES", "DEFAULT_OPSET", "ExportUnsupportedError"]
