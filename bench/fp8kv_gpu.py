"""FP8 KV cache for sparse_attention_paged on one GPU: correctness at the V3.2 decode shape, then timings.

    PYTHONPATH=. python bench/fp8kv_gpu.py --out $OUT/h100-fp8-kv.json [--budget 200]
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/fp8kv_gpu.py --tiny --out /tmp/fp8kv.json   # CPU smoke test

Shape: B 64, Sq 2, Hq 128, Dqk 576, d_v 512, top-2048 of a 32768-token context per sequence,
page block 64 (FlashMLA's V3.2 decode benchmark). The cache is ``quantize_kv_cache`` of a random
bf16 cache (656 bytes per token, ``kv_cache_layout="fp8_ds_mla"``).

Correctness (OPS.md section 5 sparse-attention thresholds): the Triton packed path against the
reference backend in float64 on the dequantized cache (``dequantize_kv_cache``); the reference's
own packed path against the same; and, for information, the quantization error (Triton fp8 vs
the reference on the unquantized bf16 cache). Timings: median of triton.testing.do_bench (L2
flushed), each case twice: the bf16-cache path and the fp8 path through the public op, a config
sweep of the fp8 kernel, the reference backend's packed path as the PyTorch peer, and the copy
bandwidth of this run for the memory floor (unique KV bytes read). The JSON is rewritten after
every step, so a cut-off run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import opbridge  # noqa: E402
from opbridge.core.kv_cache import LAYOUTS, dequantize_kv_cache, quantize_kv_cache  # noqa: E402
from opbridge.kernels.triton import sparse_attention_fp8kv as K_fp8  # noqa: E402
from attention_gpu import attn_metrics  # noqa: E402  (bench/ is this script's folder)

T0 = time.time()
I32 = torch.int32


class Run:
    def __init__(self, path: str, budget: float, tiny: bool):
        self.path, self.budget, self.tiny = path, budget, tiny
        self.dev = "cpu" if tiny else "cuda"
        self.res = {"meta": {}, "ceilings": {}, "correctness": {}, "cases": {}, "sweep": {}, "errors": {}}

    def save(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "w") as f:
            json.dump(self.res, f, indent=1, default=str)

    def left(self) -> float:
        return self.budget - (time.time() - T0)

    def time(self, fn, reps: int = 2) -> list[float]:
        if self.tiny:
            fn()
            t = time.perf_counter()
            fn()
            return [(time.perf_counter() - t) * 1e3] * reps
        import triton.testing
        fn()
        torch.cuda.synchronize()
        return [float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")) for _ in range(reps)]

    def step(self, name: str, fn, min_left: float = 0.0):
        if self.left() < min_left:
            self.res["errors"][name] = f"skipped: {self.left():.0f}s of budget left"
            return None
        print(f"[{time.time() - T0:6.1f}s] {name}", flush=True)
        try:
            return fn()
        except Exception as e:  # one broken step must not lose the others
            self.res["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
            traceback.print_exc()
            return None
        finally:
            self.save()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=200.0)
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    R = Run(a.out, a.budget, a.tiny)
    tiny = a.tiny
    B, Sq, Hq, top_k, bs, ctx = (64, 2, 128, 2048, 64, 32768) if not tiny else (2, 2, 16, 32, 16, 96)
    Dqk, dv = 576, 512
    scale = Dqk ** -0.5
    layout = "fp8_ds_mla"
    L = LAYOUTS[layout]
    R.res["meta"] = {"shape": dict(B=B, Sq=Sq, Hq=Hq, Dqk=Dqk, d_v=dv, top_k=top_k, block_size=bs, context=ctx),
                     "layout": layout, "bytes_per_token": L.bytes_per_token, "torch": torch.__version__,
                     "python": platform.python_version(), "command": " ".join(sys.argv)}
    if not tiny:
        import triton
        R.res["meta"].update(triton=triton.__version__, device=torch.cuda.get_device_name())
    dev = R.dev
    torch.manual_seed(0)
    nb_seq = ctx // bs
    nblk = B * nb_seq
    # bf16 cache (the baseline path) and its packed FP8 copy, built in chunks to bound temporaries.
    cache16 = torch.empty(nblk, bs, Dqk, dtype=torch.bfloat16, device=dev)
    cache8 = torch.empty(nblk, bs, L.bytes_per_token, dtype=torch.uint8, device=dev)
    step = max(1, nblk // 16)
    for i in range(0, nblk, step):
        x = torch.randn(min(step, nblk - i), bs, Dqk, device=dev).to(torch.bfloat16)
        cache16[i:i + step] = x
        cache8[i:i + step] = quantize_kv_cache(x, layout=layout)
    table = torch.randperm(nblk, device=dev)[:B * nb_seq].view(B, nb_seq).to(I32)
    idx = torch.rand(B * Sq, ctx, device=dev).topk(top_k, dim=-1).indices.to(I32)
    idx[torch.rand(idx.shape, device=dev) < 0.01] = -1  # some holes, masked like any -1
    idx = idx.view(B, Sq, top_k)
    q = (torch.randn(B, Sq, Hq, Dqk, device=dev) * 0.5).to(torch.bfloat16)
    R.res["meta"]["cache_bytes"] = {"bf16": cache16.numel() * 2, "fp8_ds_mla": cache8.numel()}

    def fp8_public():
        return opbridge.sparse_attention_paged(q, cache8, table, idx, scale=scale, d_v=dv, return_lse=True,
                                               kv_cache_layout=layout)

    def bf16_public():
        return opbridge.sparse_attention_paged(q, cache16, table, idx, scale=scale, d_v=dv, return_lse=True)

    # ---- ceilings: copy bandwidth of this run ---------------------------------------------------
    def ceilings():
        n = (1 << 30) if not tiny else (1 << 20)
        src = torch.empty(n, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        t = R.time(lambda: dst.copy_(src))
        R.res["ceilings"]["copy_TBps"] = [2 * n / (x * 1e-3) / 1e12 for x in t]
    R.step("ceilings", ceilings)

    # unique tokens read per batch row (the two queries of a sequence share rows)
    flat = idx.view(B, Sq * top_k).long()
    uniq = sum(int(torch.unique(r[r >= 0]).numel()) for r in flat)
    flops = 2 * B * Sq * Hq * top_k * (Dqk + dv)
    bw = max(R.res["ceilings"].get("copy_TBps", [1.0]))
    floors = {k: uniq * w / (bw * 1e12) * 1e3 for k, w in (("bf16", Dqk * 2), ("fp8", L.bytes_per_token))}
    R.res["meta"].update(unique_tokens=uniq, flops=flops, memory_floor_ms=floors)

    # ---- config sweep of the fp8 kernel ---------------------------------------------------------
    sweep = [dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=1), dict(BLOCK_H=64, BLOCK_N=32, num_warps=8,
                                                                           num_stages=1),
             dict(BLOCK_H=64, BLOCK_N=32, num_warps=8, num_stages=2), dict(BLOCK_H=32, BLOCK_N=64, num_warps=4,
                                                                           num_stages=1),
             dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=3)] if not tiny else \
        [dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1)]
    fmt = K_fp8.PackedFormat(L.bytes_per_token, L.n_fp8, L.n_rope)
    qf = q.view(B * Sq, Hq, Dqk)

    def kernel(cfg):
        def run():  # the backend's path: logical -> physical rows, then the kernel
            s = K_fp8.PackedKeySet.paged(cache8, fmt, table, idx.view(B * Sq, top_k), Sq)
            return K_fp8.sparse_attention_fp8kv_fwd(qf, [s], scale=scale, sink=None, interpret=tiny, **cfg)
        return run

    best = {}
    for cfg in sweep:
        key = ",".join(f"{k}={v}" for k, v in cfg.items())

        def one(cfg=cfg, key=key):
            t = R.time(kernel(cfg))
            R.res["sweep"][key] = {"ms": t, "TFLOPs": flops / (min(t) * 1e-3) / 1e12}
            if not best or min(t) < min(best["ms"]):
                best.update(cfg=cfg, ms=t)
        R.step(f"sweep {key}", one, min_left=45)
    if best:
        R.res["cases"]["fp8 kernel best config"] = {"config": best["cfg"], "ms": best["ms"],
                                                     "TFLOPs": flops / (min(best["ms"]) * 1e-3) / 1e12,
                                                     "fraction_of_memory_floor": floors["fp8"] / min(best["ms"])}

    # ---- correctness ----------------------------------------------------------------------------
    def correctness():
        cfg = best.get("cfg", sweep[0])
        out, lse = kernel(cfg)()
        out, lse = out.view(B, Sq, Hq, dv), lse.view(B, Sq, Hq)
        deq = torch.empty(nblk, bs, Dqk, dtype=torch.float32, device=dev)
        for i in range(0, nblk, step):
            deq[i:i + step] = dequantize_kv_cache(cache8[i:i + step], layout=layout)
        with opbridge.use_backend("reference"):
            ro, rl = opbridge.sparse_attention_paged(q.double(), deq, table, idx, scale=scale, d_v=dv, return_lse=True)
            R.res["correctness"]["triton fp8 vs reference fp64 on dequantized cache"] = attn_metrics(out, ro, lse, rl)
            po, pl = opbridge.sparse_attention_paged(q.double(), cache8, table, idx, scale=scale, d_v=dv,
                                                     return_lse=True, kv_cache_layout=layout)
            R.res["correctness"]["reference packed path vs reference on dequantized cache"] = attn_metrics(po, ro, pl,
                                                                                                          rl)
            del deq
            uo, ul = opbridge.sparse_attention_paged(q.double(), cache16, table, idx, scale=scale, d_v=dv,
                                                     return_lse=True)
        m = attn_metrics(out, uo, lse, ul)
        R.res["correctness"]["quantization error (info): triton fp8 vs reference fp64 on the bf16 cache"] = {
            "diff": m["diff"], "max_abs": m["max_abs"], "lse_max_abs": m.get("lse_max_abs")}
        if not tiny:  # the public op (JSON config) gives the same numbers as the swept kernel run
            o2, l2 = fp8_public()
            R.res["correctness"]["public op (config from attn_sparse.json) vs reference"] = attn_metrics(o2, ro, l2, rl)
    R.step("correctness", correctness)

    # ---- timings through the public op ----------------------------------------------------------
    def timings():
        for name, fn, floor in (("bf16 cache", bf16_public, floors["bf16"]), ("fp8_ds_mla cache", fp8_public,
                                                                               floors["fp8"])):
            t = R.time(fn)
            R.res["cases"][f"sparse_attention_paged decode B={B} Sq={Sq} Hq={Hq} top-{top_k}, {name}, public op"] = {
                "ms": t, "TFLOPs": flops / (min(t) * 1e-3) / 1e12, "memory_floor_ms": floor,
                "fraction_of_memory_floor": floor / min(t)}
    R.step("timings", timings)

    def peer():
        with opbridge.use_backend("reference"):
            t = R.time(lambda: opbridge.sparse_attention_paged(q, cache8, table, idx, scale=scale, d_v=dv,
                                                               kv_cache_layout=layout), reps=1)
        R.res["cases"]["peer: reference backend (PyTorch dequantize + gather + einsum, fp32), fp8 cache"] = {
            "ms": t, "TFLOPs": flops / (min(t) * 1e-3) / 1e12}
    R.step("peer", peer, min_left=20)

    # ---- the 528-byte layout (Dqk = d_v = 512) with a packed extra set and a sink, smaller --------
    def v4():
        Bv, Hv, nbv, kv_top, e_top = (8, 64, 256, 512, 128) if not tiny else (2, 16, 8, 16, 8)
        lv = "fp8_ds_v4"
        c = quantize_kv_cache(torch.randn(nbv, bs, 512, device=dev), layout=lv)
        e = quantize_kv_cache(torch.randn(nbv, bs, 512, device=dev), layout=lv)
        tb = torch.stack([torch.randperm(nbv, device=dev)[:nbv // 2] for _ in range(Bv)]).to(I32)
        cap = (nbv // 2) * bs
        ix = torch.rand(Bv * Sq, cap, device=dev).topk(kv_top, dim=-1).indices.to(I32).view(Bv, Sq, kv_top)
        ex = torch.rand(Bv * Sq, cap, device=dev).topk(e_top, dim=-1).indices.to(I32).view(Bv, Sq, e_top)
        qv = (torch.randn(Bv, Sq, Hv, 512, device=dev) * 0.5).to(torch.bfloat16)
        sk = torch.randn(Hv, device=dev)
        kw = dict(scale=512 ** -0.5, sink=sk, return_lse=True, extra_block_table=tb.flip(1).contiguous(),
                  extra_indices=ex)
        o, l_ = opbridge.sparse_attention_paged(qv, c, tb, ix, kv_cache_layout=lv, extra_kv_cache=e,
                                                extra_kv_cache_layout=lv, **kw)
        with opbridge.use_backend("reference"):
            ro, rl = opbridge.sparse_attention_paged(qv.double(), dequantize_kv_cache(c, layout=lv), tb, ix,
                                                     extra_kv_cache=dequantize_kv_cache(e, layout=lv), **kw)
        R.res["correctness"][f"fp8_ds_v4 B={Bv} Sq={Sq} Hq={Hv} top-{kv_top} + extra {e_top} + sink, public op "
                             "vs reference fp64 on dequantized caches"] = attn_metrics(o, ro, l_, rl)
    R.step("v4 layout", v4, min_left=40)
    R.res["meta"]["wall_s"] = time.time() - T0
    R.save()
    print(json.dumps({k: R.res[k] for k in ("correctness", "cases", "errors")}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
