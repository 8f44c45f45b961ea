"""Imported first by every workflow script: puts this workflow's own ``src/`` first on
``sys.path``, so a job runs the code its rerun fingerprint hashes (``peftlab.codegraph``), not
a ``peftlab`` installed elsewhere (the checkout a copy of the workflow was made from, say).
Snakemake puts a script's folder on ``sys.path``, which is how the scripts find this file."""

import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")
if sys.path[:1] != [SRC]:
    sys.path.insert(0, SRC)
