"""MLflow mirror of the result records.

Files drive the DAG; MLflow mirrors them. Each finetune / evaluate job becomes one MLflow
run (params, metric curves, tags, the record as an artifact). The default store is a SQLite
file under the results folder (no server); ``MLFLOW_TRACKING_URI`` or ``mlflow.tracking_uri``
in config.yaml point elsewhere. Writes to a SQLite store are serialised with a file lock so
parallel jobs never hit "database is locked". A rerun replaces the earlier run of the same
(model, task, method, variant, seed, rule): the old one is deleted, so only the latest shows.
Tracking never fails a job: the record on disk is the source of truth.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IDENTITY_TAGS = ("model", "task", "method", "variant", "seed")


def default_store(results_dir: str | Path) -> str:
    """The embedded default: a SQLite file in the results folder (absolute path)."""
    return str(Path(results_dir).resolve() / "mlflow.db")


def tracking_uri(mlflow_config: dict) -> str:
    """``MLFLOW_TRACKING_URI`` > config's ``mlflow.tracking_uri`` > sqlite ``default_store``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if mlflow_config.get("tracking_uri"):
        return mlflow_config["tracking_uri"]
    return f"sqlite:///{mlflow_config['default_store']}"


def _lock_for(uri: str):
    if uri.startswith("sqlite:///"):
        from filelock import FileLock

        db = Path(uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(db) + ".lock", timeout=600)
    return nullcontext()


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _metrics_of(record: dict) -> list[tuple[str, float, int]]:
    """(key, value, step) triples: curves for finetune (and subspace runs), test metrics for
    evaluate, the statistics of the analyses (d90: score per d with step = d)."""
    rows: list[tuple[str, float, int]] = []
    rule = record["rule"]
    if rule == "gradient_sparsity":
        summary = record["summary"]
        for k in ("top1_share", "gini", "jaccard", "jaccard_chance", "sift_pafi_overlap", "overlap_chance"):
            rows.append((k, summary.get(k), 0))
        for i, p in enumerate(summary["percents"]):
            rows.append((f"top_share_permille_{round(p * 10)}", record["curves"]["all"]["per_batch"][i], 0))
        return [(k, float(v), int(s)) for k, v, s in rows if v is not None]
    if rule == "d90":
        for d, score in record["scores"].items():
            rows.append(("test_score_by_d", score, int(d)))
        for k in ("d90", "threshold", "reference", "d90_fraction_of_D"):
            rows.append((k, record.get(k), 0))
        return [(k, float(v), int(s)) for k, v, s in rows if v is not None]
    if rule == "intrinsic_dimension":
        for k, v in record["test"].items():
            rows.append((f"test_{k}", v, 0))
        rows += [("d", record["d"], 0)]
    if rule in ("finetune", "intrinsic_dimension"):
        for step, loss in record["curves"]["train_loss"]:
            rows.append(("train_loss", loss, step))
        for step, lr in record["curves"].get("learning_rate", []):
            rows.append(("learning_rate", lr, step))
        for point in record["curves"]["validation"]:
            for k, v in point.items():
                if k != "step" and v is not None:
                    rows.append((f"validation_{k}", v, point["step"]))
        for k in ("trainable_params", "trainable_percent", "train_time_s", "stored_size_bytes", "steps"):
            if k in record:
                rows.append((k, record[k], 0))
        for k, v in record["peak_memory"].items():
            rows.append((f"peak_{k}", v, 0))
    else:
        for k, v in record["metrics"].items():
            rows.append((f"test_{k}", v, 0))
        for k in ("eval_time_s", "examples_per_s"):
            if record.get(k) is not None:
                rows.append((k, record[k], 0))
    return [(k, float(v), int(s)) for k, v, s in rows if v is not None]


def log_record(
    record: dict,
    record_path: str | Path,
    mlflow_config: dict,
    artifacts: list[str | Path] = (),
) -> str | None:
    """Mirror one result record into MLflow; returns the run id, or None when tracking failed.

    ``mlflow_config`` is config.yaml's ``mlflow`` section plus ``default_store``.
    """
    uri = tracking_uri(mlflow_config)
    try:
        with _lock_for(uri):
            return _log(record, record_path, uri, mlflow_config.get("experiment", "peftlab"), artifacts)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail training
        log.warning("MLflow tracking at %s failed (%s: %s); the record at %s is kept",
                    uri, type(exc).__name__, exc, record_path)
        return None


def _log(record, record_path, uri, experiment, artifacts) -> str:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
        exp_id = client.create_experiment(experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    # analyses have no method/variant of their own: the rule stands in (tags stay comparable)
    run_tags = {k: str(record["run"].get(k, "-")) for k in IDENTITY_TAGS}
    tags = run_tags | {
        "rule": record["rule"],
        "git_commit": record.get("git_commit", "unknown"),
        "config_hash": record.get("config_hash", ""),
        "status": record.get("status", ""),
        "mlflow.runName": "{model}/{task}/{method}/{variant}/seed{seed}".format(**run_tags) + f" [{record['rule']}]",
    }
    # a rerun replaces the earlier run of the same identity and rule
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in {**run_tags, "rule": record["rule"]}.items())
    for old in client.search_runs([exp_id], filter_string=query, max_results=1000):
        client.delete_run(old.info.run_id)
    run = client.create_run(exp_id, tags=tags)
    run_id = run.info.run_id
    if record["rule"] == "finetune":
        params = _flatten({"config": record["config"], "task": record["task"], "model": record["model"]})
    elif record["rule"] == "evaluate":
        params = {"split": record["split"], "n_examples": record["n_examples"]}
    else:
        params = _flatten(record.get("params", {}))
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, s) for k, v, s in _metrics_of(record)],
        params=[Param(k, str(v)[:500]) for k, v in params.items()],
    )
    client.log_artifact(run_id, str(record_path))
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED" if record.get("status") == "completed" else "FAILED")
    log.info("MLflow run %s at %s", run_id, uri)
    return run_id


def runs_table(mlflow_config: dict):
    """All active runs of the experiment as a DataFrame (for tests and the report)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(mlflow_config))
    return mlflow.search_runs(experiment_names=[mlflow_config.get("experiment", "peftlab")])

