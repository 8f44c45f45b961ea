"""MLflow models of the finetune runs, and the registered best run of each (model, task):
the ``mlflow_models`` rule (config ``mlflow.log_model: best | all``).

- **Which runs get a logged model:** ``all``: every completed run of the task; ``best``: the
  registered one only. A run's model is its standard export (``artifacts.export_run``): the
  ``merged/`` folder through MLflow's ``transformers`` flavour (a pipeline: ``text-classification``
  or ``text-generation``); a run with no merged form (prompt tuning, LoReFT, the adapter) as a
  ``pyfunc`` over its ``peft/`` or ``peftlab/`` folder (``peftlab.serving``). The logged model
  hangs off the run's finetune MLflow run (its ``source_run_id``); logging the same stored
  weights again reuses it.
- **Which run is registered:** the report's rule. Among the methods whose 95% interval clears
  the no-learning baseline, the one with the highest mean test score over its seeds (the
  report's "best"); of its seeds, the one with the best validation score (the test set does not
  pick the seed). It becomes a new version of ``peftlab-<model>-<task>`` (unless the latest
  version already is this model), with alias ``best`` and the report's numbers as tags. A task
  where no method learned registers nothing, and the record says so.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import pandas as pd

from .errors import PeftlabError
from .io import read_json, write_json

log = logging.getLogger(__name__)

LOG_MODEL_MODES = ("none", "best", "all")
MODEL_NAME = "model"  # the logged model's name
ALIAS = "best"  # the registered model's alias on the latest selection
WEIGHTS_TAG = "peftlab.weights_sha256"  # a logged model's stored weights: the same ones are not logged twice
SELECTION_RULE = ("highest mean test {metric} over the seeds among the methods whose 95% interval clears the "
                  "no-learning baseline (the report's best); of its seeds, the best validation {metric}")
RECORD_SCHEMA = 1


def registered_name(model: str, task: str) -> str:
    return f"peftlab-{model}-{task}"


# ---------------------------------------------------------------------------------------
# Selection: the report's best cell, then its seed by validation
# ---------------------------------------------------------------------------------------


def select_best(task_runs: pd.DataFrame, cells: pd.DataFrame) -> dict:
    """The run to register and the numbers behind it (``report.cell_table``'s cells of one
    task); ``{"chosen": None, "reason": ...}`` when no method learned."""
    metric = str(cells["main_metric"].iloc[0]) if len(cells) else "score"
    if not len(cells):
        return {"chosen": None, "rule": SELECTION_RULE.format(metric=metric),
                "reason": "no run of this task completed: nothing is registered (the report lists why)"}
    trained = cells[~cells["not_trained"].astype(bool)].sort_values("test_mean", ascending=False, kind="stable")
    if not len(trained):
        return {"chosen": None, "rule": SELECTION_RULE.format(metric=metric),
                "reason": "no method's 95% interval clears the no-learning baseline at this budget: nothing "
                          "is registered (train longer or on more data)"}
    best = trained.iloc[0]
    seeds = task_runs[(task_runs["status"] == "completed") & (task_runs["method"] == best["method"])
                      & (task_runs["variant"] == best["variant"])]
    seed_row = seeds.sort_values(["validation_main", "seed"], ascending=[False, True], kind="stable").iloc[0]
    return {
        "rule": SELECTION_RULE.format(metric=metric),
        "chosen": {k: (int(seed_row[k]) if k == "seed" else str(seed_row[k]))
                   for k in ("model", "task", "method", "variant", "seed")},
        "metric": metric,
        "cell": {"test_mean": float(best["test_mean"]), "test_lo": _num(best["test_lo"]),
                 "test_hi": _num(best["test_hi"]), "interval": best.get("interval"),
                 "n_seeds": int(best["n_seeds"]), "baseline": _num(best["baseline"]),
                 "vs_full": best.get("vs_full"), "trainable_percent": float(best["trainable_percent"]),
                 "tied_with": [str(x) for x in trained.loc[trained["vs_best"] == "tied", "label"]]},
        "seed": {"validation": _num(seed_row["validation_main"]), "test": float(seed_row["test_main"]),
                 "config_hash": seed_row.get("config_hash"), "git_commit": seed_row.get("git_commit")},
    }


def _num(v) -> float | None:
    return None if v is None or v != v else float(v)


def version_tags(selection: dict) -> dict[str, str]:
    """The registered version's tags: the selection rule and the report's numbers."""
    chosen, cell, seed = selection["chosen"], selection["cell"], selection["seed"]
    tags = {"selection_rule": selection["rule"], "metric": selection["metric"],
            **{k: str(chosen[k]) for k in ("method", "variant", "seed")},
            "test_mean": cell["test_mean"], "test_ci95": f"[{cell['test_lo']}, {cell['test_hi']}]",
            "interval": cell["interval"], "n_seeds": cell["n_seeds"], "baseline": cell["baseline"],
            "vs_full": cell["vs_full"], "tied_with": ", ".join(cell["tied_with"]) or "none",
            "trainable_percent": cell["trainable_percent"], "seed_validation": seed["validation"],
            "seed_test": seed["test"], "config_hash": seed["config_hash"], "git_commit": seed["git_commit"]}
    return {k: str(v) for k, v in tags.items() if v is not None}


# ---------------------------------------------------------------------------------------
# Logging one run's model
# ---------------------------------------------------------------------------------------


def weights_sha256(run_dir: str | Path) -> str:
    from .tracking import _sha256

    return _sha256(Path(run_dir) / "trainable.safetensors")


def serving_requirements() -> list[str]:
    """The pins a served model needs: peftlab's own (exact) torch, transformers, tokenizers,
    safetensors, peft, numpy, pandas and pyyaml, as installed here."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "transformers", "tokenizers", "safetensors", "peft", "numpy", "pandas", "pyyaml"):
        with contextlib.suppress(PackageNotFoundError):
            out.append(f"{name}=={version(name).split('+')[0]}")
    return out


@contextlib.contextmanager
def using_tracking_uri(uri: str):
    """MLflow's flavour ``log_model`` and ``models:/`` lookups go through the process-wide tracking
    URI, which MLflow also exports as ``MLFLOW_TRACKING_URI`` (and peftlab's jobs obey that
    variable): set for the block only, then put back as it was."""
    import mlflow

    old = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    quiet = logging.getLogger("mlflow.transformers")  # "no model card / license on the hub" for a local folder
    level = quiet.level
    mlflow.set_tracking_uri(uri)
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(level)
        mlflow.set_tracking_uri(old)


def log_exported(client, experiment_id: str, run_id: str, export_dir: Path, sha: str) -> dict:
    """Log an export folder as a model of the finetune run ``run_id``: the merged form through
    the transformers flavour, else a peftlab pyfunc. Returns its entry (model id, uri, flavour)."""
    import mlflow

    manifest = read_json(export_dir / "export.json")
    forms = manifest["forms"]
    flavour = "transformers" if "merged" in forms else "pyfunc"
    logged = client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                        tags={WEIGHTS_TAG: sha, "peftlab.flavour": flavour})
    with using_tracking_uri(client.tracking_uri):
        if flavour == "transformers":
            info = mlflow.transformers.log_model(_pipeline(export_dir / "merged", manifest["task"]), name=MODEL_NAME,
                                                 model_id=logged.model_id, pip_requirements=serving_requirements())
        else:
            from . import serving

            form = "peft" if "peft" in forms else "peftlab"
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, model_id=logged.model_id, python_model=serving.PeftlabModel(),
                artifacts={"model": str(export_dir / form), "export": str(export_dir / "export.json")},
                code_paths=[str(Path(serving.__file__).parent)], signature=serving.signature(manifest["task"]),
                pip_requirements=serving_requirements())
    return {"model_id": logged.model_id, "model_uri": info.model_uri, "flavour": flavour,
            "form": "merged" if flavour == "transformers" else form}


def _pipeline(folder: Path, task: dict):
    import transformers

    from .models import GENERATIVE_PROBLEMS

    if task.get("kind") == "image_classification":
        return transformers.pipeline("image-classification", model=str(folder), image_processor=str(folder))
    kind = "text-generation" if task["problem_type"] in GENERATIVE_PROBLEMS else "text-classification"
    return transformers.pipeline(kind, model=str(folder), tokenizer=str(folder))


def logged_model_of(client, experiment_id: str, run_id: str, sha: str):
    """A model already logged on this finetune run from these very weights, or None."""
    from mlflow.entities import LoggedModelStatus

    models = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    same = [m for m in models if m.tags.get(WEIGHTS_TAG) == sha and m.status == LoggedModelStatus.READY]
    return max(same, key=lambda m: m.creation_timestamp) if same else None


# ---------------------------------------------------------------------------------------
# Registering the best run
# ---------------------------------------------------------------------------------------


def register(client, name: str, entry: dict, run_id: str, selection: dict) -> dict:
    """A new version of ``name`` for the chosen run's model (the latest version when it already
    is that model, its tags brought up to date), with the selection's tags, and alias ``best``."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="peftlab: the best run of {model} on {task}, picked by "
                                       "the comparison report's rule (see each version's tags)".format(
                                           **selection["chosen"]))
    versions = client.search_model_versions(f"name = '{name}'")
    latest = max(versions, key=lambda v: int(v.version)) if versions else None
    if latest is not None and latest.source == entry["model_uri"]:
        version = latest  # the same model: its tags follow the report's current numbers
        for key, value in version_tags(selection).items():
            if latest.tags.get(key) != value:
                client.set_model_version_tag(name, latest.version, key, value)
    else:
        chosen = selection["chosen"]
        with using_tracking_uri(client.tracking_uri):  # MLflow resolves a models:/ source through it
            version = client.create_model_version(
                name, source=entry["model_uri"], run_id=run_id, tags=version_tags(selection),
                model_id=entry["model_id"],
                description=f"{chosen['method']}/{chosen['variant']} seed {chosen['seed']}: mean test "
                            f"{selection['metric']} {selection['cell']['test_mean']:.4f} over "
                            f"{selection['cell']['n_seeds']} seed(s)")
    client.set_registered_model_alias(name, ALIAS, version.version)
    return {"name": name, "version": int(version.version), "alias": ALIAS, "uri": f"models:/{name}@{ALIAS}"}


# ---------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------


def task_cells(summary_path: str | Path, stats_path: str | Path, model: str, task: str):
    """The task's summary rows and the report's cells for them (intervals and marks)."""
    from .report import cell_table, read_predictions

    runs = pd.read_parquet(summary_path)
    runs = runs[(runs["model"] == model) & (runs["task"] == task)]
    stats = read_json(stats_path)
    predictions = read_predictions(runs, Path(summary_path).parent)
    return runs, cell_table(runs, predictions, {(model, task): stats})


def models_stage(summary_path, stats_path, model: str, task: str, model_spec, mode: str, mlflow_config: dict,
                 out_path, export_dirs: dict | None = None) -> dict:
    """The ``mlflow_models`` job: log the runs' models (``mode``: ``best`` or ``all``),
    register the best run, and write what was done to ``out_path``."""
    if mode not in LOG_MODEL_MODES[1:]:
        raise PeftlabError(f"mlflow.log_model is {mode!r}: use one of {', '.join(LOG_MODEL_MODES)}")
    runs, cells = task_cells(summary_path, stats_path, model, task)
    selection = select_best(runs, cells)
    chosen = selection["chosen"]
    wanted = runs[runs["status"] == "completed"] if mode == "all" else \
        runs[[chosen is not None and _same_run(r, chosen) for r in runs.itertuples()]]
    results = Path(summary_path).parent
    with _StoreSession(mlflow_config) as store:
        logged = [store.log_run(results, r, model_spec, Path(stats_path).parent, (export_dirs or {}).get(_run_id(r)))
                  for r in wanted.itertuples()]
        registered = None
        if chosen is not None:
            entry = next(e for e in logged if e["run"] == chosen)
            registered = store.register(registered_name(model, task), entry, selection)
    record = {"schema": RECORD_SCHEMA, "model": model, "task": task, "log_model": mode, "selection": selection,
              "logged": logged, "registered": registered, "tracking_uri": store.display_uri,
              "experiment": store.experiment}
    write_json(out_path, record)
    if registered:
        log.info("%s/%s: registered %s version %d (%s/%s seed %d)", model, task, registered["name"],
                 registered["version"], chosen["method"], chosen["variant"], chosen["seed"])
    else:
        log.warning("%s/%s: nothing registered: %s", model, task, selection["reason"])
    return record


def _run_id(r) -> str:
    """The run folder of a summary row (``RunKey.path``)."""
    from .config import RunKey

    return RunKey(r.model, r.task, r.method, r.variant, int(r.seed)).path()


def _same_run(r, chosen: dict) -> bool:
    return (r.model, r.task, r.method, r.variant, int(r.seed)) == tuple(
        chosen[k] for k in ("model", "task", "method", "variant", "seed"))


class _StoreSession:
    """The MLflow store of the runs (``tracking``'s); its writes take turns with the other jobs'
    (the exports, which take longest, run outside the store's lock)."""

    def __init__(self, mlflow_config: dict):
        from . import tracking

        self.uri = tracking.tracking_uri(mlflow_config)
        self.display_uri = tracking.display_uri(self.uri)
        self.experiment = mlflow_config.get("experiment", "peftlab")
        self._tracking = tracking

    def __enter__(self):
        from mlflow.tracking import MlflowClient

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self._tracking._bounded_http())
        try:
            with self.writing():
                self.store = self._tracking._Store(self.uri, self.experiment)
        except Exception as exc:
            self._stack.close()
            raise PeftlabError(f"the MLflow store {self.display_uri} cannot be reached ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:200] if str(exc) else ''}): start it (or fix "
                               "mlflow.tracking_uri), then rerun; the runs' files are untouched") from None
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def writing(self):
        """Held while writing: a SQLite store takes one writer at a time (``tracking``'s lock)."""
        return self._tracking._store_lock(self.uri)

    def finetune_run_id(self, r) -> str:
        ident = {"model": r.model, "task": r.task, "method": r.method, "variant": r.variant,
                 "seed": str(int(r.seed)), "rule": "finetune"}
        found = self.store._runs_of(ident)
        if not found:
            raise PeftlabError(f"run {_run_id(r)} has no finetune run in the MLflow store {self.display_uri} (its "
                               "record may still be queued): run `python -m peftlab sync-mlflow`, then rerun")
        return max(found, key=lambda x: x.info.start_time).info.run_id

    def log_run(self, results: Path, r, model_spec, data_dir: Path, export_dir: str | None) -> dict:
        """The run's logged model: the one already on its finetune run for these weights, else
        its export (the export rule's folder when there is one) logged now."""
        from .artifacts import export_run

        run_dir = results / "finetune" / _run_id(r)
        run_id, sha = self.finetune_run_id(r), weights_sha256(run_dir)
        key = {"model": r.model, "task": r.task, "method": r.method, "variant": r.variant, "seed": int(r.seed)}
        found = logged_model_of(self.client, self.store.experiment_id, run_id, sha)
        if found is not None:
            return {"run": key, "mlflow_run_id": run_id, "model_id": found.model_id, "model_uri": found.model_uri,
                    "flavour": found.tags.get("peftlab.flavour"), "reused": True}
        with tempfile.TemporaryDirectory(prefix="peftlab-export-") as tmp:
            folder = Path(export_dir) if export_dir and (Path(export_dir) / "export.json").exists() else None
            if folder is None or not read_json(folder / "export.json").get("forms"):
                folder = Path(tmp) / "export"
                export_run(run_dir, model_spec, data_dir, folder)
            with self.writing():
                entry = log_exported(self.client, self.store.experiment_id, run_id, folder, sha)
        log.info("%s: logged as %s (%s)", _run_id(r), entry["model_uri"], entry["flavour"])
        return {"run": key, "mlflow_run_id": run_id, **entry, "reused": False}

    def register(self, name: str, entry: dict, selection: dict) -> dict:
        with self.writing():
            return register(self.client, name, entry, entry["mlflow_run_id"], selection)
