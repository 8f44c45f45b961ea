# Thin wrapper: comparison_report -> peftlab.report.write_report
import _workflow_src  # noqa: F401  (this workflow's src/ first on sys.path)

from peftlab.cli import run_step
from peftlab.report import write_report

sm = snakemake  # noqa: F821

run_step(
    "comparison_report",
    sm.log[0],
    lambda: write_report(
        sm.input.summary,
        list(sm.input.stats),
        dict(sm.params.config),
        sm.output.html,
        finetune_paths=list(sm.input.finetune),
        analysis_paths=list(sm.input.analyses),
        gift_paths=list(sm.input.gift),
        mlflow_config=dict(sm.params.mlflow),
        figures_dir=sm.output.figures,
        tuning_paths=list(sm.input.tuning),
    ),
)
