"""Preemption-safe training: a run stopped by SIGTERM, or SIGKILLed after a periodic checkpoint,
resumes and ends bitwise equal to a run never stopped (real MiniLM-L6, real rotten_tomatoes)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from peftlab import checkpoint
from peftlab.config import Experiment, RunKey, TrainConfig
from peftlab.errors import ConfigError
from peftlab.train import finetune

# 64 training rows at batch 16: 4 steps per epoch, so 12 steps cross two epoch boundaries;
# validation every 2 steps (after which the loop trains in the mode validation left it in);
# LoRA dropout and MiniLM's own dropout draw from the RNG at every step
TRAINING = {"max_steps": 12, "batch_size": 16, "eval_batch_size": 32, "learning_rate": 1e-3,
            "evals_per_epoch": 2, "log_every_steps": 2}
LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["query", "value"]}

CHILD = """
import json, sys
from peftlab.cli import run_step
from peftlab.config import Experiment, RunKey, TrainConfig
from peftlab.models import ModelSpec
from peftlab.train import finetune

a = json.loads(sys.argv[1])
if a.get("defer"):  # a GPU's deferred loss read-back, on the CPU
    import peftlab.train
    peftlab.train.defer_loss_readback = lambda dev: True
key = RunKey("minilm-l6", "rotten_tomatoes", "lora", "default", 0)
exp = Experiment("lora", "default", TrainConfig(**a["training"]), a["lora"], ())
run_step("finetune", None, lambda: finetune(key, ModelSpec.from_config("minilm-l6", {}), exp, a["data"],
         a["out"] + "/w.safetensors", a["out"] + "/result.json", threads=1))
"""


def _experiment(lr=TRAINING["learning_rate"]):
    return Experiment("lora", "default", TrainConfig(**(TRAINING | {"learning_rate": lr})), dict(LORA), ())


def _finetune(spec, data_dir, out: Path, lr=TRAINING["learning_rate"]):
    key = RunKey("minilm-l6", "rotten_tomatoes", "lora", "default", 0)
    return finetune(key, spec, _experiment(lr), data_dir, out / "w.safetensors", out / "result.json", threads=1)


def _child(tmp_path, data_dir, out: Path, env: dict, until: str, sig: int, defer: bool = False):
    """Train in a subprocess; send ``sig`` once a log line matches ``until``. Returns (exit status,
    the log lines seen)."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    args = json.dumps({"training": TRAINING, "lora": LORA, "data": str(data_dir), "out": str(out), "defer": defer})
    proc = subprocess.Popen([sys.executable, str(script), args], stderr=subprocess.PIPE, text=True,
                            env=os.environ | env)
    lines, deadline = [], time.monotonic() + 300
    for line in proc.stderr:
        lines.append(line.rstrip())
        if re.search(until, line):
            proc.send_signal(sig)
            break
        assert time.monotonic() < deadline, "\n".join(lines[-20:])
    lines += proc.stderr.read().splitlines()
    return proc.wait(timeout=120), lines


def _same_outcome(resumed: dict, reference: dict, out: Path, ref_out: Path) -> None:
    for k in ("curves", "best_validation", "final_validation", "steps", "trainable_params"):
        assert resumed[k] == reference[k], k
    assert (out / "w.safetensors").read_bytes() == (ref_out / "w.safetensors").read_bytes()
    assert not checkpoint.checkpoint_path(out / "result.json").exists()  # removed after success


@pytest.fixture(scope="module")
def reference(tmp_path_factory, minilm_spec, tiny_task_dir):
    out = tmp_path_factory.mktemp("uninterrupted")
    return _finetune(minilm_spec, tiny_task_dir, out), out


@pytest.mark.slow
def test_sigterm_mid_training_saves_and_the_rerun_resumes_bitwise(tmp_path, minilm_spec, tiny_task_dir, reference):
    out = tmp_path / "run"
    # periodic checkpoints off: only the signal saves
    off = {"PEFTLAB_CHECKPOINT_EVERY_STEPS": "0", "PEFTLAB_CHECKPOINT_EVERY_SECONDS": "0"}
    status, lines = _child(tmp_path, tiny_task_dir, out, off, r"step 6 validation", signal.SIGTERM)
    assert status == 1, "\n".join(lines[-20:])
    # one line names the step it stopped at (run_step prints it and logs it: twice on stderr)
    (stopped_at,) = {int(m.group(1)) for line in lines
                     if (m := re.search(r"stopped at step (\d+) of 12 \(SIGTERM received\)", line))}
    assert stopped_at in (6, 7)  # the step in progress when the signal came, then it saved
    assert not (out / "result.json").exists() and not (out / "w.safetensors").exists()

    resumed = _finetune(minilm_spec, tiny_task_dir, out)
    assert resumed["resumed_from_steps"] == [stopped_at]
    ref, ref_out = reference
    assert ref["resumed_from_steps"] == []
    _same_outcome(resumed, ref, out, ref_out)
    print(f"SIGTERM during step {stopped_at}: saved, resumed from step {stopped_at}; best validation "
          f"{resumed['best_validation']} == uninterrupted {ref['best_validation']}, weights bitwise equal")


@pytest.mark.slow
def test_sigkill_after_a_periodic_checkpoint_resumes_from_it_bitwise(tmp_path, minilm_spec, tiny_task_dir,
                                                                      reference):
    out = tmp_path / "run"
    every5 = {"PEFTLAB_CHECKPOINT_EVERY_STEPS": "5", "PEFTLAB_CHECKPOINT_EVERY_SECONDS": "0"}
    # killed once step 6 is done: the work after the step-5 checkpoint is lost and redone
    status, lines = _child(tmp_path, tiny_task_dir, out, every5, r"step 6 validation", signal.SIGKILL)
    assert status == -signal.SIGKILL
    assert any(re.search(r"checkpoint at step 5 saved", line) for line in lines), "\n".join(lines[-20:])
    assert not any(re.search(r"checkpoint at step 10 saved", line) for line in lines)

    stale = tmp_path / "stale"  # the same checkpoint beside a run with another learning rate
    shutil.copytree(out / checkpoint.CHECKPOINT_DIR, stale / checkpoint.CHECKPOINT_DIR)

    resumed = _finetune(minilm_spec, tiny_task_dir, out)
    assert resumed["resumed_from_steps"] == [5]
    ref, ref_out = reference
    _same_outcome(resumed, ref, out, ref_out)
    print(f"SIGKILL after step 6, resumed from the step-5 checkpoint; best validation "
          f"{resumed['best_validation']} == uninterrupted {ref['best_validation']}, weights bitwise equal")

    other = _finetune(minilm_spec, tiny_task_dir, stale, lr=5e-4)
    assert other["resumed_from_steps"] == [] and other["steps"] == 12
    assert other["curves"]["train_loss"] != ref["curves"]["train_loss"]
    assert not checkpoint.checkpoint_path(stale / "result.json").exists()


@pytest.mark.slow
def test_deferred_loss_readback_checkpoints_and_resumes_bitwise(tmp_path, minilm_spec, tiny_task_dir, reference,
                                                                monkeypatch):
    """A GPU's loop reads losses back only at logging / validation / checkpoint steps: a
    checkpoint at step 5 (between two logging steps) must hold the loss of step 5, or the
    resumed run's step-6 mean would differ. Forced on here: killed after step 6, resumed
    from the step-5 checkpoint, the run ends bitwise equal to the uninterrupted one."""
    import peftlab.train

    out = tmp_path / "run"
    every5 = {"PEFTLAB_CHECKPOINT_EVERY_STEPS": "5", "PEFTLAB_CHECKPOINT_EVERY_SECONDS": "0"}
    status, lines = _child(tmp_path, tiny_task_dir, out, every5, r"step 6 validation", signal.SIGKILL, defer=True)
    assert status == -signal.SIGKILL
    assert any(re.search(r"checkpoint at step 5 saved", line) for line in lines), "\n".join(lines[-20:])
    monkeypatch.setattr(peftlab.train, "defer_loss_readback", lambda dev: True)
    resumed = _finetune(minilm_spec, tiny_task_dir, out)
    assert resumed["resumed_from_steps"] == [5]
    ref, ref_out = reference
    _same_outcome(resumed, ref, out, ref_out)


def test_checkpoint_file_round_trip_and_refusals(tmp_path, caplog):
    path = tmp_path / checkpoint.CHECKPOINT_DIR / "result.safetensors"
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "rng": torch.get_rng_state()}
    meta = {"step": 3, "best": {"value": -float("inf")}, "curves": [[2, 0.5]]}
    checkpoint.save(path, "fp1", tensors, meta)
    got_tensors, got_meta = checkpoint.load(path, "fp1")
    assert got_meta == meta and torch.equal(got_tensors["a"], tensors["a"])
    # another run's (or stale) checkpoint is discarded, not resumed
    assert checkpoint.load(path, "fp2") is None and not path.exists()
    assert "another config, data or code" in caplog.text
    # a pickle is never unpickled: the file is unreadable as safetensors and discarded
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"step": 3}))
    assert checkpoint.load(path, "fp1") is None and not path.exists()
    assert "cannot be read" in caplog.text


def test_policy_from_environment():
    assert checkpoint.CheckpointPolicy.from_env({}) == checkpoint.CheckpointPolicy()
    policy = checkpoint.CheckpointPolicy.from_env({"PEFTLAB_CHECKPOINT_EVERY_STEPS": "50",
                                                   "PEFTLAB_CHECKPOINT_MARGIN_SECONDS": "0"})
    assert policy.every_steps == 50 and policy.margin_seconds == 0 and policy.every_seconds == 600
    with pytest.raises(ConfigError, match="PEFTLAB_CHECKPOINT_EVERY_SECONDS='ten' is not a number >= 0"):
        checkpoint.CheckpointPolicy.from_env({"PEFTLAB_CHECKPOINT_EVERY_SECONDS": "ten"})


@pytest.mark.parametrize(("text", "seconds"), [
    ("0:58", 58), ("12:00", 720), ("1:02:03", 3723), ("2-01:00:00", 176400),
    ("UNLIMITED", None), ("NOT_SET", None), ("", None)])
def test_parse_squeue_time_left(text, seconds):
    assert checkpoint.parse_time_left(text) == seconds
