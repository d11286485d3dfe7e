"""Transformers DeepSeek models on one GPU: unpatched vs patched with opbridge (agreement, then speed).

    # transformers >= 5.23 (for deepseek_v4) travels as a wheel in .whl/ (git-ignored); then:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/transformers-*.whl && export PYTHONPATH=/tmp/site:. && \
        OPBRIDGE_FALLBACK=reference python3 bench/port_gpu.py --out $OUT --families v4,v32,v3 --budget 380
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/port_gpu.py --tiny --out /tmp/port   # CPU smoke test

Per family, a random-initialised ``mid`` model (V4: hidden 2048, 8 layers, head dim 512, 64 experts
top-6, CSA rate 4 with top-128 indexer, HCA rate 128, window 128; V3 / V3.2: hidden 2048, 8 layers,
MLA 512 + 64, 64 experts top-6) in bfloat16:

1. agreement with transformers: ``opbridge port-check`` semantics (patched on Triton vs the
   unpatched model, both measured against a float32 copy of the unpatched model), prefill of
   ``--seq-len`` tokens then ``--decode-steps`` cached greedy steps;
2. agreement Triton vs reference backend (both patched);
3. speed: prefill latency and per-step decode latency (CUDA events, medians, warm-up first, each
   measured twice), unpatched transformers vs patched on Triton.

Ops the Triton backend cannot run fall back to the reference backend when OPBRIDGE_FALLBACK=reference;
each fallback is listed in the JSON. The JSON (``<out>/port_gpu.json``) is rewritten after every section,
so a run cut off by ``--budget`` still leaves its numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import opbridge  # noqa: E402
from opbridge.integrations import patch, unpatch  # noqa: E402
from opbridge.integrations.models import build_model, make_config  # noqa: E402
from opbridge.integrations.port_check import check  # noqa: E402

T0 = time.time()


def _trim(result: dict) -> dict:
    """The check result without per-step detail that the summary already carries."""
    keep = {k: result[k] for k in ("backend", "against", "dtype", "ok", "verdict", "fallbacks", "seconds")
            if k in result}
    agr = result["agreement"]
    keep["layers"] = agr["layers"]
    keep["prefill"] = agr["prefill"]
    keep["decode"] = {k: agr["decode"][k] for k in ("diff", "max_abs", "nonfinite_match")}
    keep["decode_steps"] = [{k: s[k] for k in ("step", "diff", "max_abs", "tokens_equal")}
                            for s in agr["decode"]["steps"]]
    keep["tokens"] = agr["tokens"]
    if "oracle" in result:
        keep["oracle"] = {who: {p: {k: v[p][k] for k in ("diff", "max_abs")} for p in ("prefill", "decode")}
                          for who, v in result["oracle"].items()}
    return keep


class Events:
    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn):
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            torch.cuda.synchronize()
            return out, a.elapsed_time(b)
        t = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t) * 1e3


@torch.no_grad()
def time_model(model, ids, steps: int, reps: int, device: str) -> dict:
    """Prefill ms and decode-step ms (greedy, cached): a warm-up pass, then ``reps`` measured passes."""
    ev = Events(device)
    prefill, decode = [], []
    for r in range(reps + 1):
        out, ms = ev(lambda: model(input_ids=ids, use_cache=True))
        cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        step_ms = []
        for _ in range(steps):
            out, t = ev(lambda: model(input_ids=tok, past_key_values=cache, use_cache=True))
            cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            step_ms.append(t)
        if r:  # pass 0 is the warm-up (Triton compiles, autotunes; caches allocate)
            prefill.append(ms)
            decode.append(statistics.median(step_ms))
    return {"prefill_ms": prefill, "decode_step_ms": decode,
            "prefill_ms_median": statistics.median(prefill), "decode_step_ms_median": statistics.median(decode)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for port_gpu.json")
    ap.add_argument("--families", default="v4,v32,v3")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2, help="measured passes per timing (each reported)")
    ap.add_argument("--budget", type=float, default=380.0, help="seconds; no new section starts after")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, float16, TRITON_INTERPRET=1")
    args = ap.parse_args()

    device = "cpu" if args.tiny else "cuda"
    size = "tiny" if args.tiny else "mid"
    dtype = torch.float16 if args.tiny else torch.bfloat16
    seq = min(args.seq_len, 22) if args.tiny else args.seq_len
    steps = min(args.decode_steps, 2) if args.tiny else args.decode_steps
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "port_gpu.json")
    import transformers

    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor()
    res = {"meta": {"argv": sys.argv, "device": gpu,
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "triton": getattr(__import__("triton"), "__version__", "?"), "dtype": str(dtype), "size": size,
                    "seq_len": seq, "decode_steps": steps, "env": {k: v for k, v in os.environ.items()
                                                                  if k.startswith(("OPBRIDGE_", "TRITON_INTERPRET"))}},
           "families": {}, "errors": {}}

    def save():
        res["meta"]["elapsed_s"] = time.time() - T0
        with open(path, "w") as f:
            json.dump(res, f, indent=1, default=str)

    def section(name, fn):
        if time.time() - T0 > args.budget:
            res["errors"][name] = "skipped: time budget spent"
            return None
        try:
            out = fn()
            return out
        except Exception as e:  # keep going: the other sections still measure something
            res["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
            print(res["errors"][name], file=sys.stderr)
            return None
        finally:
            save()

    for fam in args.families.split(","):
        fres = res["families"].setdefault(fam, {})
        cfg = make_config(fam, size)
        fres["config"] = {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                       "n_routed_experts", "num_experts_per_tok") if hasattr(cfg, k)}
        model = build_model(fam, size, dtype=dtype, device=device, seed=0)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=g).to(device)
        fres["params"] = sum(p.numel() for p in model.parameters())
        print(f"[{time.time() - T0:6.1f}s] {fam}: {fres['params'] / 1e9:.2f}B params", flush=True)

        r = section(f"{fam}/agreement_vs_transformers",
                    lambda: check(model, ids, backend="triton", against="unpatched", decode_steps=steps))
        if r is not None:
            fres["patch"] = {k: r["patch"][k] for k in ("kinds", "ops", "skipped")}
            fres["agreement_vs_transformers"] = _trim(r)
            print(f"  vs transformers: ok={r['ok']} prefill diff {r['agreement']['prefill']['diff']:.3e} "
                  f"tokens {r['agreement']['tokens']['agree']}/{r['agreement']['tokens']['compared']}", flush=True)
        r = section(f"{fam}/agreement_triton_vs_reference",
                    lambda: check(model, ids, backend="triton", against="reference", decode_steps=steps))
        if r is not None:
            fres["agreement_triton_vs_reference"] = _trim(r)
            print(f"  triton vs reference: ok={r['ok']} prefill diff {r['agreement']['prefill']['diff']:.3e}",
                  flush=True)

        def speed():
            out = {"unpatched": time_model(model, ids, steps, args.reps, device)}
            patch(model)
            try:
                with warnings.catch_warnings(record=True) as caught, opbridge.use_backend("triton"):
                    warnings.simplefilter("always")
                    out["patched_triton"] = time_model(model, ids, steps, args.reps, device)
                out["fallbacks"] = sorted({str(w.message) for w in caught if "OPBRIDGE_FALLBACK" in str(w.message)})
            finally:
                unpatch(model)
            u, p = out["unpatched"], out["patched_triton"]
            out["speedup_prefill"] = u["prefill_ms_median"] / p["prefill_ms_median"]
            out["speedup_decode"] = u["decode_step_ms_median"] / p["decode_step_ms_median"]
            return out

        t = section(f"{fam}/speed", speed)
        if t is not None:
            fres["speed"] = t
            u, p = t["unpatched"], t["patched_triton"]
            print(f"  prefill {u['prefill_ms_median']:.1f} -> {p['prefill_ms_median']:.1f} ms, "
                  f"decode step {u['decode_step_ms_median']:.1f} -> {p['decode_step_ms_median']:.1f} ms", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        save()
    save()
    print(f"wrote {path} in {time.time() - T0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
