# Thin wrapper: aggregate -> peftlab.report.aggregate (after syncing queued MLflow records)
import _workflow_src  # noqa: F401  (this workflow's src/ first on sys.path)

from peftlab.cli import run_step
from peftlab.report import aggregate
from peftlab.tracking import sync_pending

sm = snakemake  # noqa: F821


def main():
    sync_pending(sm.params.mlflow)  # never raises: what cannot be synced stays queued
    aggregate(list(sm.input.finetune), list(sm.input.evaluate), sm.output.csv, sm.output.parquet)


run_step("aggregate", sm.log[0], main)
