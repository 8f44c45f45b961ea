"""Task metrics on predictions: accuracy, macro-F1, F1, MCC; Pearson/Spearman for regression."""

from __future__ import annotations

import numpy as np


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    preds = logits.argmax(axis=-1)
    out = {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, preds)),
    }
    if logits.shape[-1] == 2:
        out["f1"] = float(f1_score(labels, preds, average="binary", zero_division=0))
    return out


def regression_metrics(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    preds = preds.reshape(-1)
    if np.std(preds) == 0 or np.std(labels) == 0:
        return {"pearson": 0.0, "spearman": 0.0, "mse": float(np.mean((preds - labels) ** 2))}
    return {
        "pearson": float(pearsonr(preds, labels)[0]),
        "spearman": float(spearmanr(preds, labels)[0]),
        "mse": float(np.mean((preds - labels) ** 2)),
    }


def compute_metrics(problem_type: str, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    if problem_type == "regression":
        return regression_metrics(outputs, labels)
    return classification_metrics(outputs, labels)
