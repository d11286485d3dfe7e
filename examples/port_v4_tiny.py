"""Port a (tiny, random) Hugging Face DeepSeek-V4 model to opbridge and generate a few tokens.

    PYTHONPATH=. python examples/port_v4_tiny.py [--tokens 8] [--device cuda]

Builds a 4-layer V4 config (sliding, CSA and HCA attention; hash-MoE then top-k MoE; mHC), runs
``model.generate`` unpatched, patches the model with ``opbridge.integrations.patch`` and generates
again on the reference backend, then on the Triton backend when a GPU is present (bf16 there, the
dtype the Triton MoE kernels take). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import opbridge  # noqa: E402
from opbridge.integrations import patch, unpatch  # noqa: E402
from opbridge.integrations.models import build_model  # noqa: E402


def generate(model, prompt, n):
    out = model.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    model = build_model("v4", "tiny", device="cpu")
    prompt = torch.randint(0, model.config.vocab_size, (1, 22), generator=torch.Generator().manual_seed(0))
    plain = generate(model, prompt, args.tokens)
    print("transformers          :", plain)

    report = patch(model)
    print(report)
    with opbridge.use_backend("reference"):
        ported = generate(model, prompt, args.tokens)
    print("opbridge (reference)  :", ported)
    ok = ported == plain

    if args.device == "cuda":
        unpatch(model)
        gpu = build_model("v4", "tiny", device="cuda", dtype=torch.bfloat16)
        p = prompt.cuda()
        plain_gpu = generate(gpu, p, args.tokens)
        patch(gpu)
        with opbridge.use_backend("triton"):
            tri = generate(gpu, p, args.tokens)
        print("transformers bf16 GPU :", plain_gpu)
        print("opbridge (triton) bf16:", tri)
        same = sum(a == b for a, b in zip(tri, plain_gpu))
        print(f"triton vs transformers on the GPU: {same}/{len(tri)} tokens equal (bf16 may break near-ties)")
    print("reference port reproduces transformers' greedy tokens:", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
