"""MLflow mirror: concurrency on the default SQLite store, outages, reruns that replace."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _mlflow_server import free_port, mlflow_server
from peftlab.io import write_json
from peftlab.tracking import log_record, pending_entries, runs_table

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"


def _record(seed: int, method: str = "lora", status: str = "completed", n_steps: int = 60) -> dict:
    """A finetune record with curves (what a job writes before logging)."""
    run = {"model": "minilm-l6", "task": "rotten_tomatoes", "method": method, "variant": "default", "seed": seed}
    rec = {
        "rule": "finetune", "status": status, "run": run, "main_metric": "accuracy", "config_hash": f"cfg{seed}",
        "git_commit": "abc", "config": {"training": {"learning_rate": 1e-3}, "method_params": {"r": 8}},
        "task": {"name": "rotten_tomatoes"}, "model": {"name": "minilm-l6", "total_params": 100},
        "trainable_params": 10 + seed, "trainable_percent": 10.0, "train_time_s": 1.0, "stored_size_bytes": 40,
        "steps": n_steps, "peak_memory": {"host_rss_mb": 800.0},
        "curves": {"train_loss": [[s, 1.0 / s] for s in range(1, n_steps + 1)],
                   "learning_rate": [[s, 1e-3] for s in range(0, n_steps, 10)],
                   "validation": [{"step": s, "accuracy": 0.5 + s / 1000} for s in range(10, n_steps + 1, 10)]},
    }
    if status == "failed":
        rec["failure"] = {"reason": "loss became nan at step 7", "step": 7}
    return rec


def _mlflow_config(tmp_path: Path, uri: str | None = None) -> dict:
    return {"tracking_uri": uri, "experiment": "peftlab", "default_store": str(tmp_path / "results" / "mlflow.db")}


def _write(tmp_path: Path, rec: dict, name: str | None = None) -> Path:
    path = tmp_path / "results" / "finetune" / (name or "{model}/{task}/{method}/{variant}/seed{seed}".format(
        **rec["run"])) / "result.json"
    write_json(path, rec)
    return path


WORKER = r"""
import json, sys, time, logging, io
from pathlib import Path
stream = io.StringIO()
logging.basicConfig(level=logging.INFO, stream=stream, force=True)
from peftlab.tracking import log_record
from peftlab.io import read_json
import mlflow.tracking, mlflow.store.tracking.sqlalchemy_store  # a job's imports, done before the start signal
record_path, cfg, ready, go = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
record = read_json(record_path)
ready.write_text("1")
while not go.exists():
    time.sleep(0.01)
t0 = time.perf_counter()
run_id = log_record(record, record_path, cfg)
print(json.dumps({"run_id": run_id, "seconds": time.perf_counter() - t0, "log": stream.getvalue()}))
"""


@pytest.mark.slow
def test_16_parallel_jobs_log_to_the_default_sqlite_store(tmp_path):
    """16 processes log at the same instant (all imports done first) to one fresh SQLite store:
    16 complete runs, none lost or duplicated, no "database is locked" anywhere."""
    cfg = _mlflow_config(tmp_path)
    n = 16
    procs = []
    go = tmp_path / "go"
    for seed in range(n):
        path = _write(tmp_path, _record(seed))
        ready = tmp_path / f"ready{seed}"
        procs.append((ready, subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), json.dumps(cfg), str(ready), str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    deadline = time.time() + 300
    while not all(r.exists() for r, _ in procs):
        assert time.time() < deadline, "workers did not start"
        assert all(p.poll() is None for _, p in procs), [p.stderr.read() for _, p in procs if p.poll() is not None]
        time.sleep(0.05)
    t0 = time.perf_counter()
    go.write_text("go")
    outs = []
    for _, p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        assert "database is locked" not in err and "database is locked" not in out
        outs.append(json.loads(out.strip().splitlines()[-1]))
    wall = time.perf_counter() - t0
    assert all(o["run_id"] for o in outs)
    assert not pending_entries(cfg)
    runs = runs_table(cfg)
    assert len(runs) == n and set(runs["status"]) == {"FINISHED"}
    assert sorted(runs["tags.seed"].astype(int)) == list(range(n))
    assert sorted(runs["run_id"]) == sorted(o["run_id"] for o in outs)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cfg['default_store']}")
    for run_id in runs["run_id"]:  # complete: every metric step and the record artifact
        assert len(client.get_metric_history(run_id, "train_loss")) == 60
        assert [a.path for a in client.list_artifacts(run_id)] == ["result.json"]
    retries = sum(o["log"].count("database is locked") for o in outs)
    waits = [float(w) for o in outs for w in re.findall(r"waited ([0-9.]+) s for the store lock", o["log"])]
    assert len(waits) == n
    figures = {"processes": n, "wall_s": round(wall, 2), "slowest_job_s": round(max(o["seconds"] for o in outs), 2),
               "fastest_job_s": round(min(o["seconds"] for o in outs), 2), "lock_retries": retries,
               "longest_lock_wait_s": round(max(waits), 2), "mean_lock_wait_s": round(sum(waits) / n, 2),
               "runs": len(runs)}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "mlflow_concurrency.json").write_text(json.dumps(figures, indent=2))
    print("MLflow concurrency:", figures)


def test_rerun_replaces_its_run_and_failed_runs_are_marked(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = _mlflow_config(tmp_path)
    rec = _record(0)
    path = _write(tmp_path, rec)
    first = log_record(rec, path, cfg)
    assert log_record(rec, path, cfg) == first  # the same record again: nothing new
    rec2 = rec | {"trainable_params": 99}
    write_json(path, rec2)
    second = log_record(rec2, path, cfg)
    assert second and second != first
    runs = runs_table(cfg)
    assert list(runs["run_id"]) == [second] and runs["metrics.trainable_params"].iloc[0] == 99
    client = MlflowClient(f"sqlite:///{cfg['default_store']}")
    assert client.get_run(first).info.lifecycle_stage == "deleted"  # replaced, restorable
    failed = _record(1, status="failed") | {"device_name": "NVIDIA H200", "precision": "bf16 autocast"}
    fpath = _write(tmp_path, failed)
    run_id = log_record(failed, fpath, cfg)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["status"] == "failed" and run.data.tags["failure_reason"] == "loss became nan at step 7"
    assert {k: run.data.tags[k] for k in ("model", "task", "method", "variant", "seed", "rule", "config_hash")} == {
        "model": "minilm-l6", "task": "rotten_tomatoes", "method": "lora", "variant": "default", "seed": "1",
        "rule": "finetune", "config_hash": "cfg1"}
    # what it ran on, to filter by in the UI (a cluster's jobs may land on different GPUs)
    assert run.data.tags["device_name"] == "NVIDIA H200" and run.data.tags["precision"] == "bf16 autocast"
    assert "device_name" not in client.get_run(second).data.tags  # a record without it: no tag


def test_unreachable_sqlite_store_queues_then_the_sync_command_catches_up(tmp_path, monkeypatch):
    """A store that cannot be opened (its folder is blocked by a file) fails nothing; once it
    can be opened, ``python -m peftlab sync-mlflow`` logs what was queued."""
    blocker = tmp_path / "store"
    blocker.write_text("not a folder")
    cfg = _mlflow_config(tmp_path, f"sqlite:///{blocker}/mlflow.db")
    paths = []
    for seed in (0, 1):
        rec = _record(seed)
        paths.append(_write(tmp_path, rec))
        assert log_record(rec, paths[-1], cfg) is None
    assert len(pending_entries(cfg)) == 2
    blocker.unlink()
    blocker.mkdir()
    conf = tmp_path / "cfg.yaml"
    conf.write_text(
        (REPO / "tests" / "configs" / "tiny.yaml").read_text()
        + f"results_dir: {tmp_path / 'results'}\nmlflow: {{tracking_uri: 'sqlite:///{blocker}/mlflow.db'}}\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    res = subprocess.run([sys.executable, "-m", "peftlab", "sync-mlflow", "--configfile", str(conf)],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "synced 2" in res.stdout
    assert not pending_entries(cfg)
    runs = runs_table(cfg)
    assert sorted(runs["tags.seed"]) == ["0", "1"] and set(runs["status"]) == {"FINISHED"}


@pytest.mark.slow
def test_mlflow_server_outage_loses_nothing(tmp_path, tiny_task_dir, minilm_spec, monkeypatch):
    """A real training run while nothing answers at the tracking URL: the job's logging
    returns within seconds, the record stays on disk and queued. Then a real ``mlflow
    server`` comes up at that URL, and the next job to log syncs the queue too."""
    from peftlab.config import RunKey, load_experiment
    from peftlab.train import finetune

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cfg = _mlflow_config(tmp_path, uri)
    key = RunKey("minilm-l6", "rotten_tomatoes", "bitfit", "default", 0)
    exp = load_experiment(REPO / "config" / "experiments", "bitfit", "default")
    exp = type(exp)(exp.method, exp.variant, type(exp.training)(**(exp.training.to_dict() | {"max_steps": 2})),
                    exp.method_params, exp.files)
    ft_path = tmp_path / "results" / "finetune" / key.path() / "result.json"
    record = finetune(key, minilm_spec, exp, tiny_task_dir, ft_path.with_name("trainable.safetensors"), ft_path,
                      threads=1)
    import peftlab.tracking as tracking

    probes = []  # what bounds the job's logging: one TCP probe, not MLflow's own minutes of retries
    real_probe = tracking.reachable
    monkeypatch.setattr(tracking, "reachable", lambda u, *a, **k: probes.append((u, real_probe(u, *a, **k)))
                        or probes[-1][1])
    assert log_record(record, ft_path, cfg) is None
    assert probes == [(uri, False)]
    monkeypatch.setattr(tracking, "reachable", real_probe)
    assert ft_path.exists() and len(pending_entries(cfg)) == 1
    other = _record(5)
    other_path = _write(tmp_path, other)
    assert log_record(other, other_path, cfg) is None
    assert len(pending_entries(cfg)) == 2

    with mlflow_server(tmp_path, port):
        later = _record(6)
        later_path = _write(tmp_path, later)
        assert log_record(later, later_path, cfg)  # a later job: logs itself and syncs the queue
        assert not pending_entries(cfg)
        runs = runs_table(cfg)
        assert sorted(runs["tags.method"] + "/" + runs["tags.seed"]) == ["bitfit/0", "lora/5", "lora/6"]
        assert set(runs["status"]) == {"FINISHED"}
        bitfit = runs[runs["tags.method"] == "bitfit"].iloc[0]
        assert bitfit["metrics.trainable_params"] == record["trainable_params"]
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        assert [a.path for a in client.list_artifacts(bitfit["run_id"])] == ["result.json"]
        assert len(client.get_metric_history(bitfit["run_id"], "train_loss")) == len(record["curves"]["train_loss"])


@pytest.mark.slow
def test_weights_logged_when_configured(tmp_path, tiny_task_dir, minilm_spec):
    """``log_weights: merged``: the run gets its trainable tensors and the merged plain model
    (which loads into the base architecture); the exported file leaves the queue folder."""
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from peftlab.config import RunKey, load_experiment
    from peftlab.export import weights_to_log
    from peftlab.models import load_model
    from peftlab.train import finetune

    cfg = _mlflow_config(tmp_path) | {"log_weights": "merged"}
    key = RunKey("minilm-l6", "rotten_tomatoes", "lora", "default", 0)
    exp = load_experiment(REPO / "config" / "experiments", "lora", "default")
    exp = type(exp)(exp.method, exp.variant, type(exp.training)(**(exp.training.to_dict() | {"max_steps": 2})),
                    exp.method_params, exp.files)
    ft_path = tmp_path / "results" / "finetune" / key.path() / "result.json"
    weights = ft_path.with_name("trainable.safetensors")
    record = finetune(key, minilm_spec, exp, tiny_task_dir, weights, ft_path, threads=1)
    files = weights_to_log(cfg, key, minilm_spec, record, tiny_task_dir, weights)
    assert [f.name for f in files] == ["trainable.safetensors", "merged.safetensors"]
    merged = load_file(str(files[1]))
    base = load_model(minilm_spec, 2, "single_label_classification").state_dict()
    assert set(merged) == set(base) and all(merged[k].shape == base[k].shape for k in base)
    run_id = log_record(record, ft_path, cfg, artifacts=files)
    names = sorted(a.path for a in MlflowClient(f"sqlite:///{cfg['default_store']}").list_artifacts(run_id))
    assert names == ["merged.safetensors", "result.json", "trainable.safetensors"]
    assert not files[1].exists() and weights.exists()  # the export was the queue's; the output stays
    assert weights_to_log(cfg | {"log_weights": "none"}, key, minilm_spec, record, tiny_task_dir, weights) == []
