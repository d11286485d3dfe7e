"""`opbridge bench` on CPU at the small tier (the CI smoke test), and the FLOP / byte counts."""
import json

import pytest
import torch

from opbridge.conformance import bench_cli
from opbridge.conformance.bench import costs, timing
from opbridge.conformance.inputs import build


def test_costs():
    c = build("grouped_gemm", {"E": 4, "M": 64, "N": 32, "K": 128}, "cpu", 0)
    flops, nbytes = costs.cost(c, (torch.empty(64, 32, dtype=torch.bfloat16),))
    assert flops == 2 * 64 * 32 * 128
    assert nbytes >= 64 * 128 * 2 + 64 * 32 * 2
    c = build("sparse_attention", {"seqs": [[4, 8]], "Hq": 2, "Dqk": 16, "top_k": 8}, "cpu", 0)
    valid = int((c.named["indices"] >= 0).sum())
    assert costs.cost(c, ())[0] == 2 * valid * 2 * (16 + 16)
    c = build("moe", {"T": 8, "H": 32, "I": 16, "E": 4, "k": 2, "routing": "with_-1"}, "cpu", 0)
    valid = int((c.named["topk_ids"] >= 0).sum())
    assert costs.cost(c, ())[0] == 6 * valid * 32 * 16


def test_timing_rotation_and_median():
    assert timing.sets_needed(10, torch.device("cpu")) == 1
    calls = []
    t = timing.measure(lambda i: calls.append(i), 3, torch.device("cpu"), timing.Budget(1, 5, 5, 0.0))
    assert t.reps == 5 and t.sets == 3 and t.method == "wall clock"
    assert set(calls) == {0, 1, 2}  # every input set used


def test_bench_cli_smoke(tmp_path, capsys):
    parser = __import__("argparse").ArgumentParser()
    bench_cli.add_arguments(parser)
    args = parser.parse_args(["--backend", "reference", "--device", "cpu", "--ops", "moe", "mhc_pre", "window_indices", "--out", str(tmp_path)])
    assert bench_cli.run(args) == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["ceilings"]["bf16_gemm"]["tflops"] > 0 and res["ceilings"]["copy"]["gbps"] > 0
    assert "reason" in res["ceilings"]["fp8_gemm"]  # no fp8 GEMM on a CPU, and it says why
    by_op = {r["op"]: r for r in res["results"]}
    assert set(by_op) == {"moe", "mhc_pre", "window_indices"}
    assert all(r["status"] == "ok" and r["timing"]["median_ms"] > 0 for r in by_op.values())
    assert by_op["moe"]["flops"] > 0 and by_op["window_indices"]["flops"] == 0
    peers = {p["name"]: p for p in by_op["moe"]["peers"]}
    assert peers["per-expert loop"]["status"] == "ok"
    assert peers["torch._grouped_mm pipeline"]["status"] == "n/a"
    assert {p["name"]: p["status"] for p in by_op["mhc_pre"]["peers"]} == {"eager": "ok", "torch.compile": "skipped"}
    md = (tmp_path / "bench.md").read_text()
    assert "| moe | v3-bf16 | ok |" in md and "% roof" in md
    pytest.importorskip("matplotlib")  # optional: without it bench.json says why there is no chart
    assert (tmp_path / "bench.png").stat().st_size > 1000
