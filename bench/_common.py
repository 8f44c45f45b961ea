"""Helpers every benchmark uses: a measurement in a fresh process, peak resident memory,
writing a benchmark's JSON and markdown table."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRSS:
    """Peak resident set inside the ``with`` block above the RSS at its start, sampled
    every 2 ms: ``with PeakRSS() as mem: ...; mem.mb``."""

    def __enter__(self) -> PeakRSS:
        self.base, self.peak, self._done = rss_mb(), 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.mb = max(self.peak, rss_mb()) - self.base


def in_fresh_process(module: str, call: str) -> dict:
    """``module.call`` (a Python expression returning JSON-able data) in a new interpreter,
    so that each measurement has its own peak memory and allocator state."""
    code = (f"import sys, json; sys.path.insert(0, {str(BENCH)!r}); import {module};"
            f"print('RESULT ' + json.dumps({module}.{call}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{module}.{call} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def write_outputs(out: Path, name: str, data: dict, table: str) -> None:
    """``<out>/<name>.json`` and ``<out>/<name>.md``; the table is also printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))
    (out / f"{name}.md").write_text(table)
    print(table)
