"""Aggregation of result records and the self-contained HTML comparison report.

``aggregate``: finetune records + evaluate records -> one row per run (CSV + parquet).
``write_report``: that table + task statistics -> ``reports/comparison.html`` with every
figure embedded as a PNG data URI (no external files) and the table rendered from the
same rows, so the numbers in the report are exactly the records' numbers.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .io import atomic_path, read_json, write_text

RUN_COLUMNS = ["model", "task", "method", "variant", "seed"]


# ---------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------


def summary_row(ft: dict, ev: dict) -> dict[str, Any]:
    run = ft["run"]
    if {k: str(v) for k, v in ev["run"].items()} != {k: str(v) for k, v in run.items()}:
        raise ValueError(f"records of different runs joined: {run} vs {ev['run']}")
    row: dict[str, Any] = {k: run[k] for k in RUN_COLUMNS}
    row["seed"] = int(row["seed"])
    main = ft["main_metric"]
    row.update(
        family=ft["method"]["family"],
        status=ev.get("status", ft.get("status")),
        main_metric=main,
        test_main=ev["metrics"][main],
        trainable_params=ft["trainable_params"],
        trainable_percent=ft["trainable_percent"],
        total_params=ft["model"]["total_params"],
        train_time_s=ft["train_time_s"],
        peak_rss_mb=ft["peak_memory"].get("host_rss_mb"),
        peak_gpu_mb=ft["peak_memory"].get("gpu_mb"),
        stored_size_bytes=ft["stored_size_bytes"],
        steps=ft["steps"],
        best_validation_step=ft["best_validation"]["step"],
        validation_main=ft["best_validation"].get(main),
        eval_examples_per_s=ev.get("examples_per_s"),
        mergeable=ev.get("inference", {}).get("mergeable"),
        latency_ms_unmerged=ev.get("inference", {}).get("unmerged_ms_per_batch"),
        latency_ms_merged=ev.get("inference", {}).get("merged_ms_per_batch"),
        latency_ms_base=ev.get("inference", {}).get("base_ms_per_batch"),
        added_latency_ratio=ev.get("inference", {}).get("added_latency_ratio"),
        n_test=ev["n_examples"],
        data_fingerprint=ft["data_fingerprint"],
        config_hash=ft.get("config_hash"),
        git_commit=ft.get("git_commit"),
    )
    for k, v in ev["metrics"].items():
        row[f"test_{k}"] = v
    return row


def aggregate(finetune_paths: list[str], evaluate_paths: list[str], csv_path: str, parquet_path: str) -> pd.DataFrame:
    """One row per run, in the config's order."""
    if len(finetune_paths) != len(evaluate_paths):
        raise ValueError("every finetune record needs its evaluate record")
    rows = [summary_row(read_json(f), read_json(e)) for f, e in zip(finetune_paths, evaluate_paths, strict=True)]
    df = pd.DataFrame(rows)
    with atomic_path(csv_path, suffix=".csv") as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(parquet_path, suffix=".parquet") as tmp:
        df.to_parquet(tmp, index=False)
    return df


# ---------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------


def mean_ci95(values: list[float] | np.ndarray) -> tuple[float, float | None]:
    """Mean and half-width of the 95% Student-t interval (None with one value)."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, None
    from scipy.stats import t

    return mean, float(t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (fewer params and higher score is better)."""
    front = []
    for i, (p, s) in enumerate(points):
        dominated = any(
            (q <= p and t >= s) and (q < p or t > s) for j, (q, t) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def cell_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% CI of the main test metric per (model, task, method, variant)."""
    rows = []
    for keys, g in df.groupby(["model", "task", "method", "variant"], sort=False):
        mean, ci = mean_ci95(g["test_main"].to_numpy())
        rows.append(dict(zip(["model", "task", "method", "variant"], keys, strict=True)) | {
            "family": g["family"].iloc[0],
            "main_metric": g["main_metric"].iloc[0],
            "n_seeds": len(g),
            "test_mean": mean,
            "test_ci95": ci,
            "trainable_params": int(g["trainable_params"].iloc[0]),
            "trainable_percent": float(g["trainable_percent"].iloc[0]),
            "train_time_s": float(g["train_time_s"].mean()),
            "peak_rss_mb": float(g["peak_rss_mb"].mean()),
            "stored_size_bytes": int(g["stored_size_bytes"].iloc[0]),
            "added_latency_ratio": float(g["added_latency_ratio"].mean())
            if "added_latency_ratio" in g and g["added_latency_ratio"].notna().any() else None,
        })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------


def method_palette(labels: list[str]) -> dict[str, Any]:
    """One fixed colour per method label, the same in every figure."""
    import seaborn as sns

    colors = sns.color_palette("tab10", n_colors=max(10, len(labels)))
    return {label: colors[i] for i, label in enumerate(sorted(labels))}


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _label(method: str, variant: str) -> str:
    return method if variant == "default" else f"{method}/{variant}"


def figure_metric_vs_params(cells: pd.DataFrame, palette: dict, title: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    metric = cells["main_metric"].iloc[0]
    points = []
    for _, c in cells.iterrows():
        label = _label(c["method"], c["variant"])
        ax.errorbar(c["trainable_params"], c["test_mean"], yerr=c["test_ci95"] or 0, fmt="o",
                    color=palette[label], label=label, capsize=4, markersize=8)
        points.append((c["trainable_params"], c["test_mean"]))
    front = pareto_front(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="grey",
            lw=1, label="Pareto front", zorder=0)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"test {metric} (mean, 95% CI over seeds)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _png(fig)


def figure_metric_per_method(runs: pd.DataFrame, palette: dict, title: str) -> str:
    """Each seed as a dot, the mean as a diamond with the same 95% t-interval as the tables."""
    import matplotlib.pyplot as plt

    labels = [_label(m, v) for m, v in zip(runs["method"], runs["variant"], strict=True)]
    runs = runs.assign(label=labels)
    order = list(dict.fromkeys(labels))
    rng = np.random.default_rng(0)  # fixed jitter: the figure is reproducible
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, label in enumerate(order):
        values = runs.loc[runs["label"] == label, "test_main"].to_numpy()
        mean, ci = mean_ci95(values)
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, color=palette[label], alpha=0.55, s=30)
        ax.errorbar(i + 0.25, mean, yerr=ci or 0, fmt="D", color=palette[label], capsize=5, markersize=8)
    ax.set_xticks(range(len(order)), order)
    ax.set_xlim(-0.6, len(order) - 0.4)
    ax.set_xlabel("method")
    ax.set_ylabel(f"test {runs['main_metric'].iloc[0]}")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)


def figure_training_curves(records: list[dict], palette: dict, metric: str, title: str) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    seen: set[str] = set()
    for r in records:
        label = _label(r["run"]["method"], r["run"]["variant"])
        kw = dict(color=palette[label], alpha=0.8, lw=1.4, label=None if label in seen else label)
        seen.add(label)
        loss = np.asarray(r["curves"]["train_loss"], dtype=float)
        if len(loss):
            axes[0].plot(loss[:, 0], loss[:, 1], **kw)
        val = r["curves"]["validation"]
        axes[1].plot([p["step"] for p in val], [p[metric] for p in val], marker="o", ms=3, **kw)
    axes[0].set(xlabel="optimizer step", ylabel="training loss", title="training loss")
    axes[1].set(xlabel="optimizer step", ylabel=f"validation {metric}", title=f"validation {metric}")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(title)
    return _png(fig)


# ---------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.7em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:right}th{background:#f4f4f4}
td.l,th.l{text-align:left}img{max-width:100%;display:block;margin:.8em 0}
.note{color:#555;font-size:.9em}code{background:#f4f4f4;padding:0 .2em}
"""


def fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{digits}f}"
    return html.escape(str(v))


def _table(df: pd.DataFrame, columns: list[tuple[str, str, int]], row_id: str | None = None) -> str:
    head = "".join(f'<th class="{"l" if d < 0 else ""}">{html.escape(t)}</th>' for _, t, d in columns)
    body = []
    for _, r in df.iterrows():
        rid = f' id="{html.escape(row_id.format(**r))}"' if row_id else ""
        cells = "".join(
            f'<td class="{"l" if d < 0 else ""}" data-col="{c}">{fmt(r[c], max(d, 0))}</td>' for c, _, d in columns
        )
        body.append(f"<tr{rid}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def write_report(summary_path: str, stats_paths: list[str], config: dict, html_path: str,
                 finetune_paths: list[str] | None = None) -> str:
    """Render the comparison report; returns the HTML written to ``html_path``."""
    runs = pd.read_parquet(summary_path)
    stats = {(s["model"], s["task"]["name"]): s for s in map(read_json, stats_paths)}
    base = Path(summary_path).parent
    records = [read_json(p) for p in (finetune_paths or [])] or [
        read_json(base / "finetune" / f"{r.model}/{r.task}/{r.method}/{r.variant}/seed{r.seed}/result.json")
        for r in runs.itertuples()
    ]
    palette = method_palette(sorted({_label(m, v) for m, v in zip(runs["method"], runs["variant"], strict=True)}))
    any_record = records[0] if records else {}
    versions = any_record.get("versions", {})
    commits = sorted(set(runs["git_commit"].dropna()))

    parts = [f"<h1>peftlab comparison report</h1><p class='note'>Generated "
             f"{_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M UTC} from {len(runs)} runs.</p>"]
    # --- setup ---------------------------------------------------------------------------
    parts.append("<h2 id='setup'>Setup</h2><ul>")
    for name, entry in config["models"].items():
        src = (entry or {}).get("pretrained") or "built-in"
        total = runs.loc[runs["model"] == name, "total_params"]
        size = f", {fmt(int(total.iloc[0]))} parameters" if len(total) else ""
        parts.append(f"<li>model <b>{html.escape(name)}</b> ({html.escape(src)}{size})</li>")
    parts.append(f"<li>seeds: {', '.join(map(str, config['seeds']))}</li>")
    parts.append(f"<li>evaluation protocol: {html.escape(any_record.get('protocol', ''))}</li>")
    parts.append(f"<li>git commit: <code>{html.escape(', '.join(commits) or 'unknown')}</code></li>")
    parts.append("<li>versions: " + ", ".join(f"{html.escape(k)} {html.escape(v)}" for k, v in versions.items()
                                               if k != "platform") + "</li></ul>")
    split_rows = []
    for (model, task), s in sorted(stats.items()):
        for split, v in s["splits"].items():
            split_rows.append({"model": model, "task": task, "split": split, "size": v["size"],
                               "labels": ", ".join(f"{k}: {n}" for k, n in v.get("label_balance", {}).items()),
                               "p50": v["length_tokens"]["p50"], "p95": v["length_tokens"]["p95"],
                               "truncated": v["truncated_share"], "fingerprint": v["fingerprint"]})
    if split_rows:
        parts.append("<h3>Data splits</h3>")
        parts.append(_table(pd.DataFrame(split_rows), [
            ("model", "model", -1), ("task", "task", -1), ("split", "split", -1), ("size", "examples", 0),
            ("labels", "label balance", -1), ("p50", "tokens p50", 0), ("p95", "tokens p95", 0),
            ("truncated", "share truncated", 3), ("fingerprint", "split fingerprint", -1)]))

    # --- per task ------------------------------------------------------------------------
    cells = cell_table(runs)
    for (model, task), task_runs in runs.groupby(["model", "task"], sort=False):
        metric = task_runs["main_metric"].iloc[0]
        title = f"{task} · {model}"
        task_cells = cells[(cells["model"] == model) & (cells["task"] == task)]
        parts.append(f"<h2 id='task-{html.escape(model)}-{html.escape(task)}'>{html.escape(title)}</h2>")
        parts.append(f"<p class='note'>Headline metric: test <b>{metric}</b>. Points are means over "
                     "seeds with 95% Student-t intervals; the dashed line joins the Pareto front "
                     "(no other method is both smaller and better).</p>")
        parts.append(f"<img alt='{html.escape(task)} {metric} vs trainable parameters' "
                     f"src='{figure_metric_vs_params(task_cells, palette, f'{title}: {metric} vs trainable parameters')}'>")
        parts.append(f"<img alt='{html.escape(task)} {metric} per method' "
                     f"src='{figure_metric_per_method(task_runs, palette, f'{title}: test {metric} per method (seeds as dots)')}'>")
        task_records = [r for r in records if r["run"]["model"] == model and r["run"]["task"] == task]
        if task_records:
            parts.append(f"<img alt='{html.escape(task)} training curves' "
                         f"src='{figure_training_curves(task_records, palette, metric, f'{title}: training curves')}'>")
        parts.append(_table(task_cells, [
            ("method", "method", -1), ("variant", "variant", -1), ("n_seeds", "seeds", 0),
            ("test_mean", f"test {metric} (mean)", 4), ("test_ci95", "± 95% CI", 4),
            ("trainable_params", "trainable params", 0), ("trainable_percent", "trainable %", 4),
            ("train_time_s", "train time (s)", 1), ("peak_rss_mb", "peak RSS (MB)", 0),
            ("stored_size_bytes", "stored bytes", 0),
            ("added_latency_ratio", "inference latency vs base", 2)]))

    # --- all runs ------------------------------------------------------------------------
    parts.append("<h2 id='runs'>All runs</h2>")
    metric_cols = [c for c in runs.columns if c.startswith("test_") and c != "test_main"]
    parts.append(_table(runs, [
        ("model", "model", -1), ("task", "task", -1), ("method", "method", -1), ("variant", "variant", -1),
        ("seed", "seed", 0), *[(c, c.replace("_", " "), 4) for c in metric_cols],
        ("validation_main", "best validation", 4), ("best_validation_step", "best step", 0),
        ("steps", "steps", 0), ("trainable_params", "trainable params", 0),
        ("train_time_s", "train time (s)", 1)],
        row_id="run-{model}-{task}-{method}-{variant}-{seed}"))
    data = {"runs": json.loads(runs.to_json(orient="records")), "cells": json.loads(cells.to_json(orient="records"))}
    blob = json.dumps(data).replace("<", "\\u003c")  # safe inside <script>
    parts.append(f"<script type='application/json' id='peftlab-data'>{blob}</script>")

    doc = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           "<meta name='viewport' content='width=device-width, initial-scale=1'>"
           f"<title>peftlab comparison</title><style>{CSS}</style></head><body>"
           + "\n".join(parts) + "</body></html>\n")
    write_text(html_path, doc)
    return doc
