"""One small call of every Triton op through the public API, bad ids and indices included, and the
backward of every differentiable op, for ``compute-sanitizer --tool memcheck``: kernels must mask
what the data says, never touch memory outside their tensors. Odd shapes (several token blocks,
column splits and tails) for the mHC kernels, and attention rows on both sides of the exact-P
threshold. The MoE kernels have their own (bench/moe_gpu.py --sanitize).

    compute-sanitizer --tool memcheck python bench/sanitize_gpu.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "core"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import opbridge  # noqa: E402
from opbridge.core.opdef import OPS  # noqa: E402
from samples import call, samples  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run under TRITON_INTERPRET=1


def shaped_variants():
    """Calls sized past one block: mHC with T, C off every tile size (n = 4 and 6), sparse attention
    with rows above and below the exact-P threshold (512 valid keys) at the V3.2 head dims."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, dt=torch.bfloat16, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dt).to(DEV)

    out = []
    for n, T, C in ((4, 301, 1000), (6, 45, 520)):
        x, f = r(T, n, C), r(T, C)
        phi, alpha, bias = r(n * (n + 2), n * C, dt=torch.float32, s=0.02), torch.rand(3, generator=g).to(DEV), \
            r(n * (n + 2), dt=torch.float32)
        post, comb = torch.rand(T, n, generator=g).to(DEV), torch.rand(T, n, n, generator=g).to(DEV)
        out += [("mhc_pre", (x, phi, alpha, bias), {}), ("mhc_post", (f, x, post, comb), {}),
                ("mhc_post_pre", (f, x, post, comb, phi, alpha, bias), {}),
                ("sinkhorn", (r(T, n, n, dt=torch.float32),), dict(iters=7))]
    T, Hq, Tk = 3, 16, 700
    idx = torch.stack([torch.randperm(Tk, generator=g)[:640] for _ in range(T)]).to(torch.int32)
    idx[1, 100:] = -1  # row 1: 100 keys (exact launch); rows 0 and 2: 640 (main launch)
    out.append(("sparse_attention", (r(T, Hq, 576), r(Tk, 576), idx.to(DEV)), dict(scale=0.04, d_v=512,
                                                                                  return_lse=True)))
    return out


def backward(name, args, kwargs):
    """Backpropagate random upstream gradients through ``name``'s float outputs."""
    diff = OPS[name].differentiable
    names = [p.name for p in OPS[name].params if not p.kwonly]
    args = [a.detach().clone().requires_grad_(True) if n in diff and isinstance(a, torch.Tensor)
            and a.is_floating_point() else a for n, a in zip(names, args)]
    kwargs = {k: v.detach().clone().requires_grad_(True) if k in diff and isinstance(v, torch.Tensor)
              and v.is_floating_point() else v for k, v in kwargs.items()}
    outs = call(name, tuple(args), kwargs)
    outs = [o for o in (outs if isinstance(outs, (tuple, list)) else (outs,))
            if isinstance(o, torch.Tensor) and o.requires_grad]
    torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])


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
    s = samples(torch.bfloat16, DEV)
    ran = []
    with opbridge.use_backend("triton"):
        calls = list(s.items()) + [(n, (a, k)) for n, a, k in bad_variants(s) + shaped_variants()]
        for name, (args, kwargs) in calls:
            try:
                call(name, args, kwargs)
                ran.append(name)
            except opbridge.UnsupportedError as e:
                print(f"{name}: unsupported ({e.reason})")
        for name, (args, kwargs) in calls:
            if not OPS[name].differentiable:
                continue
            try:
                backward(name, args, kwargs)
                ran.append(f"{name} backward")
            except opbridge.UnsupportedError as e:
                print(f"{name} backward: unsupported ({e.reason})")
    if DEV == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize: {len(ran)} calls ran: {', '.join(ran)}")


if __name__ == "__main__":
    main()
