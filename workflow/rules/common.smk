# Helpers for the workflow files: config validation, run discovery, input functions.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from peftlab.config import experiment_files, iter_runs, validate_config
from peftlab.errors import PeftlabError
from peftlab.io import files_fingerprint
from peftlab.methods import method_source_files
from peftlab.tracking import default_store

try:
    validate_config(config)
except PeftlabError as exc:
    sys.exit(f"peftlab: {exc}")

RESULTS = config["results_dir"]
RUNS = list(iter_runs(config))
SRC = Path(workflow.basedir) / "src" / "peftlab"
# config.yaml's mlflow section plus the embedded default store (absolute: jobs may run
# on other nodes of a shared filesystem)
MLFLOW = dict(config["mlflow"], default_store=default_store(RESULTS))
NAME = "[A-Za-z0-9][A-Za-z0-9_.-]*"


RUN_DIR = "{model}/{task}/{method}/{variant}/seed{seed}"


def run_path(stage, key, name):
    return f"{RESULTS}/{stage}/{key.path()}/{name}"


def all_targets():
    return [config["report_path"], f"{RESULTS}/summary.csv"]


def experiment_inputs(wildcards):
    """The two YAML files that define this run's experiment (reruns when they change)."""
    return [
        str(p)
        for p in experiment_files(
            config["experiments_dir"], wildcards.method, wildcards.variant
        )
    ]


def method_code(wildcards):
    """Fingerprint of the code a method's results depend on: its module, the method base,
    the training loop and model loading. Editing another method's module leaves it alone.
    """
    shared = [SRC / "train.py", SRC / "models.py", SRC / "metrics.py"]
    return files_fingerprint(method_source_files(wildcards.method) + shared)


def all_finetune_records(wildcards):
    return [run_path("finetune", k, "result.json") for k in RUNS]


def all_evaluate_records(wildcards):
    return [run_path("evaluate", k, "metrics.json") for k in RUNS]
