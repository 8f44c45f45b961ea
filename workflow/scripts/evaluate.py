# Thin wrapper: evaluate[model,task,method,variant,seed] -> peftlab.evaluate.evaluate
from pathlib import Path

import _workflow_src  # noqa: F401  (this workflow's src/ first on sys.path)

from peftlab.cli import run_step
from peftlab.config import RunKey
from peftlab.evaluate import evaluate
from peftlab.io import read_json
from peftlab.models import ModelSpec
from peftlab.tracking import log_record

sm = snakemake  # noqa: F821
w = sm.wildcards


def main():
    key = RunKey(w.model, w.task, w.method, w.variant, int(w.seed))
    record = evaluate(
        key,
        ModelSpec.from_config(w.model, sm.params.model),
        data_dir=Path(sm.input.stats).parent,
        finetune_record_path=sm.input.record,
        weights_path=sm.input.weights,
        out_path=sm.output.metrics,
        predictions_path=sm.output.predictions,
        threads=sm.threads,
    )
    # tagged with its finetune run's config hash, so the MLflow UI groups the two
    config_hash = read_json(sm.input.record).get("config_hash")
    log_record(record, sm.output.metrics, sm.params.mlflow, tags={"config_hash": config_hash})


run_step("evaluate", sm.log[0], main)
