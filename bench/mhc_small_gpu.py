"""Latency-bound mHC pieces on one GPU: the Sinkhorn chain (forward and backward) per launch config,
`mhc_pre` at decode size, and the coefficient pass of `mhc_pre_backward` per warp count.
Times are CUDA-graph replays (`graph_ms` of bench/mhc_gpu.py: 50 calls per graph, median of 5 replays), so launch overhead is out.

    PYTHONPATH=. python bench/mhc_small_gpu.py      # writes $OUT/h100-mhc-small.json (OUT defaults to .)
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from opbridge.kernels.triton import mhc_pre as K_pre  # noqa: E402
from opbridge.kernels.triton import mhc_pre_backward as K_pre_bwd  # noqa: E402
from opbridge.kernels.triton import sinkhorn as K_sk  # noqa: E402
from opbridge.kernels.triton.mhc_configs import _load  # noqa: E402
from mhc_gpu import graph_ms  # noqa: E402  (bench/mhc_gpu.py)


def graph_us(fn, reps=50):
    return graph_ms(fn, reps) * 1e3


def main():
    n, res = 4, {"device": torch.cuda.get_device_name(), "sinkhorn": {}, "mhc_pre_decode": {}, "pre_backward": {}}
    table = _load("mhc_sinkhorn")["default"]
    keep = dict(table)
    for M in (64, 8192):
        L = torch.randn(M, n, n, device="cuda") * 3
        G = torch.randn(M, n, n, device="cuda")
        for cfg in ({"BM": 16, "num_warps": 1}, {"BM": 32, "num_warps": 1}, {"BM": 32, "num_warps": 4}):
            table.update(cfg)
            res["sinkhorn"][f"M={M} BM={cfg['BM']} warps={cfg['num_warps']}"] = {
                "fwd_us": graph_us(lambda: K_sk.sinkhorn(L, 20, 1e-6)),
                "bwd_us": graph_us(lambda: K_sk.sinkhorn_backward(L, G, 20, 1e-6))}
    table.clear()
    table.update(keep)
    C = 7168
    x = torch.randn(64, n, C, device="cuda").bfloat16()
    phi = torch.randn(n * (n + 2), n * C, device="cuda") * 0.01
    alpha, bias = torch.rand(3, device="cuda"), torch.randn(n * (n + 2), device="cuda")
    for name, cfg in (("checked-in small entry", None),
                      ("first-session style BT 16", dict(BT=16, NSUB=4, BT2=8, SB=16, STEPS3=1, BT3=8))):
        res["mhc_pre_decode"][name] = {"cfg": cfg, "us": graph_us(
            lambda: K_pre.mhc_pre(x, phi, alpha, bias, 20, 1e-6, 1e-6, 2.0, cfg=cfg))}
    T = 8192
    x = torch.randn(T, n, C, device="cuda").bfloat16()
    grads = [torch.randn(T, C, device="cuda").bfloat16(), torch.randn(T, n, device="cuda"),
             torch.randn(T, n, n, device="cuda")]
    for w in (4, 2, 1):
        res["pre_backward"][f"T=8192 warps2={w}"] = {"us": graph_us(
            lambda: K_pre_bwd.mhc_pre_backward(grads, x, phi, alpha, bias, 20, 1e-6, 1e-6, 2.0,
                                               cfg=dict(warps2=w)), reps=5)}
    print(json.dumps(res, indent=1))
    with open(os.path.join(os.environ.get("OUT", "."), "h100-mhc-small.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
