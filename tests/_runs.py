"""Short real finetune runs for the tests that need a completed run folder (exports, MLflow models)."""

from __future__ import annotations

import dataclasses

from peftlab.config import RunKey, load_experiment
from peftlab.train import finetune


def train_run(repo, spec, data_dir, results, method, variant="default", steps=2, **training):
    """A completed ``steps``-step run of ``method``/``variant`` (seed 0) under ``results``."""
    exp = load_experiment(repo / "config" / "experiments", method, variant)
    exp = dataclasses.replace(exp, training=dataclasses.replace(exp.training, max_steps=steps, **training))
    key = RunKey(spec.name, data_dir.name, method, variant, 0)
    run = results / "finetune" / key.path()
    rec = finetune(key, spec, exp, data_dir, run / "trainable.safetensors", run / "result.json", threads=2)
    assert rec["status"] == "completed"
    return run
