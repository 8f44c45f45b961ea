"""How sure the report can be: intervals over the test examples and the seeds, the baseline a
run must beat to count as trained, and paired comparisons between methods.

A Student-t interval over 2 seeds is ±12.7 standard errors wide and ignores the test set's own
sampling noise, so it runs past the metric's range and says little. Here a run's main metric is
recomputed from its predictions file (every test example's prediction) on bootstrap resamples:
each draw resamples the seeds and, shared by all of them, the test examples (a percentile
bootstrap over both sources of noise, always inside the metric's range). A comparison of two
methods pairs them by seed and draws the same examples for both. Metrics that are not a function
of per-example predictions (corpus BLEU, ROUGE, an average over several test sets), or runs whose
predictions do not reproduce the recorded score, fall back to the t interval over seeds, clipped
to the metric's range; each cell says which it got.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DRAWS = 2000
LEVEL = 0.95
BOOTSTRAP = "bootstrap"
STUDENT_T = "t"
# per-example metrics recomputed here (classification "accuracy" and the generative ones from
# the rows' "correct"; the rest from the predicted and true labels or values)
MEAN_METRICS = ("accuracy", "exact_match")
LABEL_METRICS = ("f1", "mcc", "macro_f1")
VALUE_METRICS = ("pearson", "spearman")
RANGES = {"mcc": (-1.0, 1.0), "pearson": (-1.0, 1.0), "spearman": (-1.0, 1.0), "mse": (0.0, math.inf)}
_BLOCK = 4_000_000  # resampled predictions per block of draws (memory: 8 bytes each)


def metric_range(metric: str) -> tuple[float, float]:
    """The values ``metric`` can take (fractions of 1 unless listed in ``RANGES``)."""
    return RANGES.get(metric, (0.0, 1.0))


@dataclass(frozen=True)
class Scores:
    """One run's test predictions in example order: ``pred`` and ``label`` as ``metric_rows``
    reads them (a 0/1 score and ones for mean metrics, label codes, or values)."""

    ids: np.ndarray
    pred: np.ndarray
    label: np.ndarray


def scores_of(rows: list[dict], metric: str, label_names: list | None = None) -> Scores | None:
    """``rows`` of a predictions file as ``Scores`` for ``metric``; None where the metric is not
    a function of per-example predictions. Label codes follow ``label_names`` (the positive class
    of binary F1 is code 1, as in training)."""
    if not rows:
        return None
    rows = sorted(rows, key=lambda r: r["example_id"])
    ids = np.array([r["example_id"] for r in rows])
    if metric in MEAN_METRICS:
        if any(r.get("correct") is None for r in rows):
            return None
        return Scores(ids, np.array([float(r["correct"]) for r in rows]), np.ones(len(rows)))
    if metric in VALUE_METRICS:
        return Scores(ids, np.array([float(r["prediction"]) for r in rows]), np.array([float(r["label"]) for r in rows]))
    if metric in LABEL_METRICS:
        names = list(label_names or sorted({r["label"] for r in rows} | {r["prediction"] for r in rows}, key=str))
        code = {n: i for i, n in enumerate(names)}
        if any(r["label"] not in code or r["prediction"] not in code for r in rows):
            return None
        return Scores(ids, np.array([code[r["prediction"]] for r in rows]), np.array([code[r["label"]] for r in rows]))
    return None


def metric_rows(metric: str, pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """``metric`` of each row of ``pred`` / ``label`` (draws x examples), as
    ``metrics.classification_metrics`` / ``regression_metrics`` compute it on one row."""
    if metric in MEAN_METRICS:
        return pred.mean(axis=1)
    if metric in VALUE_METRICS:
        if metric == "spearman":
            from scipy.stats import rankdata

            pred, label = rankdata(pred, axis=1), rankdata(label, axis=1)
        return _pearson_rows(pred, label)
    k = max(2, int(max(pred.max(), label.max())) + 1)
    p, t = _counts(pred, k), _counts(label, k)
    if metric == "mcc":
        n, c = pred.shape[1], (pred == label).sum(axis=1)
        num = c * n - (p * t).sum(axis=1)
        den = np.sqrt((n * n - (p * p).sum(axis=1)) * (n * n - (t * t).sum(axis=1)))
        return np.divide(num, den, out=np.zeros(len(pred)), where=den > 0)
    tp = _counts(np.where(pred == label, pred, k), k + 1)[:, :k]
    f1 = np.divide(2 * tp, p + t, out=np.zeros(p.shape), where=(p + t) > 0)
    if metric == "f1":
        return f1[:, 1]
    present = (p + t) > 0
    return (f1 * present).sum(axis=1) / present.sum(axis=1)


def _counts(codes: np.ndarray, k: int) -> np.ndarray:
    """Per row, how often each code 0..k-1 occurs (draws x k)."""
    offset = np.arange(len(codes))[:, None] * k
    return np.bincount((codes.astype(np.int64) + offset).ravel(), minlength=len(codes) * k).reshape(len(codes), k)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x, y = x - x.mean(axis=1, keepdims=True), y - y.mean(axis=1, keepdims=True)
    den = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
    return np.divide((x * y).sum(axis=1), den, out=np.zeros(len(x)), where=den > 0)


def _draws(runs: list[list[Scores]], metric: str, draws: int, seed: int) -> np.ndarray:
    """Bootstrap values (groups x draws) of each group's mean metric over its seeds: every draw
    resamples the examples (the same ones for every group and seed) and, per group, its seeds
    (by position: groups of equal length are paired seed by seed)."""
    rng = np.random.default_rng(seed)
    n = len(runs[0][0].ids)
    out = np.empty((len(runs), draws))
    step = max(1, _BLOCK // n)
    for start in range(0, draws, step):
        b = min(step, draws - start)
        examples = rng.integers(n, size=(b, n))
        picks = rng.integers(len(runs[0]), size=(b, len(runs[0])))
        for g, group in enumerate(runs):
            per_seed = np.stack([metric_rows(metric, s.pred[examples], s.label[examples]) for s in group], axis=1)
            out[g, start:start + b] = np.take_along_axis(per_seed, picks % len(group), axis=1).mean(axis=1)
    return out


def same_examples(runs: list[Scores]) -> bool:
    """Whether the runs scored the same test examples, in the same order."""
    return all(len(r.ids) == len(runs[0].ids) and (r.ids == runs[0].ids).all() for r in runs)


def bootstrap_interval(runs: list[Scores], metric: str, draws: int = DRAWS, seed: int = 0) -> tuple[float, float]:
    """The percentile interval (``LEVEL``) of the mean metric over the seeds ``runs``."""
    values = _draws([runs], metric, draws, seed)[0]
    return tuple(float(v) for v in np.quantile(values, [(1 - LEVEL) / 2, (1 + LEVEL) / 2]))


def paired_difference(a: list[Scores], b: list[Scores], metric: str, draws: int = DRAWS,
                      seed: int = 0) -> tuple[float, float, float]:
    """``a``'s mean metric minus ``b``'s (runs of the same seeds, in the same order): the
    observed difference and its percentile interval (same examples and seeds in every draw)."""
    observed = (np.mean([metric_rows(metric, s.pred[None], s.label[None])[0] for s in a])
                - np.mean([metric_rows(metric, s.pred[None], s.label[None])[0] for s in b]))
    values = _draws([a, b], metric, draws, seed)
    lo, hi = np.quantile(values[0] - values[1], [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(observed), float(lo), float(hi)


def student_t_interval(values, metric: str) -> tuple[float, float] | None:
    """The t interval (``LEVEL``) of the seeds' mean, clipped to the metric's range; None with one seed."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return None
    from scipy.stats import t

    half = float(t.ppf((1 + LEVEL) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    lo, hi = metric_range(metric)
    return max(lo, float(x.mean()) - half), min(hi, float(x.mean()) + half)


def baseline(rows: list[dict], metric: str, problem_type: str | None,
             label_names: list | None = None) -> float | None:
    """What a model that learned nothing scores: a classifier that always predicts the test
    set's most frequent class (its accuracy is that class's share; its MCC 0), or a regressor's
    correlation 0. None for generative tasks (no fixed guess)."""
    if problem_type == "regression" and metric in VALUE_METRICS:
        return 0.0
    if not rows or "label" not in rows[0] or "correct" not in rows[0] or "output" in rows[0]:
        return None
    labels = [r["label"] for r in rows]
    majority = max(sorted(set(labels), key=str), key=labels.count)
    guess = [dict(r, prediction=majority, correct=r["label"] == majority) for r in rows]
    s = scores_of(guess, metric, label_names)
    return None if s is None else float(metric_rows(metric, s.pred[None], s.label[None])[0])


def reproduces(runs: list[Scores], metric: str, recorded: list[float], tol: float = 1e-6) -> bool:
    """Whether each run's predictions give its recorded score (a task averaged over several
    test sets, say, does not: its interval falls back to t)."""
    got = [metric_rows(metric, s.pred[None], s.label[None])[0] for s in runs]
    return len(runs) > 0 and same_examples(runs) and np.allclose(got, recorded, atol=tol, rtol=0)
