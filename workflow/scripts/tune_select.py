# Thin wrapper: tune_select[model,task,method,variant] -> peftlab.tuning.write_selection
import _workflow_src  # noqa: F401  (this workflow's src/ first on sys.path)

from peftlab.cli import run_step
from peftlab.tuning import write_selection

sm = snakemake  # noqa: F821
w = sm.wildcards

run_step(
    "tune_select",
    sm.log[0],
    lambda: write_selection(
        {"model": w.model, "task": w.task, "method": w.method, "variant": w.variant},
        list(sm.params.points),
        list(sm.params.seeds),
        list(sm.input.trials),
        dict(sm.params.budget),
        sm.output[0],
        dict(sm.params.mlflow),
    ),
)
