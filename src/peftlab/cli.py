"""Glue for the thin workflow scripts: logging to the job's log file, one-line errors."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .errors import PeftlabError

T = TypeVar("T")


def run_step(name: str, log_path: str | None, fn: Callable[[], T]) -> T:
    """Run one stage with its output (logs, progress bars) in ``log_path``.

    A ``PeftlabError`` ends the job with its one-line message on the console and in the log
    (exit status 1); anything else keeps its traceback in the log. A result record with
    ``status: failed`` (a run that diverged) is a recorded outcome, not a crashed job: its
    reason goes to the console as one line and the job succeeds, so the DAG goes on.
    """
    console = sys.stderr
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        stream = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        sys.stderr = stream
        sys.stdout = stream
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("httpx", "urllib3", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        result = fn()
    except PeftlabError as exc:
        msg = f"peftlab {name}: {exc}"
        logging.getLogger("peftlab").error(msg)
        print(msg, file=console)
        sys.exit(1)
    if isinstance(result, dict) and result.get("status") == "failed":
        msg = f"peftlab {name}: {_run_name(result)} failed: {(result.get('failure') or {}).get('reason')}"
        logging.getLogger("peftlab").warning(msg)
        print(msg, file=console)
    return result


def _run_name(record: dict) -> str:
    run = record.get("run") or {}
    parts = [str(run[k]) for k in ("model", "task", "method", "variant") if k in run]
    return "/".join(parts) + (f"/seed{run['seed']}" if "seed" in run else "")
