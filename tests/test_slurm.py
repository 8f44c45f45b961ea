"""`snakemake --profile slurm` for real: the shipped profile on a one-node SLURM cluster on
localhost (.ci/run starts one with tests/slurm/start-localhost-cluster.sh), code-aware reruns,
MLflow from the jobs, and a job stopped by its time limit that resumes where it stopped.

The cluster tests skip with the reason when no cluster answers `sinfo`; the rerun test then
runs on a local run of the same tiny pipeline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from _mlflow_server import mlflow_server as serve_mlflow
from _workflow_copy import workflow_copy

REPO = Path(__file__).resolve().parents[1]
TINY = ["--configfile", "tests/configs/tiny.yaml"]
# what this one small node lacks, nothing else: no slurmdbd (sacct cannot answer, so status
# comes from squeue), no accounts, and a fast status poll for a two-core machine
SMALL_NODE = ["--slurm-status-command", "squeue", "--slurm-no-account",
              "--seconds-between-status-checks", "5", "--slurm-init-seconds-before-status-checks", "5"]
GPU_RULES = {"gradient_sparsity", "intrinsic_dimension", "d90", "finetune", "evaluate"}


def snakemake(*args, cwd: Path, env: dict | None = None, limit: int = 1500, log: Path | None = None):
    """Snakemake under `timeout -s INT` (SIGINT makes it cancel its SLURM jobs; SIGTERM would not
    stop it). Output goes to ``log`` when given (long runs) and is returned."""
    cmd = ["timeout", "-s", "INT", "-k", "60", str(limit), sys.executable, "-m", "snakemake", *args]
    # no site values or tracking URI from the environment of the tests (mlflow.set_tracking_uri
    # exports MLFLOW_TRACKING_URI into the process that calls it), only those given here
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PEFTLAB_SLURM_") and k != "MLFLOW_TRACKING_URI"} | (env or {})
    if log is None:
        res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        return res.returncode, res.stdout + res.stderr
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    return rc, log.read_text()


def slurm_cluster() -> str | None:
    """None when a SLURM cluster with GPU GRES answers here, else why not."""
    if not shutil.which("sinfo"):
        return "no SLURM cluster: sinfo is not installed (.ci/run starts one with tests/slurm/)"
    res = subprocess.run(["sinfo", "-h", "-o", "%T %G"], capture_output=True, text=True)
    if res.returncode != 0:
        return f"no SLURM cluster reachable: sinfo failed ({res.stderr.strip()[:200]})"
    states = res.stdout.split()
    if not any(s in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"SLURM cluster has no usable node: {res.stdout.strip()}"
    if "gpu" not in res.stdout:
        return "SLURM cluster has no GPU GRES (start it with SLURM_FAKE_GPUS=2)"
    return None


def job_blocks(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, {key: value} of its indented lines: wildcards, resources, reason...) of every job
    in snakemake's output."""
    jobs: list[tuple[str, dict[str, str]]] = []
    for line in output.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            jobs.append((m.group(1), {}))
        elif jobs and (m := re.match(r"^    (\w+): (.*)$", line)):
            jobs[-1][1][m.group(1)] = m.group(2)
    return jobs


def pairs(text: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in text.split(", ")) if text else {}


def jobs_of(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job in snakemake's output."""
    return [(rule, pairs(info.get("wildcards", ""))) for rule, info in job_blocks(output)]


# ----------------------------------------------------------------------------------------
# The profile, without a cluster
# ----------------------------------------------------------------------------------------


def test_profile_takes_site_values_from_the_environment(tmp_path):
    work = workflow_copy(tmp_path, extra=("slurm",))
    site = {"PEFTLAB_SLURM_ACCOUNT": "proj-42", "PEFTLAB_SLURM_PARTITION": "cpu",
            "PEFTLAB_SLURM_GPU_PARTITION": "gpu-a100", "PEFTLAB_SLURM_GPU_MODEL": "a100",
            "PEFTLAB_SLURM_QOS": "normal", "PEFTLAB_SLURM_EXTRA": "--mail-type=FAIL"}
    rc, out = snakemake("--profile", "slurm", "-n", *TINY, cwd=work, env=site)
    assert rc == 0, out[-3000:]
    assert "Using profile slurm" in out
    resources = {rule: pairs(info.get("resources", "")) for rule, info in job_blocks(out)}
    submitted = set(resources) - {"all", "aggregate", "comparison_report"}
    assert submitted == GPU_RULES | {"prepare_data"}
    # the rules that declare a GPU are exactly those the profile gives the GPU partition and model
    assert {r for r, res in resources.items() if res.get("gpu") == "1"} == GPU_RULES
    for rule in submitted:
        res = resources[rule]
        assert res["slurm_account"] == "proj-42" and res["slurm_extra"] == "--mail-type=FAIL"
        assert int(res["mem_mb"]) > 0 and int(res["runtime"]) > 0
        gpu = rule in GPU_RULES
        assert res["slurm_partition"] == ("gpu-a100" if gpu else "cpu")
        assert res.get("gpu_model") == ("a100" if gpu else None)
    # aggregation and the report run on the submitting machine
    snakefile = (work / "Snakefile").read_text()
    assert re.search(r"localrules:\s+all,\s+aggregate,\s+comparison_report,", snakefile)

    # unset: nothing site-specific is passed (the plugin then uses the cluster's defaults)
    rc, out = snakemake("--profile", "slurm", "-n", *TINY, cwd=work)
    assert rc == 0 and "slurm_account" not in out and "slurm_partition" not in out and "gpu_model" not in out
    # a model with gpus: 2: its finetune jobs ask for two GPUs, the rest for one
    cfg = yaml.safe_load((work / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["models"] = {"minilm-l6": {"gpus": 2}}
    (work / "two.yaml").write_text(yaml.safe_dump(cfg))
    rc, out = snakemake("--profile", "slurm", "-n", "--configfile", "two.yaml", cwd=work)
    assert rc == 0, out[-3000:]
    gpus = {(rule, pairs(info.get("resources", "")).get("gpu")) for rule, info in job_blocks(out)}
    assert {g for r, g in gpus if r == "finetune"} == {"2"} and {g for r, g in gpus if r == "evaluate"} == {"1"}
    # SNAKEMAKE_PROFILE=slurm is the same as --profile slurm
    rc, out = snakemake("-n", *TINY, cwd=work, env={"SNAKEMAKE_PROFILE": "slurm", "PEFTLAB_SLURM_ACCOUNT": "p1"})
    assert rc == 0 and "Using profile slurm" in out and "slurm_account=p1" in out


def test_profile_is_commented_key_by_key():
    text = (REPO / "slurm" / "config.yaml").read_text().splitlines()
    keys = [i for i, line in enumerate(text) if re.match(r"^[a-z][\w-]*:", line)]
    assert len(keys) >= 10
    for i in keys:  # every top-level key has a comment line right above it
        assert text[i - 1].lstrip().startswith("#"), text[i]
    profile = yaml.safe_load("\n".join(text))
    assert profile["executor"] == "slurm" and profile["retries"] >= 1 and profile["rerun-incomplete"]
    assert "cpus_per_task" not in str(profile.get("default-resources"))  # would override every rule's threads


# ----------------------------------------------------------------------------------------
# The tiny pipeline through SLURM (or locally when no cluster answers)
# ----------------------------------------------------------------------------------------


class TinyRun:
    def __init__(self, work: Path, executor: str, output: str, seconds: float):
        self.work, self.executor, self.output, self.seconds = work, executor, output, seconds

    @property
    def results(self) -> Path:
        return self.work / "results"

    def mlflow_runs(self, uri: str | None = None) -> list:
        """The active runs in the default store (SQLite in the results) or at ``uri``."""
        from peftlab.tracking import default_store

        client = MlflowClient(tracking_uri=uri or f"sqlite:///{default_store(self.results)}")
        exp = client.get_experiment_by_name("peftlab")
        return [] if exp is None else client.search_runs([exp.experiment_id])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> TinyRun:
    work = workflow_copy(tmp_path_factory.mktemp("tiny"), extra=("slurm",))
    t0 = time.monotonic()
    if slurm_cluster() is None:
        rc, out = snakemake("--profile", "slurm", *TINY, *SMALL_NODE, "--verbose", cwd=work,
                            log=work / "snakemake.log")
        executor = "slurm"
    else:
        rc, out = snakemake("-c2", *TINY, cwd=work, log=work / "snakemake.log")
        executor = "local"
    assert rc == 0, out[-5000:]
    return TinyRun(work, executor, out, time.monotonic() - t0)


@pytest.mark.slow
def test_tiny_pipeline_through_slurm(tiny_run):
    if tiny_run.executor != "slurm":
        pytest.skip(slurm_cluster())
    out, results = tiny_run.output, tiny_run.results
    print(f"tiny pipeline through SLURM: {tiny_run.seconds:.0f} s")
    calls = re.findall(r"sbatch call: (.*)", out)
    rules = [re.search(r"--comment '?rule_(\w+?)(?:_wildcards_|'|\s)", c).group(1) for c in calls]
    assert sorted(set(rules)) == sorted(GPU_RULES | {"prepare_data"})
    assert len(calls) == 17  # every job that is not a localrule, once (none failed)
    for rule, call in zip(rules, calls, strict=True):
        assert ("--gpus=1" in call) == (rule in GPU_RULES), call[:400]
        assert re.search(r" -t \d+", call) and re.search(r" --mem \d+", call) and "--requeue" in call
    # SLURM's job logs where the profile puts them; the jobs' own logs as in local runs
    assert len(list((tiny_run.work / "logs" / "slurm" / "rule_finetune").glob("*/*.log"))) == 6
    assert "peftlab.train" in (tiny_run.work / "logs" / "finetune" / "minilm-l6" / "rotten_tomatoes" / "lora"
                               / "default" / "seed0.log").read_text()

    html = (tiny_run.work / "reports" / "comparison.html").read_text()
    assert "Analyses of the tasks" in html and html.count("src='data:image/png;base64,") == 6
    runs = tiny_run.mlflow_runs()  # the default store: SQLite on the shared filesystem
    assert Counter(r.data.tags["rule"] for r in runs) == {
        "d90": 1, "evaluate": 6, "finetune": 6, "gradient_sparsity": 1, "intrinsic_dimension": 2}
    assert {r.info.status for r in runs} == {"FINISHED"}
    for record in results.glob("finetune/**/result.json"):
        assert json.loads(record.read_text())["resumed_from_steps"] == []
    assert not list(results.rglob(".checkpoint"))  # removed after success


@pytest.mark.slow
def test_editing_one_method_reruns_only_its_jobs(tiny_run):
    """Code-aware reruns on the finished tiny run: a method module, a variant file, data
    preparation, the intrinsic-dimension code."""
    work = tiny_run.work

    def dry_run():
        rc, out = snakemake("-n", *TINY, cwd=work)
        assert rc == 0, out[-3000:]
        return jobs_of(out), out

    def edited(path: Path, check):
        original, stat = path.read_bytes(), path.stat()
        path.write_bytes(original + b"\n# edited\n")
        try:
            return check()
        finally:
            path.write_bytes(original)
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    jobs, out = dry_run()
    assert jobs == [] and "Nothing to be done" in out
    downstream = {"aggregate", "comparison_report", "all"}

    for path in (work / "src/peftlab/methods/lora.py", work / "tests/configs/experiments/lora/default.yaml"):
        jobs, out = edited(path, dry_run)
        assert {r for r, _ in jobs} == {"finetune", "evaluate"} | downstream, out[-2000:]
        assert sorted((r, w["method"], w["seed"]) for r, w in jobs if "method" in w) == [
            ("evaluate", "lora", "0"), ("evaluate", "lora", "1"), ("finetune", "lora", "0"), ("finetune", "lora", "1")]
        assert ("Params have changed" in out) == path.name.endswith(".py")

    jobs, out = edited(work / "src/peftlab/data.py", dry_run)
    counts = {r: sum(1 for j, _ in jobs if j == r) for r, _ in jobs}
    assert counts == {"prepare_data": 1, "gradient_sparsity": 1, "intrinsic_dimension": 2, "finetune": 6,
                      "evaluate": 6, "d90": 1} | dict.fromkeys(downstream, 1), out[-2000:]

    jobs, out = edited(work / "src/peftlab/intrinsic.py", dry_run)
    assert sorted(r for r, _ in jobs) == ["all", "comparison_report", "d90", "intrinsic_dimension",
                                          "intrinsic_dimension"], out[-2000:]

    jobs, out = dry_run()
    assert jobs == [], out[-2000:]  # the edits undone: nothing to do again


@pytest.fixture
def mlflow_server(tmp_path):
    """A team `mlflow server` on localhost (its own SQLite store, artifacts served over HTTP)."""
    with serve_mlflow(tmp_path) as url:
        yield url


@pytest.mark.slow
def test_jobs_log_to_a_team_mlflow_server(tiny_run, mlflow_server):
    """The team setup: MLFLOW_TRACKING_URI exported to the jobs sends their runs to the server."""
    executor = ["--profile", "slurm", *SMALL_NODE] if tiny_run.executor == "slurm" else ["-c2"]
    before = len(tiny_run.mlflow_runs())
    rc, out = snakemake(*executor, *TINY, "--forcerun", "gradient_sparsity", cwd=tiny_run.work,
                        env={"MLFLOW_TRACKING_URI": mlflow_server}, log=tiny_run.work / "team.log")
    assert rc == 0, out[-4000:]
    assert {r for r, _ in jobs_of(out)} == {"gradient_sparsity", "comparison_report", "all"}
    (run,) = tiny_run.mlflow_runs(mlflow_server)
    assert run.data.tags["rule"] == "gradient_sparsity" and run.info.status == "FINISHED"
    assert run.data.tags["task"] == "rotten_tomatoes" and "top1_share" in run.data.metrics
    # its record went to the server's artifact store over HTTP (no shared filesystem needed)
    artifacts = {a.path for a in MlflowClient(mlflow_server).list_artifacts(run.info.run_id)}
    assert artifacts == {"sparsity.json", "modules.csv"}
    assert len(tiny_run.mlflow_runs()) == before  # nothing went to the default store


@pytest.mark.slow
def test_time_limit_checkpoint_and_retry_resume_through_slurm(tiny_run):
    """A finetune job whose SLURM time limit is near checkpoints and fails; the profile's retry
    (with more time: runtime scales with the attempt) resumes it and ends with the same weights
    and curves as the uninterrupted run of the same seed."""
    if tiny_run.executor != "slurm":
        pytest.skip(slurm_cluster())
    run = tiny_run.results / "finetune/minilm-l6/rotten_tomatoes/bitfit/default/seed0"
    before = json.loads((run / "result.json").read_text())
    weights = (run / "trainable.safetensors").read_bytes()
    # attempt 1 gets 2 minutes: under the 119 s margin once the job is up (starting Snakemake and
    # loading the model take longer than a second), it saves after its first step and stops;
    # attempt 2 gets 4 minutes and finishes
    rc, out = snakemake("--profile", "slurm", *TINY, *SMALL_NODE, "--set-resources", "finetune:runtime=2*attempt",
                        "--force", str(run.relative_to(tiny_run.work) / "result.json"), cwd=tiny_run.work,
                        env={"PEFTLAB_CHECKPOINT_MARGIN_SECONDS": "119"}, log=tiny_run.work / "timelimit.log")
    assert rc == 0, out[-4000:]
    assert len(re.findall(r"has been submitted with SLURM jobid", out)) == 2
    first = sorted((tiny_run.work / "logs/slurm/rule_finetune/minilm-l6_rotten_tomatoes_bitfit_default_0")
                   .glob("*.log"), key=lambda p: int(p.stem))[-2].read_text()
    stopped = re.search(r"stopped at step (\d+) of 6 \((\d+) s left in SLURM job \d+\)", first)
    assert stopped, first[-3000:]
    after = json.loads((run / "result.json").read_text())
    assert after["resumed_from_steps"] == [int(stopped.group(1))]
    for k in ("curves", "best_validation", "final_validation", "steps"):
        assert after[k] == before[k], k
    assert (run / "trainable.safetensors").read_bytes() == weights
    assert not (run / ".checkpoint").exists()
    print(f"SLURM time limit: attempt 1 stopped at step {stopped.group(1)} with {stopped.group(2)} s left, "
          f"attempt 2 resumed from it; best validation {after['best_validation']} == {before['best_validation']}")
