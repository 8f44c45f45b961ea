"""Intervals, baselines and paired comparisons, against independent computations: sklearn's
and scipy's metrics on each resample, a bootstrap written the plain way, and the binomial
standard error."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from peftlab.uncertainty import (
    Scores,
    baseline,
    bootstrap_interval,
    metric_rows,
    paired_difference,
    reproduces,
    scores_of,
    student_t_interval,
)

SKLEARN = {
    "accuracy": accuracy_score,
    "f1": lambda y, p: f1_score(y, p, average="binary", zero_division=0),
    "macro_f1": lambda y, p: f1_score(y, p, average="macro", zero_division=0),
    "mcc": matthews_corrcoef,
}


@pytest.mark.parametrize("metric,classes", [("f1", 2), ("macro_f1", 2), ("macro_f1", 3), ("mcc", 2), ("mcc", 3)])
def test_label_metrics_match_sklearn_on_every_row(metric, classes):
    rng = np.random.default_rng(classes)
    label = rng.integers(classes, size=(40, 25))
    pred = np.where(rng.random((40, 25)) < 0.6, label, rng.integers(classes, size=(40, 25)))
    pred[0] = 0  # a constant guess: MCC's denominator is 0
    ours = metric_rows(metric, pred, label)
    theirs = [SKLEARN[metric](y, p) for y, p in zip(label, pred, strict=True)]
    np.testing.assert_allclose(ours, theirs, atol=1e-12)


@pytest.mark.parametrize("metric,ref", [("pearson", pearsonr), ("spearman", spearmanr)])
def test_value_metrics_match_scipy_on_every_row(metric, ref):
    rng = np.random.default_rng(0)
    label = rng.normal(size=(30, 20)).round(1)  # ties: spearman ranks them as scipy does
    pred = label + rng.normal(size=(30, 20))
    np.testing.assert_allclose(metric_rows(metric, pred, label),
                               [ref(p, y)[0] for p, y in zip(pred, label, strict=True)], atol=1e-12)


def _runs(n_seeds=2, n=200, p=0.7, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.arange(n)
    return [Scores(ids, (rng.random(n) < p).astype(float), np.ones(n)) for _ in range(n_seeds)]


def test_bootstrap_interval_of_one_run_is_the_binomial_one():
    """One seed: the interval is the test set's sampling noise, about p +- 1.96 sqrt(p(1-p)/n)."""
    runs = _runs(1, n=2000, p=0.7)
    lo, hi = bootstrap_interval(runs, "accuracy", draws=4000)
    p = runs[0].pred.mean()
    half = 1.96 * np.sqrt(p * (1 - p) / 2000)
    assert abs((hi - lo) / 2 - half) < 0.1 * half and lo < p < hi


def test_bootstrap_interval_matches_a_plain_loop_and_stays_in_range():
    """The vectorised draws against a bootstrap written the plain way (seeds and shared examples
    resampled per draw), to within Monte Carlo error; a near-perfect run stays below 1."""
    runs = _runs(3, n=60, p=0.5, seed=1)
    lo, hi = bootstrap_interval(runs, "accuracy", draws=3000, seed=5)
    rng = np.random.default_rng(9)
    plain = []
    for _ in range(3000):
        ex = rng.integers(60, size=60)
        seeds = rng.integers(3, size=3)
        plain.append(np.mean([runs[s].pred[ex].mean() for s in seeds]))
    plo, phi = np.quantile(plain, [0.025, 0.975])
    assert abs(lo - plo) < 0.02 and abs(hi - phi) < 0.02
    top = _runs(2, n=50, p=0.98, seed=2)
    assert bootstrap_interval(top, "accuracy")[1] <= 1.0


def test_student_t_interval_is_clipped_to_the_metric_range():
    lo, hi = student_t_interval([0.55, 0.98], "accuracy")
    assert lo == 0.0 and hi == 1.0  # the raw t interval is 0.765 +- 2.73
    lo, hi = student_t_interval([0.2, 0.3, 0.25], "mcc")
    assert (lo, hi) == pytest.approx((0.25 - 4.303 * 0.05 / np.sqrt(3), 0.25 + 4.303 * 0.05 / np.sqrt(3)), abs=1e-3)
    assert student_t_interval([0.5], "accuracy") is None


def test_paired_difference_tells_a_real_gap_from_noise():
    """Two methods on the same 400 examples: B copies A but fixes 10% of A's errors (a real gap),
    C is A with 3 answers flipped (noise); pairing sees the first and not the second."""
    a = _runs(2, n=400, p=0.7, seed=3)
    rng = np.random.default_rng(4)
    b = [Scores(s.ids, np.where((s.pred == 0) & (rng.random(400) < 0.5), 1.0, s.pred), s.label) for s in a]
    c = [Scores(s.ids, np.where(np.isin(np.arange(400), [1, 2, 3]), 1 - s.pred, s.pred), s.label) for s in a]
    diff, lo, hi = paired_difference(b, a, "accuracy")
    assert diff == pytest.approx(np.mean([x.pred.mean() for x in b]) - np.mean([x.pred.mean() for x in a]))
    assert lo > 0
    _, lo, hi = paired_difference(c, a, "accuracy")
    assert lo < 0 < hi


def test_scores_read_predictions_files_and_reproduce_the_recorded_score():
    rows = [{"example_id": i, "prediction": "pos" if i % 3 else "neg", "label": "pos" if i % 2 else "neg",
             "correct": (i % 3 != 0) == (i % 2 == 1)} for i in range(30)][::-1]  # file order: any
    acc = scores_of(rows, "accuracy")
    assert list(acc.ids) == list(range(30))
    truth = np.array([1 if i % 2 else 0 for i in range(30)])
    guess = np.array([1 if i % 3 else 0 for i in range(30)])
    assert reproduces([acc], "accuracy", [accuracy_score(truth, guess)])
    f1 = scores_of(rows, "f1", ["neg", "pos"])
    assert reproduces([f1], "f1", [f1_score(truth, guess)])
    assert not reproduces([f1], "f1", [0.5])
    assert scores_of([{"example_id": 0, "output": "x", "correct": None}], "exact_match") is None
    assert scores_of(rows, "rougeL") is None


def test_baseline_is_the_majority_class_guess():
    rows = [{"example_id": i, "prediction": "a", "label": "a" if i < 7 else "b", "correct": i < 7} for i in range(10)]
    assert baseline(rows, "accuracy", "single_label_classification") == pytest.approx(0.7)
    assert baseline(rows, "mcc", "single_label_classification") == 0.0
    assert baseline(rows, "f1", "single_label_classification", ["b", "a"]) == pytest.approx(f1_score(
        [1] * 7 + [0] * 3, [1] * 10))
    assert baseline([{"example_id": 0, "prediction": 0.3, "label": 0.1}], "pearson", "regression") == 0.0
    assert baseline([{"example_id": 0, "prompt": "p", "output": "o", "answer": "a", "correct": False}],
                    "exact_match", "generation") is None
