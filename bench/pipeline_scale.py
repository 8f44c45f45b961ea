"""Pipeline scale: DAG build over a 2,400-run grid, the fixed cost of one job, the report over
1,000 result records.

1. ``snakemake -n`` over 5 models x 8 tasks x 12 method variants x 5 seeds (2,400 fine-tuning
   runs, each with its evaluation: 4,800 jobs plus data preparation and the report), wall
   time of the whole command (target < 10 s; median of 3 after one untimed run, which writes
   the bytecode of the scratch copy's modules as a user's first run does), as on a machine
   without a SLURM client; where one is configured, the SLURM plugin's own probe at start is
   timed apart.
2. The per-job fixed cost: the tiny pipeline (tests/configs/tiny.yaml without the analyses)
   runs one job at a time; each finetune / evaluate job's wall time (Snakemake's
   ``benchmark:`` file) minus the work inside it (the record's training + validation time,
   or the test pass) is what a job costs whatever it trains: process start, imports, data
   and model loading, writing outputs, MLflow (target < 10 s on CPU).
3. The report over 1,000 records: that run's finetune / evaluate records copied to 1,040
   runs (2 models x 4 tasks x 13 methods x 2 variants x 5 seeds, metrics jittered), then
   ``aggregate`` + ``write_report`` timed (target < 30 s).

    python bench/pipeline_scale.py                  # all three
    python bench/pipeline_scale.py --skip-jobs      # 1 and 3 from an earlier run's records

Writes ``<out>/pipeline_scale.json`` and ``<out>/pipeline_scale.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))  # the pipeline tests' scratch copy of the workflow

from _common import write_outputs  # noqa: E402

from _workflow_copy import workflow_copy  # noqa: E402

MODELS = {"minilm-l6": {}, "mpnet-base": {}, "smollm2-135m": {}, "bert-base": {"pretrained": "bert-base-uncased"},
          "roberta-base": {"pretrained": "FacebookAI/roberta-base"}}
TASKS = {"rotten_tomatoes": {}, "imdb": {}, "bbc_news": {}, **{t: {"source": "glue"} for t in
                                                                ("sst2", "mrpc", "rte", "cola", "qnli")}}
VARIANTS = {"full": ["default"], "bitfit": ["default"], "lora": ["default"], "dora": ["default"],
            "ia3": ["default"], "vera": ["default"], "gift": ["default"], "hiwi": ["default"],
            "adapter": ["default", "pfeiffer"], "loreft": ["default"], "sift": ["default"]}


def snakemake(args: list[str], cwd: Path, env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    env = dict(env or os.environ, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, capture_output=True, text=True,
                         env=env)
    return time.perf_counter() - t0, res


def slurm_probe_seconds() -> float | None:
    """The SLURM executor plugin runs ``scontrol show config`` when Snakemake imports it, at
    every start: fast on a cluster, up to its 10 s timeout where a SLURM client is configured
    but no controller answers (as on a machine with the CI test cluster stopped)."""
    if not shutil.which("scontrol"):
        return None
    t0 = time.perf_counter()
    try:
        subprocess.run(["scontrol", "show", "config"], capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        pass
    return time.perf_counter() - t0


def without_scontrol(tmp: Path) -> dict:
    """The environment of a machine without a SLURM client: the DAG build alone is timed."""
    stub = tmp.resolve() / "no-slurm-bin"
    stub.mkdir(exist_ok=True)
    (stub / "scontrol").write_text("#!/bin/sh\nexit 1\n")
    (stub / "scontrol").chmod(0o755)
    return dict(os.environ, PATH=f"{stub}{os.pathsep}{os.environ['PATH']}")


def dag_build(work: Path) -> dict:
    cfg = {"models": MODELS, "tasks": TASKS, "methods": VARIANTS, "seeds": [0, 1, 2, 3, 4],
           "analyses": {"intrinsic_dimension": {"dims": []}, "gradient_sparsity": {"enabled": False}}}
    runs = len(MODELS) * len(TASKS) * sum(map(len, VARIANTS.values())) * len(cfg["seeds"])
    (work / "grid.yaml").write_text(yaml.safe_dump(cfg))
    env = without_scontrol(work)
    # as on a user's machine from the second run on: Python's bytecode of the scratch copy's
    # modules is cached (the first, untimed run writes it) and the files are in the page cache
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    times = []
    for i in range(4):
        seconds, res = snakemake(["-n", "--quiet", "rules", "--configfile", "grid.yaml"], work, env)
        if res.returncode:
            raise RuntimeError(f"dry run failed:\n{res.stderr[-3000:]}")
        if i:
            times.append(seconds)
    # the job-stats table (printed twice: before and after the dry run) counts every job
    table = res.stdout.split("Job stats:")[1]
    counts = {line.split()[0]: int(line.split()[-1]) for line in table.splitlines()
              if len(line.split()) == 2 and line.split()[-1].isdigit()}
    return {"runs": runs, "jobs": counts["total"] - counts.get("all", 0), "job_counts": counts,
            "seconds": times, "median_s": statistics.median(times), "target_s": 10,
            "slurm_probe_s": slurm_probe_seconds()}


def job_costs(work: Path) -> dict:
    """The tiny pipeline one job at a time; fixed cost = benchmark wall time - work inside."""
    cfg = yaml.safe_load((work / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["analyses"] = {"intrinsic_dimension": {"dims": []}, "gradient_sparsity": {"enabled": False}}
    (work / "tiny_jobs.yaml").write_text(yaml.safe_dump(cfg))
    seconds, res = snakemake(["-c1", "--configfile", "tiny_jobs.yaml"], work)
    if res.returncode:
        raise RuntimeError(f"tiny pipeline failed:\n{res.stderr[-3000:]}")
    costs: dict[str, list[float]] = {"finetune": [], "evaluate": []}
    for rule, inner_key, record_name in (("finetune", "train_time_s", "result.json"),
                                         ("evaluate", "eval_time_s", "metrics.json")):
        for tsv in sorted((work / "benchmarks" / rule).rglob("*.tsv")):
            rel = tsv.relative_to(work / "benchmarks" / rule).with_suffix("")
            with open(tsv) as fh:
                wall = float(next(csv.DictReader(fh, delimiter="\t"))["s"])
            record = json.loads((work / "results" / rule / rel / record_name).read_text())
            inner = record[inner_key]
            if rule == "evaluate" and record.get("inference"):
                inf = record["inference"]  # the latency probe's forwards are work too
                inner += 4 * sum(inf.get(k, 0) or 0 for k in ("base_ms_per_batch", "unmerged_ms_per_batch",
                                                               "merged_ms_per_batch")) / 1000
            costs[rule].append(wall - inner)
    return {"pipeline_s": seconds, "per_job_fixed_s": {k: {"median": statistics.median(v), "max": max(v), "n": len(v)}
                                                       for k, v in costs.items()}, "target_s": 10}


def report_over_records(work: Path, n_target: int = 1000) -> dict:
    from peftlab.report import aggregate, write_report

    src = work / "results"
    fts = sorted((src / "finetune").rglob("result.json"))
    if not fts:
        raise RuntimeError(f"no finetune records under {src}: run without --skip-jobs first")
    stats = json.loads(next((src / "data").rglob("stats.json")).read_text())
    out = work / "many"
    shutil.rmtree(out, ignore_errors=True)
    models, tasks = ["minilm-l6", "mpnet-base"], ["rotten_tomatoes", "sst2", "imdb", "mrpc"]
    methods = ["full", "bitfit", "lora", "dora", "ia3", "vera", "prompt_tuning", "gift", "hiwi", "adapter",
               "loreft", "sift", "pafi"]
    rng = random.Random(0)
    ft_paths, ev_paths, stats_paths = [], [], []
    for model in models:
        for task in tasks:
            s = dict(stats, model=model, task=dict(stats["task"], name=task))
            p = out / "data" / model / task / "stats.json"
            p.parent.mkdir(parents=True)
            p.write_text(json.dumps(s))
            stats_paths.append(str(p))
            for method in methods:
                for variant in ("default", "alt"):
                    for seed in range(5):
                        base_ft = json.loads(rng.choice(fts).read_text())
                        base_ev = json.loads((Path(str(rng.choice(fts)).replace("/finetune/", "/evaluate/"))
                                              .with_name("metrics.json")).read_text())
                        run = {"model": model, "task": task, "method": method, "variant": variant, "seed": seed}
                        base_ft["run"] = base_ev["run"] = run
                        base_ft["method"] = dict(base_ft["method"], name=method)
                        base_ev["metrics"] = {k: min(1.0, max(0.0, v + rng.gauss(0, 0.03)))
                                              for k, v in base_ev["metrics"].items()}
                        rel = f"{model}/{task}/{method}/{variant}/seed{seed}"
                        for stage, name, rec, paths in (("finetune", "result.json", base_ft, ft_paths),
                                                        ("evaluate", "metrics.json", base_ev, ev_paths)):
                            p = out / stage / rel / name
                            p.parent.mkdir(parents=True, exist_ok=True)
                            p.write_text(json.dumps(rec))
                            paths.append(str(p))
    config = {"models": {m: {} for m in models}, "tasks": {t: {} for t in tasks},
              "methods": {m: ["default", "alt"] for m in methods}, "seeds": list(range(5))}
    t0 = time.perf_counter()
    aggregate(ft_paths, ev_paths, str(out / "summary.csv"), str(out / "summary.parquet"))
    t_agg = time.perf_counter() - t0
    write_report(str(out / "summary.parquet"), stats_paths, config, str(out / "comparison.html"),
                 finetune_paths=ft_paths, figures_dir=str(out / "figures"))
    total = time.perf_counter() - t0
    return {"records": len(ft_paths), "aggregate_s": t_agg, "total_s": total,
            "html_mb": (out / "comparison.html").stat().st_size / 2**20, "target_s": 30}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "pipeline_scale")
    ap.add_argument("--skip-jobs", action="store_true", help="reuse the records of an earlier run in --out")
    args = ap.parse_args(argv)
    work = args.out / "work"
    if not args.skip_jobs:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        workflow_copy(work)
    result = {"dag": dag_build(work)}
    if not args.skip_jobs:
        result["jobs"] = job_costs(work)
    result["report"] = report_over_records(work)
    d, r = result["dag"], result["report"]
    rows = ["| measurement | value | target |", "|---|---|---|",
            f"| `snakemake -n`, {d['runs']:,} runs ({d['jobs']:,} jobs) | {d['median_s']:.1f} s (median of 3) | < 10 s |"]
    if d["slurm_probe_s"] is not None and d["slurm_probe_s"] > 1:
        rows.append(f"| + the SLURM plugin's `scontrol show config` probe at every Snakemake start, on this "
                    f"machine (SLURM client installed, no controller answering) | {d['slurm_probe_s']:.1f} s | - |")
    if "jobs" in result:
        for rule, c in result["jobs"]["per_job_fixed_s"].items():
            rows.append(f"| fixed cost per {rule} job (median / max of {c['n']}) | {c['median']:.1f} / "
                        f"{c['max']:.1f} s | < 10 s |")
    rows.append(f"| aggregate + report over {r['records']:,} records | {r['total_s']:.1f} s "
                f"(aggregate {r['aggregate_s']:.1f} s; {r['html_mb']:.1f} MB of HTML) | < 30 s |")
    write_outputs(args.out, "pipeline_scale", result, "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
