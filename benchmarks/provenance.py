"""Where a benchmark's figures came from: the git commit, whether the tree had changes, and versions.

Every results file records :func:`provenance` so a figure can be traced to the code that produced
it, and a stale one (code changed since) can be found by diffing its commit against HEAD.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def cpu_count() -> int:
    """CPU cores this process may use (the affinity mask, where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def provenance() -> dict[str, Any]:
    """The code and versions a run used: git commit (and whether the tree had changes), library and torch versions."""
    import pytorch_metric_learning

    import ssl_memory

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "ssl_memory": ssl_memory.__version__,
        "torch": torch.__version__,
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "python": platform.python_version(),
        # torch picks its CPU kernels by the vector instructions it finds: two machines that differ here can
        # differ in a float's last bits, and a training run's figures with them
        "machine": f"{platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), {cpu_count()} CPU cores"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
    }
