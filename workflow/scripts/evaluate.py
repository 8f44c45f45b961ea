# Thin wrapper: evaluate[model,task,method,variant,seed] -> peftlab.evaluate.evaluate
from pathlib import Path

from peftlab.cli import run_step
from peftlab.config import RunKey
from peftlab.evaluate import evaluate
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
        threads=sm.threads,
    )
    log_record(record, sm.output.metrics, sm.params.mlflow)


run_step("evaluate", sm.log[0], main)
