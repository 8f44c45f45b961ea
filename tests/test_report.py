"""Statistics and figures of the comparison report."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from peftlab.report import method_palette, pareto_front


def test_pareto_front():
    points = [(100, 0.8), (10, 0.7), (1000, 0.79), (10, 0.75), (5000, 0.85)]
    assert pareto_front(points) == [3, 0, 4]


def test_palette_is_stable():
    a = method_palette(["lora", "full", "bitfit"])
    b = method_palette(["bitfit", "lora", "full"])
    assert a == b and len(set(map(tuple, a.values()))) == 3
    assert np.allclose(a["bitfit"], method_palette(["bitfit", "full"])["bitfit"])


def test_atomic_write_leaves_no_temp_and_normal_permissions(tmp_path):
    import os

    from peftlab.io import atomic_path, write_json

    write_json(tmp_path / "a.json", {"x": float("nan"), "y": 1})
    assert (tmp_path / "a.json").read_text().count("null") == 1
    assert oct((tmp_path / "a.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "b.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert sorted(os.listdir(tmp_path)) == ["a.json"]  # nothing half-written left behind


def _umask():
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------
# Failed and missing runs: kept in the summary with their reason, out of every number
# ---------------------------------------------------------------------------------------

SENTINEL_SCORE = 0.123457  # numbers only a failed record carries: they must appear nowhere
SENTINEL_PARAMS = 987_654_321


def _records(method: str, seed: int, acc: float, trainable: int, family: str = "weight", variant: str = "default"):
    """A completed finetune + evaluate record pair with every field the report reads."""
    run = {"model": "minilm-l6", "task": "rotten_tomatoes", "method": method, "variant": variant, "seed": seed}
    total = 22_713_986
    ft = {
        "rule": "finetune", "status": "completed", "run": run, "main_metric": "accuracy",
        "model": {"name": "minilm-l6", "pretrained": None, "notes": "MiniLM-L6", "total_params": total},
        "task": {"name": "rotten_tomatoes"}, "data_fingerprint": "fp", "config_hash": f"h-{method}",
        "method": {"name": method, "family": family, "params": {}},
        "config": {"training": {"learning_rate": 1e-3, "batch_size": 16, "max_steps": 6}, "method_params": {"r": 8}},
        "trainable_params": trainable, "trainable_percent": 100 * trainable / total, "steps": 6,
        "curves": {"train_loss": [[2, 0.7], [4, 0.69], [6, 0.68]], "learning_rate": [[0, 1e-3]],
                   "validation": [{"step": 3, "accuracy": acc - 0.01}, {"step": 6, "accuracy": acc}]},
        "best_validation": {"step": 6, "accuracy": acc}, "train_time_s": 10.0 + seed,
        "peak_memory": {"host_rss_mb": 800.0}, "stored_size_bytes": 4 * trainable, "protocol": "fixed splits",
        "versions": {"torch": "2.13.0", "platform": "Linux-x86_64"}, "git_commit": "abc123", "device": "cpu",
        "precision": "fp32", "device_name": "AMD EPYC" if seed == 0 else "Intel Xeon", "threads": 1,
    }
    ev = {
        "rule": "evaluate", "status": "completed", "run": run, "main_metric": "accuracy", "split": "test",
        "n_examples": 64, "metrics": {"accuracy": acc, "f1": acc}, "examples_per_s": 100.0,
        "inference": {"mergeable": True, "unmerged_ms_per_batch": 12.0, "merged_ms_per_batch": 10.0,
                      "base_ms_per_batch": 10.0, "added_latency_ratio": 1.0},
    }
    return ft, ev


def _failed(ft: dict, ev: dict, reason: str, step: int | None):
    """The failed-run contract: status failed + failure {reason, step}; the finetune record
    may keep partial numbers (here: sentinels), the evaluate record has no metrics."""
    failure = {"reason": reason, "step": step}
    ft = ft | {"status": "failed", "failure": failure, "trainable_params": SENTINEL_PARAMS,
               "best_validation": {"step": 2, "accuracy": SENTINEL_SCORE},
               "curves": {"train_loss": [[2, SENTINEL_SCORE]], "validation": [{"step": 2, "accuracy": SENTINEL_SCORE}]}}
    for k in ("train_time_s", "stored_size_bytes", "peak_memory"):
        ft.pop(k, None)
    ev = {k: ev[k] for k in ("rule", "run", "main_metric")} | {"status": "failed", "metrics": {}, "failure": failure}
    return ft, ev


def _write_results(root: Path, pairs: list[tuple[dict | None, dict | None]], run_keys: list[dict]):
    from peftlab.io import write_json

    ft_paths, ev_paths = [], []
    for (ft, ev), run in zip(pairs, run_keys, strict=True):
        rd = "{model}/{task}/{method}/{variant}/seed{seed}".format(**run)
        f, e = root / "results" / "finetune" / rd / "result.json", root / "results" / "evaluate" / rd / "metrics.json"
        if ft is not None:
            write_json(f, ft)
        if ev is not None:
            write_json(e, ev)
        ft_paths.append(str(f))
        ev_paths.append(str(e))
    return ft_paths, ev_paths


def _stats(root: Path) -> str:
    from peftlab.io import write_json

    split = {"size": 64, "fingerprint": "f", "length_tokens": {"p50": 20, "p95": 40}, "truncated_share": 0.0,
             "label_balance": {"negative": 32, "positive": 32}}
    path = root / "results" / "data" / "minilm-l6" / "rotten_tomatoes" / "stats.json"
    write_json(path, {"model": "minilm-l6", "task": {"name": "rotten_tomatoes", "source": "builtin"},
                      "problem_type": "single_label_classification", "main_metric": "accuracy",
                      "label_names": ["negative", "positive"], "fingerprint": "fp",
                      "splits": {s: split for s in ("train", "validation", "test")}})
    return str(path)


@pytest.fixture
def mixed_results(tmp_path):
    """4 methods x 2 seeds: lora seed 1 diverged (failed record), bitfit seed 1's finetune job
    died (no record, its log names the error), everything else completed."""
    specs = [("full", 1.0, 22_713_986, "full", 0.80), ("lora", 0.5, 74_498, "weight", 0.78),
             ("bitfit", 0.2, 26_882, "weight", 0.75), ("sift", 0.3, 50_000, "sparse", 0.70)]
    pairs, keys = [], []
    for method, _, trainable, family, acc in specs:
        for seed in (0, 1):
            ft, ev = _records(method, seed, acc + 0.01 * seed, trainable, family)
            if (method, seed) == ("lora", 1):
                ft, ev = _failed(ft, ev, "loss became nan at step 2", 2)
            if (method, seed) == ("bitfit", 1):
                ft, ev = None, None
            pairs.append((ft, ev))
            keys.append({"model": "minilm-l6", "task": "rotten_tomatoes", "method": method, "variant": "default",
                         "seed": seed})
    ft_paths, ev_paths = _write_results(tmp_path, pairs, keys)
    log = tmp_path / "logs" / "finetune" / "minilm-l6" / "rotten_tomatoes" / "bitfit" / "default" / "seed1.log"
    log.parent.mkdir(parents=True)
    log.write_text("2026-01-01 INFO peftlab.train: step 3\n"
                   "2026-01-01 ERROR peftlab: peftlab finetune: out of memory on the node: lower batch_size\n")
    return tmp_path, ft_paths, ev_paths


def test_aggregate_keeps_failed_and_missing_runs_with_their_reason(mixed_results):
    from peftlab.report import aggregate, cell_table

    root, ft_paths, ev_paths = mixed_results
    df = aggregate(ft_paths, ev_paths, str(root / "s.csv"), str(root / "s.parquet"), logs_dir=root / "logs")
    assert len(df) == 8
    assert df["status"].value_counts().to_dict() == {"completed": 6, "failed": 1, "missing": 1}
    failed = df[df["status"] == "failed"].iloc[0]
    assert (failed["method"], failed["seed"], failed["failure_step"]) == ("lora", 1, 2)
    assert failed["failure_reason"] == "loss became nan at step 2" and failed["failure_stage"] == "finetune"
    assert math.isnan(failed["test_main"]) and math.isnan(failed["trainable_params"])
    missing = df[df["status"] == "missing"].iloc[0]
    assert (missing["method"], missing["seed"]) == ("bitfit", 1)
    assert missing["failure_reason"].startswith("finetune failed: out of memory on the node: lower batch_size")
    # the CSV keeps them too, and no failed number reached it
    csv = (root / "s.csv").read_text()
    assert "loss became nan at step 2" in csv and str(SENTINEL_PARAMS) not in csv and str(SENTINEL_SCORE) not in csv
    cells = cell_table(df).set_index("method")
    assert cells.loc["lora", "n_seeds"] == 1 and cells.loc["lora", "test_mean"] == pytest.approx(0.78)
    assert cells.loc["lora", "trainable_params"] == 74_498
    assert cells.loc["bitfit", "n_seeds"] == 1 and cells.loc["full", "n_seeds"] == 2


def test_report_lists_failed_and_missing_and_keeps_their_numbers_out(mixed_results):
    import re

    from peftlab.report import aggregate, write_report

    root, ft_paths, ev_paths = mixed_results
    aggregate(ft_paths, ev_paths, str(root / "s.csv"), str(root / "s.parquet"), logs_dir=root / "logs")
    config = {"models": {"minilm-l6": {}}, "seeds": [0, 1]}
    doc = write_report(str(root / "s.parquet"), [_stats(root)], config, str(root / "r.html"), ft_paths,
                       figures_dir=root / "figures")
    problems = doc[doc.index("id='problems'"):doc.index("id='runs'")]
    assert "loss became nan at step 2" in problems and "minilm-l6/rotten_tomatoes/lora/default/seed1" in problems
    assert "out of memory on the node" in problems and "bitfit/default/seed1" in problems
    assert "2 run(s) or analyses failed or are missing" in doc
    assert "platform: Linux-x86_64; device cpu (fp32), 1 thread(s) per job" in doc  # what ran, and how
    # seeds 0 and 1 ran on different CPUs: said, since their times and memory do not compare
    assert "the runs ran on 2 different devices</b> (AMD EPYC; Intel Xeon)" in doc
    row = re.search(r'<tr id="run-minilm-l6-rotten_tomatoes-lora-default-1" class="failed">(.*?)</tr>', doc).group(1)
    assert "failed" in row
    # no number of the failed run anywhere: tables, embedded data, glance
    assert f"{SENTINEL_PARAMS:,}" not in doc and str(SENTINEL_PARAMS) not in doc
    assert "0.1235" not in doc and str(SENTINEL_SCORE) not in doc
    blob = json.loads(re.search(r"id='peftlab-data'>(.*?)</script>", doc).group(1))
    lora = [c for c in blob["cells"] if c["method"] == "lora"][0]
    assert lora["n_seeds"] == 1 and lora["test_mean"] == pytest.approx(0.78)
    # figures: the same images embedded and written for snakemake --report, one set per task
    names = sorted(p.name for p in (root / "figures").glob("*.png"))
    assert names == ["minilm-l6--rotten_tomatoes--metric_per_method.png",
                     "minilm-l6--rotten_tomatoes--metric_vs_params.png",
                     "minilm-l6--rotten_tomatoes--training_curves.png"]
    assert doc.count("src='data:image/png;base64,") == 3


def test_report_shows_the_papers_number_beside_ours(mixed_results):
    """A config with paper_results: the task's metric table gets a 'paper' column holding each
    method's published number (only for the model it names), and the sources under it."""
    import re

    from peftlab.report import aggregate, write_report

    root, ft_paths, ev_paths = mixed_results
    aggregate(ft_paths, ev_paths, str(root / "s.csv"), str(root / "s.parquet"), logs_dir=root / "logs")
    paper = {"lora": {"value": 0.812, "source": "Hu et al. 2021, Table 2"},
             "full": {"value": 0.9, "source": "elsewhere", "model": "another-model"}}
    config = {"models": {"minilm-l6": {}}, "seeds": [0, 1], "paper_results": {"rotten_tomatoes": paper}}
    doc = write_report(str(root / "s.parquet"), [_stats(root)], config, str(root / "r.html"), ft_paths)
    section = doc[doc.index("<h3>Test accuracy per method</h3>"):doc.index("<h3>Efficiency</h3>")]
    assert "<th class=\"\">paper</th>" in section
    rows = dict(re.findall(r'data-col="label">([^<]*)<.*?data-col="paper">([^<]*)<', section))
    assert rows == {"lora": "0.8120", "full": "–", "bitfit": "–", "sift": "–"}  # full's number is another model's
    assert "lora: 0.8120 test accuracy, Hu et al. 2021, Table 2" in section and "elsewhere" not in section
    # without paper_results the table has no paper column
    doc = write_report(str(root / "s.parquet"), [_stats(root)], config | {"paper_results": {}}, str(root / "r.html"),
                       ft_paths)
    assert 'data-col="paper"' not in doc


def test_a_task_tested_on_several_sets_gets_a_per_set_table(tmp_path):
    """One fine-tuning tested on several sets: summary columns per set, the set metrics in MLflow,
    and a table of each set's mean ± CI and their average, with the papers' per-set numbers and
    their mean beside them."""
    import re

    from peftlab.report import aggregate, write_report
    from peftlab.tracking import _metrics_of

    scores = {("lora", 0): (0.70, 0.50), ("lora", 1): (0.72, 0.54), ("bitfit", 0): (0.60, 0.40),
              ("bitfit", 1): (0.60, 0.44)}
    pairs, keys = [], []
    for (method, seed), (boolq, piqa) in scores.items():
        ft, ev = _records(method, seed, (boolq + piqa) / 2, 1000)
        ev["test_sets"] = {"boolq": {"n_examples": 40, "metrics": {"accuracy": boolq, "f1": boolq}},
                           "piqa": {"n_examples": 24, "metrics": {"accuracy": piqa, "f1": piqa}}}
        pairs.append((ft, ev))
        keys.append(ft["run"])
    ft_paths, ev_paths = _write_results(tmp_path, pairs, keys)
    runs = aggregate(ft_paths, ev_paths, str(tmp_path / "s.csv"), str(tmp_path / "s.parquet"))
    assert list(runs.loc[0, ["set_boolq", "set_piqa", "test_main"]]) == pytest.approx([0.70, 0.50, 0.60])
    assert ("test_piqa_accuracy", 0.5, 0) in _metrics_of(pairs[0][1])
    paper = {"boolq": {"lora": {"value": 0.689, "source": "LLM-Adapters"}},
             "piqa": {"lora": {"value": 0.807, "source": "LLM-Adapters"}}}
    config = {"models": {"minilm-l6": {}}, "seeds": [0, 1], "paper_results": paper}
    doc = write_report(str(tmp_path / "s.parquet"), [_stats(tmp_path)], config, str(tmp_path / "r.html"), ft_paths)
    section = doc[doc.index("<h3>Test accuracy per test set</h3>"):doc.index("<h3>Efficiency</h3>")]
    lora = section[section.index('data-col="label">lora<'):section.index('data-col="label">bitfit<')]
    cells = dict(re.findall(r'data-col="([\w]+)">([^<]*)<', lora))
    # 0.71 ± t(0.975, 1) * 0.01 = 0.127; the paper's average is the mean of its two sets
    assert cells["set_boolq"] == "0.710 [0.583, 0.837]" and cells["set_piqa"] == "0.520 [0.266, 0.774]"
    assert cells["set_boolq__paper"] == "0.689" and cells["test_main__paper"] == "0.748"
    assert cells["test_main"].startswith("0.615 [")
    assert section.index('data-col="label">lora<') < section.index('data-col="label">bitfit<')


def test_published_numbers_per_model():
    """A list of published numbers, one per model: each model's runs get theirs, and one naming the
    model wins over one for every model."""
    from peftlab.report import paper_results_for

    config = {"paper_results": {"piqa": {
        "lora": [{"value": 0.807, "source": "A", "model": "llama-7b"}, {"value": 0.852, "source": "B", "model": "llama-3-8b"}],
        "dora": [{"value": 0.5, "source": "C"}, {"value": 0.893, "source": "D", "model": "llama-3-8b"}],
        "gift": {"value": 0.6, "source": "E", "model": "llama-7b"}}}}
    assert {m: e["value"] for m, e in paper_results_for(config, "llama-3-8b", "piqa").items()} == {"lora": 0.852,
                                                                                                  "dora": 0.893}
    assert {m: e["value"] for m, e in paper_results_for(config, "llama-7b", "piqa").items()} == {
        "lora": 0.807, "dora": 0.5, "gift": 0.6}
    assert paper_results_for(config, "llama-7b", "siqa") == {}


def test_figures_draw_only_completed_runs(mixed_results):
    """The training-curve figure gets the completed records only: the failed run's curve
    (the sentinel loss) is never drawn."""
    import matplotlib

    from peftlab import report

    matplotlib.use("Agg")
    root, ft_paths, ev_paths = mixed_results
    drawn = []
    real = report.figure_training_curves

    def spy(records, *a, **k):
        drawn.extend(records)
        return real(records, *a, **k)

    report.figure_training_curves = spy
    try:
        report.aggregate(ft_paths, ev_paths, str(root / "s.csv"), str(root / "s.parquet"))
        report.write_report(str(root / "s.parquet"), [_stats(root)], {"models": {"minilm-l6": {}}, "seeds": [0, 1]},
                            str(root / "r.html"), ft_paths)
    finally:
        report.figure_training_curves = real
    assert len(drawn) == 6 and all(r["status"] == "completed" for r in drawn)


def test_partial_report_from_whatever_exists(mixed_results, monkeypatch, capsys):
    """What the Snakefile's onerror (and python -m peftlab report) writes when jobs failed:
    the report of what finished beside the configured one, naming every missing record.
    ``--configfile`` replaces config/config.yaml, as in the pipeline: runs only the default
    config names are not listed as missing."""
    from peftlab.__main__ import main

    root, _, _ = mixed_results
    _stats(root)
    monkeypatch.chdir(root)
    (root / "reports").mkdir()
    (root / "reports" / "comparison.html").write_text("the last complete report")
    (root / "cfg.yaml").write_text(
        "models: {minilm-l6: {}}\ntasks: {rotten_tomatoes: {}}\n"
        "methods: {full: [default], lora: [default], bitfit: [default], sift: [default]}\nseeds: [0, 1]\n"
        f"experiments_dir: {Path(__file__).parent / 'configs' / 'experiments'}\n"
        "analyses: {gradient_sparsity: {enabled: true}}\n")
    for m in ("full", "bitfit", "sift"):  # the test experiments dir has lora only
        d = root / "exp" / m
        d.mkdir(parents=True)
        (d / "default.yaml").write_text("{}\n")
    exp = Path(__file__).parent / "configs" / "experiments"
    (root / "exp" / "defaults.yaml").write_text((exp / "defaults.yaml").read_text())
    (root / "exp" / "lora").mkdir()
    (root / "exp" / "lora" / "default.yaml").write_text((exp / "lora" / "default.yaml").read_text())
    text = (root / "cfg.yaml").read_text().replace(str(exp), str(root / "exp"))
    (root / "cfg.yaml").write_text(text)
    sparsity_log = root / "logs" / "gradient_sparsity" / "minilm-l6" / "rotten_tomatoes.log"
    sparsity_log.parent.mkdir(parents=True)
    sparsity_log.write_text("Traceback (most recent call last):\n  File x\nRuntimeError: CUDA error: device lost\n")
    (root / "config").mkdir()  # a default config naming another task and method
    (root / "config" / "config.yaml").write_text(
        "models: {minilm-l6: {}}\ntasks: {bbc_news: {}}\nmethods: {hiwi: [default]}\nseeds: [7]\n")
    assert main(["report", "--configfile", "cfg.yaml"]) == 0
    doc = (root / "reports" / "comparison.partial.html").read_text()
    assert "bbc_news" not in doc and "hiwi" not in doc and "seed7" not in doc
    assert capsys.readouterr().err.count("--replace") == 0
    assert main(["report", "--configfile", "cfg.yaml", "--replace"]) == 0  # deprecated: a no-op
    assert "--replace is no longer needed and does nothing" in capsys.readouterr().err
    def undated(html: str) -> str:
        return re.sub(r"Generated \d{4}-\d\d-\d\d \d\d:\d\d UTC", "Generated", html)

    assert undated((root / "reports" / "comparison.partial.html").read_text()) == undated(doc)
    assert (root / "reports" / "comparison.html").read_text() == "the last complete report"
    assert "Partial report." in doc
    problems = doc[doc.index("id='problems'"):doc.index("id='runs'")]
    assert "gradient_sparsity failed: RuntimeError: CUDA error: device lost" in problems
    assert "out of memory on the node" in problems and "loss became nan at step 2" in problems
    assert (root / "results" / "summary.partial.csv").exists()
    assert doc.count("src='data:image/png;base64,") == 3  # the completed runs' figures


def test_style_is_fixed_per_method_and_variant():
    from peftlab.report import METHOD_COLORS, method_palette

    pal = method_palette(["sift", "sift/random_mask", "lora", "pafi"])
    assert len(set(pal.values())) == 4
    # a method keeps its colour whatever else is in the report
    assert pal["lora"] == method_palette(["lora"])["lora"]
    assert len(set(METHOD_COLORS.values())) == len(METHOD_COLORS)
    from peftlab.methods import METHODS

    assert set(METHODS) <= set(METHOD_COLORS)  # every registered method has its own colour


def test_last_error_line(tmp_path):
    from peftlab.report import last_error_line

    log = tmp_path / "a.log"
    log.write_text("x\nTraceback (most recent call last):\n  File y\nValueError: bad shape (3, 4)\nmore\n")
    assert last_error_line(log) == "ValueError: bad shape (3, 4)"
    log.write_text("peftlab d90: no full fine-tuning record: run it first\nValueError: later\n")
    assert last_error_line(log) == "no full fine-tuning record: run it first"
    assert last_error_line(tmp_path / "none.log") is None


# ---------------------------------------------------------------------------------------
# Intervals over examples and seeds, the no-learning baseline, paired marks
# ---------------------------------------------------------------------------------------


def _predictions(correct: np.ndarray, labels: list[str]) -> list[dict]:
    other = {"negative": "positive", "positive": "negative"}
    return [{"example_id": i, "prediction": y if c else other[y], "label": y, "correct": bool(c)}
            for i, (c, y) in enumerate(zip(correct, labels, strict=True))]


def test_report_intervals_baseline_and_marks_come_from_the_predictions(tmp_path):
    """400 test examples, 60% negative. full and lora (lora = full with 4 answers changed) cannot
    be told apart; ia3 is 10 points lower: below both; bitfit always says negative: the majority
    baseline exactly, so it is not trained and ranks nowhere; sift has no predictions file: its
    interval is the clipped t one."""
    import re

    from peftlab.io import write_text
    from peftlab.report import aggregate, write_report

    rng = np.random.default_rng(0)
    labels = ["negative"] * 240 + ["positive"] * 160
    full = {s: rng.random(400) < 0.85 for s in (0, 1)}
    lora = {s: np.where(np.isin(np.arange(400), [3, 50, 120, 300]), ~full[s], full[s]) for s in (0, 1)}
    correct = {"full": full, "lora": lora, "ia3": {s: rng.random(400) < 0.75 for s in (0, 1)},
               "bitfit": {s: np.array([y == "negative" for y in labels]) for s in (0, 1)}}
    pairs, keys = [], []
    for method, family, trainable in (("full", "full", 22_713_986), ("lora", "weight", 74_498),
                                      ("ia3", "weight", 10_000), ("bitfit", "weight", 5_000), ("sift", "sparse", 50_000)):
        for seed in (0, 1):
            acc = float(correct[method][seed].mean()) if method in correct else 0.70 + 0.05 * seed
            ft, ev = _records(method, seed, acc, trainable, family)
            ev["n_examples"] = 400
            pairs.append((ft, ev))
            keys.append(ft["run"])
            if method in correct:
                rd = f"minilm-l6/rotten_tomatoes/{method}/default/seed{seed}"
                rows = _predictions(correct[method][seed], labels)
                write_text(tmp_path / "results" / "evaluate" / rd / "predictions.jsonl",
                           "".join(json.dumps(r) + "\n" for r in rows))
    ft_paths, ev_paths = _write_results(tmp_path, pairs, keys)
    aggregate(ft_paths, ev_paths, str(tmp_path / "results" / "s.csv"), str(tmp_path / "results" / "s.parquet"))
    doc = write_report(str(tmp_path / "results" / "s.parquet"), [_stats(tmp_path)],
                       {"models": {"minilm-l6": {}}, "seeds": [0, 1]},
                       str(tmp_path / "r.html"), ft_paths)
    cells = {c["method"]: c for c in json.loads(re.search(
        r"<script type='application/json' id='peftlab-data'>(.*?)</script>", doc).group(1))["cells"]}
    for m in ("full", "lora", "ia3", "bitfit"):
        assert cells[m]["interval"] == "bootstrap" and 0 <= cells[m]["test_lo"] < cells[m]["test_mean"]
        assert cells[m]["test_mean"] < cells[m]["test_hi"] <= 1
        assert cells[m]["baseline"] == pytest.approx(0.6)
    # one run's binomial noise alone is +-0.035 at 400 examples: the interval is at least that wide
    assert cells["full"]["test_hi"] - cells["full"]["test_lo"] > 0.05
    assert cells["sift"]["interval"] == "t" and cells["sift"]["baseline"] is None
    assert (cells["sift"]["test_lo"], cells["sift"]["test_hi"]) == pytest.approx((0.725 - 0.3177, 1.0), abs=1e-3)
    assert cells["bitfit"]["not_trained"] and cells["bitfit"]["vs_best"] is None
    best = max(("full", "lora"), key=lambda m: cells[m]["test_mean"])
    other = {"full": "lora", "lora": "full"}[best]
    assert cells[best]["vs_best"] == "best" and cells[other]["vs_best"] == "tied"
    assert cells["ia3"]["vs_best"] == "below" and cells["ia3"]["vs_full"] == "below"
    assert cells["lora"]["vs_full"] == "tied"
    glance = doc[doc.index("id='glance'"):doc.index("id='setup'")]
    assert "no single winner" in glance and "cannot be told apart at 95%" in glance
    front = re.findall(r"<td class='l'>(.*?)</td>", glance)[4]  # task, metric, best, full, front, runs
    assert "bitfit" not in front and "ia3" in front  # the fewest parameters, but it learned nothing
    assert "not trained at this budget" in doc and "percentile bootstrap (2000 draws)" in doc
    assert "No-learning baseline: 0.6000 test accuracy" in doc


def test_model_size_view_shows_d90_against_parameters_when_several_models_ran():
    """Aghajanyan et al.'s view: d90 per model against its size, for tasks with more than one
    model; a d90 beyond the grid is shown as a lower bound, and one model alone shows nothing."""
    from peftlab.report import Figures, _model_size_view, model_size_table

    def d90(total, value, grid=(100, 1000, 10000)):
        return {"d90": {"total_params": total, "d90": value, "reached": value is not None, "grid": list(grid)}}

    analyses = {("big", "mrpc"): d90(355_000_000, 200), ("small", "mrpc"): d90(125_000_000, 1800),
                ("tiny", "mrpc"): d90(22_700_000, None), ("small", "qqp"): d90(125_000_000, 7000)}
    table = model_size_table(analyses)
    assert list(table["model"]) == ["tiny", "small", "big"] and set(table["task"]) == {"mrpc"}
    html = "".join(_model_size_view(analyses, Figures()))
    assert "Intrinsic dimension and model size" in html and "data:image/png;base64," in html
    assert "&gt; 10,000" in html and ">1,800<" in html and ">355,000,000<" in html
    assert _model_size_view({("small", "qqp"): d90(125_000_000, 7000)}, Figures()) == []
    paper = {"big": {"mrpc": {"value": 207, "source": "Aghajanyan et al. 2021 Table 1"}}}
    with_paper = "".join(_model_size_view(analyses, Figures(), paper))
    assert ">207<" in with_paper and "big / mrpc: 207, Aghajanyan et al. 2021 Table 1" in with_paper
