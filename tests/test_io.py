"""Atomic outputs: a writer killed mid-write leaves the old file or none, never half a file."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


@pytest.mark.parametrize("kind", ["json", "safetensors", "parquet", "csv", "html"])
def test_writer_killed_mid_write_leaves_no_partial_file(tmp_path, kind):
    dest = tmp_path / f"out.{kind}"
    dest.write_text("previous complete version")
    # each writer as the stages call it, killed (SIGKILL) after it has written part of the data
    body = {
        "json": "write_json(dest, {'x': 1})",
        "html": "write_text(dest, '<html>' * 10)",
        "safetensors": "import torch\nfrom safetensors.torch import save_file\n"
                       "with atomic_path(dest, suffix='.safetensors') as tmp:\n"
                       "    save_file({'w': torch.zeros(1000)}, str(tmp))\n    die()",
        "parquet": "import pandas as pd\nwith atomic_path(dest, suffix='.parquet') as tmp:\n"
                   "    pd.DataFrame({'a': range(1000)}).to_parquet(tmp)\n    die()",
        "csv": "import pandas as pd\nwith atomic_path(dest, suffix='.csv') as tmp:\n"
               "    pd.DataFrame({'a': range(1000)}).to_csv(tmp)\n    die()",
    }[kind]
    script = textwrap.dedent("""
        import os, signal
        from pathlib import Path
        import peftlab.io as io
        from peftlab.io import atomic_path, write_json, write_text

        def die():
            os.kill(os.getpid(), signal.SIGKILL)

        def replace_then_never(src, dst):  # killed at the last moment: the data is written, not renamed
            die()
        io.os.replace = replace_then_never
        dest = Path({dest!r})
    """).format(dest=str(dest)) + body + "\n"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == -9, res.stderr[-2000:]
    assert dest.read_text() == "previous complete version"  # the old complete file, untouched
    leftovers = [p.name for p in tmp_path.iterdir() if p != dest]
    assert all(name.startswith(f".{dest.name}.") for name in leftovers)  # only a hidden temp file
