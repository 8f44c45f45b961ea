# Thin wrapper: finetune[model,task,method,variant,seed] -> peftlab.train.finetune
import sys
from pathlib import Path

import _workflow_src  # noqa: F401  (this workflow's src/ first on sys.path)

from peftlab.cli import run_step
from peftlab.config import RunKey, TrialKey, load_experiment
from peftlab.distributed import finetune_processes
from peftlab.export import weights_to_log
from peftlab.models import ModelSpec
from peftlab.tracking import log_record
from peftlab.train import finetune

sm = snakemake  # noqa: F821
w = sm.wildcards


def main():
    # a tuning trial (rule tune_trial) or a final run (rule finetune)
    ident = (w.model, w.task, w.method, w.variant, int(w.seed))
    key = TrialKey(*ident, trial=int(w.trial)) if "trial" in w.keys() else RunKey(*ident)
    # input.experiment = [<experiments_dir>/defaults.yaml, <experiments_dir>/<method>/<variant>.yaml]
    experiments_dir = Path(sm.input.experiment[0]).parent
    tuned = sm.params.tuned  # the grid point (and budget) tuning gives this run, or None
    experiment = load_experiment(experiments_dir, w.method, w.variant, sm.params.training, tuned, task=w.task)
    if sm.input.mask:  # SIFT on the gradient-sparsity stage's index sets
        experiment.method_params["mask_path"] = sm.input.mask[0]
    spec = ModelSpec.from_config(w.model, sm.params.model)
    data_dir = Path(sm.input.stats).parent
    processes = (sm.params.model or {}).get("gpus", 1)
    if processes > 1:  # torchrun starts one process per GPU; process 0 writes the outputs
        record = finetune_processes(processes, key, sm.params.model, experiments_dir, sm.params.training,
                                    sm.input.mask[0] if sm.input.mask else None, data_dir, sm.output.weights,
                                    sm.output.record, sm.threads, sm.params.code, stream=sys.stderr, tuned=tuned)
    else:
        record = finetune(key, spec, experiment, data_dir=data_dir, weights_path=sm.output.weights,
                          record_path=sm.output.record, threads=sm.threads, code_fingerprint=sm.params.code)
    if sm.params.mlflow is None:  # a trial: its selection logs it to MLflow
        return record
    # log_weights from the config, not params: changing it must not rerun training
    mlflow = dict(sm.params.mlflow, log_weights=sm.config["mlflow"].get("log_weights", "none"))
    weights = weights_to_log(mlflow, key, spec, record, data_dir, sm.output.weights)
    log_record(record, sm.output.record, mlflow, artifacts=weights)
    return record


run_step("finetune", sm.log[0], main)
