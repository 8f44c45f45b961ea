# Helpers for the workflow files: config validation, run discovery, input functions.
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from peftlab.config import retype_overrides, validate_config
from peftlab.errors import PeftlabError
from peftlab.tuning import check_tuning


def _shown(path):
    """A path as the user would write it: relative below the working directory."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def config_name():
    """The config file named in error messages: the one in effect, else 'config'."""
    settings = workflow.config_settings
    cli = [_shown(p) for p in workflow.overwrite_configfiles]
    files = (
        cli
        if (cli and settings.replace_workflow_config)
        else ["config/config.yaml", *cli]
    )
    return files[0] if len(files) == 1 and not settings.config else "config"


# checked before anything else is imported or planned: a bad config stops the DAG with one
# line naming the key, the bad value and what is allowed
try:
    retype_overrides(config, workflow.config_settings.config)
    validate_config(config, config_name())
    check_tuning(config, config_name())
except PeftlabError as exc:
    sys.exit(f"peftlab: {exc}")

from peftlab.config import (
    analysis_training,
    experiment_files,
    iter_runs,
    sift_analysis_variants,
)
from peftlab.codegraph import METHOD_RULES, CodeGraph
from peftlab.report import figures_dir_for
from peftlab.tracking import default_store
from peftlab.tuning import read_selection, trial_settings, tuned_variants

RESULTS = config["results_dir"]
RUNS = list(iter_runs(config))
# config.yaml's mlflow section plus the embedded default store (absolute: jobs may run
# on other nodes of a shared filesystem), without log_weights and log_model: the jobs' params
# must not change with them (finetune reads log_weights from the config; log_model is the
# mlflow_models rule's own param), so they never rerun training
MLFLOW = {
    k: v
    for k, v in config["mlflow"].items()
    if k not in ("log_weights", "log_model", "ui_url")
}
MLFLOW["default_store"] = default_store(RESULTS)
# the report's: plus the MLflow UI its run links lead to
MLFLOW_REPORT = MLFLOW | {"ui_url": config["mlflow"]["ui_url"]}
NAME = "[A-Za-z0-9][A-Za-z0-9_.-]*"
# analyses: intrinsic dimension (on when it has a grid of d) and gradient sparsity
ID = config["analyses"]["intrinsic_dimension"]
ID_TRAINING = analysis_training(config).to_dict() if ID["dims"] else {}
SPARSITY = config["analyses"]["gradient_sparsity"]
# SIFT variants whose masks come from the gradient-sparsity stage (mask_source: analysis)
SIFT_ANALYSIS = sift_analysis_variants(config)
MODEL_TASKS = [(m, t) for m in config["models"] for t in config["tasks"]]
# tuning: (method, variant) -> its grid points, for the variants the config tunes
TUNED = tuned_variants(config)
TUNING_SEEDS = config["tuning"]["seeds"]
# the report's figures as PNG files too (snakemake --report shows them)
REPORT_FIGURES = str(figures_dir_for(config["report_path"]))


RUN_DIR = "{model}/{task}/{method}/{variant}/seed{seed}"


def run_path(stage, key, name):
    return f"{RESULTS}/{stage}/{key.path()}/{name}"


def all_targets():
    return (
        [config["report_path"], f"{RESULTS}/summary.csv"]
        + analysis_records()
        + exports()
        + mlflow_models_records()
    )


def exports():
    """The export folders of every final run (config export: all), else none."""
    if config["export"] != "all":
        return []
    return [f"{RESULTS}/export/{key.path()}" for key in RUNS]


def mlflow_models_records():
    """Each task's MLflow models record (config mlflow.log_model: best or all), else none."""
    if config["mlflow"]["log_model"] == "none":
        return []
    return [f"{RESULTS}/mlflow_models/{m}/{t}.json" for m, t in MODEL_TASKS]


def task_run_files(wildcards, stage, name):
    """One file of every final run of the task (model, task) in the wildcards."""
    return [
        run_path(stage, k, name)
        for k in RUNS
        if (k.model, k.task) == (wildcards.model, wildcards.task)
    ]


def analysis_records(wildcards=None):
    """The analyses' outputs the report shows (empty when both analyses are off)."""
    out = []
    for m, t in MODEL_TASKS:
        if SPARSITY["enabled"]:
            out.append(f"{RESULTS}/analyses/{m}/{t}/gradient_sparsity/sparsity.json")
        if ID["dims"]:
            out.append(f"{RESULTS}/analyses/{m}/{t}/intrinsic_dimension/d90.json")
    return out


def sift_mask_input(wildcards):
    """A SIFT variant with mask_source: analysis trains on the gradient-sparsity stage's masks."""
    if wildcards.method == "sift" and wildcards.variant in SIFT_ANALYSIS:
        return [
            f"{RESULTS}/analyses/{wildcards.model}/{wildcards.task}/gradient_sparsity/"
            f"sift_mask_{wildcards.variant}.safetensors"
        ]
    return []


# the two YAML files that define a run's experiment (reruns when they change): patterns,
# not an input function, which costs per job on a large grid
EXPERIMENT_FILES = [
    str(p) for p in experiment_files(config["experiments_dir"], "{method}", "{variant}")
]


# what a fine-tuning job reads, for a final run (rule finetune, which adds the selection it
# trains at) and for a tuning trial (rule tune_trial)
TRAIN_INPUT = dict(
    train=f"{RESULTS}/data/{{model}}/{{task}}/train.parquet",
    validation=f"{RESULTS}/data/{{model}}/{{task}}/validation.parquet",
    stats=f"{RESULTS}/data/{{model}}/{{task}}/stats.json",
    experiment=EXPERIMENT_FILES,
    mask=sift_mask_input,
)


# the code the jobs of each rule run (its script plus the closure of the script's imports inside
# src/peftlab, and of the job's method module for finetune and evaluate); each file is read
# and hashed once per DAG build (src/peftlab/codegraph.py)
try:
    CODE = CodeGraph(workflow.basedir)
except PeftlabError as exc:
    sys.exit(f"peftlab: {exc}")


def code_of(name):
    """The `code` param of the rule called `name`, the fingerprint of the code its jobs run.
    Snakemake reruns a job whose params changed, so an edit reruns exactly the jobs whose
    code includes it."""
    if name in METHOD_RULES:
        return lambda wildcards: CODE.fingerprint(name, wildcards.method)
    return CODE.fingerprint(name)


TRIAL_DIR = "{model}/{task}/{method}/{variant}/trial{trial}/seed{seed}"
SELECTION = "{model}/{task}/{method}/{variant}/selected.json"


def _cell(wildcards):
    """The (model, task, method, variant) wildcards of a job, by name."""
    return {k: getattr(wildcards, k) for k in ("model", "task", "method", "variant")}


def trial_point(wildcards):
    """What one tuning trial trains with: its grid point over the tuning budget."""
    return trial_settings(
        TUNED[(wildcards.method, wildcards.variant)],
        config["tuning"]["training"],
        int(wildcards.trial),
    )


def trial_records(wildcards):
    """Every trial record of one tuned (model, task, method, variant): per point, per seed."""
    points = TUNED[(wildcards.method, wildcards.variant)]
    return [
        f"{RESULTS}/tune/{TRIAL_DIR}/result.json".format(
            trial=i, seed=s, **_cell(wildcards)
        )
        for i in range(len(points))
        for s in TUNING_SEEDS
    ]


def _selection(wildcards):
    """The tuning checkpoint of a final run's (model, task, method, variant), or None when
    that variant is not tuned; raises Snakemake's incomplete-checkpoint signal until it ran.
    """
    if (wildcards.method, wildcards.variant) not in TUNED:
        return None
    return checkpoints.tune_select.get(**_cell(wildcards))


def tuned_after(wildcards):
    """A final run waits for its selection, but does not take the file as an input: the
    selected point is a param, so a rerun of the selection that keeps the same point reruns
    nothing downstream, and one that moves it reruns exactly these runs."""
    _selection(wildcards)
    return []


def tuned_point(wildcards):
    selection = _selection(wildcards)
    return None if selection is None else read_selection(selection.output[0])


def all_selections(wildcards=None):
    """The selection records the report shows (one per tuned (model, task, method, variant))."""
    return [
        f"{RESULTS}/tune/{m}/{t}/{method}/{variant}/selected.json"
        for m, t in MODEL_TASKS
        for method, variant in TUNED
    ]


def all_finetune_records(wildcards):
    return [run_path("finetune", k, "result.json") for k in RUNS]


def all_evaluate_records(wildcards):
    return [run_path("evaluate", k, "metrics.json") for k in RUNS]


def gift_view_records(wildcards=None):
    """The GIFT token views the report shows (one per (model, task) when gift runs)."""
    if "gift" not in config["methods"]:
        return []
    return [f"{RESULTS}/analyses/{m}/{t}/gift_tokens.json" for m, t in MODEL_TASKS]


def _gift_runs(wildcards):
    return [
        k
        for k in RUNS
        if k.method == "gift" and (k.model, k.task) == (wildcards.model, wildcards.task)
    ]


def gift_run_records(wildcards):
    return [run_path("finetune", k, "result.json") for k in _gift_runs(wildcards)]


def gift_run_weights(wildcards):
    return [
        run_path("finetune", k, "trainable.safetensors") for k in _gift_runs(wildcards)
    ]


def on_pipeline_error():
    """Snakefile onerror: jobs failed, so the report rule cannot run; write the report of
    whatever finished (beside the configured report, naming what is missing and why) and
    sync MLflow records queued meanwhile. Never raises."""
    try:
        from peftlab.report import write_partial_report
        from peftlab.tracking import sync_pending

        sync_pending(MLFLOW)
        path = write_partial_report(config, "logs", MLFLOW_REPORT)
        print(
            f"peftlab: some jobs failed; report of what finished, with the missing runs and "
            f"their reasons: {path}",
            file=sys.stderr,
        )
    except Exception as exc:
        print(
            f"peftlab: could not write the partial report ({type(exc).__name__}: {exc}); "
            "run: python -m peftlab report",
            file=sys.stderr,
        )


# Building the DAG creates objects by the hundred thousand (jobs, their files and params),
# nearly all kept to the end, and Python's cycle collector rescans them all again and again
# as they pile up. What exists now (Snakemake, this workflow, the config) is moved out of its
# reach, and it runs after 50,000 new objects instead of 700: the DAG of 2,400 runs builds
# about 15% faster (bench/pipeline_scale.py) at the same peak memory. Jobs run in their own
# processes, untouched by this.
import gc

gc.freeze()
gc.set_threshold(50_000, 20, 20)
