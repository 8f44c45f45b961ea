"""MLflow models of the runs (``peftlab.registry``): which run the registry gets, and every
logged flavour loading back through MLflow with the run's own outputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from _runs import train_run
from peftlab.artifacts import _logits, export_run
from peftlab.io import read_json
from peftlab.registry import (
    log_exported,
    logged_model_of,
    register,
    select_best,
    using_tracking_uri,
    version_tags,
    weights_sha256,
)
from peftlab.tracking import _Store


def _cells(rows):
    cols = ["model", "task", "method", "variant", "label", "main_metric", "test_mean", "test_lo", "test_hi", "interval",
            "n_seeds", "baseline", "vs_full", "vs_best", "not_trained", "trainable_percent"]
    return pd.DataFrame([dict(zip(cols, r, strict=True)) for r in rows])


def _runs(rows):
    return pd.DataFrame([{"model": "m", "task": "t", "method": m, "variant": "default", "seed": s, "status": st,
                          "validation_main": v, "test_main": te, "config_hash": "h", "git_commit": "c"}
                         for m, s, st, v, te in rows])


def test_the_registry_gets_the_reports_best_method_and_its_best_validation_seed():
    """A method within noise of the baseline never wins, however high its mean; of the best
    method's seeds, validation (not test) picks one."""
    cells = _cells([
        ("m", "t", "lucky", "default", "lucky", "accuracy", 0.95, 0.40, 1.0, "bootstrap", 2, 0.5, None, None, True, 1.0),
        ("m", "t", "lora", "default", "lora", "accuracy", 0.80, 0.75, 0.85, "bootstrap", 2, 0.5, "tied", "best",
         False, 0.3),
        ("m", "t", "full", "default", "full", "accuracy", 0.79, 0.74, 0.84, "bootstrap", 2, 0.5, None, "tied",
         False, 100.0),
    ])
    runs = _runs([("lora", 0, "completed", 0.70, 0.83), ("lora", 1, "completed", 0.78, 0.77),
                  ("lora", 2, "failed", None, None), ("full", 0, "completed", 0.9, 0.8)])
    sel = select_best(runs, cells)
    assert sel["chosen"] == {"model": "m", "task": "t", "method": "lora", "variant": "default", "seed": 1}
    assert sel["cell"]["tied_with"] == ["full"] and sel["seed"] == {
        "validation": 0.78, "test": 0.77, "config_hash": "h", "git_commit": "c"}
    tags = version_tags(sel)
    assert tags["test_mean"] == "0.8" and tags["test_ci95"] == "[0.75, 0.85]" and tags["tied_with"] == "full"
    assert "validation accuracy" in tags["selection_rule"] and tags["seed"] == "1"

    nothing = select_best(runs, cells.assign(not_trained=True))
    assert nothing["chosen"] is None and "no-learning baseline" in nothing["reason"]
    failed = select_best(runs.assign(status="failed"), pd.DataFrame())  # cell_table of no completed run
    assert failed["chosen"] is None and "no run of this task completed" in failed["reason"]


@pytest.fixture
def store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    st = _Store(uri, "peftlab")
    return st, MlflowClient(tracking_uri=uri, registry_uri=uri)


def _finetune_run(store_client) -> str:
    st, client = store_client
    run = client.create_run(st.experiment_id, tags={"rule": "finetune"})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _texts_and_reference(run, task_dir, spec, n=6):
    """The first test texts and the run's own class probabilities on them, tokenized the way
    the pyfunc does (the raw text, padded and truncated by the base's tokenizer)."""
    from peftlab.data import load_split
    from peftlab.methods import build_method, load_trained
    from peftlab.models import load_tokenizer

    stats, record = read_json(task_dir / "stats.json"), read_json(run / "result.json")
    texts = list(load_split(task_dir, "test")["text"][:n])
    tokenizer = load_tokenizer(spec)
    batch = dict(tokenizer(texts, padding=True, truncation=True, return_tensors="pt"))
    method = build_method(record["run"]["method"], record["config"]["method_params"], spec.targets)
    model = load_trained(method, spec, stats, run / "trainable.safetensors", 0).eval()
    return stats, texts, _logits(model, batch).softmax(-1)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["loreft", "prompt_tuning"])
def test_a_run_without_a_merged_form_is_a_pyfunc_that_predicts_the_runs_labels(
        method, store, minilm_spec, minilm_task, tmp_path, repo):
    """LoReFT (peftlab's own folder) and prompt tuning (peft's folder) log as a pyfunc carrying
    peftlab's code; loaded back through MLflow, its scores are the run's softmaxed logits."""
    import mlflow


    run = train_run(repo, minilm_spec, minilm_task, tmp_path / "results", method, steps=3, learning_rate=1e-2)
    export_run(run, minilm_spec, minilm_task, tmp_path / "export")
    run_id = _finetune_run(store)
    st, client = store
    sha = weights_sha256(run)
    entry = log_exported(client, st.experiment_id, run_id, tmp_path / "export", sha)
    assert entry["flavour"] == "pyfunc" and entry["form"] == ("peft" if method == "prompt_tuning" else "peftlab")
    assert logged_model_of(client, st.experiment_id, run_id, sha).model_id == entry["model_id"]
    assert logged_model_of(client, st.experiment_id, run_id, "other weights") is None

    stats, texts, probs = _texts_and_reference(run, minilm_task, minilm_spec)
    with using_tracking_uri(client.tracking_uri):  # not left set: it is exported to later jobs
        predicted = mlflow.pyfunc.load_model(entry["model_uri"]).predict(pd.DataFrame({"text": texts}))
    names = stats["label_names"]
    assert list(predicted["label"]) == [names[i] for i in probs.argmax(-1).tolist()]
    assert np.allclose(predicted["score"], probs.max(-1).values.numpy(), atol=1e-5)


@pytest.mark.slow
def test_a_merged_run_is_a_transformers_pipeline_registered_with_its_numbers(
        store, minilm_spec, minilm_task, tmp_path, repo):
    """A mergeable run logs through the transformers flavour (label names in the pipeline's
    answers); registering makes version 1 with alias best, and the same model again reuses it."""
    import mlflow

    run = train_run(repo, minilm_spec, minilm_task, tmp_path / "results", "lora", steps=3, learning_rate=1e-2)
    export_run(run, minilm_spec, minilm_task, tmp_path / "export")
    run_id = _finetune_run(store)
    st, client = store
    entry = log_exported(client, st.experiment_id, run_id, tmp_path / "export", weights_sha256(run))
    assert entry["flavour"] == "transformers" and entry["form"] == "merged"
    selection = {"rule": "r", "metric": "accuracy",
                 "chosen": {"model": "minilm-l6", "task": "rotten_tomatoes", "method": "lora", "variant": "default",
                            "seed": 0},
                 "cell": {"test_mean": 0.8, "test_lo": 0.7, "test_hi": 0.9, "interval": "bootstrap", "n_seeds": 1,
                          "baseline": 0.5, "vs_full": None, "trainable_percent": 1.0, "tied_with": []},
                 "seed": {"validation": 0.8, "test": 0.8, "config_hash": "h", "git_commit": "c"}}
    reg = register(client, "peftlab-minilm-l6-rotten_tomatoes", entry, run_id, selection)
    assert reg == {"name": "peftlab-minilm-l6-rotten_tomatoes", "version": 1, "alias": "best",
                   "uri": "models:/peftlab-minilm-l6-rotten_tomatoes@best"}
    # the same model again (a later report, one more seed): the same version, its numbers updated
    selection["cell"] |= {"test_mean": 0.81, "n_seeds": 2}
    assert register(client, reg["name"], entry, run_id, selection)["version"] == 1
    version = client.get_model_version_by_alias(reg["name"], "best")
    assert version.tags["method"] == "lora" and version.tags["test_mean"] == "0.81" and version.run_id == run_id
    assert version.tags["n_seeds"] == "2" and len(client.search_model_versions(f"name = '{reg['name']}'")) == 1

    stats, texts, probs = _texts_and_reference(run, minilm_task, minilm_spec)
    with using_tracking_uri(client.tracking_uri):
        answers = mlflow.transformers.load_model(reg["uri"])(texts)
    assert [a["label"] for a in answers] == [stats["label_names"][i] for i in probs.argmax(-1).tolist()]
    assert np.allclose([a["score"] for a in answers], probs.max(-1).values.numpy(), atol=1e-5)
    assert json.loads(json.dumps(entry))["model_uri"].startswith("models:/")
    assert "MLFLOW_TRACKING_URI" not in os.environ  # put back as it was: later jobs log where they should

