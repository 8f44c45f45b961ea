"""Reproducibility: seeding, library versions, git commit, peak memory."""

from __future__ import annotations

import os
import platform
import random
import resource
import subprocess
import sys
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import torch

_PACKAGES = ("torch", "transformers", "peft", "datasets", "numpy", "pandas", "mlflow", "snakemake")


def set_seed(seed: int, threads: int | None = None, deterministic: bool = True) -> None:
    """Seed every RNG and, unless ``deterministic`` is False, make torch kernels deterministic
    (bitwise-repeatable on CPU; on a GPU it may cost speed: ``training.deterministic``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if threads:
        torch.set_num_threads(threads)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    from . import __version__

    out["peftlab"] = __version__
    return out


@lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD of the checkout peftlab runs from, with ``-dirty`` when files are modified."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@cache
def device_name(dev: torch.device) -> str:
    """What the run's numbers were measured on: the GPU's name, or the CPU's model name
    (jobs of one cluster run can land on different hardware; the report flags a mix)."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def peak_memory_mb(dev: torch.device) -> dict[str, float]:
    """Peak host RSS of this process, and peak GPU memory allocated when on a GPU."""
    out = {"host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if dev.type == "cuda":
        out["gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out
