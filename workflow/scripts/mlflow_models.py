# Thin wrapper: mlflow_models[model,task] -> peftlab.registry.models_stage
from pathlib import Path

import _workflow_src  # noqa: F401  (this workflow's src/ first on sys.path)

from peftlab.cli import run_step
from peftlab.models import ModelSpec
from peftlab.registry import models_stage

sm = snakemake  # noqa: F821
w = sm.wildcards
exported = Path(sm.input.summary).parent / "export"  # the export rule's folders, by run

run_step(
    "mlflow_models",
    sm.log[0],
    lambda: models_stage(
        sm.input.summary,
        sm.input.stats,
        w.model,
        w.task,
        ModelSpec.from_config(w.model, sm.params.model),
        sm.params.mode,
        dict(sm.params.mlflow),
        sm.output.record,
        export_dirs={str(Path(p).relative_to(exported)): p for p in sm.input.exports},
    ),
)
