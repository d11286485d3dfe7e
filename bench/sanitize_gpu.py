"""One small call of every Triton op through the public API, bad ids and indices included, for
``compute-sanitizer --tool memcheck``: kernels must mask what the data says, never touch memory
outside their tensors. The MoE kernels have their own (bench/moe_gpu.py --sanitize).

    compute-sanitizer --tool memcheck python bench/sanitize_gpu.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "core"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import opbridge  # noqa: E402
from samples import call, samples  # noqa: E402


def bad_variants(s):
    """Calls whose ids / indices point outside their tensors (no OPBRIDGE_VALIDATE: they reach the kernels)."""
    out = []
    (q, kv, idx), kw = s["sparse_attention"]
    out.append(("sparse_attention", (q, kv, torch.where(idx == 1, 999, torch.where(idx == 2, -7, idx))), kw))
    (q, cache, table, idx), kw = s["sparse_attention_paged"]
    out.append(("sparse_attention_paged", (q, cache, table + 100, idx + 50), kw))
    (x, w, ids, w13, w2), kw = s["moe"]
    out.append(("moe", (x, w, torch.where(ids == 3, 99, ids), w13, w2), kw))
    (x, ids, E), kw = s["moe_permute"]
    out.append(("moe_permute", (x, torch.where(ids == 2, -9, ids), E), kw))
    return out


def main():
    assert torch.cuda.is_available()
    s = samples(torch.bfloat16, "cuda")
    ran = []
    with opbridge.use_backend("triton"):
        for name, (args, kwargs) in list(s.items()) + [(n, (a, k)) for n, a, k in bad_variants(s)]:
            try:
                call(name, args, kwargs)
                ran.append(name)
            except opbridge.UnsupportedError as e:
                print(f"{name}: unsupported ({e.reason})")
    torch.cuda.synchronize()
    print(f"sanitize: {len(ran)} calls ran: {', '.join(ran)}")


if __name__ == "__main__":
    main()
