"""Every registered method through the real trainer and evaluator (default variant, a few
steps on real rotten_tomatoes examples): the record's trainable count is the formula,
evaluation reloads the stored tensors, and mergeable methods merge to the plain model."""

from __future__ import annotations

import dataclasses

import pytest

from peftlab.config import RunKey, load_experiment
from peftlab.evaluate import evaluate
from peftlab.methods import METHODS, build_method
from peftlab.models import load_model
from peftlab.train import finetune


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_evaluates_and_merges(method, repo, tmp_path, minilm_spec, tiny_task_dir):
    exp = load_experiment(repo / "config" / "experiments", method, "default")
    exp = dataclasses.replace(exp, training=dataclasses.replace(
        exp.training, max_steps=3, batch_size=16, eval_batch_size=32, evals_per_epoch=1))
    key = RunKey("minilm-l6", "rotten_tomatoes", method, "default", 0)
    rec = finetune(key, minilm_spec, exp, tiny_task_dir, tmp_path / "w.safetensors", tmp_path / "r.json", threads=1)
    base = load_model(minilm_spec, 2, "single_label_classification", seed=0)
    m = build_method(method, exp.method_params)
    assert rec["trainable_params"] == m.expected_trainable_parameters(base)  # closed form, no data
    assert rec["steps"] == 3 and rec["stored_size_bytes"] > 0
    ev = evaluate(key, minilm_spec, tiny_task_dir, tmp_path / "r.json", tmp_path / "w.safetensors",
                  tmp_path / "m.json", threads=1)
    inf = ev["inference"]
    assert inf["mergeable"] == m.mergeable
    if m.mergeable:
        assert inf["merged_class"] == "BertForSequenceClassification"
        assert inf["merged_max_abs_diff"] <= 1e-5
    # the ratio is the deployed model's latency (merged when it can be) over the plain model's
    deployed = inf["merged_ms_per_batch"] if m.mergeable else inf["unmerged_ms_per_batch"]
    assert inf["added_latency_ratio"] == pytest.approx(deployed / inf["base_ms_per_batch"])
