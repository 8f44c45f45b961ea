"""Failures through the real pipeline (issue 9, items 4-6): a diverged run is a recorded
outcome (the DAG goes on), a SIGKILLed job leaves nothing Snakemake accepts as complete and
the rerun recomputes it, and the same config and seed give the same numbers and weights.

One scratch copy of the workflow serves the module; each test asks Snakemake for its own
targets, so the data is prepared once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from _workflow_copy import workflow_copy

REPO = Path(__file__).resolve().parents[1]
RUN = "minilm-l6/rotten_tomatoes"

pytestmark = pytest.mark.slow


def snakemake(work: Path, *args, timeout=900):
    cores = [] if any(a.startswith("-c") for a in args) else ["-c1"]
    return subprocess.run([sys.executable, "-m", "snakemake", *cores, "--configfile", "robust.yaml",
                           "--replace-workflow-config", *args], cwd=work, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = workflow_copy(tmp_path_factory.mktemp("robust"))
    exp = work / "tests" / "configs" / "experiments"
    (exp / "full" / "diverge.yaml").write_text("# far too high a rate: the loss becomes NaN\n"
                                               "training:\n  learning_rate: 1.0e+4\n")
    (exp / "full" / "slow.yaml").write_text("# long enough to be killed mid-training\ntraining:\n  max_steps: 24\n")
    cfg = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["methods"] = {"full": ["default", "diverge", "slow"], "lora": ["default"]}
    cfg["analyses"] = {"intrinsic_dimension": {"dims": []}, "gradient_sparsity": {"enabled": False}}
    (work / "robust.yaml").write_text(yaml.safe_dump(cfg))
    return work


def _outputs(work: Path, variant: str, seed: int = 0, method: str = "full") -> dict[str, Path]:
    run = f"{RUN}/{method}/{variant}/seed{seed}"
    return {"weights": work / f"results/finetune/{run}/trainable.safetensors",
            "record": work / f"results/finetune/{run}/result.json",
            "metrics": work / f"results/evaluate/{run}/metrics.json",
            "log": work / f"logs/finetune/{run}.log"}


def test_diverged_run_is_recorded_and_the_dag_goes_on(work, monkeypatch):
    from peftlab.tracking import default_store, runs_table

    out = _outputs(work, "diverge")
    res = snakemake(work, str(out["metrics"].relative_to(work)))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]  # a recorded outcome, not a crash
    console = res.stdout + res.stderr
    assert "Traceback" not in console
    lines = [line for line in console.splitlines() if line.startswith("peftlab finetune:")]
    assert lines == [f"peftlab finetune: {RUN}/full/diverge/seed0 failed: loss became NaN at step 2; lower "
                     "learning_rate (now 10000.0) in tests/configs/experiments/full/diverge.yaml, or set "
                     "on_nonfinite_loss: skip there"], console[-3000:]
    record = json.loads(out["record"].read_text())
    assert record["status"] == "failed" and record["failure"]["step"] == 2
    assert record["failure"]["reason"] == lines[0].split(" failed: ", 1)[1]
    assert out["weights"].stat().st_size > 0  # declared output, documented as not a trained model
    metrics = json.loads(out["metrics"].read_text())
    assert metrics["status"] == "failed" and metrics["metrics"] == {} and metrics["failure"] == record["failure"]
    # runs_table (mlflow.set_tracking_uri) exports MLFLOW_TRACKING_URI: undone after the test
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{default_store(work / 'results')}")
    runs = runs_table({"experiment": "peftlab", "default_store": default_store(work / "results")})
    mine = runs[runs["tags.variant"] == "diverge"]
    assert sorted(mine["tags.rule"]) == ["evaluate", "finetune"] and set(mine["status"]) == {"FAILED"}


def _job_process(snake: psutil.Process, script: str) -> psutil.Process | None:
    for child in snake.children(recursive=True):
        try:
            if any(script in part for part in child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def _start_and_wait_for_training(work: Path, target: str, log: Path) -> tuple[subprocess.Popen, psutil.Process]:
    """Start Snakemake on ``target``; return it and the finetune job's process once it trains."""
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "-c1", "--configfile", "robust.yaml",
                             "--replace-workflow-config", target], cwd=work, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        job = _job_process(psutil.Process(proc.pid), "finetune.py")
        if job and log.exists() and "finetune full/slow seed0:" in log.read_text(errors="replace"):
            return proc, job  # the progress bar is up: training has started
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError("the finetune job never started training")


def _kill_when_outputs_start(proc: subprocess.Popen, run_dir: Path) -> str:
    """SIGKILL Snakemake and its job together (the node goes away: nothing is left to clean
    up) the moment the job's first output appears in ``run_dir``: the weights' temporary file
    (caught mid-write), or, were writes not atomic, the weights file itself mid-write.
    Returns the name seen."""
    deadline = time.time() + 600
    while time.time() < deadline:
        names = [e.name for e in os.scandir(run_dir)] if run_dir.is_dir() else []
        seen = [n for n in names if n.startswith((".trainable.safetensors.", "trainable.safetensors"))]
        if seen:
            os.killpg(proc.pid, signal.SIGKILL)
            return seen[0]
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.001)
    raise AssertionError("the finetune job never wrote its outputs")


def test_sigkilled_job_leaves_no_complete_output_and_reruns(work):
    from safetensors.torch import load_file

    out = _outputs(work, "slow")
    target = str(out["record"].relative_to(work))
    # 1. the job's process is killed (the OOM killer, a cgroup at the end of the time limit)
    proc, job = _start_and_wait_for_training(work, target, out["log"])
    job.send_signal(signal.SIGKILL)
    console = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0, console[-3000:]
    assert not out["record"].exists() and not out["weights"].exists(), console[-3000:]
    # 2. the whole process group dies with it (the node goes away mid-training)
    proc, job = _start_and_wait_for_training(work, target, out["log"])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=300)
    assert not out["record"].exists() and not out["weights"].exists()
    # Snakemake's lock outlives a killed Snakemake: the user unlocks, as its message says
    assert snakemake(work, "--unlock").returncode == 0
    dry = snakemake(work, "-n", target)
    assert dry.returncode == 0 and "rule finetune:" in dry.stdout + dry.stderr, dry.stdout  # to recompute
    # 3. killed again the moment its outputs start being written: whatever stands under an
    # output's name is whole (atomic writes), and the job still counts as not done
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "-c1", "--configfile", "robust.yaml",
                             "--replace-workflow-config", target], cwd=work, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = _kill_when_outputs_start(proc, out["record"].parent)
    console = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and not out["record"].exists(), (seen, console[-3000:])
    if out["weights"].exists():  # renamed into place before the kill: then it is the whole file
        assert load_file(out["weights"]), seen
    assert snakemake(work, "--unlock").returncode == 0
    dry = snakemake(work, "-n", target)
    assert dry.returncode == 0 and "rule finetune:" in dry.stdout + dry.stderr, dry.stdout
    # 4. the rerun recomputes it
    res = snakemake(work, target)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    record = json.loads(out["record"].read_text())
    assert record["status"] == "completed" and record["steps"] == 24
    assert "Nothing to be done" in (r := snakemake(work, "-n", target)).stdout + r.stderr


def _run_lora(work: Path, seeds=(0, 1)) -> dict[int, dict]:
    targets = [str(_outputs(work, "default", s, "lora")["metrics"].relative_to(work)) for s in seeds]
    res = snakemake(work, "-c2", *targets)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    out = {}
    for seed in seeds:
        paths = _outputs(work, "default", seed, "lora")
        out[seed] = {"record": json.loads(paths["record"].read_text()),
                     "metrics": json.loads(paths["metrics"].read_text())["metrics"],
                     "weights": paths["weights"].read_bytes()}
    return out


def test_same_config_and_seed_same_numbers_through_the_pipeline(work):
    first = _run_lora(work)
    for stage in ("finetune", "evaluate"):
        shutil.rmtree(work / "results" / stage / RUN / "lora" / "default" / "seed0")
    again = _run_lora(work, seeds=(0,))  # the same job again, from scratch
    assert again[0]["weights"] == first[0]["weights"]  # bitwise
    assert again[0]["metrics"] == first[0]["metrics"]
    assert again[0]["record"]["curves"] == first[0]["record"]["curves"]
    assert again[0]["record"]["best_validation"] == first[0]["record"]["best_validation"]
    # another seed: other weights, other numbers
    assert first[0]["weights"] != first[1]["weights"]
    assert first[0]["metrics"] != first[1]["metrics"]
    assert first[0]["record"]["curves"]["train_loss"] != first[1]["record"]["curves"]["train_loss"]


def test_the_record_alone_reproduces_the_run(work, tmp_path):
    """Everything needed is in result.json: model, task and split, resolved config, seed,
    threads; rebuilt from it alone, the run gives the same data fingerprints and weights."""
    from peftlab.config import Experiment, RunKey, TrainConfig
    from peftlab.data import TaskSpec, prepare_task
    from peftlab.models import ModelSpec, load_tokenizer
    from peftlab.provenance import versions
    from peftlab.train import finetune

    paths = _outputs(work, "default", 1, "lora")
    if not paths["record"].exists():
        _run_lora(work)
    rec = json.loads(paths["record"].read_text())
    assert rec["versions"] == versions() and rec["git_commit"] and rec["config_hash"]
    assert rec["run"]["seed"] == 1 and rec["config"]["training"] and rec["task"]["split_seed"] == 1234
    model = {k: v for k, v in rec["model"].items() if k not in ("notes", "total_params", "package")}
    spec = ModelSpec(**model)
    task = dict(rec["task"], text_columns=tuple(rec["task"]["text_columns"]))
    prepare_task(TaskSpec(**task), load_tokenizer(spec), tmp_path / "data", model_name=spec.name)
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert stats["fingerprint"] == rec["data_fingerprint"]
    assert {k: v["fingerprint"] for k, v in stats["splits"].items()} == rec["split_fingerprints"]
    cfg = rec["config"]
    experiment = Experiment(cfg["method"], cfg["variant"], TrainConfig(**cfg["training"]), cfg["method_params"], ())
    key = RunKey(**{k: rec["run"][k] for k in ("model", "task", "method", "variant")}, seed=int(rec["run"]["seed"]))
    again = finetune(key, spec, experiment, tmp_path / "data", tmp_path / "w.safetensors", tmp_path / "r.json",
                     threads=rec["threads"])
    assert (tmp_path / "w.safetensors").read_bytes() == paths["weights"].read_bytes()
    again = json.loads(json.dumps(again, default=str))  # as stored (tuples become lists)
    assert again["curves"] == rec["curves"] and again["best_validation"] == rec["best_validation"]


def test_bad_data_stops_its_job_with_one_line(work):
    bad = work / "one_class.csv"
    bad.write_text("text,label\n" + "".join(f"review {i},pos\n" for i in range(30)))
    cfg = yaml.safe_load((work / "robust.yaml").read_text())
    cfg["tasks"] = {"mine": {"source": "file", "path": str(bad)}}
    (work / "bad_data.yaml").write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "snakemake", "-c1", "--configfile", "bad_data.yaml",
                          "--replace-workflow-config", "results/data/minilm-l6/mine/stats.json"],
                         cwd=work, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    console = res.stdout + res.stderr
    lines = [line for line in console.splitlines() if line.startswith("peftlab prepare_data:")]
    assert lines == [f"peftlab prepare_data: task 'mine': {bad}: label column 'label' has a single value "
                     "('pos') in all 30 rows; a classification task needs at least two labels"], console[-3000:]
    assert "Traceback" not in console
    assert not (work / "results" / "data" / "minilm-l6" / "mine").exists() or not list(
        (work / "results" / "data" / "minilm-l6" / "mine").glob("*.parquet"))
