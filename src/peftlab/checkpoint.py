"""Resumable training: when to checkpoint, and the checkpoint file itself.

A training job on a cluster can stop at any moment: its time limit, preemption, a failed
node. SLURM sends SIGTERM before it kills a job, but under cgroup process tracking only the
job step's direct children get it, not a program that Snakemake started (that one only gets
SIGKILL), so the trainer does not rely on signals alone. It checkpoints

- every ``every_steps`` optimizer steps and every ``every_seconds`` of wall time (what a SIGKILL
  loses at most),
- when a SIGTERM arrived (other launchers, or `snakemake -c` killed with SIGTERM), then stops,
- when the SLURM job has less than ``margin_seconds`` left (``squeue -h -j $SLURM_JOB_ID -o %L``),
  then stops: the retried or requeued job resumes instead of being killed mid-step.

Settings come from the environment (``CheckpointPolicy.from_env``), so they reach cluster jobs
without being rule parameters (changing them reruns nothing):
``PEFTLAB_CHECKPOINT_EVERY_STEPS`` (default 500), ``PEFTLAB_CHECKPOINT_EVERY_SECONDS`` (600) and
``PEFTLAB_CHECKPOINT_MARGIN_SECONDS`` (300); 0 turns one off.

The checkpoint is one safetensors file (tensors, plus the JSON state in its metadata): loading
it runs no pickle. It carries the fingerprint of the run (resolved config, data, code); a file
with another fingerprint is stale and is discarded, never resumed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, PeftlabError
from .io import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_DIR = ".checkpoint"
FORMAT = 1


class TrainingInterrupted(PeftlabError):
    """Training stopped early (SIGTERM or the job's time running out) after saving a checkpoint;
    the job fails so that its rerun resumes. Not a TrainingError: nothing is wrong with the run."""


def checkpoint_path(record_path: str | Path) -> Path:
    """Where the run whose record goes to ``record_path`` keeps its checkpoint: a hidden folder
    beside the record, outside the rule's declared outputs (Snakemake deletes those before
    running a job again; this file must survive until the run completes)."""
    return Path(record_path).parent / CHECKPOINT_DIR / f"{Path(record_path).stem}.safetensors"


@dataclass(frozen=True)
class CheckpointPolicy:
    every_steps: int = 500
    every_seconds: float = 600.0
    margin_seconds: float = 300.0

    _ENV = {"every_steps": "PEFTLAB_CHECKPOINT_EVERY_STEPS",
            "every_seconds": "PEFTLAB_CHECKPOINT_EVERY_SECONDS",
            "margin_seconds": "PEFTLAB_CHECKPOINT_MARGIN_SECONDS"}

    @classmethod
    def from_env(cls, environ: dict | None = None) -> CheckpointPolicy:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field, var in cls._ENV.items():
            raw = environ.get(var, "").strip()
            if not raw:
                continue
            try:
                value = int(raw) if field == "every_steps" else float(raw)
            except ValueError:
                value = -1
            if value < 0:
                raise ConfigError(f"{var}={raw!r} is not a number >= 0; set it to e.g. "
                                  f"{getattr(cls, field)!r} or 0 to turn this checkpoint off")
            values[field] = value
        return cls(**values)


_TIME_LEFT = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$")


def parse_time_left(text: str) -> float | None:
    """Seconds in squeue's ``%L`` (``[days-][hours:]minutes:seconds``); None for UNLIMITED,
    NOT_SET or anything else."""
    m = _TIME_LEFT.match(text.strip())
    if not m:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


class SlurmDeadline:
    """When this SLURM job's time limit ends (monotonic clock), re-read from squeue at most once a
    minute (an administrator may extend it). Outside a SLURM job, or when squeue does not
    answer, there is no deadline."""

    def __init__(self, job_id: str | None = None, refresh_seconds: float = 60.0):
        self.job_id = job_id if job_id is not None else os.environ.get("SLURM_JOB_ID")
        self.refresh = refresh_seconds
        self._deadline: float | None = None
        self._checked = -float("inf")

    def seconds_left(self) -> float | None:
        if not self.job_id:
            return None
        now = time.monotonic()
        if now - self._checked >= self.refresh:
            self._checked = now
            left = self._query()
            self._deadline = None if left is None else now + left
        return None if self._deadline is None else self._deadline - now

    def _query(self) -> float | None:
        try:
            out = subprocess.run(["squeue", "-h", "-j", str(self.job_id), "-o", "%L"],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("squeue failed (%s): no time-limit checkpoint for job %s", exc, self.job_id)
            return None
        return parse_time_left(out.stdout) if out.returncode == 0 else None


class StopSignal:
    """While active, SIGTERM sets ``received`` instead of killing the process, so the trainer
    can save a checkpoint at the end of the current step (main thread only)."""

    def __init__(self):
        self.received: str | None = None
        self._previous = None

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint after this step, then stopping", self.received)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------------------
# What goes into the file
# ----------------------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Python, numpy, torch (CPU and CUDA) generator states as (tensors, JSON)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(mt), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state_dict split into tensors (per-parameter state) and JSON (groups)."""
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The state_dict that ``optimizer_state`` split."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save(path: str | Path, fingerprint: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write the checkpoint atomically (temp file, fsync, rename): a kill mid-write leaves the
    previous checkpoint in place."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {"format": FORMAT, "fingerprint": fingerprint, "state": meta}
    with atomic_path(path, suffix=".safetensors") as tmp:
        # allow_nan: -inf (no best step yet) and NaN metrics round-trip exactly
        save_file(tensors, str(tmp), metadata={"peftlab": json.dumps(header, allow_nan=True)})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())


def load(path: str | Path, fingerprint: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The checkpoint at ``path`` when it belongs to the run with ``fingerprint``; None when there
    is none. A stale (other config or code) or unreadable file is removed, with a warning."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = json.loads((fh.metadata() or {})["peftlab"])
            if header.get("format") != FORMAT or header.get("fingerprint") != fingerprint:
                reason = "it was written for another config, data or code"
            else:
                return {k: fh.get_tensor(k) for k in fh.keys()}, header["state"]
    except Exception as exc:  # noqa: BLE001 - any unreadable file is discarded, never trusted
        reason = f"it cannot be read ({type(exc).__name__}: {exc})"
    log.warning("discarding the checkpoint %s: %s; training starts from step 0", path, reason)
    remove(path)
    return None


def remove(path: str | Path) -> None:
    path = Path(path)
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass  # other runs' checkpoints share the folder
