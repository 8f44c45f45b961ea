"""Every registered method fine-tunes SmolLM2 as a causal LM on a generation task (ASDiv,
numeric answers) and a multiple-choice task (PIQA) through the real trainer and evaluator:
the trainable count is the formula, the loss on the training batch falls, evaluation
generates and scores every test example, and mergeable methods merge to the plain model."""

from __future__ import annotations

import dataclasses
import json

import pytest

from peftlab.config import RunKey, load_experiment
from peftlab.data import TaskSpec, prepare_task
from peftlab.evaluate import evaluate
from peftlab.methods import METHODS, build_method
from peftlab.models import load_model
from peftlab.train import finetune

TASKS = ("asdiv", "piqa")


@pytest.fixture(scope="module")
def task_dirs(smollm, tmp_path_factory):
    _, tok = smollm
    out = {}
    for task in TASKS:
        out[task] = tmp_path_factory.mktemp(task)
        # one training batch: every step sees the same 8 examples, so the logged losses compare
        prepare_task(TaskSpec.from_config(task, {"max_train_examples": 8, "max_eval_examples": 4}), tok,
                     out[task], "smollm2-135m")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_on_a_causal_lm(method, task, smollm, task_dirs, tmp_path, repo):
    spec, _ = smollm
    data = task_dirs[task]
    variant = "weights" if method == "hiwi" else "default"  # SmolLM2's MLP has no biases for HiWi's default
    exp = load_experiment(repo / "config" / "experiments", method, variant)
    exp = dataclasses.replace(exp, training=dataclasses.replace(
        exp.training, max_steps=6, batch_size=8, eval_batch_size=4, evals_per_epoch=1, log_every_steps=1))
    key = RunKey("smollm2-135m", task, method, variant, 0)
    rec = finetune(key, spec, exp, data, tmp_path / "w.safetensors", tmp_path / "r.json", threads=2)
    assert rec["status"] == "completed" and rec["steps"] == 6
    m = build_method(method, exp.method_params)
    assert rec["trainable_params"] == m.expected_trainable_parameters(load_model(spec, 0, "generation", seed=0))
    # the loss of the one training batch, before each step: it falls
    losses = [loss for _, loss in rec["curves"]["train_loss"]]
    assert len(losses) == 6 and losses[-1] < losses[0], f"{method} on {task}: losses {losses}"

    ev = evaluate(key, spec, data, tmp_path / "r.json", tmp_path / "w.safetensors", tmp_path / "m.json",
                  threads=2, predictions_path=tmp_path / "p.jsonl")
    predictions = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(predictions) == ev["n_examples"] == 4
    assert all(isinstance(p["output"], str) and isinstance(p["correct"], bool) for p in predictions)
    # the accuracy is that of the predictions written
    assert ev["main_metric"] == "accuracy"
    assert ev["metrics"]["accuracy"] == sum(p["correct"] for p in predictions) / 4
    inf = ev["inference"]
    assert inf["mergeable"] == m.mergeable and inf["generation_speed_ratio"] > 0
    if m.mergeable:
        assert inf["merged_class"] == "LlamaForCausalLM"
        assert inf["merged_max_abs_diff"] <= 1e-3  # logits of a 49k-token vocabulary, fp32
