"""The Snakemake DAG: dry-run, lint, config errors before any job, and a tiny end-to-end run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(*args, cwd=REPO, timeout=1800):
    return subprocess.run([*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def workflow_copy(dest: Path) -> Path:
    """The workflow files in a scratch folder, so a run never touches the checkout's results."""
    for name in ("Snakefile", "workflow", "config", "envs", "src"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    shutil.copytree(REPO / "tests" / "configs", dest / "tests" / "configs")
    return dest


def test_dry_run_of_default_config_lists_every_stage():
    res = snakemake("-n", "--quiet", "rules")
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout + res.stderr
    from peftlab.config import iter_runs, load_yaml, validate_config

    cfg = validate_config(load_yaml(REPO / "config" / "config.yaml"))
    n_runs = len(list(iter_runs(cfg)))
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out, flags=re.M))
    assert int(counts["finetune"]) == n_runs and int(counts["evaluate"]) == n_runs
    assert int(counts["prepare_data"]) == len(cfg["models"]) * len(cfg["tasks"])
    assert counts["aggregate"] == "1" and counts["comparison_report"] == "1"


def test_lint_is_clean():
    res = snakemake("--lint")
    assert res.returncode == 0, res.stdout[-3000:]
    assert "Congratulations" in res.stdout + res.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("methods={'lorra': ['default']}", "key 'lorra' under 'methods' is not allowed"),
        ("threads=0", "'threads' = 0: 0 is less than the minimum of 1"),
    ],
)
def test_bad_config_fails_before_any_job(tmp_path, override, expected):
    res = snakemake("-n", "--config", override)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.startswith("peftlab:")]
    assert len(lines) == 1 and expected in lines[0], res.stderr[-2000:]
    assert "rule finetune" not in res.stdout


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path):
    """Whole DAG on a tiny config: report + summary + MLflow runs, numbers equal the records."""
    work = workflow_copy(tmp_path)
    res = snakemake("-c2", "--configfile", "tests/configs/tiny.yaml", "--replace-workflow-config", cwd=work)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]

    from peftlab.config import iter_runs, load_yaml
    from peftlab.tracking import default_store, runs_table

    cfg = load_yaml(work / "tests" / "configs" / "tiny.yaml")
    cfg.setdefault("seeds", [0])
    keys = list(iter_runs(cfg))
    html = (work / "reports" / "comparison.html").read_text()
    summary = pd.read_csv(work / "results" / "summary.csv")
    assert len(summary) == len(keys) == 6
    blob = json.loads(re.search(r"<script type='application/json' id='peftlab-data'>(.*?)</script>", html).group(1))
    for key in keys:
        ft = json.loads((work / "results" / "finetune" / key.path() / "result.json").read_text())
        ev = json.loads((work / "results" / "evaluate" / key.path() / "metrics.json").read_text())
        assert ft["status"] == ev["status"] == "completed"
        # the visible row of this run shows the record's numbers
        row = re.search(rf"<tr id=\"run-{key.model}-{key.task}-{key.method}-{key.variant}-{key.seed}\">(.*?)</tr>", html).group(1)
        cells = dict(re.findall(r'data-col="([^"]+)">([^<]*)<', row))
        for metric, value in ev["metrics"].items():
            assert cells[f"test_{metric}"] == f"{value:.4f}"
        assert cells["trainable_params"] == f"{ft['trainable_params']:,}"
        assert cells["best_validation_step"] == str(ft["best_validation"]["step"])
        # the embedded data equals the records exactly
        (run,) = [r for r in blob["runs"] if r["method"] == key.method and r["seed"] == key.seed]
        assert run["test_main"] == ev["metrics"]["accuracy"]
        assert run["trainable_params"] == ft["trainable_params"]
    # figures are embedded, nothing external: 3 for the task, 3 for the analyses
    assert html.count("src='data:image/png;base64,") == 6
    assert not re.search(r"src=['\"](?!data:)", html)
    analyses = work / "results" / "analyses" / "minilm-l6" / "rotten_tomatoes"
    d90 = json.loads((analyses / "intrinsic_dimension" / "d90.json").read_text())
    full = [json.loads((work / "results" / "evaluate" / k.path() / "metrics.json").read_text())["metrics"]["accuracy"]
            for k in keys if k.method == "full"]
    assert d90["reference"] == pytest.approx(sum(full) / len(full)) and d90["grid"] == [150, 600]
    sparsity = json.loads((analyses / "gradient_sparsity" / "sparsity.json").read_text())
    assert "Analyses of the tasks" in html and f"{sparsity['summary']['top1_share']:.3f}" in html

    runs = runs_table({"experiment": "peftlab", "default_store": default_store(work / "results")})
    assert len(runs) == 2 * len(keys) + 4
    assert sorted(runs["tags.rule"].value_counts().items()) == [
        ("d90", 1), ("evaluate", 6), ("finetune", 6), ("gradient_sparsity", 1), ("intrinsic_dimension", 2)]
    assert set(runs["status"]) == {"FINISHED"}
    ft_runs = runs[runs["tags.rule"] == "finetune"]
    assert "metrics.validation_accuracy" in ft_runs and "params.config.training.learning_rate" in ft_runs

    # the same outputs feed Snakemake's own report (report() categories and captions)
    res = snakemake("--configfile", "tests/configs/tiny.yaml", "--replace-workflow-config",
                    "--report", "smk-report.html", cwd=work)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (work / "smk-report.html").stat().st_size > 10_000

    # nothing to do on a second run; a rerun of one job replaces (not duplicates) its MLflow run
    res = snakemake("-c2", "--configfile", "tests/configs/tiny.yaml", "--replace-workflow-config", "-n", cwd=work)
    assert "Nothing to be done" in res.stdout + res.stderr
    res = snakemake("-c2", "--configfile", "tests/configs/tiny.yaml", "--replace-workflow-config",
                    "--forcerun", "results/evaluate/minilm-l6/rotten_tomatoes/lora/default/seed0/metrics.json",
                    "--until", "evaluate", cwd=work)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(runs_table({"experiment": "peftlab", "default_store": default_store(work / "results")})) == 2 * len(keys) + 4


def test_analyses_are_stages_of_the_dag(tmp_path):
    """Intrinsic dimension (grid + d90, which pulls in full fine-tuning) and gradient sparsity
    are jobs; a SIFT variant with mask_source: analysis trains on the sparsity stage's masks."""
    work = workflow_copy(tmp_path)
    variant = work / "tests" / "configs" / "experiments" / "sift" / "from_analysis.yaml"
    variant.parent.mkdir(parents=True)
    variant.write_text("method:\n  rate: 0.01\n  mask_source: analysis\n")
    import yaml

    cfg = yaml.safe_load((work / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["methods"] = {"sift": ["from_analysis"]}
    (work / "sift_only.yaml").write_text(yaml.safe_dump(cfg))
    res = snakemake("-n", "--configfile", "sift_only.yaml", "--replace-workflow-config", cwd=work)
    assert res.returncode == 0, (res.stdout + res.stderr)[-2000:]
    out = res.stdout + res.stderr
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out, flags=re.M))
    # 2 dims x 1 seed; d90 pulls in full/default for both seeds though full is not in methods
    assert counts["intrinsic_dimension"] == "2" and counts["d90"] == "1" and counts["gradient_sparsity"] == "1"
    assert counts["finetune"] == str(2 + 2)
    mask = "gradient_sparsity/sift_mask_from_analysis.safetensors"
    finetune_jobs = [b for b in out.split("\n\n") if "rule finetune:" in b and "/sift/" in b]
    assert finetune_jobs and all(mask in job for job in finetune_jobs)


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "config" / "presets").glob("*.yaml")))
def test_paper_presets_build_a_dag(preset):
    """The papers' GLUE settings validate and plan every job (they run on a cluster with hub access)."""
    from peftlab.config import iter_runs, load_yaml, validate_config

    res = snakemake("-n", "--quiet", "rules", "--configfile", f"config/presets/{preset}", "--replace-workflow-config")
    assert res.returncode == 0, (res.stdout + res.stderr)[-2000:]
    cfg = validate_config(load_yaml(REPO / "config" / "presets" / preset))
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", res.stdout + res.stderr, flags=re.M))
    assert int(counts["finetune"]) == len(list(iter_runs(cfg)))
    assert {"loreft", "sift", "gift", "lora"} <= set(cfg["methods"])
    if preset.startswith("glue_"):  # the papers' protocol: five seeds, GLUE tasks
        assert len(cfg["seeds"]) == 5 and all(t["source"] == "glue" for t in cfg["tasks"].values())
