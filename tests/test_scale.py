"""Memory and scale: a bf16 base, gradient accumulation, gradient checkpointing, and one run on
two processes (DDP, and FSDP for full fine-tuning, over gloo, as torchrun starts it on a GPU
node), resumed after a SIGKILL.
Real MiniLM-L6 / rotten_tomatoes and SmolLM2-135M / ASDiv."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from peftlab import memory
from peftlab.config import REPO_ROOT, Experiment, RunKey, TrainConfig, load_experiment
from peftlab.data import TaskSpec, prepare_task
from peftlab.distributed import ShardedBatches, finetune_processes
from peftlab.evaluate import evaluate
from peftlab.train import finetune, loss_items, micro_batches


def _lora(**training):
    cfg = TrainConfig(**({"max_steps": 3, "batch_size": 16, "eval_batch_size": 32, "learning_rate": 1e-3,
                          "evals_per_epoch": 1, "log_every_steps": 1} | training))
    return Experiment("lora", "default", cfg, {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["query", "value"]}, ())


def _run(tmp_path, spec, data_dir, name, experiment, threads=1):
    key = RunKey(spec.name, "t", experiment.method, "default", 0)
    out = tmp_path / name
    return finetune(key, spec, experiment, data_dir, out / "w.safetensors", out / "r.json", threads=threads), out


# ---------------------------------------------------------------------------------------
# bf16 base
# ---------------------------------------------------------------------------------------


def test_base_dtype_resolution_and_config_errors():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert memory.base_dtype("auto", "weight", cpu) == torch.float32  # CPU runs stay bitwise reproducible
    assert memory.base_dtype("bf16", "weight", cpu) == torch.bfloat16
    assert memory.base_dtype("bf16", "full", cpu) == torch.float32  # full fine-tuning keeps fp32 master weights
    assert memory.base_dtype("bf16", "analysis", cuda) == torch.float32
    assert memory.base_dtype("fp32", "weight", cuda) == torch.float32
    with pytest.raises(ValueError, match="base_dtype bf16 needs bf16 compute: set precision to auto or bf16"):
        TrainConfig(base_dtype="bf16", precision="fp32")
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be >= 1, got 0"):
        TrainConfig(gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="base_dtype must be auto, fp32 or bf16, got 'fp16'"):
        TrainConfig(base_dtype="fp16")


def test_cast_frozen_halves_the_frozen_weights_and_keeps_norms_and_trainables_fp32(builtin_model_factory):
    from peftlab.methods import build_method

    _, _, model = builtin_model_factory("minilm-l6")
    model = build_method("bitfit", {}, {}).apply(model)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    before = sum(p.numel() * p.element_size() for p in frozen)
    memory.cast_frozen(model, torch.bfloat16)
    after = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    norms = [p for m in model.modules() if memory.is_norm(m) for p in m.parameters(recurse=False)]
    assert norms and all(p.dtype == torch.float32 for p in norms)  # BitFit trains LayerNorm biases beside their weights
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    norm_bytes = sum(p.numel() * 4 for p in norms if not p.requires_grad)
    assert after == (before - norm_bytes) / 2 + norm_bytes
    assert memory.frozen_dtype(model) == torch.bfloat16


@pytest.mark.slow
def test_every_method_trains_and_evaluates_on_a_bf16_base(tmp_path, minilm_spec, tiny_task_dir):
    """What a GPU run does by default for every method but full fine-tuning, asked for on the
    CPU: the frozen base in bf16, what trains in fp32 (stored so), the record says which ran,
    and evaluation rebuilds the same model."""
    from peftlab.methods import METHODS

    for name in sorted(METHODS):
        exp = load_experiment(REPO_ROOT / "config" / "experiments", name, "default")
        exp = dataclasses.replace(exp, training=dataclasses.replace(exp.training, max_steps=2, base_dtype="bf16"))
        key = RunKey("minilm-l6", "rotten_tomatoes", name, "default", 0)
        out = tmp_path / name
        rec = finetune(key, minilm_spec, exp, tiny_task_dir, out / "w.safetensors", out / "r.json", threads=1)
        assert rec["status"] == "completed" and np.isfinite(rec["curves"]["train_loss"][-1][1]), name
        assert rec["memory"]["base_dtype"] == ("fp32" if name == "full" else "bf16"), name
        assert rec["precision"] == ("fp32" if name == "full" else "bf16 autocast"), name  # CPU: auto is fp32
        stored = {v.dtype for v in load_file(str(out / "w.safetensors")).values() if v.is_floating_point()}
        assert stored == {torch.float32}, name
        ev = evaluate(key, minilm_spec, tiny_task_dir, out / "r.json", out / "w.safetensors", out / "m.json",
                      threads=1, measure_inference=name in ("lora", "bitfit"))
        assert ev["precision"] == rec["precision"] and 0.3 < ev["metrics"]["accuracy"] < 0.8, name


# ---------------------------------------------------------------------------------------
# Gradient accumulation and checkpointing
# ---------------------------------------------------------------------------------------


def test_micro_batches_are_trimmed_and_weighed_by_what_their_loss_averages():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    batch = {"input_ids": mask * 7, "attention_mask": mask, "labels": torch.tensor([0, 1, 0, 1])}
    parts = micro_batches(batch, 2)
    assert [p["input_ids"].shape for p in parts] == [(2, 4), (2, 2)]  # each padded to its own longest row
    assert micro_batches(batch, 4) == [batch]
    assert [loss_items(p) for p in parts] == [2, 2]  # a classifier: rows
    causal = {"input_ids": mask, "attention_mask": mask, "prompt_length": torch.tensor([2, 2, 1, 1]),
              "labels": torch.tensor([[-100, -100, 5, 6], [-100, -100, 5, -100], [-100, 4, -100, -100],
                                      [-100, -100, -100, -100]])}
    assert loss_items(causal) == 4  # labelled tokens after the shift


def test_sharded_batches_split_each_global_batch_across_processes():
    batches = [list(range(10)), list(range(10, 17)), [17]]
    shards = [list(ShardedBatches(batches, r, 2)) for r in range(2)]
    assert shards[0] == [[0, 1, 2, 3, 4], [10, 11, 12, 13]] and shards[1] == [[5, 6, 7, 8, 9], [14, 15, 16]]
    assert len(ShardedBatches(batches, 0, 2)) == 3


def _no_dropout(monkeypatch):
    """Dropout off in the loaded model: two batchings of the same rows then make the same update."""
    import peftlab.train as train

    real = train.load_model

    def load(*args, **kwargs):
        model = real(*args, **kwargs)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        return model

    monkeypatch.setattr(train, "load_model", load)


def _max_diff(a, b) -> float:
    wa, wb = load_file(str(a / "w.safetensors")), load_file(str(b / "w.safetensors"))
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_gradient_accumulation_makes_the_update_of_the_larger_batch(tmp_path, minilm_spec, tiny_task_dir,
                                                                  monkeypatch):
    _no_dropout(monkeypatch)
    one, a = _run(tmp_path, minilm_spec, tiny_task_dir, "one", _lora(batch_size=16))
    acc, b = _run(tmp_path, minilm_spec, tiny_task_dir, "acc", _lora(batch_size=4, gradient_accumulation_steps=4))
    assert acc["memory"]["gradient_accumulation_steps"] == 4 and acc["memory"]["global_batch_size"] == 16
    assert acc["steps"] == one["steps"] == 3
    np.testing.assert_allclose([v for _, v in acc["curves"]["train_loss"]],
                               [v for _, v in one["curves"]["train_loss"]], rtol=1e-5)
    assert _max_diff(a, b) < 1e-5


def test_gradient_checkpointing_gives_the_same_run(tmp_path, minilm_spec, tiny_task_dir):
    """Recomputed activations (dropout's masks replayed) give the same losses and weights."""
    off, a = _run(tmp_path, minilm_spec, tiny_task_dir, "off", _lora())
    on, b = _run(tmp_path, minilm_spec, tiny_task_dir, "on", _lora(gradient_checkpointing=True))
    assert on["memory"]["gradient_checkpointing"] is True and off["memory"]["gradient_checkpointing"] is False
    np.testing.assert_allclose([v for _, v in on["curves"]["train_loss"]],
                               [v for _, v in off["curves"]["train_loss"]], rtol=1e-6)
    assert _max_diff(a, b) < 1e-6
    assert on["memory"]["deterministic_kernels"] is True
    nondet, _ = _run(tmp_path, minilm_spec, tiny_task_dir, "nondet", _lora(max_steps=1, deterministic=False))
    assert nondet["memory"]["deterministic_kernels"] is False


# ---------------------------------------------------------------------------------------
# Two processes (torchrun, gloo)
# ---------------------------------------------------------------------------------------

TRAINING = {"max_steps": 4, "batch_size": 2, "evals_per_epoch": 1, "eval_batch_size": 4, "log_every_steps": 1}


@pytest.fixture(scope="module")
def smollm_job(smollm, tmp_path_factory):
    """SmolLM2 (no dropout) with LoRA (dropout 0) or full fine-tuning on 32 ASDiv problems, in an
    experiments folder of its own."""
    spec, tok = smollm
    root = tmp_path_factory.mktemp("ddp")
    prepare_task(TaskSpec.from_config("asdiv", {"max_train_examples": 32, "max_eval_examples": 4}), tok,
                 root / "task", "smollm2-135m")
    (root / "experiments" / "lora").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "config" / "experiments" / "defaults.yaml", root / "experiments" / "defaults.yaml")
    (root / "experiments" / "lora" / "default.yaml").write_text(
        "training:\n  learning_rate: 1.0e-3\nmethod: {r: 4, alpha: 8, dropout: 0.0, targets: [query, value]}\n")
    (root / "experiments" / "full").mkdir()
    (root / "experiments" / "full" / "default.yaml").write_text("training:\n  learning_rate: 1.0e-4\nmethod: {}\n")
    return spec, root


def _two(root, name, training=TRAINING, env=None, method="lora", model=None):
    key = RunKey("smollm2-135m", "asdiv", method, "default", 0)
    out = root / name
    with open(root / f"{name}.log", "a") as log, _env(env or {}):
        return finetune_processes(2, key, model, root / "experiments", training, None, root / "task",
                                  out / "w.safetensors", out / "r.json", 1, stream=log), out


class _env:
    def __init__(self, values):
        self.values, self.saved = values, {}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.slow
def test_two_processes_match_one_process_with_twice_the_batch(smollm_job):
    """2 processes with batch b each == 1 process with batch 2b (to 1e-4 on any weight, 1e-6 on
    the losses; the shards pad to their own longest rows) == 1 process accumulating 2 x b
    (to 1e-7: the same micro-batches). Process 0 alone writes."""
    spec, root = smollm_job
    two, a = _two(root, "two")
    assert two["memory"]["processes"] == 2 and two["memory"]["global_batch_size"] == 4 and two["steps"] == 4
    key = RunKey("smollm2-135m", "asdiv", "lora", "default", 0)
    exp = load_experiment(root / "experiments", "lora", "default", dict(TRAINING, batch_size=4))
    one = finetune(key, spec, exp, root / "task", root / "one" / "w.safetensors", root / "one" / "r.json", threads=2)
    exp = load_experiment(root / "experiments", "lora", "default", dict(TRAINING, gradient_accumulation_steps=2))
    acc = finetune(key, spec, exp, root / "task", root / "acc" / "w.safetensors", root / "acc" / "r.json", threads=2)
    losses = {n: [v for _, v in r["curves"]["train_loss"]] for n, r in (("two", two), ("one", one), ("acc", acc))}
    np.testing.assert_allclose(losses["two"], losses["one"], rtol=1e-6)
    assert _max_diff(a, root / "one") < 1e-4
    assert _max_diff(a, root / "acc") < 1e-7
    assert sorted(p.name for p in a.iterdir()) == ["r.json", "w.safetensors"]  # no stray files of process 1
    assert "process 1" in (root / "two.log").read_text()  # both processes ran


@pytest.mark.slow
def test_fsdp_full_fine_tuning_on_two_processes_matches_one_process(smollm_job):
    """Full fine-tuning sharded over 2 processes (FSDP) with batch b each == 1 process with
    batch 2b: the same losses (1e-5) and weights (1e-5, against updates of 1e-4 and more); the
    weights file is a single process's (every tensor, full size), written by process 0 alone."""
    from peftlab.models import load_model

    spec, root = smollm_job
    two, a = _two(root, "fsdp", method="full", model={"parallel": "fsdp"})
    assert two["memory"]["parallel"] == "fsdp" and two["memory"]["processes"] == 2
    key = RunKey("smollm2-135m", "asdiv", "full", "default", 0)
    exp = load_experiment(root / "experiments", "full", "default", dict(TRAINING, batch_size=4))
    one = finetune(key, spec, exp, root / "task", root / "one-full" / "w.safetensors", root / "one-full" / "r.json",
                   threads=2)
    np.testing.assert_allclose([v for _, v in two["curves"]["train_loss"]],
                               [v for _, v in one["curves"]["train_loss"]], rtol=1e-5)
    assert two["best_validation"] == one["best_validation"]
    wa, wb = load_file(str(a / "w.safetensors")), load_file(str(root / "one-full" / "w.safetensors"))
    assert set(wa) == set(wb) and all(wa[k].shape == wb[k].shape for k in wa)
    assert _max_diff(a, root / "one-full") < 1e-5
    stats = __import__("json").loads((root / "task" / "stats.json").read_text())
    pretrained = dict(load_model(spec, stats["num_labels"], stats["problem_type"], seed=0).named_parameters())
    assert max((wb[k] - pretrained[k].detach()).abs().max().item() for k in wb) > 1e-4
    assert sorted(p.name for p in a.iterdir()) == ["r.json", "w.safetensors"]


def test_an_unknown_parallel_mode_is_a_config_error(smollm_job):
    from peftlab.errors import ConfigError

    spec, root = smollm_job
    with pytest.raises(ConfigError, match="parallel is 'zero3': use one of ddp, fsdp"):
        _two(root, "bad", model={"parallel": "zero3"})


def _kill_all(marker: str, proc) -> None:
    """SIGKILL to torchrun and its workers (they run in sessions of their own), as a node's
    failure or SLURM's kill of the job's cgroup would."""
    from pathlib import Path

    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().decode(errors="replace"):
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("method,model,steps", [("lora", None, 6), ("full", {"parallel": "fsdp"}, 4)],
                         ids=["ddp", "fsdp"])  # a sharded step takes seconds: it is killed at step 2 or 3 of 4
def test_two_process_run_killed_with_sigkill_resumes_to_the_same_result(smollm_job, method, model, steps):
    """SIGKILL to the whole 2-process run after a checkpoint: the job run again resumes from it
    and ends with the weights of a run that was never stopped (bitwise on CPU)."""
    from safetensors import safe_open

    spec, root = smollm_job
    training = dict(TRAINING, max_steps=steps)
    whole, _ = _two(root, f"whole-{method}", training, method=method, model=model)
    out = root / f"killed-{method}"
    ckpt = out / ".checkpoint" / "r.safetensors"
    job = {"key": ["smollm2-135m", "asdiv", method, "default", 0], "model": model,
           "experiments_dir": str(root / "experiments"), "training": training, "mask_path": None,
           "data_dir": str(root / "task"), "weights_path": str(out / "w.safetensors"),
           "record_path": str(out / "r.json"), "threads": 1, "code": ""}
    job_path = root / f"killed-{method}.json"
    job_path.write_text(__import__("json").dumps(job))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "peftlab.distributed", str(job_path)]
    env = dict(os.environ, PEFTLAB_CHECKPOINT_EVERY_STEPS="1", OMP_NUM_THREADS="1")
    with open(root / f"killed-{method}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        step, deadline = 0, time.monotonic() + 300
        while step < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            try:
                with safe_open(str(ckpt), framework="pt") as fh:
                    step = __import__("json").loads(fh.metadata()["peftlab"])["state"]["step"]
            except Exception:  # noqa: BLE001 - not written yet, or being renamed
                pass
        _kill_all(str(job_path), proc)
    time.sleep(1)
    assert 2 <= step < steps and not (out / "r.json").exists() and ckpt.exists()
    with _env({"PEFTLAB_CHECKPOINT_EVERY_STEPS": "1"}):
        resumed, _ = _two(root, f"killed-{method}", training, method=method, model=model)
    assert resumed["resumed_from_steps"] and resumed["resumed_from_steps"][0] >= 2
    assert resumed["curves"]["train_loss"] == whole["curves"]["train_loss"]
    assert _max_diff(out, root / f"whole-{method}") == 0.0
    assert not ckpt.exists()
