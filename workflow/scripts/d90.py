# Thin wrapper: d90[model,task] -> peftlab.intrinsic.d90_stage (bisection runs included)
from pathlib import Path

import _workflow_src  # noqa: F401  (this workflow's src/ first on sys.path)

from peftlab.cli import run_step
from peftlab.config import TrainConfig
from peftlab.intrinsic import d90_record
from peftlab.models import ModelSpec
from peftlab.tracking import log_record

sm = snakemake  # noqa: F821
w = sm.wildcards


def main():
    record = d90_record(
        ModelSpec.from_config(w.model, sm.params.model),
        data_dir=Path(sm.input.stats).parent,
        record_paths=sm.input.records,
        reference_paths=sm.input.reference,
        out_path=sm.output.record,
        settings=sm.params.settings,
        training=TrainConfig(**sm.params.training),
        threads=sm.threads,
        reference_run_paths=sm.input.reference_runs,
    )
    log_record(record, sm.output.record, sm.params.mlflow)
    return record


run_step("d90", sm.log[0], main)
