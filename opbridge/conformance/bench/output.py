"""bench.json, bench.md (ratios to the best peer and to the roofline) and bench.png (matplotlib, optional)."""
from __future__ import annotations

import json
import os
from typing import Optional


def _fmt(v, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def _best_peer(rec: dict) -> Optional[dict]:
    ok = [p for p in rec.get("peers", []) if p["status"] == "ok"]
    return min(ok, key=lambda p: p["timing"]["median_ms"]) if ok else None


def markdown(res: dict) -> str:
    env, ceil = res["environment"], res["ceilings"]
    lines = [f"# opbridge bench: `{res['backend']}` on {env.get('device_name')} ({res['device']}), {res['tier']} tier", "",
             f"torch {env['versions']['torch']}, triton {env['versions'].get('triton') or '-'}, "
             f"driver {env.get('driver') or '-'}, commit {env.get('git_commit') or '-'}, {env['created']}. "
             f"Timing: {res['results'][0]['timing']['method'] if res['results'] and 'timing' in res['results'][0] else '-'}, "
             "median after warm-up, inputs rotated past 2x L2, random data.", "",
             "## Device ceilings (measured in this run)", "", "| ceiling | value |", "|---|---:|"]
    lines.append(f"| {ceil['bf16_gemm']['name']} | {_fmt(ceil['bf16_gemm'].get('tflops'), '.3g')} TFLOP/s |")
    fp8 = ceil["fp8_gemm"]
    lines.append(f"| {fp8['name']} | " + (f"{fp8['tflops']:.3g} TFLOP/s |" if fp8.get("tflops") else f"n/a: {fp8.get('reason')} |"))
    lines.append(f"| {ceil['copy']['name']} | {_fmt(ceil['copy'].get('gbps'), '.3g')} GB/s |")
    lines += ["", "## Ops", "",
              "`roofline` = max(FLOPs / GEMM ceiling, bytes / copy bandwidth); `% roof` = roofline time / measured time. "
              "`vs peer` = peer time / op time (> 1: opbridge is faster).", "",
              "| op | case | status | median ms | TFLOP/s | GB/s | % roof | bound | best peer | peer ms | vs peer |",
              "|---|---|---|---:|---:|---:|---:|---|---|---:|---:|"]
    for r in res["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['op']} | {r['case']} | {r['status']} | | | | | | {r.get('reason', '')[:80]} | | |")
            continue
        p = _best_peer(r)
        frac = r.get("fraction_of_roofline")
        peer = f"{p['name']} | {p['timing']['median_ms']:.3f} | {p['speedup_vs_peer']:.2f}" if p else "- | | "
        lines.append(f"| {r['op']} | {r['case']} | ok | {r['timing']['median_ms']:.3f} | {_fmt(r.get('tflops'))} | "
                     f"{_fmt(r.get('gbps'))} | {_fmt(frac * 100 if frac else None, '.1f')} | {r.get('bound', '-')} | "
                     f"{peer} |")
    peers = [(r, p) for r in res["results"] for p in r.get("peers", []) if p["status"] != "ok"]
    if peers:
        lines += ["", "Peers not timed:", ""]
        lines += [f"- {r['op']}/{r['case']} {p['name']}: {p['status']} ({p.get('reason', '')})" for r, p in peers]
    return "\n".join(lines) + "\n"


def chart(res: dict, path: str) -> Optional[str]:
    """A bar chart of % of roofline per op; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib is not installed ({e}); pip install 'opbridge[bench]' for bench.png"
    rows = [r for r in res["results"] if r["status"] == "ok" and r.get("fraction_of_roofline")]
    labels = [f"{r['op']}/{r['case']}" for r in rows]
    vals = [100 * r["fraction_of_roofline"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.35 * max(len(rows), 4) + 1.2))
    colors = ["tab:blue" if r.get("bound") == "compute" else "tab:orange" for r in rows]
    ax.barh(labels[::-1], vals[::-1], color=colors[::-1])
    ax.set_xlabel("% of roofline (blue: GEMM-bound, orange: bandwidth-bound)")
    ax.set_title(f"opbridge {res['backend']} on {res['environment'].get('device_name')} ({res['tier']} tier)")
    ax.axvline(100, color="grey", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(res: dict, directory: str) -> dict:
    os.makedirs(directory, exist_ok=True)
    paths = {"json": os.path.join(directory, "bench.json"), "md": os.path.join(directory, "bench.md"),
             "png": os.path.join(directory, "bench.png")}
    with open(paths["md"], "w") as f:
        f.write(markdown(res))
    why = chart(res, paths["png"])
    if why:
        res["chart"] = why
        paths.pop("png")
    with open(paths["json"], "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    return paths
