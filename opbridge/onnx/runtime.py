"""Run an exported model on the right Python runtime: what the CLI's ``--verify`` and the tests use.

A model with ``opbridge`` domain nodes runs in ``onnx.reference.ReferenceEvaluator`` with
:func:`reference_ops`; any other model runs in onnxruntime on CPU.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
import torch

from .custom import reference_ops, to_numpy
from .schema import DOMAIN


def runtime_for(model: onnx.ModelProto) -> str:
    return "onnx.reference" if any(o.domain == DOMAIN for o in model.opset_import) else "onnxruntime"


def _feed(x: Any) -> np.ndarray:
    return to_numpy(x) if isinstance(x, torch.Tensor) else np.asarray(x)


def run(model: onnx.ModelProto, inputs: Sequence[Any]) -> list[np.ndarray]:
    """Run ``model`` on ``inputs`` (tensors or arrays, in the order of the graph's inputs)."""
    names = [i.name for i in model.graph.input]
    if len(names) != len(inputs):
        raise ValueError(f"opbridge.onnx.run: the model takes {len(names)} inputs {names}, got {len(inputs)}")
    feeds = {n: _feed(x) for n, x in zip(names, inputs)}
    if runtime_for(model) == "onnx.reference":
        from onnx.reference import ReferenceEvaluator

        return list(ReferenceEvaluator(model, new_ops=reference_ops()).run(None, feeds))
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return list(sess.run(None, feeds))
