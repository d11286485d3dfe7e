"""``opbridge port-check``: one transformers DeepSeek model, unpatched vs patched (or backend vs backend).

Runs the same weights and prompt through (a) the unpatched transformers model, or the patched
model on the ``--against`` backend, and (b) the patched model on ``--backend``: prefill, then
``--decode-steps`` cached greedy steps (b teacher-forced on a's tokens). Reports per-layer and
logits agreement with the OPS.md section 5 metric and the greedy token agreement; exits 1 when
they disagree beyond the thresholds below, 0 otherwise.

Thresholds (on ``diff`` of the logits, prefill and decode):

- float64 models: 1e-12 (transformers itself runs V4's mHC and V3's router in float32); float32: 1e-6
  (a kernel may use TF32 where OPS.md allows it; on the CPU
  reference the observed values are ~1e-13).
- bfloat16 / float16 models: transformers rounds intermediates to the model dtype where opbridge
  accumulates in fp32, so the two differ by the dtype's noise, not by a fixed amount. Both are
  measured against a float32 copy of the unpatched model (the oracle); the unpatched model's
  distance to it (the larger of prefill and decode) is the dtype's noise scale, and the patched
  model must be no further from the oracle than ``max(floor, 10 x noise)`` (floor 2e-3 bf16, 5e-4 fp16).
- quantised experts (``--quantize``): fp8 5e-3, mxfp4 5e-2 against the unquantised model
  (end-to-end budgets above the per-op ones of OPS.md, which bound one layer's error).

A greedy token mismatch fails unless it is a numerical tie (the reference's two tokens differ by
less than the two runs' largest logit difference at that step).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from typing import Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
MAX_DIFF = {torch.float64: 1e-12, torch.float32: 1e-6}
ORACLE_FLOOR = {torch.bfloat16: 2e-3, torch.float16: 5e-4}
ORACLE_RATIO = 10.0
QUANT_MAX_DIFF = {"fp8": 5e-3, "mxfp4": 5e-2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .models import FAMILIES, SIZES

    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", choices=FAMILIES, default="v4", help="random-initialised family (default v4)")
    src.add_argument("--checkpoint", metavar="DIR", help="a local transformers checkpoint directory instead")
    p.add_argument("--size", choices=SIZES, default="tiny", help="size of the random model (default tiny)")
    p.add_argument("--backend", default="reference", help="backend of the patched run (default reference)")
    p.add_argument("--against", default="unpatched",
                   help="'unpatched' (transformers' own code, default) or a backend name for the patched model")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=22, help="prompt length (default 22)")
    p.add_argument("--decode-steps", type=int, default=4, help="cached greedy decode steps (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantize", choices=("fp8", "mxfp4"), help="quantise the experts of the patched model")
    p.add_argument("--max-diff", type=float, help="override the logits threshold")
    p.add_argument("--no-oracle", action="store_true", help="low-precision models: compare directly, no fp32 oracle")
    p.add_argument("--json", metavar="FILE", help="write the full result as JSON")
    p.add_argument("--quiet", action="store_true")


def check(model: torch.nn.Module, input_ids: torch.Tensor, *, backend: str = "reference",
          against: str = "unpatched", decode_steps: int = 4, quantize: Optional[str] = None,
          oracle: bool = True, max_diff: Optional[float] = None) -> dict:
    """Run the check on ``model`` (left as it was found) and return the result; ``result['ok']`` says pass."""
    import opbridge

    from . import patch, unpatch
    from .agreement import compare, run
    from .patching import is_patched

    if any(is_patched(m) for m in model.modules()):
        raise ValueError("opbridge port-check: the model is already patched; pass an unpatched model")
    dtype = next(model.parameters()).dtype
    result: dict = {"backend": backend, "against": against, "dtype": str(dtype).removeprefix("torch."),
                    "quantize": quantize, "decode_steps": decode_steps, "input_shape": list(input_ids.shape),
                    "seconds": {}}
    low = dtype in ORACLE_FLOOR and against == "unpatched" and quantize is None and oracle
    if low:  # a float32 copy of the unpatched model: the yardstick for both low-precision runs
        o_model = copy.deepcopy(model).float()
    t0 = time.perf_counter()
    if against == "unpatched":
        ref = run(model, input_ids, decode_steps)
    result["seconds"]["reference"] = time.perf_counter() - t0
    report = patch(model, quantize=quantize)
    result["patch"] = report.to_dict()
    try:
        if against != "unpatched":
            t0 = time.perf_counter()
            with opbridge.use_backend(against):
                ref = run(model, input_ids, decode_steps)
            result["seconds"]["reference"] = time.perf_counter() - t0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            with opbridge.use_backend(backend):
                cand = run(model, input_ids, decode_steps, forced=ref.tokens)
            result["seconds"]["candidate"] = time.perf_counter() - t0
        result["fallbacks"] = sorted({str(w.message) for w in caught if "OPBRIDGE_FALLBACK" in str(w.message)})
    finally:
        unpatch(model)
    result["agreement"] = compare(ref, cand)
    if low:
        oracle_trace = run(o_model, input_ids, decode_steps, forced=ref.tokens)
        del o_model
        result["oracle"] = {who: {k: v for k, v in compare(oracle_trace, trace).items() if k in ("prefill", "decode")}
                            for who, trace in (("reference", ref), ("candidate", cand))}
    result["verdict"] = _verdict(result, dtype, against, quantize, low, max_diff)
    result["ok"] = not result["verdict"]["failures"]
    return result


def _verdict(result: dict, dtype, against: str, quantize: Optional[str], low: bool, max_diff: Optional[float]) -> dict:
    agr = result["agreement"]
    failures = []
    for part in ("prefill", "decode"):
        if not agr[part]["nonfinite_match"]:
            failures.append(f"{part}: NaN/Inf positions differ")
    if low and max_diff is None:
        # The unpatched model's own distance to the fp32 oracle is the noise scale of this dtype.
        floor = ORACLE_FLOOR[dtype]
        noise = max(result["oracle"]["reference"][part]["diff"] for part in ("prefill", "decode"))
        limit = max(floor, ORACLE_RATIO * noise)
        rule = f"diff to the fp32 oracle <= max({floor:g}, {ORACLE_RATIO:g} x the unpatched model's) = {limit:.3g}"
        for part in ("prefill", "decode"):
            c = result["oracle"]["candidate"][part]["diff"]
            if c > limit:
                failures.append(f"{part}: diff to the fp32 oracle {c:.3g} > {limit:.3g}")
    else:
        limit = max_diff if max_diff is not None else (QUANT_MAX_DIFF[quantize] if quantize else
                                                       MAX_DIFF.get(dtype, ORACLE_FLOOR.get(dtype, 1e-6)))
        rule = f"logits diff <= {limit:g}"
        for part in ("prefill", "decode"):
            if agr[part]["diff"] > limit:
                failures.append(f"{part}: logits diff {agr[part]['diff']:.3g} > {limit:g}")
    if agr["tokens"]["unexplained"]:
        failures.append(f"{agr['tokens']['unexplained']} greedy token(s) differ beyond numerical ties")
    return {"rule": rule, "failures": failures}


def _summary(result: dict) -> str:
    agr = result["agreement"]
    lines = [f"port-check: patched on '{result['backend']}' vs {result['against']}, {result['dtype']}"
             + (f", experts {result['quantize']}" if result["quantize"] else "")
             + f", input {tuple(result['input_shape'])}, {result['decode_steps']} decode steps"]
    kinds = result["patch"]["kinds"]
    lines.append("  patched: " + (", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())) or "nothing")
                 + (f"; left unpatched: {len(result['patch']['skipped'])}" if result["patch"]["skipped"] else ""))
    for s in result["patch"]["skipped"]:
        lines.append(f"    {s['path']} [{s['cls']}]: {s['reason']}")
    for f in result.get("fallbacks", []):
        lines.append(f"  fallback: {f}")
    for layer in agr["layers"]:
        lines.append(f"  layer {layer['layer']:>2}: diff {layer['diff']:.3e}  max_abs {layer['max_abs']:.3e}")
    for part in ("prefill", "decode"):
        lines.append(f"  {part} logits: diff {agr[part]['diff']:.3e}  max_abs {agr[part]['max_abs']:.3e}")
    if "oracle" in result:
        o = result["oracle"]
        lines.append(f"  vs fp32 oracle: unpatched {o['reference']['prefill']['diff']:.3e} / "
                     f"{o['reference']['decode']['diff']:.3e}, patched {o['candidate']['prefill']['diff']:.3e} / "
                     f"{o['candidate']['decode']['diff']:.3e} (prefill / decode)")
    tok = agr["tokens"]
    lines.append(f"  greedy tokens: {tok['agree']}/{tok['compared']} agree"
                 + (f" ({len(tok['mismatches']) - tok['unexplained']} numerical ties)" if tok["mismatches"] else ""))
    s = result["seconds"]
    lines.append(f"  time: reference {s.get('reference', 0):.2f} s, patched {s.get('candidate', 0):.2f} s")
    v = result["verdict"]
    lines.append(("PASS" if result["ok"] else "FAIL") + f" ({v['rule']})")
    lines += [f"  - {f}" for f in v["failures"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from .models import build_model, load_checkpoint

    dtype = DTYPES[args.dtype]
    if args.checkpoint:
        if not os.path.isdir(args.checkpoint):
            print(f"opbridge port-check: --checkpoint {args.checkpoint!r} is not a directory", file=sys.stderr)
            return 2
        model = load_checkpoint(args.checkpoint, dtype=dtype, device=args.device)
        source = args.checkpoint
    else:
        model = build_model(args.model, args.size, dtype=dtype, device=args.device, seed=args.seed)
        source = f"random {args.model} ({args.size})"
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), generator=g).to(args.device)
    result = check(model, ids, backend=args.backend, against=args.against, decode_steps=args.decode_steps,
                   quantize=args.quantize, oracle=not args.no_oracle, max_diff=args.max_diff)
    result["model"] = source
    if not args.quiet:
        print(f"model: {source}")
        print(_summary(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["ok"] else 1
