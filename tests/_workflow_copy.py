"""The workflow in a scratch folder, so a run never touches the checkout's results: used by the
pipeline tests and by ``bench/pipeline_scale.py``."""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def workflow_copy(dest: Path, extra: tuple[str, ...] = ()) -> Path:
    """Snakefile, workflow/, config/, envs/, src/ (plus ``extra`` top-level entries, e.g.
    the SLURM profile) and tests/configs/ copied under ``dest``; returns ``dest``."""
    for name in ("Snakefile", "workflow", "config", "envs", "src", *extra):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / name)
    shutil.copytree(REPO / "tests" / "configs", dest / "tests" / "configs")
    return dest
