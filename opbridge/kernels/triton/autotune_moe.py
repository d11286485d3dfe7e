"""Measure candidate launch configurations of the MoE GEMMs and write ``configs/moe_<arch>.json``.

Run on the GPU to tune:  ``python -m opbridge.kernels.triton.autotune_moe --out configs.json``
(``bench/moe_gpu.py --sections tune`` calls :func:`tune_route` and :func:`tune`, records every timing
and runs its later sections with the result).

Problems are DeepSeek-V3 expert shapes (H=7168, I=2048, k=8) with E=32 experts, so one table
row per bucket of expected rows per expert ``T*k/E``: 16 (decode, T=64), 128 (T=512), 1024
(prefill, T=4096). For each (role, kind, bucket) every candidate is compiled and timed with
``triton.testing.do_bench`` (median) on random data; the fastest wins. Each GEMM is timed alone,
on the operands the fused MoE would give it.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable, Optional

import torch

from .grouped_gemm import B_FP8, B_MXFP4, Operand, launch
from .moe_configs import gemm_config
from .moe_fused import gemm1, gemm2, quantize_fp8_rows
from .moe_permute import routing

H, I, E, K_TOP = 7168, 2048, 32, 8
BUCKETS = ((32, 64), (256, 512), (None, 4096))  # (max_m, T)


def _c(BM, BN, BK, w, s, gm=8, **kw):
    return {"BM": BM, "BN": BN, "BK": BK, "GROUP_M": gm, "num_warps": w, "num_stages": s, **kw}


def _mx(cfgs):  # MXFP4 decode paths: 1 = tl.dot_scaled, 2 = fp16-bit decode in registers
    return [dict(c, MX=m) for c in cfgs for m in (1, 2)]


# Candidates per bucket and kind, kept to what won or came close on the H100 (bench/results/h100-moe.json
# has every timing). Large tiles need 8 warps (two warpgroups of wgmma); fp8 tiles keep the live fp32
# tiles (accumulators plus each K block's product) within the register file; the decode bucket is
# bandwidth-bound and wants many programs with deep pipelines; MXFP4 is bound by the in-register
# decode, which larger M tiles amortise.
CANDIDATES = {
    32: {
        "bf16": [_c(32, 64, 256, 4, 3), _c(32, 128, 128, 4, 3), _c(16, 64, 128, 4, 4)],
        "fp8": [_c(32, 128, 128, 4, 3), _c(64, 64, 128, 4, 4), _c(32, 64, 128, 4, 4)],
        "mxfp4": _mx([_c(32, 64, 128, 4, 4), _c(32, 128, 128, 4, 3), _c(32, 64, 256, 4, 3)])
        + [_c(16, 64, 128, 4, 4, MX=2, SWAP=True), _c(32, 64, 128, 4, 4, MX=2, SWAP=True),
           _c(32, 128, 128, 4, 3, MX=2, SWAP=True)],
    },
    256: {
        "bf16": [_c(128, 128, 64, 8, 3), _c(64, 128, 64, 4, 4)],
        "fp8": [_c(64, 128, 128, 4, 3), _c(64, 128, 128, 8, 3), _c(64, 64, 128, 4, 4)],
        "mxfp4": _mx([_c(128, 128, 64, 8, 3), _c(64, 128, 64, 4, 4)]),
    },
    None: {
        "bf16": [_c(128, 128, 64, 8, 3), _c(128, 128, 64, 8, 4), _c(128, 256, 64, 8, 3), _c(128, 64, 64, 4, 4)],
        "fp8": [_c(128, 128, 128, 8, 3), _c(128, 128, 128, 8, 4), _c(64, 128, 128, 8, 3), _c(64, 128, 128, 4, 4)],
        "mxfp4": [_c(128, 64, 64, 4, 4, MX=2), _c(128, 64, 64, 4, 4, MX=1), _c(256, 64, 64, 8, 3, MX=2),
                  _c(256, 128, 64, 8, 3, MX=2), _c(128, 128, 128, 8, 3, MX=2),
                  _c(128, 128, 64, 8, 3, MX=2, SWAP=True), _c(128, 64, 64, 4, 4, MX=2, SWAP=True)],
    },
}


def _candidates(bucket, kind: str, role: str) -> list[dict]:
    cands = list(CANDIDATES[bucket][kind])
    if role == "gemm1":  # two accumulators: BN=256 would be a 128x512 accumulator
        cands = [x for x in cands if x["BN"] <= 128]
    return cands


def _bench(fn: Callable[[], None], reps_ms: int = 30) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=reps_ms, return_mode="median"))


def _weights(kind: str, dev: torch.device):
    from ...core.formats import quantize

    w13 = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16).mul_(H ** -0.5)
    w2 = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16).mul_(I ** -0.5)
    if kind == "bf16":
        return Operand(w13), Operand(w2)
    fmt, block, k = ("fp8", (128, 128), B_FP8) if kind == "fp8" else ("mxfp4", (1, 32), B_MXFP4)

    def per_expert(w):  # one expert at a time: the whole-tensor quantizer needs several fp32 copies
        parts = [quantize(w[e], fmt, block) for e in range(w.shape[0])]
        return Operand(torch.stack([p.data for p in parts]), torch.stack([p.scale for p in parts]), k)

    return per_expert(w13), per_expert(w2)


def tune(kinds=("bf16", "fp8", "mxfp4"), roles=("gemm1", "gemm2"), buckets=BUCKETS, deadline: Optional[float] = None,
         log=print) -> dict:
    """Time the candidates; return {"gemm": {role/kind: [entries]}, "timings": [...]}."""
    dev = torch.device("cuda")
    table: dict[str, list] = {}
    timings = []
    for kind in kinds:
        w13, w2 = _weights(kind, dev)
        for max_m, T in buckets:
            if deadline is not None and time.time() > deadline:
                log(f"tune: deadline reached, skipping {kind} T={T}")
                continue
            x = torch.randn(T, H, device=dev).to(torch.bfloat16)
            logits = torch.randn(T, E, device=dev)
            ids = logits.topk(K_TOP, dim=1).indices.to(torch.int32)
            tw = torch.rand(T, K_TOP, device=dev)
            r = routing(ids, E, tw)
            a1 = quantize_fp8_rows(x) if kind == "fp8" else Operand(x)
            quant = kind == "fp8"
            flops = 6.0 * T * K_TOP * H * I
            for role in roles:
                best = None
                seen = []
                for cand in _candidates(max_m, kind, role):
                    cfg = dict(cand)
                    if kind == "fp8":
                        cfg["BK"] = min(cfg["BK"], 128)
                        if role == "gemm1":
                            cfg["BN"] = 128
                    if kind == "mxfp4":
                        cfg["BK"] = max(cfg["BK"], 64)
                    if cfg in seen:
                        continue
                    seen.append(cfg)
                    try:
                        if role == "gemm1":
                            fn = lambda: gemm1(r, a1, w13, T, None, quant, cfg, torch.bfloat16)  # noqa: E731
                        else:
                            a2 = gemm1(r, a1, w13, T, None, quant, gemm_config(dev, "gemm1", kind, 1e9,
                                                                            quant_out=quant,
                                                                            fp8_blocks=quant,
                                                                            mxfp4=kind == "mxfp4"),
                                       torch.bfloat16)
                            fn = lambda: gemm2(r, a2, w2, cfg, torch.bfloat16)  # noqa: E731
                        ms = _bench(fn)
                    except Exception as e:  # a config that does not compile (e.g. out of shared memory)
                        log(f"tune {role}/{kind} T={T} {cfg}: failed: {type(e).__name__}: {str(e)[:200]}")
                        continue
                    share = 2.0 / 3.0 if role == "gemm1" else 1.0 / 3.0
                    tf = flops * share / ms / 1e9
                    timings.append({"role": role, "kind": kind, "T": T, "cfg": cfg, "ms": ms, "tflops": tf})
                    log(f"tune {role}/{kind} T={T} {cfg}: {ms:.4f} ms {tf:.0f} TFLOP/s")
                    if best is None or ms < best[0]:
                        best = (ms, cfg)
                if best is not None:
                    entry = dict(best[1])
                    if max_m is not None:
                        entry = {"max_m": max_m, **entry}
                    entry["measured_ms"] = round(best[0], 4)
                    table.setdefault(f"{role}/{kind}", []).append(entry)
        del w13, w2
        torch.cuda.empty_cache()
    return {"gemm": table, "timings": timings}


def tune_plain(kinds=("bf16", "fp8"), deadline: Optional[float] = None, log=print) -> dict:
    """The plain grouped GEMM (role ``gemm``) on the issue's shapes: G=4 x 8192 rows, N=4096, K=7168."""
    from ...core.formats import quantize

    dev = torch.device("cuda")
    G, Mg, N, K = 4, 8192, 4096, 7168
    table, timings = {}, []
    offsets = torch.arange(0, G + 1, device=dev, dtype=torch.int32) * Mg
    a = torch.randn(G * Mg, K, device=dev).to(torch.bfloat16)
    b = (torch.randn(G, N, K, device=dev) / K ** 0.5).to(torch.bfloat16)
    for kind in kinds:
        if kind == "fp8":
            qa, qb = quantize(a, "fp8", (1, 128)), quantize(b, "fp8", (128, 128))
            A, B = Operand(qa.data, qa.scale, B_FP8), Operand(qb.data, qb.scale, B_FP8)
        else:
            A, B = Operand(a), Operand(b)
        out = torch.empty(G * Mg, N, device=dev, dtype=torch.bfloat16)
        best = None
        for cand in CANDIDATES[None][kind]:
            if deadline is not None and time.time() > deadline:
                break
            if kind == "bf16" and "MX" in cand:
                continue
            cfg = dict(cand)
            try:
                ms = _bench(lambda: launch(A, B, out, offsets, cfg, m_rows=G * Mg))
            except Exception as e:
                log(f"tune gemm/{kind} {cfg}: failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            tf = 2.0 * G * Mg * N * K / ms / 1e9
            timings.append({"role": "gemm", "kind": kind, "cfg": cfg, "ms": ms, "tflops": tf})
            log(f"tune gemm/{kind} {cfg}: {ms:.4f} ms {tf:.0f} TFLOP/s")
            if best is None or ms < best[0]:
                best = (ms, cfg)
        if best is not None:
            table[f"gemm/{kind}"] = [{**best[1], "measured_ms": round(best[0], 4)}]
    return {"gemm": table, "timings": timings}


def tune_route(deadline: Optional[float] = None, log=print) -> dict:
    """Tokens per program and warps of the routing kernel: V3 (E=256, top-8, 8 groups keep 4) and V4
    (E=384, top-6), T=4096, each timed as 16 calls on 16 logit buffers replayed from one CUDA graph."""
    import triton.testing

    from .moe_route import moe_route

    dev = torch.device("cuda")
    T = 4096
    cases = ((256, dict(top_k=8, scoring="sigmoid", num_groups=8, topk_groups=4)),
             (384, dict(top_k=6, scoring="sqrtsoftplus", num_groups=1, topk_groups=1)))
    rows, timings = [], []
    for E, kw in cases:
        bufs = [torch.randn(T, E, device=dev) for _ in range(16)]
        bias = torch.randn(E, device=dev) * 0.1
        best = None
        for bt in (1, 2, 4, 8):
            for nw in (1, 2, 4, 8):
                if deadline is not None and time.time() > deadline:
                    break
                cfg = {"BT": bt, "num_warps": nw}

                def run():
                    for b in bufs:
                        moe_route(b, kw["top_k"], kw["scoring"], bias, kw["num_groups"], kw["topk_groups"], True,
                                  2.5, cfg)
                try:
                    run()
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        run()
                    us = float(triton.testing.do_bench(g.replay, warmup=10, rep=30, return_mode="median")) * 1e3 / 16
                except Exception as e:
                    log(f"tune route E={E} {cfg}: failed: {type(e).__name__}: {str(e)[:200]}")
                    continue
                timings.append({"E": E, "cfg": cfg, "us": us})
                log(f"tune route E={E} {cfg}: {us:.1f} us")
                if best is None or us < best[0]:
                    best = (us, cfg)
        if best is not None:
            rows.append({**({"max_e": E} if E == 256 else {}), **best[1], "measured_us": round(best[0], 2)})
    return {"route": rows, "timings": timings}


def merge(base: dict, tuned: dict) -> dict:
    """Replace the tuned (role/kind) rows of a config table; keep the rest."""
    out = json.loads(json.dumps(base))
    if tuned.get("route"):
        out["route"] = tuned["route"]
    for key, rows in tuned.get("gemm", {}).items():
        old = {r.get("max_m"): r for r in out.setdefault("gemm", {}).get(key, [])}
        for r in rows:
            old[r.get("max_m")] = r
        out["gemm"][key] = sorted(old.values(), key=lambda r: float("inf") if r.get("max_m") is None else r["max_m"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="where to write the merged config table (JSON)")
    p.add_argument("--kinds", default="bf16,fp8,mxfp4")
    p.add_argument("--budget-s", type=float, default=600.0)
    args = p.parse_args(argv)
    from .moe_configs import arch, table

    deadline = time.time() + args.budget_s
    kinds = tuple(args.kinds.split(","))
    route = tune_route(deadline=deadline)
    res = tune(kinds=kinds, deadline=deadline)
    plain = tune_plain(kinds=tuple(k for k in kinds if k != "mxfp4"), deadline=deadline)
    base = table(arch(torch.device("cuda")))
    merged = merge(merge(merge(base, route), res), plain)
    merged["measured"] = True
    merged["device"] = torch.cuda.get_device_name()
    with open(args.out, "w") as f:
        json.dump(merged, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
