"""The tuning stage's logic: grids, equal effort, selection on validation, MLflow nesting."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest

from peftlab.config import load_experiment, load_yaml, validate_config
from peftlab.errors import ConfigError, TrainingError
from peftlab.io import write_json
from peftlab.tracking import log_record, pending_entries, runs_table, sync_pending
from peftlab.tuning import (
    check_tuning,
    grid_of,
    grid_points,
    select,
    trial_settings,
    tuned_settings,
    tuned_variants,
    write_selection,
)

REPO = Path(__file__).resolve().parents[1]
CELL = {"model": "minilm-l6", "task": "rotten_tomatoes", "method": "lora", "variant": "default"}


def _config(tuning: dict, methods: dict | None = None) -> dict:
    cfg = load_yaml(REPO / "config" / "config.yaml")
    cfg["methods"] = methods or {"full": ["default"], "lora": ["default"], "sift": ["default", "random_mask"]}
    cfg["tuning"] = tuning
    validate_config(cfg)
    check_tuning(cfg)  # the DAG build runs both
    return cfg


def _trial(trial: int, seed: int, score: float | None, lr: float = 1e-3) -> dict:
    """A trial's finetune record as the trainer writes it (best validation on the main metric)."""
    rec = {"rule": "finetune", "status": "completed" if score is not None else "failed",
           "run": CELL | {"seed": seed, "trial": str(trial)}, "main_metric": "accuracy", "steps": 63,
           "best_validation": {"step": 60, "accuracy": score if score is not None else 0.9},
           "config": {"training": {"learning_rate": lr, "epochs": 1.0}, "method_params": {}},
           "task": {"name": "rotten_tomatoes"}, "model": {"name": "minilm-l6"}, "curves": {}}
    if score is None:
        rec["failure"] = {"reason": f"loss became nan at step {3 + trial}", "step": 3 + trial}
    return rec


def test_grid_points_are_every_combination_first_key_slowest():
    points = grid_points({"learning_rate": [1e-4, 1e-3], "r": [4, 8, 16]})
    assert points == [{"learning_rate": lr, "r": r} for lr, r in itertools.product([1e-4, 1e-3], [4, 8, 16])]


def test_a_choice_at_the_grids_edge_names_the_keys_to_widen():
    from peftlab.tuning import edge_keys

    points = grid_points({"learning_rate": [1e-4, 1e-3, 1e-2], "r": [4, 8], "targets": ["qv", "all"]})
    assert edge_keys(points, {"learning_rate": 1e-3, "r": 8, "targets": "all"}) == ["r"]  # not the text key
    assert edge_keys(points, {"learning_rate": 1e-2, "r": 4, "targets": "qv"}) == ["learning_rate", "r"]
    assert edge_keys(grid_points({"learning_rate": [1e-3]}), {"learning_rate": 1e-3}) == []  # nothing searched


def test_a_variant_entry_beats_its_method_entry_which_beats_the_default_grid():
    cfg = _config({"grid": {"learning_rate": [1e-4, 1e-3]},
                   "methods": {"sift": {"learning_rate": [1e-5, 1e-4]},
                               "sift/random_mask": {"learning_rate": [3e-4, 3e-3]}, "full": False}})
    assert grid_of(cfg, "lora", "default") == {"learning_rate": [1e-4, 1e-3]}
    assert grid_of(cfg, "sift", "default") == {"learning_rate": [1e-5, 1e-4]}
    assert grid_of(cfg, "sift", "random_mask") == {"learning_rate": [3e-4, 3e-3]}
    assert grid_of(cfg, "full", "default") is None  # false: stays on its variant file's settings
    assert set(tuned_variants(cfg)) == {("lora", "default"), ("sift", "default"), ("sift", "random_mask")}
    assert _config({})["tuning"]["grid"] == {} and tuned_variants(_config({})) == {}


def test_a_trial_trains_its_point_over_the_tuning_budget():
    cfg = _config({"grid": {"learning_rate": [1e-4, 1e-3]}, "methods": {"lora": {"r": [4, 16]}},
                   "training": {"max_steps": 5, "learning_rate": 7e-3}})
    plan, budget = tuned_variants(cfg), cfg["tuning"]["training"]
    settings = trial_settings(plan[("lora", "default")], budget, 1)
    exp = load_experiment(cfg["experiments_dir"], "lora", "default", cfg.get("training"), settings)
    stored = load_experiment(cfg["experiments_dir"], "lora", "default", cfg.get("training"))
    assert exp.method_params["r"] == 16 and stored.method_params["r"] != 16
    # the budget's keys apply, the point's own keys win over them, and the record says so
    assert exp.training.max_steps == 5 and exp.training.learning_rate == 7e-3
    full = load_experiment(cfg["experiments_dir"], "full", "default", None, trial_settings(plan[("full", "default")], budget, 1))
    assert full.training.learning_rate == 1e-3 and full.training.max_steps == 5
    assert exp.resolved()["tuned"]["trial"] == 1 and "tuned" not in stored.resolved()
    assert tuned_settings({"learning_rate": 1e-3, "r": 4}) == {
        "point": {"learning_rate": 1e-3, "r": 4}, "training": {"learning_rate": 1e-3}, "method": {"r": 4}}


@pytest.mark.parametrize(("tuning", "expected"), [
    ({"grid": {"learning_rate": [1e-4, 1e-3]}, "methods": {"full": {"learning_rate": [1e-5]}}},
     "'tuning' gives methods unequal numbers of trials"),
    ({"grid": {"lr": [1e-4]}}, "'tuning' grid key 'lr' of full/default is neither a training key"),
    ({"methods": {"lora": {"r": [4, -1]}}}, "'tuning' point {'r': -1} of lora/default: "),
    ({"grid": {"learning_rate": [1e-4, -1e-3]}}, "'training.learning_rate' = -0.001"),
    ({"methods": {"dora": {"learning_rate": [1e-3]}}}, "'tuning.methods.dora' names no method/variant"),
    ({"grid": {"learning_rate": 1e-3}}, "'tuning.grid.learning_rate'"),
])
def test_a_bad_tuning_section_is_one_line_naming_it(tuning, expected):
    with pytest.raises(ConfigError) as err:
        _config(tuning)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_unequal_effort_needs_saying_so():
    cfg = _config({"grid": {"learning_rate": [1e-4, 1e-3]}, "methods": {"full": {"learning_rate": [1e-5]}},
                   "equal_trials": False})
    assert {k: len(v) for k, v in tuned_variants(cfg).items()} == {
        ("full", "default"): 1, ("lora", "default"): 2, ("sift", "default"): 2, ("sift", "random_mask"): 2}


def test_selection_is_the_best_mean_over_the_tuning_seeds():
    scores = {0: [0.70, 0.60], 1: [0.80, 0.40], 2: [0.55, 0.70], 3: [0.50, 0.52]}
    points = [{"learning_rate": lr} for lr in (1e-4, 3e-4, 1e-3, 3e-3)]
    chosen = select(points, [[_trial(t, s, v) for s, v in enumerate(scores[t])] for t in range(4)])
    means = {t: sum(v) / len(v) for t, v in scores.items()}  # 0.65, 0.60, 0.625, 0.51
    assert chosen["chosen"] == {"trial": 0, "point": points[0], "validation": pytest.approx(0.65),
                                "at_edge": ["learning_rate"]}  # the smallest rate searched
    assert [row["mean"] for row in chosen["grid"]] == pytest.approx([means[t] for t in range(4)])
    # not the best single score (trial 1's 0.80 on seed 0) and not the last seed's best


def test_ties_go_to_the_earlier_point_and_failed_points_are_never_chosen():
    points = [{"learning_rate": lr} for lr in (1e-4, 1e-3, 1e-2)]
    tie = select(points, [[_trial(0, 0, 0.6)], [_trial(1, 0, 0.6)], [_trial(2, 0, 0.5)]])
    assert tie["chosen"]["trial"] == 0
    inside = select(points, [[_trial(0, 0, 0.5)], [_trial(1, 0, 0.6)], [_trial(2, 0, 0.5)]])
    assert inside["chosen"]["trial"] == 1 and inside["chosen"]["at_edge"] == []
    # a point whose second seed diverged is out, however good its first seed was
    mixed = select(points, [[_trial(0, 0, 0.6), _trial(0, 1, 0.6)], [_trial(1, 0, 0.95), _trial(1, 1, None)],
                            [_trial(2, 0, 0.5), _trial(2, 1, 0.5)]])
    assert mixed["chosen"]["trial"] == 0
    assert mixed["grid"][1]["status"] == "failed" and mixed["grid"][1]["mean"] is None
    assert mixed["grid"][1]["failures"] == ["loss became nan at step 4"]
    with pytest.raises(TrainingError, match=r"every tuning trial failed \(trial 0: loss became nan at step 3; "):
        select(points, [[_trial(t, 0, None)] for t in range(3)])


def _selection_files(tmp_path: Path, scores: list[float]) -> tuple[list[dict], list[str]]:
    points = [{"learning_rate": 10.0 ** (-4 + i)} for i in range(len(scores))]
    paths = []
    for t, v in enumerate(scores):
        path = tmp_path / "results" / "tune" / "minilm-l6/rotten_tomatoes/lora/default" / f"trial{t}/seed0/result.json"
        write_json(path, _trial(t, 0, v, points[t]["learning_rate"]))
        paths.append(str(path))
    return points, paths


def test_mlflow_nests_the_trials_under_their_selection(tmp_path):
    cfg = {"tracking_uri": None, "experiment": "peftlab", "default_store": str(tmp_path / "results" / "mlflow.db")}
    points, paths = _selection_files(tmp_path, [0.6, 0.7, 0.5])
    out = tmp_path / "results" / "tune" / "minilm-l6/rotten_tomatoes/lora/default" / "selected.json"
    rec = write_selection(CELL, points, [0], paths, {}, out, cfg)
    assert json.loads(out.read_text()) == rec and rec["chosen"]["trial"] == 1
    # a final run of the same cell and seed is a different MLflow run from trial 0's
    final = copy.deepcopy(_trial(0, 0, 0.6))
    del final["run"]["trial"]
    final_path = tmp_path / "final.json"
    write_json(final_path, final)
    log_record(final, final_path, cfg)
    runs = runs_table(cfg)
    parent = runs[runs["tags.rule"] == "tune"]
    assert len(parent) == 1 and parent["tags.mlflow.runName"].item() == "minilm-l6/rotten_tomatoes/lora/default [tuning]"
    assert parent["metrics.chosen_validation"].item() == pytest.approx(0.7)
    trials = runs[runs["tags.trial"].notna()].sort_values("tags.trial")
    assert list(trials["tags.trial"]) == ["0", "1", "2"]
    assert set(trials["tags.mlflow.parentRunId"]) == {parent["run_id"].item()}
    assert runs[(runs["tags.rule"] == "finetune") & runs["tags.trial"].isna()]["tags.mlflow.parentRunId"].isna().all()
    assert len(runs) == 5 and not pending_entries(cfg)


def test_trials_queued_while_the_store_is_down_nest_once_it_is_back(tmp_path):
    blocker = tmp_path / "store"
    blocker.write_text("not a folder")  # the store's folder is a file: it cannot be opened
    cfg = {"tracking_uri": f"sqlite:///{blocker}/mlflow.db", "experiment": "peftlab",
           "default_store": str(tmp_path / "unused.db")}
    points, paths = _selection_files(tmp_path, [0.6, 0.7])
    out = tmp_path / "selected.json"
    write_selection(CELL, points, [0], paths, {}, out, cfg)
    queued = pending_entries(cfg)
    assert len(queued) == 3 and queued[0].name.startswith("tune__")  # the selection syncs first
    blocker.unlink()
    blocker.mkdir()
    assert sync_pending(cfg)["synced"] == 3
    runs = runs_table(cfg)
    parent_id = runs[runs["tags.rule"] == "tune"]["run_id"].item()
    assert set(runs[runs["tags.trial"].notna()]["tags.mlflow.parentRunId"]) == {parent_id}
