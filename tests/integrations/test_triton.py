"""The patched model on the Triton backend (TRITON_INTERPRET=1 on CPU) agrees with transformers.

Ops the Triton backend cannot run fall back to the reference (OPBRIDGE_FALLBACK=reference); the
test checks that some ops did run on Triton and that the output agrees either way.
"""
import warnings

import torch

from opbridge.core import registry
from opbridge.integrations import patch, unpatch
from opbridge.integrations.agreement import compare, run
from opbridge.integrations.models import build_model

from .conftest import prompt

# float16 is the dtype the Triton MoE kernels take. Both runs round to fp16 at different places
# (transformers in its matmuls and softmaxes, opbridge only at op outputs); observed ~1.5e-6.
FP16_MAX_DIFF = 5e-5


def test_v4_on_triton_agrees_with_transformers(monkeypatch):
    monkeypatch.setenv("OPBRIDGE_BACKEND", "triton")
    monkeypatch.setenv("OPBRIDGE_FALLBACK", "reference")
    # Three layers cover sliding, CSA and HCA attention and both MoE kinds at the least interpreter time.
    model = build_model("v4", "tiny", dtype=torch.float16, seed=0, num_hidden_layers=3,
                        layer_types=["sliding_attention", "compressed_sparse_attention",
                                     "heavily_compressed_attention"],
                        mlp_layer_types=["hash_moe", "moe", "moe"])
    ids = prompt(batch=1, length=17, seed=2)
    ref = run(model, ids, steps=1)
    ran = {}
    real = registry.dispatch

    def spy(op, device, args, kwargs):
        d = registry.decide(op, device, args, kwargs)
        ran[op] = "triton" if d.backend == "triton" and d.reason is None else "reference"
        return real(op, device, args, kwargs)

    monkeypatch.setattr(registry, "dispatch", spy)
    patch(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback warnings, if any, are what `ran` records
            cand = run(model, ids, steps=1, forced=ref.tokens)
    finally:
        unpatch(model)
    assert {"moe", "moe_route_hash", "mhc_pre", "mhc_post", "kv_compress", "indexer_topk", "sparse_attention"} \
        <= set(ran), ran
    assert "sparse_attention" in ran and [op for op, b in ran.items() if b == "triton"], ran
    res = compare(ref, cand)
    assert res["prefill"]["diff"] < FP16_MAX_DIFF and res["decode"]["diff"] < FP16_MAX_DIFF, (res["prefill"], ran)
    assert res["tokens"]["unexplained"] == 0
