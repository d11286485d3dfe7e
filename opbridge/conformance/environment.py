"""Where a run happened: device, driver, library versions, backend and settings (for report.json)."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
from typing import Optional

import torch

import opbridge
from opbridge.core import settings
from opbridge.core.registry import get_backend


def _version(dist: str) -> Optional[str]:
    # Read package metadata only: importing torch_npu without CANN breaks torch (PLATFORM.md).
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> Optional[str]:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit() -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(opbridge.__file__)))
    if not os.path.isdir(os.path.join(root, ".git")) or shutil.which("git") is None:
        return None
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_info(device: str) -> dict:
    d = torch.device(device)
    info: dict = {"device": str(d), "device_type": d.type}
    if d.type == "cuda":
        idx = d.index if d.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(device_name=props.name, compute_capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    driver=_nvidia_driver(), cuda_runtime=torch.version.cuda)
    elif d.type == "npu":
        npu = getattr(torch, "npu")
        info.update(device_name=npu.get_device_name(d), driver=None, cann=os.environ.get("ASCEND_TOOLKIT_HOME"))
    else:
        info.update(device_name=_cpu_name(), driver=None, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads())
    return info


def collect(backend: str, device: str, oracle_device: Optional[str] = None) -> dict:
    be = get_backend(backend)
    return {
        **device_info(device),
        "backend": backend,
        "backend_available": str(be.availability()),
        "backend_deterministic": be.deterministic,
        "oracle": f"reference backend, float64, on {oracle_device or device}",
        "settings": settings.describe(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "versions": {"opbridge": opbridge.__version__, "torch": torch.__version__, "triton": _version("triton"),
                     "torch_npu": _version("torch-npu") or _version("torch_npu"), "python": platform.python_version()},
        "git_commit": _git_commit(),
        "platform": platform.platform(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
