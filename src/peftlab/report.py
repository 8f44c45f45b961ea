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


def figure_intrinsic_dimension(d90: dict, title: str) -> str:
    """Test score against d (log x), full fine-tuning's score, the threshold and d90."""
    import matplotlib.pyplot as plt

    ds = sorted(int(d) for d in d90["scores"])
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(ds, [d90["scores"][str(d)] for d in ds], "o-", color="tab:blue",
            label=f"{d90.get('kind', 'said').upper()} (mean over seeds)")
    refined = set(d90.get("refined", []))
    if refined:
        ax.plot(sorted(refined), [d90["scores"][str(d)] for d in sorted(refined)], "s", color="tab:orange",
                ms=8, label="bisection points")
    ax.axhline(d90["reference"], color="black", lw=1, label="full fine-tuning")
    ax.axhline(d90["threshold"], color="grey", ls="--", lw=1, label=f"{d90['fraction']:.0%} of full")
    if d90.get("d90") is not None:
        ax.axvline(d90["d90"], color="tab:red", ls=":", lw=1.5, label=f"d90 = {d90['d90']:,}")
    ax.set_xscale("log")
    ax.set(xlabel="subspace dimension d (log scale)", ylabel=f"test {d90['metric']}", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _png(fig)


def figure_gradient_sparsity(sp: dict, title: str) -> str:
    """Share of gradient mass in the top p% entries (log x), overall and per role; per layer."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    percents = sp["summary"]["percents"]
    curves = sp["curves"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    ax.plot(percents, curves["all"]["per_batch"], "o-", color="black", lw=2, label="all (per batch)")
    ax.plot(percents, curves["all"]["accumulated"], "o--", color="grey", lw=1.5, label="all (sum of |g|)")
    roles = [k for k in curves if k.startswith("role:")]
    colors = dict(zip(roles, sns.color_palette("tab10", n_colors=10), strict=False))
    for k in roles:
        ax.plot(percents, curves[k]["per_batch"], ".-", color=colors[k], lw=1, label=k[5:])
    ax.plot(percents, [p / 100 for p in percents], ":", color="tab:red", label="uniform (no sparsity)")
    ax.set_xscale("log")
    ax.set(xlabel="top p% of entries by |gradient| (log scale)", ylabel="share of squared gradient mass",
           title="concentration", ylim=(0, 1.02))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    layers = sorted(int(k[6:]) for k in curves if k.startswith("layer:"))
    if layers and 1.0 in percents:
        i = percents.index(1.0)
        axes[1].plot(layers, [curves[f"layer:{n}"]["per_batch"][i] for n in layers], "o-", color="black")
        axes[1].set(xlabel="layer", ylabel="share held by the top 1%", title="top-1% share per layer",
                    ylim=(0, 1.02))
        axes[1].set_xticks(layers)
        axes[1].grid(True, alpha=0.3)
    else:
        axes[1].set_visible(False)
    fig.suptitle(title)
    return _png(fig)


def cross_analysis_table(cells: pd.DataFrame, analyses: dict) -> pd.DataFrame:
    """Per (model, task, method, variant): efficiency next to the task's d90 and gradient
    concentration. ``analyses``: (model, task) -> {"d90": record, "sparsity": record}."""
    rows = []
    for (model, task), g in cells.groupby(["model", "task"], sort=False):
        a = analyses.get((model, task), {})
        full = g[(g["method"] == "full")]
        full_mean = float(full["test_mean"].iloc[0]) if len(full) else None
        for _, c in g.iterrows():
            rows.append({
                "model": model, "task": task, "method": c["method"], "variant": c["variant"],
                "label": _label(c["method"], c["variant"]),
                "test_mean": c["test_mean"], "trainable_params": c["trainable_params"],
                "gap_to_full": (c["test_mean"] - full_mean) if full_mean is not None else None,
                "score_per_million_params": c["test_mean"] / (c["trainable_params"] / 1e6),
                "d90": (a.get("d90") or {}).get("d90"),
                "top1_share": ((a.get("sparsity") or {}).get("summary") or {}).get("top1_share"),
            })
    return pd.DataFrame(rows)


def figure_cross_analysis(cross: pd.DataFrame, palette: dict) -> str:
    """Each method's gap to full fine-tuning against the task's d90 and top-1% gradient share."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, col, xlabel, log in ((axes[0], "d90", "d90 of the (model, task) (log scale)", True),
                                 (axes[1], "top1_share", "share of gradient mass in the top 1%", False)):
        sub = cross.dropna(subset=[col, "gap_to_full"])
        for label, g in sub.groupby("label", sort=True):
            ax.plot(g[col], g["gap_to_full"], "o-" if len(g) > 1 else "o", color=palette.get(label, "grey"),
                    label=label, alpha=0.85)
        if log and len(sub):
            ax.set_xscale("log")
        ax.axhline(0, color="black", lw=0.8)
        ax.set(xlabel=xlabel)
        ax.grid(True, alpha=0.3)
        if not len(sub):
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_ylabel("test score minus full fine-tuning's")
    legend: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    if legend:
        axes[1].legend(list(legend.values()), list(legend), loc="upper left", bbox_to_anchor=(1.01, 1.0),
                       frameon=False, fontsize=8)
    fig.suptitle("cross-analysis: is a method's gap to full fine-tuning related to the task's "
                 "intrinsic dimension or gradient concentration?", fontsize=10)
    return _png(fig)


def analyses_section(analysis_paths: list[str], cells: pd.DataFrame, palette: dict) -> list[str]:
    """HTML parts of the analyses section (empty when no analysis ran)."""
    found: dict[tuple[str, str], dict] = {}
    for path in analysis_paths:
        rec = read_json(path)
        kind = {"d90": "d90", "gradient_sparsity": "sparsity"}[rec["rule"]]
        found.setdefault((rec["run"]["model"], rec["run"]["task"]), {})[kind] = rec
    if not found:
        return []
    parts = ["<h2 id='analyses'>Analyses of the tasks</h2>",
             "<p class='note'>Intrinsic dimension: random-subspace training (theta = theta0 + "
             "lambda * P(theta_d), Fastfood projection); d90 is the smallest d whose test score "
             "reaches the stated fraction of full fine-tuning's. Gradient sparsity: gradients at the "
             "pretrained point over a few training batches.</p>"]
    summary_rows = []
    for (model, task), a in found.items():
        title = f"{task} · {model}"
        parts.append(f"<h3 id='analyses-{html.escape(model)}-{html.escape(task)}'>{html.escape(title)}</h3>")
        row: dict[str, Any] = {"model": model, "task": task}
        if "d90" in a:
            d = a["d90"]
            parts.append(f"<img alt='{html.escape(task)} intrinsic dimension' src='"
                         f"{figure_intrinsic_dimension(d, f'{title}: score vs subspace dimension')}'>")
            row.update(d90=d.get("d90"), d90_share=d.get("d90_fraction_of_D"),
                       grid=", ".join(f"{x:,}" for x in d["grid"]), reached=d["reached"])
            if not d["reached"]:
                parts.append(f"<p class='note'>No d of the grid reached {d['fraction']:.0%} of full "
                             f"fine-tuning's {d['metric']} ({d['reference']:.4f}); d90 is above "
                             f"{max(d['grid']):,}.</p>")
        if "sparsity" in a:
            sp = a["sparsity"]
            parts.append(f"<img alt='{html.escape(task)} gradient sparsity' src='"
                         f"{figure_gradient_sparsity(sp, f'{title}: gradient concentration')}'>")
            summ = sp["summary"]
            row.update(top1=summ.get("top1_share"), gini=summ.get("gini"), jaccard=summ.get("jaccard"),
                       jaccard_chance=summ.get("jaccard_chance"), overlap=summ.get("sift_pafi_overlap"),
                       overlap_chance=summ.get("overlap_chance"))
            role_rows = [{"role": r, **v} for r, v in summ["by_role"].items()]
            parts.append("<p class='note'>Per role: share of squared gradient mass in the top 1% of "
                         f"entries; Jaccard index of the per-batch top-{summ['jaccard_percent']:g}% sets "
                         f"(chance {summ['jaccard_chance']:.4f}); overlap of SIFT's gradient mask with "
                         f"PaFi's smallest-magnitude mask at rate {summ['overlap_rate']:g} (chance "
                         f"{summ['overlap_chance']:.4f}).</p>")
            parts.append(_table(pd.DataFrame(role_rows), [
                ("role", "role", -1), ("top1_share", "top-1% share", 3), ("jaccard", "Jaccard across batches", 3),
                ("sift_pafi_overlap", "SIFT ∩ PaFi / k", 4)]))
        summary_rows.append(row)
    cols = [("model", "model", -1), ("task", "task", -1)]
    frame = pd.DataFrame(summary_rows)
    for c, t, dgt in (("d90", "d90", 0), ("d90_share", "d90 / D", 6), ("grid", "grid of d", -1),
                      ("top1", "top-1% gradient share", 3), ("gini", "Gini of |g|", 3),
                      ("jaccard", "top-set Jaccard", 3), ("overlap", "SIFT ∩ PaFi / k", 4)):
        if c in frame:
            cols.append((c, t, dgt))
    parts.append("<h3 id='analyses-summary'>Summary and cross-analysis</h3>")
    parts.append(_table(frame, cols))
    cross = cross_analysis_table(cells, found)
    parts.append(f"<img alt='cross-analysis' src='{figure_cross_analysis(cross, palette)}'>")
    parts.append(_table(cross, [
        ("model", "model", -1), ("task", "task", -1), ("label", "method", -1), ("test_mean", "test (mean)", 4),
        ("gap_to_full", "gap to full", 4), ("trainable_params", "trainable params", 0),
        ("score_per_million_params", "score per 10⁶ trainable", 4), ("d90", "task d90", 0),
        ("top1_share", "task top-1% share", 3)]))
    return parts


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
                 finetune_paths: list[str] | None = None, analysis_paths: list[str] = ()) -> str:
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

    # --- analyses ------------------------------------------------------------------------
    parts.extend(analyses_section(list(analysis_paths), cells, palette))

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
