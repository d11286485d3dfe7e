"""Expert-parallel MoE across GPUs: correctness against one GPU, stage timings, all-to-all bandwidth.

One process per GPU, started by torchrun (``python3 -m torch.distributed.run``):

    python3 -m torch.distributed.run --standalone --nproc-per-node 2 bench/ep_gpu.py \
        --out bench/results/h200x2-ep.json

Defaults: the DeepSeek-V4-Flash routed-MoE shape (H=4096, I=2048, E=256 experts, top-6, sqrt-softplus
routing), experts sharded evenly, T=4096 tokens per rank, bf16 and FP8 dispatch, dropless. Each
configuration records, per rank and as max/mean over ranks (median of ``--iters`` timed runs, each
started after a barrier):

- correctness: the EP output of this rank's first ``--check-tokens`` tokens against ``opbridge.moe`` of
  the same tokens over all experts on this one GPU (OPS.md diff; bf16 < 5e-5, FP8 payload < 1e-3);
- ms of ``layout`` (sort + count exchange + host read of the sizes), ``dispatch`` (layout included,
  plus pack / FP8 quantise, all-to-all, unpack), ``compute`` (``opbridge.moe`` on the received rows),
  ``combine`` (all-to-all back + weighted sum), the whole ``layer`` with and without the metadata
  agreement, and the shared expert alone / overlapped (second stream) / serial;
- bytes moved and the achieved bandwidth of dispatch and combine, expert TFLOP/s;
- an ``all_to_all_single`` bandwidth sweep (nccl-tests convention: algbw = bytes per rank / time,
  busbw = algbw * (W-1)/W).

Results are written by rank 0 after every configuration (a crash keeps what was measured).
``--merge A.json B.json ... --out M.json`` joins runs at several GPU counts and adds weak-scaling
efficiency (layer time at the smallest GPU count / layer time at W, same tokens per rank).

CPU smoke test (gloo), tiny shape:
    python -m torch.distributed.run --standalone --nproc-per-node 2 bench/ep_gpu.py --device cpu \
        --hidden 256 --inter 64 --experts 8 --topk 2 --tokens 64 --iters 2 --warmup 1 --a2a-mb 1 --out /tmp/ep.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import opbridge  # noqa: E402
from opbridge.core.registry import decide  # noqa: E402
from opbridge.distributed import combine, dispatch, ep_moe, expert_compute, make_layout, setup  # noqa: E402
from opbridge.distributed.comm import all_to_all  # noqa: E402
from opbridge.conformance.metrics import diff  # noqa: E402

THRESHOLDS = {"bf16": 5e-5, "fp8": 1e-3}  # OPS.md 5: bf16 moe; fp8 activations


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write (rank 0)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda: NCCL; cpu: gloo (smoke test)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=2048)
    p.add_argument("--experts", type=int, default=256, help="global routed experts (a multiple of the GPU count)")
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--tokens", default="4096", help="tokens per rank, comma list (weak scaling)")
    p.add_argument("--dispatch", default="bf16,fp8", help="payloads to run: bf16, fp8")
    p.add_argument("--capacity-factor", type=float, default=0.0,
                   help="> 0: also run capacity mode, capacity = ceil(f * T * k / E) per (source rank, expert)")
    p.add_argument("--shared-inter", type=int, default=2048, help="shared expert width (0: skip the overlap runs)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--check-tokens", type=int, default=256)
    p.add_argument("--backend", default="auto", help="opbridge backend for the expert compute (auto: by device)")
    p.add_argument("--a2a-mb", default="1,4,16,64,256", help="all-to-all sweep: MiB sent per rank (empty: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=int, default=180, help="collective timeout (a hang becomes an error)")
    p.add_argument("--merge", nargs="+", help="merge result files of several GPU counts into --out")
    return p.parse_args(argv)


# ---- data: every rank can rebuild any expert and its own tokens from the seed --------------------

def expert_weights(experts, H, I, device, seed):
    """bf16 ``w13 [n, 2I, H]``, ``w2 [n, H, I]`` for the given global expert ids (deterministic per id)."""
    n = len(experts)
    w13 = torch.empty((n, 2 * I, H), dtype=torch.bfloat16, device=device)
    w2 = torch.empty((n, H, I), dtype=torch.bfloat16, device=device)
    g = torch.Generator(device=device)
    for i, e in enumerate(experts):
        g.manual_seed(seed * 1_000_003 + int(e))
        w13[i] = torch.randn((2 * I, H), generator=g, device=device).mul_(H ** -0.5)
        w2[i] = torch.randn((H, I), generator=g, device=device).mul_(I ** -0.5)
    return w13, w2


def tokens(T, H, E, k, rank, device, seed):
    g = torch.Generator(device=device).manual_seed(seed * 7919 + 1000 + rank)
    x = torch.randn((T, H), generator=g, device=device).to(torch.bfloat16)
    logits = torch.randn((T, E), generator=g, device=device)
    with opbridge.use_backend("reference"):  # routing is not what is measured here
        w, ids = opbridge.moe_route(logits, k, scoring="sqrtsoftplus", renormalize=True)
    return x, w, ids


class SharedExpert(torch.nn.Module):
    """A SwiGLU MLP in plain PyTorch (DeepSeek's shared expert)."""

    def __init__(self, H, I, device, seed):
        super().__init__()
        g = torch.Generator(device=device).manual_seed(seed + 424242)
        self.w13 = (torch.randn((2 * I, H), generator=g, device=device) * H ** -0.5).to(torch.bfloat16)
        self.w2 = (torch.randn((H, I), generator=g, device=device) * I ** -0.5).to(torch.bfloat16)

    def forward(self, x):
        gate, up = F.linear(x, self.w13).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2)


def single_gpu_reference(x, w, ids, args, device):
    """``opbridge.moe`` over all experts on this GPU (in expert chunks only if they would not fit)."""
    E, H, I = args.experts, args.hidden, args.inter
    per_expert = 3 * H * I * 2
    chunk = E
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        chunk = max(1, min(E, int(0.15 * free // per_expert)))  # the reference backend adds fp32 copies
    acc = torch.zeros(x.shape, dtype=torch.float32, device=device)
    for lo in range(0, E, chunk):
        hi = min(E, lo + chunk)
        w13, w2 = expert_weights(range(lo, hi), H, I, device, args.seed)
        local = torch.where((ids >= lo) & (ids < hi), ids - lo, -1).to(torch.int32)
        acc += opbridge.moe(x, w, local, w13, w2).float()
        del w13, w2
    return acc.to(x.dtype), chunk


# ---- timing --------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, args, device):
    """Median ms (and all samples) of ``fn()``; each run starts after a barrier, on an idle device."""
    for _ in range(args.warmup):
        fn()
    samples = []
    for _ in range(args.iters):
        sync(device)
        dist.barrier()
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples), samples


def across_ranks(value):
    """Every rank's value -> {'max', 'mean', 'per_rank'} (collective)."""
    vals = [None] * dist.get_world_size()
    dist.all_gather_object(vals, value)
    return {"max": max(vals), "mean": sum(vals) / len(vals), "per_rank": vals}


# ---- one configuration ---------------------------------------------------------------------------

def run_config(T, payload, capacity, w13, w2, shared, args, device):
    rank, W = dist.get_rank(), dist.get_world_size()
    E, H, I, k = args.experts, args.hidden, args.inter, args.topk
    fp8 = payload == "fp8"
    x, w, ids = tokens(T, H, E, k, rank, device, args.seed)
    opts = dict(dispatch_fp8=fp8, capacity=capacity)
    res = {"tokens_per_rank": T, "dispatch": payload, "mode": "dropless" if capacity is None else "capacity",
           "capacity": capacity}

    # Correctness: the first check-tokens tokens of every rank against one GPU.
    out, st = ep_moe(x, w, ids, w13, w2, num_experts=E, return_stats=True, **opts)
    C = min(args.check_tokens, T)
    ids_ref = ids[:C]
    if capacity is not None:  # copies the EP layer dropped add nothing: drop them in the reference too
        lay = make_layout(ids, E, capacity)
        kept = torch.zeros(T * k, dtype=torch.bool, device=device)
        kept[lay.order] = lay.kept
        ids_ref = torch.where(kept.view(T, k), ids, -1)[:C]
    ref, chunk = single_gpu_reference(x[:C], w[:C], ids_ref, args, device)
    d = diff(out[:C], ref)
    check = {"diff": across_ranks(d), "threshold": THRESHOLDS[payload], "check_tokens_per_rank": C,
             "reference_expert_chunk": chunk}
    if fp8:
        qdq = opbridge.dequantize(opbridge.quantize(x[:C], "fp8", (1, 128))).to(x.dtype)
        check["diff_vs_fp8_rounded_x"] = across_ranks(diff(out[:C], single_gpu_reference(qdq, w[:C], ids_ref, args,
                                                                                        device)[0]))
    check["pass"] = check["diff"]["max"] < THRESHOLDS[payload]
    if shared is not None:  # the shared expert on the second stream adds the same as computed apart
        with_shared = ep_moe(x, w, ids, w13, w2, shared_experts=shared, overlap_shared=True, **opts)
        serial = ep_moe(x, w, ids, w13, w2, shared_experts=shared, overlap_shared=False, **opts)
        apart = (out.float() + shared(x).float()).to(x.dtype)  # rounds twice: bf16 tolerance
        check["shared_overlap_diff"] = across_ranks(diff(with_shared, apart))
        check["shared_overlap_vs_serial_diff"] = across_ranks(diff(with_shared, serial))
        check["pass"] = (check["pass"] and check["shared_overlap_diff"]["max"] < THRESHOLDS["bf16"]
                         and check["shared_overlap_vs_serial_diff"]["max"] < 1e-6)
        del with_shared, serial, apart
    res["correctness"] = check
    del out, ref

    # Traffic of one call on this rank.
    row_bytes = H + 4 * math.ceil(H / 128) if fp8 else 2 * H
    sent, recvd = st.sent_per_rank.tolist(), st.received_per_rank.tolist()
    if capacity is None:
        out_rows, in_rows = sum(sent) - sent[rank], sum(recvd) - recvd[rank]
    else:  # fixed-size exchange: every (rank, expert) block travels whole
        out_rows = in_rows = (W - 1) * (E // W) * capacity
    res["rows_received"] = across_ranks(int(st.tokens_per_expert.sum()))
    res["dropped"] = across_ranks(int(st.dropped))
    res["dispatch_bytes_off_rank"] = across_ranks(out_rows * row_bytes)
    res["combine_bytes_off_rank"] = across_ranks(in_rows * 2 * H)

    # Stage timings.
    shard = setup(x, w, ids, w13, w2, num_experts=E, **opts)
    ms = {}

    def layout_only():
        lay = make_layout(ids, E, capacity)
        counts = lay.send_counts().view(W, E // W)
        recv = all_to_all(counts.reshape(-1), None, None, None).view(W, E // W)
        if capacity is None:
            torch.stack([counts.sum(1), recv.sum(1)]).tolist()

    ms["layout"] = time_ms(layout_only, args, device)
    ms["dispatch"] = time_ms(lambda: dispatch(x, ids, shard, **opts), args, device)
    dd = dispatch(x, ids, shard, **opts)
    ms["compute"] = time_ms(lambda: expert_compute(dd, w13, w2), args, device)
    y = expert_compute(dd, w13, w2)
    ms["combine"] = time_ms(lambda: combine(y, dd, w), args, device)
    ms["layer"] = time_ms(lambda: ep_moe(x, w, ids, w13, w2, validate=False, **opts), args, device)
    ms["layer_validated"] = time_ms(lambda: ep_moe(x, w, ids, w13, w2, validate=True, **opts), args, device)
    if shared is not None:
        ms["shared_alone"] = time_ms(lambda: shared(x), args, device)
        ms["layer_shared_overlap"] = time_ms(
            lambda: ep_moe(x, w, ids, w13, w2, validate=False, shared_experts=shared, overlap_shared=True, **opts),
            args, device)
        ms["layer_shared_serial"] = time_ms(
            lambda: ep_moe(x, w, ids, w13, w2, validate=False, shared_experts=shared, overlap_shared=False, **opts),
            args, device)
    res["ms"] = {name: across_ranks(med) for name, (med, _) in ms.items()}
    res["ms_samples_rank0"] = {name: samples for name, (_, samples) in ms.items()} if rank == 0 else None
    R = int(st.tokens_per_expert.sum())
    res["compute_tflops"] = across_ranks(6.0 * R * H * I / (ms["compute"][0] * 1e-3) / 1e12)
    res["dispatch_GBps"] = across_ranks(out_rows * row_bytes / (ms["dispatch"][0] * 1e-3) / 1e9)
    res["combine_GBps"] = across_ranks(in_rows * 2 * H / (ms["combine"][0] * 1e-3) / 1e9)
    if shared is not None:
        s, lo, ls = ms["shared_alone"][0], ms["layer_shared_overlap"][0], ms["layer_shared_serial"][0]
        # Fraction of the shared expert's time hidden behind the routed path.
        res["shared_hidden_fraction"] = across_ranks(max(0.0, min(1.0, (ms["layer"][0] + s - lo) / s)) if s else 0.0)
        res["shared_overlap_saving_ms"] = across_ranks(ls - lo)
    del dd, y
    return res


def a2a_sweep(args, device):
    rows = []
    W = dist.get_world_size()
    for mb in [float(v) for v in args.a2a_mb.split(",") if v.strip()]:
        n = int(mb * 2 ** 20) // W * W
        buf = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
        med, _ = time_ms(lambda: all_to_all(buf, None, None, None), args, device)
        t = across_ranks(med)["max"]
        algbw = n / (t * 1e-3) / 1e9
        rows.append({"bytes_per_rank": n, "ms": t, "algbw_GBps": algbw, "busbw_GBps": algbw * (W - 1) / W})
        del buf
    return rows


def environment(device):
    env = {"world_size": dist.get_world_size(), "backend": dist.get_backend(), "torch": torch.__version__,
           "python": platform.python_version(), "moe_backend": str(decide("moe", device)),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        v = torch.cuda.nccl.version()
        env["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        env["NCCL_NVLS_ENABLE"] = os.environ.get("NCCL_NVLS_ENABLE")
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def write(path, doc):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1))


def merge(paths, out):
    """Join runs at several GPU counts; weak-scaling efficiency = layer ms at the fewest GPUs / layer ms at W."""
    runs = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda d: d["env"]["world_size"])
    base = {}
    rows = []
    for run in runs:
        W = run["env"]["world_size"]
        for c in run["configs"]:
            key = (c["tokens_per_rank"], c["dispatch"], c["mode"])
            t = c["ms"]["layer"]["max"]
            base.setdefault(key, (W, t))
            W0, t0 = base[key]
            rows.append({"world_size": W, "tokens_per_rank": key[0], "dispatch": key[1], "mode": key[2],
                         "layer_ms": t, "weak_scaling_efficiency": t0 / t, "relative_to_world_size": W0,
                         "correct": c["correctness"]["pass"], "diff_max": c["correctness"]["diff"]["max"]})
    write(out, {"runs": runs, "weak_scaling": rows, "sources": list(paths)})
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    timeout = datetime.timedelta(seconds=args.timeout_s)
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    rank, W = dist.get_rank(), dist.get_world_size()
    E = args.experts
    if E % W:
        raise SystemExit(f"--experts {E} is not a multiple of the {W} ranks")
    El = E // W
    doc = {"bench": "ep_gpu", "command": " ".join(sys.argv), "env": environment(device),
           "shape": {"hidden": args.hidden, "inter": args.inter, "experts": E, "local_experts": El,
                     "topk": args.topk, "routing": "sqrtsoftplus top-k, renormalised, random logits",
                     "dtype": "bfloat16", "shared_inter": args.shared_inter},
           "method": f"median of {args.iters} runs after {args.warmup} warm-ups, each after a barrier; "
                     "per rank, then max/mean over ranks", "configs": [], "all_to_all": [], "errors": []}
    try:
        with opbridge.use_backend(None if args.backend == "auto" else args.backend):
            w13, w2 = expert_weights(range(rank * El, (rank + 1) * El), args.hidden, args.inter, device, args.seed)
            shared = SharedExpert(args.hidden, args.shared_inter, device, args.seed) if args.shared_inter else None
            for T in [int(t) for t in args.tokens.split(",")]:
                for payload in [p.strip() for p in args.dispatch.split(",") if p.strip()]:
                    modes = [None]
                    if args.capacity_factor > 0:
                        modes.append(math.ceil(args.capacity_factor * T * args.topk / E))
                    for capacity in modes:
                        t0 = time.perf_counter()
                        res = run_config(T, payload, capacity, w13, w2, shared if capacity is None else None,
                                         args, device)
                        res["wall_s"] = time.perf_counter() - t0
                        doc["configs"].append(res)
                        if rank == 0:
                            write(args.out, doc)
                            m = {n: v["max"] for n, v in res["ms"].items()}
                            print(f"T={T} {payload} {res['mode']}: layer {m['layer']:.3f} ms = dispatch "
                                  f"{m['dispatch']:.3f} (layout {m['layout']:.3f}) + compute {m['compute']:.3f} + "
                                  f"combine {m['combine']:.3f}; diff {res['correctness']['diff']['max']:.2e} "
                                  f"({'ok' if res['correctness']['pass'] else 'FAIL'})", flush=True)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
            doc["all_to_all"] = a2a_sweep(args, device)
    except Exception:  # record what failed next to what was measured, then stop every rank
        doc["errors"].append({"rank": rank, "traceback": traceback.format_exc()})
        if rank == 0:
            write(args.out, doc)
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    if rank == 0:
        write(args.out, doc)
        print(json.dumps({"all_to_all": doc["all_to_all"]}, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
