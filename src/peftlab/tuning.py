"""Tuning as a stage of the DAG: a grid per (method, variant), selected on validation only.

The config's ``tuning`` section names a grid over any training or method key (``grid`` for
every method; ``methods.<method>`` or ``methods.<method>/<variant>`` replaces it, ``false``
leaves that method on its stored settings). Every grid point is trained on each tuning seed
at the tuning budget (``tuning.training`` over the experiment's training settings): these are
the *trials* (``results/tune/<model>/<task>/<method>/<variant>/trial<i>/seed<s>``). The
selection (a Snakemake checkpoint) reads their best validation score on the task's main
metric, averages it over the tuning seeds, and keeps the highest; a tie goes to the earlier
point of the grid. The final runs (the config's ``seeds``) then train at that point. Test
data is never read here.

Equal effort: unless ``tuning.equal_trials`` is false, every tuned method gets the same
number of grid points, so no method wins by being searched harder.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig, load_for_tasks, short
from .errors import TrainingError

TRAINING_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
SELECTION_SCHEMA = 1


def grid_of(config: dict, method: str, variant: str) -> dict[str, list] | None:
    """The grid of ``method``/``variant`` (its own entry, else the method's, else the default
    ``grid``), or None when it is not tuned."""
    tuning = config.get("tuning") or {}
    per_method = tuning.get("methods") or {}
    for name in (f"{method}/{variant}", method):
        if name in per_method:
            return per_method[name] or None  # false: not tuned
    return tuning.get("grid") or None


def grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the first key varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def tuned_variants(config: dict) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(method, variant) -> its grid points, for every tuned variant of the config."""
    out = {}
    for method, variants in config["methods"].items():
        for variant in variants:
            grid = grid_of(config, method, variant)
            if grid:
                out[(method, variant)] = grid_points(grid)
    return out


def tuned_settings(point: dict[str, Any], budget: dict | None = None, **provenance) -> dict:
    """A point as ``load_experiment``'s ``tuned``: training keys under ``training`` (over the
    budget's), the method's own under ``method``; ``provenance`` (trial, source) kept beside."""
    training = dict(budget or {}) | {k: v for k, v in point.items() if k in TRAINING_KEYS}
    method = {k: v for k, v in point.items() if k not in TRAINING_KEYS}
    return {"point": dict(point), "training": training, "method": method} | provenance


def trial_settings(points: list[dict[str, Any]], budget: dict | None, trial: int) -> dict:
    """What trial ``trial`` of a variant whose grid points are ``points`` trains with, at the
    tuning budget ``budget`` (``tuning.training``)."""
    return tuned_settings(points[trial], budget, trial=trial)


def check_tuning(config: dict, where: str = "config") -> None:
    """Every grid point of every tuned variant builds a valid experiment; grid keys are known;
    equal trials per method unless the config allows otherwise. One-line ConfigErrors."""
    tuning = config.get("tuning") or {}
    for name in tuning.get("methods") or {}:
        method, _, variant = name.partition("/")
        if method not in config["methods"] or (variant and variant not in config["methods"][method]):
            raise ConfigError(f"{where}: 'tuning.methods.{name}' names no method/variant of 'methods' "
                              f"({sorted(config['methods'])}); remove it or add the method")
    plan = tuned_variants(config)
    for (method, variant), points in plan.items():
        _check_keys(points[0], method, variant, where)
        for point in points:
            try:
                load_for_tasks(config["experiments_dir"], method, variant, config.get("training"), config["tasks"],
                               tuned_settings(point, tuning.get("training")))
            except ConfigError as exc:
                reason = str(exc).removeprefix("config: ")
                raise ConfigError(f"{where}: 'tuning' point {short(point)} of {method}/{variant}: {reason}") from None
    sizes = {f"{m}/{v}": len(p) for (m, v), p in plan.items()}
    if tuning.get("equal_trials", True) and len(set(sizes.values())) > 1:
        raise ConfigError(f"{where}: 'tuning' gives methods unequal numbers of trials ({short(sizes, 200)}); "
                          "give every grid as many points, or set tuning.equal_trials: false")


def _check_keys(point: dict, method: str, variant: str, where: str) -> None:
    from .method_configs import config_class

    own = {f.name for f in dataclasses.fields(config_class(method))}
    unknown = [k for k in point if k not in TRAINING_KEYS | own]
    if unknown:
        raise ConfigError(f"{where}: 'tuning' grid key {unknown[0]!r} of {method}/{variant} is neither a training "
                          f"key ({', '.join(sorted(TRAINING_KEYS))}) nor a parameter of {method} "
                          f"({', '.join(sorted(own)) or 'none'}); fix the key")


# ---------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------


def validation_score(record: dict) -> float | None:
    """A trial's best validation score on the task's main metric (None: failed or not finite)."""
    if record.get("status") != "completed":
        return None
    value = (record.get("best_validation") or {}).get(record.get("main_metric"))
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _trial_row(trial: int, point: dict, records: list[dict]) -> dict:
    scores = [validation_score(r) for r in records]
    ok = bool(scores) and all(s is not None for s in scores)
    failures = [str((r.get("failure") or {}).get("reason") or r.get("status")) for r, s in zip(records, scores,
                                                                                                 strict=True)
                if s is None]
    return {"trial": trial, "point": point, "seeds": [int(r["run"]["seed"]) for r in records],
            "scores": scores, "mean": sum(scores) / len(scores) if ok else None,
            "status": "completed" if ok else "failed", "failures": failures}


def select(points: list[dict], records: list[list[dict]]) -> dict:
    """The grid with each point's validation scores and the chosen point: the highest mean
    over the tuning seeds; a tie goes to the earlier point. ``records[i]``: point i's trial
    records, one per tuning seed. Raises TrainingError when every point failed."""
    if len(points) != len(records):
        raise ValueError("one list of trial records per grid point")
    rows = [_trial_row(i, p, recs) for i, (p, recs) in enumerate(zip(points, records, strict=True))]
    ok = [r for r in rows if r["mean"] is not None]
    if not ok:
        reasons = "; ".join(f"trial {r['trial']}: {r['failures'][0] if r['failures'] else 'no record'}"
                            for r in rows)[:400]
        raise TrainingError(f"every tuning trial failed ({reasons}); fix the grid or the budget in the "
                            "config's tuning section and rerun")
    best = max(ok, key=lambda r: (r["mean"], -r["trial"]))
    return {"grid": rows, "chosen": {"trial": best["trial"], "point": best["point"], "validation": best["mean"],
                                     "at_edge": edge_keys(points, best["point"])}}


def edge_keys(points: list[dict], chosen: dict) -> list[str]:
    """The grid's numeric keys whose chosen value is the smallest or largest searched: the
    optimum may lie outside the grid, which should then be widened that way."""
    out = []
    for key, value in chosen.items():
        values = sorted({p[key] for p in points})
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric and len(values) > 1 and value in (values[0], values[-1]):
            out.append(key)
    return out


def selection_record(run: dict, points: list[dict], records: list[list[dict]], budget: dict,
                     trial_paths: list[list[str]]) -> dict:
    """The selection's record (``selected.json``): the grid, the choice, and the budget."""
    chosen = select(points, records)
    first = next(r for recs in records for r in recs)
    seeds = sorted({int(r["run"]["seed"]) for recs in records for r in recs})
    steps = [r.get("steps") for recs in records for r in recs if r.get("steps") is not None]
    return {
        "schema_version": SELECTION_SCHEMA,
        "rule": "tune",
        "status": "completed",
        "run": dict(run),
        "metric": first.get("main_metric"),
        "selected_on": "validation",
        **chosen,
        "budget": {"training": dict(budget or {}), "seeds": seeds, "trials": len(points),
                   "trial_runs": sum(len(recs) for recs in records), "steps_per_trial": max(steps, default=None),
                   "epochs": (first.get("config") or {}).get("training", {}).get("epochs")},
        "trial_records": trial_paths,
        "params": {"grid": {k: sorted({str(p[k]) for p in points}) for k in points[0]} if points else {},
                   "chosen": chosen["chosen"]["point"], "seeds": seeds, "trials": len(points)},
    }


def read_selection(path: str | Path) -> dict:
    """The point a final run trains at, from its selection record (for ``load_experiment``)."""
    from .io import read_json

    rec = read_json(path)
    return tuned_settings(rec["chosen"]["point"], source=str(path), trial=rec["chosen"]["trial"],
                          validation=rec["chosen"]["validation"])


def write_selection(run: dict, points: list[dict], seeds: list[int], trial_paths: list[str], budget: dict,
                    out_path: str | Path, mlflow: dict | None = None) -> dict:
    """The checkpoint's work: read the trials (``trial_paths`` point by point, seed by seed
    within a point), write the selection record, and log it to MLflow with its trials nested
    under it."""
    from .io import read_json, write_json

    n = len(seeds)
    if len(trial_paths) != len(points) * n:
        raise ValueError(f"{len(trial_paths)} trial records for {len(points)} points x {n} seeds")
    paths = [[str(p) for p in trial_paths[i * n:(i + 1) * n]] for i in range(len(points))]
    records = [[read_json(p) for p in group] for group in paths]
    rec = selection_record(run, points, records, budget, paths)
    write_json(out_path, rec)
    if mlflow:
        log_selection(rec, out_path, mlflow)
    return rec


def log_selection(rec: dict, path: str | Path, mlflow: dict) -> None:
    """The selection as an MLflow run, then each trial as a run nested under it."""
    import json

    from .io import read_json
    from .tracking import PARENT_TAG, identity, log_record

    log_record(rec, path, mlflow)
    parent = json.dumps(identity(rec))
    for trial_path in (p for group in rec["trial_records"] for p in group):
        log_record(read_json(trial_path), trial_path, mlflow, tags={PARENT_TAG: parent})
