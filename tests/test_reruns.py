"""Reruns are exact. After a complete run of every method, a content edit of any module of
``src/peftlab``, any workflow script or any schema schedules (``snakemake -n``) every job whose
code includes that file, and what depends on those jobs, and nothing else. The expectations
come from ``tests/_imports.py`` (the rules' scripts, ``modulefinder``, the method registry), not
from the workflow's own fingerprint code."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _imports import job_code, rule_scripts
from _workflow_copy import workflow_copy

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
CONFIG = "rerun.yaml"
NOTHING = "Nothing to be done"


def snakemake(work: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, "--configfile", CONFIG, *args], cwd=work, capture_output=True,
                          text=True, timeout=1800)


def _all_methods_config(work: Path) -> None:
    """The tiny config with every method (a SIFT variant on the gradient-sparsity stage's masks
    too), one seed, both analyses, the tiny training budget."""
    from peftlab.methods import METHODS

    experiments = work / "rerun_experiments"
    shutil.copytree(work / "config" / "experiments", experiments)
    shutil.copy(work / "tests" / "configs" / "experiments" / "defaults.yaml", experiments / "defaults.yaml")
    (experiments / "sift" / "from_analysis.yaml").write_text("method:\n  rate: 0.01\n  mask_source: analysis\n")
    cfg = yaml.safe_load((work / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["methods"] = {m: ["default"] for m in sorted(METHODS)}
    cfg["methods"]["sift"].append("from_analysis")
    cfg.update(seeds=[0], experiments_dir=experiments.name)
    (work / CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False))


def parse_jobs(out: str) -> dict[tuple[str, ...], dict]:
    """The jobs a dry run lists: outputs -> rule, wildcards, inputs (the `all` target left out)."""
    jobs = {}
    for rule, body in re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n?)*)", out, flags=re.M):
        fields = dict(re.findall(r"^    (\w+): (.*)$", body, flags=re.M))
        if rule == "all":
            continue
        wildcards = dict(kv.split("=", 1) for kv in fields.get("wildcards", "").split(", ") if kv)
        outputs = tuple(sorted(fields["output"].split(", ")))
        jobs[outputs] = {"rule": rule, "wildcards": wildcards,
                         "input": set(fields.get("input", "").split(", ")) - {""}}
    return jobs


def dependants(jobs: dict, start: set) -> set:
    """``start`` and every job downstream of it, following outputs into inputs."""
    producer = {f: key for key in jobs for f in key}
    consumers: dict = {}
    for key, job in jobs.items():
        for f in job["input"]:
            if f in producer:
                consumers.setdefault(producer[f], set()).add(key)
    out, todo = set(), list(start)
    while todo:
        key = todo.pop()
        if key not in out:
            out.add(key)
            todo.extend(consumers.get(key, ()))
    return out


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory):
    """The whole DAG run once for every method; then nothing is left to do."""
    work = workflow_copy(tmp_path_factory.mktemp("reruns"))
    _all_methods_config(work)
    res = snakemake(work, "-c2")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    res = snakemake(work, "-n")
    assert NOTHING in res.stdout + res.stderr, (res.stdout + res.stderr)[-3000:]
    res = snakemake(work, "-n", "--forceall")
    assert res.returncode == 0, res.stderr[-2000:]
    return work, parse_jobs(res.stdout)


def edited_files(work: Path) -> list[Path]:
    src = sorted((work / "src" / "peftlab").rglob("*.py"))
    return [*src, *sorted((work / "workflow" / "scripts").glob("*.py")),
            *sorted((work / "workflow" / "schemas").glob("*.yaml"))]


def _probe(path: Path) -> str:
    """A content edit that changes what the file does (a new module global; a schema comment)."""
    return "\n_RERUN_PROBE = 1\n" if path.suffix == ".py" else "\n# rerun probe\n"


def with_edit(work: Path, path: Path, *args: str) -> str:
    """Snakemake's output with ``path`` edited; the file is restored after, mtime too."""
    text, stat = path.read_bytes(), path.stat()
    try:
        path.write_bytes(text + _probe(path).encode())
        res = snakemake(work, *args)
    finally:
        path.write_bytes(text)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return res.stdout


def scheduled_after_edit(work: Path, path: Path) -> set:
    """The jobs a dry run schedules with ``path`` edited."""
    return set(parse_jobs(with_edit(work, path, "-n")))


@pytest.mark.slow
def test_every_edit_reruns_exactly_the_jobs_whose_code_includes_it(complete_run):
    work, jobs = complete_run
    scripts = rule_scripts(work)
    # every rule of the DAG has a script; tuning is off in this config (its reruns: test_workflow),
    # and so are export (its code: test_codegraph; its rule: test_artifacts) and mlflow_models
    # (its rule: test_workflow's tiny run)
    assert set(scripts) - {"tune_trial", "tune_select", "export", "mlflow_models"} == {
        j["rule"] for j in jobs.values()}
    cache: dict = {}
    code = {key: job_code(work, job["rule"], job["wildcards"].get("method"), scripts, cache)
            for key, job in jobs.items()}
    files = edited_files(work)
    assert len(files) > 40 and any(p.name == "_peft_common.py" for p in files)
    wrong = []
    for path in files:
        path = path.resolve()
        expected = dependants(jobs, {key for key in jobs if path in code[key]})
        scheduled = scheduled_after_edit(work, path)
        if scheduled != expected:
            wrong.append(f"{path.relative_to(work)}: missed {sorted(jobs[k]['rule'] for k in expected - scheduled)}, "
                         f"extra {sorted(jobs[k]['rule'] for k in scheduled - expected)}")
    assert not wrong, "\n".join(wrong)
    res = snakemake(work, "-n")
    assert NOTHING in res.stdout + res.stderr, "the edits were undone"


@pytest.mark.slow
def test_shared_helpers_rerun_the_methods_that_use_them(complete_run):
    """The cases that were stale: the peft helpers (DoRA, IA3, LoRA, prompt tuning, VeRA), the report, and
    LoRA's module (DoRA subclasses LoRA). The first jobs a dry run schedules (those no other
    scheduled job feeds) are the ones whose own code changed; that each job further down
    carries its own code too is checked rule by rule in tests/test_codegraph.py."""
    work, jobs = complete_run

    def first(rel: str) -> set[tuple[str, str | None]]:
        scheduled = scheduled_after_edit(work, work / rel)
        produced = {f for key in scheduled for f in key}
        return {(jobs[k]["rule"], jobs[k]["wildcards"].get("method")) for k in scheduled
                if not jobs[k]["input"] & produced}

    assert first("src/peftlab/methods/_peft_common.py") == {
        ("finetune", m) for m in ("dora", "ia3", "lora", "prompt_tuning", "vera")}
    assert first("src/peftlab/report.py") == {("aggregate", None)}
    assert first("src/peftlab/methods/lora.py") == {("finetune", "lora"), ("finetune", "dora")}
    assert first("src/peftlab/methods/sift.py") == {("gradient_sparsity", None), ("finetune", "sift")}


def test_jobs_run_the_workflows_own_code(tmp_path):
    """A job imports peftlab from the workflow's own src/, the code its rerun fingerprint
    hashes, not from the peftlab installed beside it (here: the checkout, installed editable)."""
    (tmp_path / "copy").mkdir()
    work = workflow_copy(tmp_path / "copy")
    init = work / "src" / "peftlab" / "__init__.py"
    probe = tmp_path / "imported.txt"  # each importing process: its script, this __init__
    init.write_text(init.read_text() + f"\nimport sys as _s\nopen({str(probe)!r}, 'a').write(f'{{_s.argv[0]}} {{__file__}}\\n')\n")
    res = subprocess.run([*SNAKEMAKE, "results/data/minilm-l6/rotten_tomatoes/stats.json", "-c1", "--configfile",
                          "tests/configs/tiny.yaml"], cwd=work, capture_output=True, text=True,
                         timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    jobs = [line.split() for line in probe.read_text().splitlines() if "prepare_data" in line]
    assert jobs and all(Path(file) == init for _, file in jobs), probe.read_text()
