"""Learning-rate sweep per method at the default training budget, selected on validation.

Each method's default variant is copied once per learning rate of the grid into a scratch
experiments folder (only ``training.learning_rate`` changes), the fine-tuning stage of the
pipeline runs every (method, rate, seed) through Snakemake (``--until finetune``: the test
split is never touched), and the best validation score of each run is tabulated. The
methods' stored rates now come from the pipeline's own tuning stage
(``config/presets/tuned_rotten_tomatoes.yaml``); this script remains for the analyses' rate
(``--intrinsic-d``), which that stage does not search.

    python bench/lr_sweep.py --out bench/out/lr_sweep -c 2
    python bench/lr_sweep.py --methods lora gift --seeds 0 1 --out /tmp/sweep
    python bench/lr_sweep.py --intrinsic-d 1000 --out /tmp/id_sweep   # the SAID runs' rate

Writes ``<out>/lr_sweep.json`` and ``<out>/lr_sweep.md``. With ``--intrinsic-d`` the
intrinsic-dimension stage (``analyses.intrinsic_dimension.training.learning_rate``) is swept
instead, at that d, and the validation score of each subspace run is tabulated.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# Rates around each method's published range, widened towards larger steps because the
# default budget is short (63 steps).
GRID: dict[str, list[float]] = {
    "full": [3e-5, 1e-4, 3e-4],
    "bitfit": [1e-3, 3e-3, 1e-2],
    "lora": [1e-3, 3e-3, 1e-2],
    "dora": [1e-3, 3e-3, 1e-2],
    "ia3": [1e-2, 3e-2, 1e-1],
    "vera": [1e-2, 3e-2, 1e-1],
    "prompt_tuning": [3e-2, 1e-1, 3e-1],
    "gift": [1e-3, 3e-3, 1e-2],
    "hiwi": [3e-4, 1e-3, 3e-3],
    "adapter": [1e-3, 3e-3, 1e-2],
    "loreft": [1e-3, 3e-3, 1e-2],
    "sift": [7e-5, 3e-4, 1e-3, 3e-3],
    "pafi": [7e-5, 3e-4, 1e-3, 3e-3],
}


def variant_name(lr: float) -> str:
    return f"lr{lr:.0e}".replace("e-0", "e-")


def write_experiments(out: Path, grid: dict[str, list[float]]) -> dict[str, list[str]]:
    """Scratch experiments folder: defaults.yaml + one variant per (method, rate)."""
    exp = out / "experiments"
    if exp.exists():
        shutil.rmtree(exp)
    src = ROOT / "config" / "experiments"
    exp.mkdir(parents=True)
    shutil.copy(src / "defaults.yaml", exp / "defaults.yaml")
    methods: dict[str, list[str]] = {}
    for method, rates in grid.items():
        base = yaml.safe_load((src / method / "default.yaml").read_text()) or {}
        (exp / method).mkdir()
        for lr in rates:
            variant = dict(base)
            variant["training"] = {**(base.get("training") or {}), "learning_rate": float(lr)}
            name = variant_name(lr)
            (exp / method / f"{name}.yaml").write_text(yaml.safe_dump(variant, sort_keys=False))
            methods.setdefault(method, []).append(name)
    return methods


def sweep_config(out: Path, base_config: Path, task: str, methods: dict, seeds: list[int]) -> Path:
    base = yaml.safe_load(base_config.read_text())
    if task not in base["tasks"]:
        sys.exit(f"lr_sweep: task '{task}' is not in {base_config}; pick one of {sorted(base['tasks'])}")
    if "learning_rate" in (base.get("training") or {}):
        sys.exit(f"lr_sweep: {base_config} sets training.learning_rate for every method, which would "
                 "override the swept rates; remove it there")
    cfg = {
        "models": base["models"],
        "tasks": {task: base["tasks"][task]},
        "methods": methods,
        "seeds": seeds,
        "data": base.get("data", {}),
        "training": base.get("training") or {},  # the config's budget (a preset's), over every variant's
        "experiments_dir": str(out / "experiments"),
        "results_dir": str(out / "results"),
        "report_path": str(out / "report.html"),
        "mlflow": {"tracking_uri": None, "experiment": "peftlab-lr-sweep"},
        "threads": 1,
    }
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


INTRINSIC_GRID = [3e-4, 1e-3, 3e-3, 1e-2]


def sweep_intrinsic(out: Path, base_config: Path, task: str, d: int, seeds: list[int], cores: int,
                    rates: list[float] | None = None) -> dict:
    """One pipeline run per rate (the rate is a config-level setting of the analysis)."""
    base = yaml.safe_load(base_config.read_text())
    runs = []
    for lr in rates or INTRINSIC_GRID:
        run_dir = out / f"intrinsic_{variant_name(lr)}"
        cfg = {
            "models": base["models"], "tasks": {task: base["tasks"][task]}, "methods": {"full": ["default"]},
            "seeds": seeds, "data": base.get("data", {}), "results_dir": str(run_dir / "results"),
            "report_path": str(run_dir / "report.html"), "threads": 1,
            "mlflow": {"tracking_uri": None, "experiment": "peftlab-lr-sweep"},
            "analyses": {"intrinsic_dimension": {
                **(base.get("analyses", {}).get("intrinsic_dimension") or {}),
                "dims": [d], "seeds": seeds, "refine": 0,
                "training": {**((base.get("analyses", {}).get("intrinsic_dimension") or {}).get("training") or {}),
                             "learning_rate": lr}}},
        }
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        runs.append((lr, run_dir))
    # one single-job pipeline per rate, `cores` of them at once (separate results folders)
    pending, active = list(runs), []
    while pending or active:
        while pending and len(active) < cores:
            lr, run_dir = pending.pop(0)
            log = open(run_dir / "snakemake.log", "w")  # noqa: SIM115
            active.append(subprocess.Popen(
                ["snakemake", "-c", "1", "--nolock", "--configfile", str(run_dir / "config.yaml"),
                 "--replace-workflow-config", "--until", "intrinsic_dimension", "--keep-going"],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        active[0].wait()
        active = [p for p in active if p.poll() is None]
    rows = []
    for lr, run_dir in runs:
        for rec_path in sorted((run_dir / "results" / "analyses").glob("*/*/intrinsic_dimension/d*/seed*/result.json")):
            rec = json.loads(rec_path.read_text())
            rows.append({"learning_rate": lr, "d": rec["d"], "seed": rec["run"]["seed"],
                         "best_validation": rec["best_validation"][rec["main_metric"]],
                         "test": rec["test_main"], "train_time_s": rec["train_time_s"], "steps": rec["steps"]})
    return {"rows": rows}


def collect(out: Path, grid: dict[str, list[float]]) -> dict:
    rows = []
    for rec_path in sorted((out / "results" / "finetune").glob("*/*/*/*/*/result.json")):
        rec = json.loads(rec_path.read_text())
        run = rec["run"]
        lr = rec["config"]["training"]["learning_rate"]
        rows.append({
            "model": run["model"], "task": run["task"], "method": run["method"], "seed": run["seed"],
            "learning_rate": lr, "metric": rec["main_metric"],
            "best_validation": rec["best_validation"][rec["main_metric"]],
            "final_validation": rec["final_validation"][rec["main_metric"]],
            "train_time_s": rec["train_time_s"], "steps": rec["steps"],
        })
    best = {}
    for method in grid:
        by_lr: dict[float, list[float]] = {}
        for r in rows:
            if r["method"] == method:
                by_lr.setdefault(r["learning_rate"], []).append(r["best_validation"])
        if by_lr:
            means = {lr: sum(v) / len(v) for lr, v in by_lr.items()}
            top = max(means, key=means.get)
            best[method] = {"learning_rate": top, "validation": means[top],
                            "edge_of_grid": top in (min(means), max(means)) and len(means) > 1}
    return {"rows": rows, "best": best}


def markdown(result: dict, grid: dict[str, list[float]]) -> str:
    lines = ["| method | " + " | ".join(["learning rate -> mean best validation score"]) + " | chosen |",
             "|---|---|---|"]
    for method in grid:
        cells = []
        for lr in grid[method]:
            vals = [r["best_validation"] for r in result["rows"]
                    if r["method"] == method and math.isclose(r["learning_rate"], lr)]
            cells.append(f"{lr:g}: " + (f"{sum(vals) / len(vals):.4f}" if vals else "missing"))
        b = result["best"].get(method)
        chosen = f"{b['learning_rate']:g}" + (" (edge)" if b["edge_of_grid"] else "") if b else "-"
        lines.append(f"| {method} | {'; '.join(cells)} | {chosen} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "config" / "config.yaml",
                    help="config whose models, task settings and data caps the sweep uses")
    ap.add_argument("--task", default="rotten_tomatoes")
    ap.add_argument("--methods", nargs="*", default=list(GRID), help="subset of the grid's methods")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "lr_sweep")
    ap.add_argument("-c", "--cores", type=int, default=2)
    ap.add_argument("--collect-only", action="store_true", help="tabulate existing results only")
    ap.add_argument("--intrinsic-d", type=int, default=None,
                    help="sweep the intrinsic-dimension stage's learning rate at this d instead")
    ap.add_argument("--rates", nargs="*", type=float, default=None,
                    help=f"learning rates instead of each method's grid (with --intrinsic-d: default {INTRINSIC_GRID})")
    args = ap.parse_args(argv)
    if args.intrinsic_d:
        out = args.out.resolve()
        out.mkdir(parents=True, exist_ok=True)
        result = sweep_intrinsic(out, args.config, args.task, args.intrinsic_d, args.seeds, args.cores, args.rates)
        lines = ["| learning rate | d | seed | best validation | train time (s) |", "|---|---|---|---|---|"]
        lines += [f"| {r['learning_rate']:g} | {r['d']} | {r['seed']} | {r['best_validation']:.4f} | "
                  f"{r['train_time_s']:.0f} |" for r in result["rows"]]
        (out / "lr_sweep_intrinsic.json").write_text(json.dumps(result, indent=1))
        (out / "lr_sweep_intrinsic.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    unknown = sorted(set(args.methods) - set(GRID))
    if unknown:
        sys.exit(f"lr_sweep: no grid for {unknown}; known: {sorted(GRID)}")
    grid = {m: args.rates or GRID[m] for m in args.methods}
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not args.collect_only:
        methods = write_experiments(out, grid)
        cfg = sweep_config(out, args.config, args.task, methods, args.seeds)
        cmd = ["snakemake", "-c", str(args.cores), "--configfile", str(cfg),
               "--replace-workflow-config", "--until", "finetune", "--keep-going"]
        print("lr_sweep:", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=False)
    result = collect(out, grid)
    result.update(seeds=args.seeds, task=args.task, grid=grid, wall_s=round(time.time() - t0, 1))
    (out / "lr_sweep.json").write_text(json.dumps(result, indent=1))
    table = markdown(result, grid)
    (out / "lr_sweep.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
