"""One small valid call per op: (args, kwargs). Used by the registration and validation tests."""
from __future__ import annotations

import torch

import opbridge


def samples(dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict[str, tuple[tuple, dict]]:
    g = torch.Generator().manual_seed(0)

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(dt).to(device)

    def i32(*vals):
        return torch.tensor(vals, dtype=torch.int32, device=device)

    T, H, I, E, k = 5, 16, 8, 4, 2
    ids = i32(0, 1, 2, 3, 1, -1, -1, -1, 3, 0).view(T, k)
    tw = torch.rand(T, k, generator=g).to(device)
    n, C = 4, 8
    x = r(3, n, C)
    phi, alpha, bias = r(n * (n + 2), n * C, dt=torch.float32) * 0.1, torch.rand(3, generator=g).to(device), \
        r(n * (n + 2), dt=torch.float32)
    y, post, comb = r(3, C), torch.rand(3, n, generator=g).to(device), torch.rand(3, n, n, generator=g).to(device)
    Tq, Hi, D = 6, 2, 16
    cu_q, cu_k = i32(0, 2, 6), i32(0, 3, 9)
    idx = i32(0, 1, -1, 2, 1, -1, 0, 2, 3, 5, 4, -1).view(Tq, 2)
    return {
        "moe_route": ((r(T, E), k), dict(scoring="sigmoid", correction_bias=r(E, dt=torch.float32), num_groups=2,
                                         topk_groups=1, renormalize=True, scaling_factor=2.5)),
        "moe_route_hash": ((r(T, E), i32(0, 3, 2, 1, 0), i32(0, 1, 2, 3, 1, 2, 3, 0).view(4, 2)), {}),
        "grouped_gemm": ((r(7, H), r(E, 6, H), i32(0, 2, 2, 5, 7)), dict(out_dtype=dtype)),
        "grouped_gemm_masked": ((r(E, 3, H), r(E, 6, H), i32(1, 0, 3, 2)), dict(out_dtype=dtype)),
        "moe": ((r(T, H), tw, ids, r(E, 2 * I, H) * 0.2, r(E, H, I) * 0.2), dict(swiglu_limit=10.0)),
        "moe_permute": ((r(T, H), ids, E), {}),
        "moe_combine": ((r(7, H), torch.tensor([0, 2, 3, 4, 6, 8, 9], device=device), tw, T), {}),
        "indexer_topk": ((r(Tq, Hi, D), r(9, D), r(Tq, Hi, dt=torch.float32), 3),
                         dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)),
        "indexer_logits": ((r(Tq, Hi, D), r(9, D), r(Tq, Hi, dt=torch.float32)), {}),
        "indexer_topk_paged": ((r(2, 2, Hi, D), r(4, 4, D), i32(2, 0, 3, 1).view(2, 2), i32(5, 8),
                                r(2, 2, Hi, dt=torch.float32), 3), {}),
        "kv_compress": ((r(9, 2 * D), r(9, 2 * D), r(4, 2 * D), 4),
                        dict(overlap=True, prev_kv=r(4, 2 * D), prev_gate=r(4, 2 * D))),
        "sparse_attention": ((r(Tq, 4, D), r(9, D), idx), dict(scale=0.25, d_v=8, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                                              sink=r(4, dt=torch.float32), return_lse=True)),
        "sparse_attention_paged": ((r(2, 1, 4, D), r(4, 4, D), i32(2, 0, 3, 1).view(2, 2), i32(0, 5, -1, 7, 1, 2).view(2, 1, 3)),
                                   dict(scale=0.25, return_lse=True)),
        "window_indices": ((cu_q, cu_k, 3), {}),
        "sinkhorn": ((r(3, n, n),), dict(iters=5)),
        "mhc_pre": ((x, phi, alpha, bias), {}),
        "mhc_post": ((y, x, post, comb), {}),
        "mhc_post_pre": ((y, x, post, comb, phi, alpha, bias), {}),
    }


def call(name: str, args: tuple, kwargs: dict):
    return getattr(opbridge, name)(*args, **kwargs)
