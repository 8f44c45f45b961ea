# Thin wrapper: export[model,task,method,variant,seed] -> peftlab.artifacts.export_stage
from pathlib import Path

import _workflow_src  # noqa: F401  (this workflow's src/ first on sys.path)

from peftlab.artifacts import export_stage
from peftlab.cli import run_step
from peftlab.models import ModelSpec

sm = snakemake  # noqa: F821
w = sm.wildcards

run_step(
    "export",
    sm.log[0],
    lambda: export_stage(
        Path(sm.input.record).parent,
        ModelSpec.from_config(w.model, sm.params.model),
        Path(sm.input.stats).parent,
        sm.output[0],
    ),
)
