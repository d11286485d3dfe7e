"""Expert parallelism on CPU over gloo: 2 and 4 ranks on loopback, spawned here, bounded in time.

One spawn per group size runs every check of ep_worker.py (process start-up is the slow part);
each rank compares its result with single-process ``opbridge.moe`` over all experts.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

import opbridge
from opbridge.distributed import ep_moe

WORKER = Path(__file__).with_name("ep_worker.py")
REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 100


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, tmp_path: Path) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env.pop("OPBRIDGE_VALIDATE", None)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), str(port), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            logs.append(out)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{world}-rank run did not finish in {TIMEOUT_S}s (a hang)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for r in range(world):
        path = tmp_path / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote no results; its output:\n{logs[r][-3000:]}"
        results.append(json.loads(path.read_text()))
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{logs[r][-3000:]}"
    return results


def _assert_all(results: list[dict], expected_checks: int) -> None:
    failures = [f"rank {r} {name}:\n{detail}" for r, res in enumerate(results)
                for name, (ok, detail) in res.items() if not ok]
    assert not failures, "\n".join(failures)
    assert all(len(res) == expected_checks for res in results), [sorted(res) for res in results]


def _num_checks() -> int:
    sys.path.insert(0, str(WORKER.parent))
    try:
        import ep_worker
    finally:
        sys.path.pop(0)
    return len(ep_worker.CHECKS)


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_gloo(world: int, tmp_path: Path) -> None:
    _assert_all(_run(world, tmp_path), _num_checks())


def test_uninitialised_group_is_a_clear_error() -> None:
    assert not dist.is_initialized()
    import torch
    x = torch.randn(2, 8)
    with pytest.raises(opbridge.OpError, match="init_process_group"):
        ep_moe(x, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int32), torch.randn(1, 4, 8), torch.randn(1, 8, 2))
