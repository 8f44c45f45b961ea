"""Every registered method fine-tunes SmolLM2 as a causal LM on a generation task (ASDiv,
numeric answers) and a multiple-choice task (PIQA) through the real trainer and evaluator:
the trainable count is the formula, the loss on the trained examples falls, evaluation
generates and scores every test example, and mergeable methods merge to the plain model."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch

from peftlab.config import RunKey, load_experiment
from peftlab.data import TaskSpec, prepare_task
from peftlab.evaluate import evaluate
from peftlab.generation import CausalCollator
from peftlab.methods import METHODS, build_method
from peftlab.models import ModelSpec, load_model, load_tokenizer
from peftlab.train import finetune

TASKS = ("asdiv", "piqa")


@pytest.fixture(scope="module")
def smollm(peftlab_cache):
    spec = ModelSpec.from_config("smollm2-135m", {})
    return spec, load_tokenizer(spec)


@pytest.fixture(scope="module")
def task_dirs(smollm, tmp_path_factory):
    _, tok = smollm
    out = {}
    for task in TASKS:
        out[task] = tmp_path_factory.mktemp(task)
        prepare_task(TaskSpec.from_config(task, {"max_train_examples": 24, "max_eval_examples": 4}), tok,
                     out[task], "smollm2-135m")
    return out


def _loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        inputs = batch if getattr(model, "peftlab_reads_prompt_length", False) else {
            k: v for k, v in batch.items() if k != "prompt_length"}
        return model(**inputs).loss.item()


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_on_a_causal_lm(method, task, smollm, task_dirs, tmp_path, repo):
    spec, tok = smollm
    data = task_dirs[task]
    exp = load_experiment(repo / "config" / "experiments", method, "default")
    exp = dataclasses.replace(exp, training=dataclasses.replace(
        exp.training, max_steps=6, batch_size=8, eval_batch_size=4, evals_per_epoch=1, log_every_steps=1))
    key = RunKey("smollm2-135m", task, method, "default", 0)
    rec = finetune(key, spec, exp, data, tmp_path / "w.safetensors", tmp_path / "r.json", threads=2)
    assert rec["status"] == "completed" and rec["steps"] == 6
    m = build_method(method, exp.method_params)
    assert rec["trainable_params"] == m.expected_trainable_parameters(load_model(spec, 0, "generation", seed=0))

    rows = pd.read_parquet(data / "train.parquet").head(8)[["input_ids", "prompt_length"]].to_dict("records")
    batch = CausalCollator(tok.pad_token_id)(rows)
    before = _loss(build_method(method, exp.method_params).apply(load_model(spec, 0, "generation", seed=0)), batch)
    after = _loss(build_method(method, exp.method_params).load(load_model(spec, 0, "generation", seed=0),
                                                                tmp_path / "w.safetensors"), batch)
    assert after < before, f"{method} on {task}: loss {before:.4f} -> {after:.4f}"

    ev = evaluate(key, spec, data, tmp_path / "r.json", tmp_path / "w.safetensors", tmp_path / "m.json",
                  threads=2, predictions_path=tmp_path / "p.jsonl")
    assert ev["main_metric"] == "accuracy" and 0 <= ev["metrics"]["accuracy"] <= 1
    predictions = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(predictions) == ev["n_examples"] == 4
    assert all(isinstance(p["output"], str) and isinstance(p["correct"], bool) for p in predictions)
    inf = ev["inference"]
    assert inf["mergeable"] == m.mergeable and inf["generation_speed_ratio"] > 0
    if m.mergeable:
        assert inf["merged_class"] == "LlamaForCausalLM"
        assert inf["merged_max_abs_diff"] <= 1e-3  # logits of a 49k-token vocabulary, fp32
