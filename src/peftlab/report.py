"""Aggregation of result records and the self-contained HTML comparison report.

``aggregate``: finetune records + evaluate records -> one row per run (CSV + parquet), every
run kept: a completed run with its numbers, a failed one (``status: failed``, e.g. its loss
diverged) or a missing one (its job did not finish) with the reason and no numbers.
``write_report``: that table + task statistics + analyses (+ the GIFT token view) ->
``reports/comparison.html`` with every figure embedded as a PNG data URI (no external
files) and the tables rendered from the same rows, so the report's numbers are exactly the
records' numbers. Only completed runs enter any mean, interval, Pareto front or figure;
failed and missing runs are listed with their reason.
``write_partial_report``: the same report from whatever results exist when jobs failed
(``snakemake --keep-going`` and the Snakefile's ``onerror``, or ``python -m peftlab report``),
naming the runs and analyses that are missing and why.
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import html
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import uncertainty
from .io import atomic_path, read_json, write_text

RUN_COLUMNS = ["model", "task", "method", "variant", "seed"]
COMPLETED = "completed"
FAILED = "failed"
MISSING = "missing"
SET_PREFIX = "set_"  # summary columns: a task tested on several sets, each set's main test metric


# ---------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------


def run_from_path(path: str | Path) -> dict[str, Any]:
    """Run identity from ``.../<stage>/<model>/<task>/<method>/<variant>/seed<k>/<file>``."""
    parts = Path(path).parts
    model, task, method, variant, seed = parts[-6:-1]
    return {"model": model, "task": task, "method": method, "variant": variant,
            "seed": int(seed.removeprefix("seed"))}


_ONE_LINE = re.compile(r"peftlab [\w-]+: (.*)$")
_EXCEPTION = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b.*")


def last_error_line(log_path: str | Path) -> str | None:
    """The reason a job failed, from its log: peftlab's one-line error, else the last
    exception line of a traceback, else a kill by a signal; None when the log has none."""
    try:
        lines = Path(log_path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        m = _ONE_LINE.search(line)
        if m:
            return m.group(1).strip()
    for line in reversed(lines):
        if _EXCEPTION.match(line.strip()):
            return line.strip()[:500]
    return None


def missing_reason(stage_logs: list[tuple[str, Path]]) -> str:
    """Why a record is missing: the first of its jobs (upstream first) whose log names an error."""
    for stage, path in stage_logs:
        line = last_error_line(path)
        if line:
            return f"{stage} failed: {line} (log: {path})"
    return "not run: the pipeline stopped before this job (an upstream job failed or was interrupted)"


def _failure_of(record: dict) -> dict:
    failure = record.get("failure") or {}
    return {"reason": str(failure.get("reason") or f"status {record.get('status')!r}"),
            "step": failure.get("step")}


def summary_row(ft: dict | None, ev: dict | None, run: dict | None = None,
                reason: str | None = None) -> dict[str, Any]:
    """One row of the summary table.

    Both records completed: the run's numbers. A failed record (``status: failed`` with
    ``failure: {reason, step}``): identity, status and reason only, so none of its numbers can
    reach an aggregate. A missing record (``None``): status ``missing`` and ``reason``.
    """
    if run is None:
        run = (ft or ev or {}).get("run")
        if run is None:
            raise ValueError("summary_row needs a record or the run identity")
    if ft is not None and ev is not None:
        a = {k: str(v) for k, v in ev["run"].items()}
        b = {k: str(v) for k, v in ft["run"].items()}
        if a != b:
            raise ValueError(f"records of different runs joined: {ft['run']} vs {ev['run']}")
    row: dict[str, Any] = {k: run[k] for k in RUN_COLUMNS}
    row["seed"] = int(row["seed"])
    known = ft or ev or {}
    row.update(family=(known.get("method") or {}).get("family"), main_metric=known.get("main_metric"),
               config_hash=known.get("config_hash"), git_commit=known.get("git_commit"))
    for stage, rec in (("finetune", ft), ("evaluate", ev)):
        if rec is not None and rec.get("status") != COMPLETED:
            failure = _failure_of(rec)
            return row | {"status": FAILED, "failure_stage": stage, "failure_reason": failure["reason"],
                          "failure_step": failure["step"]}
    if ft is None or ev is None:
        return row | {"status": MISSING, "failure_stage": "finetune" if ft is None else "evaluate",
                      "failure_reason": reason or "record missing", "failure_step": None}
    main = ft["main_metric"]
    inference = ev.get("inference") or {}
    row.update(
        status=COMPLETED,
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
        mergeable=inference.get("mergeable"),
        latency_ms_unmerged=inference.get("unmerged_ms_per_batch"),
        latency_ms_merged=inference.get("merged_ms_per_batch"),
        latency_ms_base=inference.get("base_ms_per_batch"),
        added_latency_ratio=inference.get("added_latency_ratio"),
        gen_new_tokens_per_s=(ev.get("generation") or {}).get("new_tokens_per_s"),
        generation_speed_ratio=inference.get("generation_speed_ratio"),
        examples_json=json.dumps(ev["examples"]) if ev.get("examples") else None,
        n_test=ev["n_examples"],
        data_fingerprint=ft["data_fingerprint"],
    )
    for k, v in ev["metrics"].items():
        row[f"test_{k}"] = v
    for name, part in (ev.get("test_sets") or {}).items():  # a task tested on several sets: each one's
        row[f"{SET_PREFIX}{name}"] = part["metrics"].get(main)  # main metric (test_main is their mean)
    return row


def _read(path: str | Path) -> dict | None:
    try:
        return read_json(path)
    except FileNotFoundError:
        return None


def summary_rows(finetune_paths: list[str], evaluate_paths: list[str], logs_dir: str | Path = "logs") -> list[dict]:
    """One row per expected run; records that do not exist become ``missing`` rows whose
    reason comes from the jobs' logs under ``logs_dir``."""
    if len(finetune_paths) != len(evaluate_paths):
        raise ValueError("every finetune record needs its evaluate record")
    rows = []
    for f, e in zip(finetune_paths, evaluate_paths, strict=True):
        ft, ev = _read(f), _read(e)
        reason = None
        if ft is None or ev is None:
            run = run_from_path(f)
            rd = "{model}/{task}/{method}/{variant}/seed{seed}".format(**run)
            logs = Path(logs_dir)
            cell = "{model}/{task}/{method}/{variant}".format(**run)
            stage_logs = [("prepare_data", logs / "prepare_data" / run["model"] / f"{run['task']}.log"),
                          # a tuned variant: its trials and its selection come first
                          *sorted(("tune_trial", p) for p in (logs / "tune" / cell).glob("trial*/*.log")),
                          ("tune_select", logs / "tune" / cell / "selected.json.log"),
                          ("finetune", logs / "finetune" / f"{rd}.log")]
            if ft is not None:
                stage_logs = [("evaluate", logs / "evaluate" / f"{rd}.log")]
            reason = missing_reason(stage_logs)
            rows.append(summary_row(ft, ev, run=run, reason=reason))
        else:
            rows.append(summary_row(ft, ev))
    return rows


def aggregate(finetune_paths: list[str], evaluate_paths: list[str], csv_path: str, parquet_path: str,
              logs_dir: str | Path = "logs") -> pd.DataFrame:
    """One row per run, in the config's order (failed and missing runs included)."""
    df = pd.DataFrame(summary_rows(finetune_paths, evaluate_paths, logs_dir))
    with atomic_path(csv_path, suffix=".csv") as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(parquet_path, suffix=".parquet") as tmp:
        df.to_parquet(tmp, index=False)
    return df


def completed_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The rows every statistic and figure is computed from."""
    if "status" not in runs:
        return runs
    return runs[runs["status"] == COMPLETED]


# ---------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------


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


def _mean_or_none(g: pd.DataFrame, col: str) -> float | None:
    if col not in g or not g[col].notna().any():
        return None
    return float(g[col].astype(float).mean())


def cell_table(df: pd.DataFrame, predictions: dict | None = None, stats: dict | None = None) -> pd.DataFrame:
    """Mean and 95% interval of the main test metric per (model, task, method, variant), over
    the completed runs only, with the marks of ``compare_cells`` (``predictions``: each run's
    predictions file rows by (model, task, method, variant, seed); ``stats``: each task's
    stats.json by (model, task)); efficiency figures averaged over the same runs."""
    rows, scored = [], {}
    for keys, g in completed_runs(df).groupby(["model", "task", "method", "variant"], sort=False):
        metric = g["main_metric"].iloc[0]
        task_stats = (stats or {}).get(keys[:2], {})
        runs = [(predictions or {}).get((*keys, int(seed))) for seed in g["seed"]]
        interval = cell_interval(g, metric, runs, task_stats)
        scored[keys] = interval.pop("_scores")
        rows.append(dict(zip(["model", "task", "method", "variant"], keys, strict=True)) | {
            "label": _label(keys[2], keys[3]),
            "family": g["family"].iloc[0],
            "main_metric": metric,
            "n_seeds": len(g),
            "test_mean": float(g["test_main"].mean()),
            **interval,
            "trainable_params": int(g["trainable_params"].iloc[0]),
            "trainable_percent": float(g["trainable_percent"].iloc[0]),
            "train_time_s": float(g["train_time_s"].mean()),
            "peak_rss_mb": _mean_or_none(g, "peak_rss_mb"),
            "peak_gpu_mb": _mean_or_none(g, "peak_gpu_mb"),
            "stored_size_bytes": int(g["stored_size_bytes"].iloc[0]),
            "latency_ms_unmerged": _mean_or_none(g, "latency_ms_unmerged"),
            "latency_ms_merged": _mean_or_none(g, "latency_ms_merged"),
            "latency_ms_base": _mean_or_none(g, "latency_ms_base"),
            "added_latency_ratio": _mean_or_none(g, "added_latency_ratio"),
            "gen_new_tokens_per_s": _mean_or_none(g, "gen_new_tokens_per_s"),
            "generation_speed_ratio": _mean_or_none(g, "generation_speed_ratio"),
        })
    return compare_cells(pd.DataFrame(rows), scored)


def cell_interval(g: pd.DataFrame, metric: str, runs: list[list[dict] | None], task_stats: dict) -> dict:
    """A cell's 95% interval (``test_lo``, ``test_hi``) and how it was computed (``interval``:
    bootstrap over examples and seeds where every run's predictions reproduce its recorded score,
    else Student t over seeds, clipped to the metric's range; None with one seed and no
    predictions), the no-learning ``baseline``, and the runs' ``_scores`` by seed (or None)."""
    names, problem = task_stats.get("label_names"), task_stats.get("problem_type")
    scores = [None if r is None else uncertainty.scores_of(r, metric, names) for r in runs]
    base = uncertainty.baseline(runs[0], metric, problem, names) if runs and runs[0] else None
    values = g["test_main"].to_numpy(dtype=float)
    if all(s is not None for s in scores) and uncertainty.reproduces(scores, metric, list(values)):
        lo, hi = uncertainty.bootstrap_interval(scores, metric)
        return {"test_lo": lo, "test_hi": hi, "interval": uncertainty.BOOTSTRAP, "baseline": base,
                "_scores": dict(zip(g["seed"].astype(int), scores, strict=True))}
    ci = uncertainty.student_t_interval(values, metric)
    return {"test_lo": ci[0] if ci else None, "test_hi": ci[1] if ci else None,
            "interval": uncertainty.STUDENT_T if ci else None, "baseline": base, "_scores": None}


def _paired(scored: dict, a: tuple, b: tuple, metric: str) -> tuple[float, float, float] | None:
    """``a``'s mean minus ``b``'s over their common seeds, with its paired bootstrap interval."""
    sa, sb = scored.get(a), scored.get(b)
    seeds = sorted(set(sa or ()) & set(sb or ()))
    if not seeds or not uncertainty.same_examples([sa[seeds[0]], sb[seeds[0]]]):
        return None
    return uncertainty.paired_difference([sa[s] for s in seeds], [sb[s] for s in seeds], metric)


def compare_cells(cells: pd.DataFrame, scored: dict) -> pd.DataFrame:
    """Per task, the marks a reader decides by: ``not_trained`` (the interval reaches the
    no-learning baseline: never ranked), ``vs_full`` (above / below / tied with full fine-tuning,
    paired over seeds at 95%) and ``vs_best`` (``best``, ``tied`` with it, or ``below``)."""
    if not len(cells):
        return cells
    key = ["model", "task", "method", "variant"]
    lo = cells["test_lo"].where(cells["test_lo"].notna(), cells["test_mean"])
    cells = cells.assign(not_trained=[b is not None and b == b and low <= b for b, low in zip(cells["baseline"], lo,
                                                                                              strict=True)],
                         vs_full=None, vs_full_diff=None, vs_best=None)
    for _, g in cells.groupby(["model", "task"], sort=False):
        metric = g["main_metric"].iloc[0]
        # once per pair: "vs full" and "vs best" are one pair when full fine-tuning is best
        paired = functools.cache(lambda a, b, metric=metric: _paired(scored, a, b, metric))
        full = g[(g["method"] == "full") & ~g["not_trained"]]
        trained = g[~g["not_trained"]].sort_values("test_mean", ascending=False)
        best = tuple(trained.iloc[0][key]) if len(trained) else None
        for i, row in g.iterrows():
            me = tuple(row[key])
            if len(full) and me != tuple(full.iloc[0][key]):
                diff = paired(me, tuple(full.iloc[0][key]))
                if diff is not None:
                    cells.at[i, "vs_full_diff"] = diff[0]
                    cells.at[i, "vs_full"] = _mark(diff, "above", "below", "tied")
            if best is None or row["not_trained"]:
                continue
            if me == best:
                cells.at[i, "vs_best"] = "best"
            elif (diff := paired(me, best)) is not None:
                cells.at[i, "vs_best"] = _mark(diff, "above", "below", "tied")
    return cells


def _mark(diff: tuple[float, float, float], above: str, below: str, tied: str) -> str:
    _, lo, hi = diff
    return above if lo > 0 else below if hi < 0 else tied


# ---------------------------------------------------------------------------------------
# Colours and markers: one per method, the same in every figure and every report
# ---------------------------------------------------------------------------------------

# fixed per method (not per report), so a method keeps its colour across reports; related
# methods share a hue family (LoRA/DoRA blues, SIFT/PaFi indigos), full fine-tuning is black
METHOD_COLORS = {
    "full": "#000000", "lora": "#1f77b4", "dora": "#17becf", "bitfit": "#ff7f0e", "ia3": "#2ca02c",
    "vera": "#d62728", "prompt_tuning": "#9467bd", "gift": "#8c564b", "hiwi": "#e377c2",
    "adapter": "#7f7f7f", "loreft": "#bcbd22", "sift": "#393b79", "pafi": "#6b6ecf",
}
_EXTRA_COLORS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]
FAMILY_MARKERS = {"full": "*", "weight": "o", "representation": "^", "sparse": "s"}
_VARIANT_MARKERS = ["o", "D", "v", "P", "X", "p", "h"]


def _label(method: str, variant: str) -> str:
    return method if variant == "default" else f"{method}/{variant}"


def method_palette(labels: list[str]) -> dict[str, tuple[float, float, float]]:
    """One fixed RGB colour per method label, the same in every figure: the method's colour
    for its first variant (``default`` first), darker or lighter shades for further ones."""
    from matplotlib.colors import to_rgb

    unknown = sorted({lab.split("/")[0] for lab in labels} - set(METHOD_COLORS))
    base = dict(METHOD_COLORS) | {m: _EXTRA_COLORS[i % len(_EXTRA_COLORS)] for i, m in enumerate(unknown)}
    out = {}
    by_method: dict[str, list[str]] = {}
    for lab in sorted(labels, key=lambda s: (s.split("/")[0], "/" in s, s)):
        by_method.setdefault(lab.split("/")[0], []).append(lab)
    for method, labs in by_method.items():
        rgb = np.array(to_rgb(base[method]))
        for i, lab in enumerate(labs):
            shade = (0, -0.35, 0.4, -0.6, 0.6)[i % 5]
            c = rgb * (1 + shade) if shade < 0 else rgb + (1 - rgb) * shade
            out[lab] = tuple(float(x) for x in np.clip(c, 0, 1))
    return out


class Style:
    """Colour and marker of each method label (marker by method family; variants vary it)."""

    def __init__(self, cells_or_runs: pd.DataFrame):
        labels = sorted({_label(m, v) for m, v in zip(cells_or_runs["method"], cells_or_runs["variant"],
                                                       strict=True)})
        self.colors = method_palette(labels)
        fam = dict(zip((_label(m, v) for m, v in zip(cells_or_runs["method"], cells_or_runs["variant"],
                                                      strict=True)), cells_or_runs["family"], strict=True))
        self.markers = {}
        for lab in labels:
            variant_no = sorted(x for x in labels if x.split("/")[0] == lab.split("/")[0]).index(lab)
            base = FAMILY_MARKERS.get(fam.get(lab) or "", "o")
            self.markers[lab] = base if variant_no == 0 else _VARIANT_MARKERS[variant_no % len(_VARIANT_MARKERS)]

    def color(self, label: str):
        return self.colors.get(label, (0.5, 0.5, 0.5))

    def marker(self, label: str) -> str:
        return self.markers.get(label, "o")


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


class Figures:
    """Renders figures to PNG data URIs; with ``out_dir`` also writes each as ``<name>.png``
    (the files ``snakemake --report`` shows)."""

    def __init__(self, out_dir: str | Path | None = None):
        self.out_dir = Path(out_dir) if out_dir else None
        self.written: list[Path] = []

    def add(self, fig, name: str) -> str:
        plt = _plt()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        data = buf.getvalue()
        if self.out_dir is not None:
            path = self.out_dir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
            with atomic_path(path, suffix=".png") as tmp:
                tmp.write_bytes(data)
            self.written.append(path)
        return "data:image/png;base64," + base64.b64encode(data).decode()


def _legend_outside(ax, handles=None, labels=None, fontsize=9, title=None):
    """Legend to the right of the axes: it never covers data."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                  fontsize=fontsize, title=title, title_fontsize=fontsize)


def _error_bar(c) -> list[list[float]]:
    """A cell's interval as matplotlib's asymmetric error (none where it has no interval)."""
    lo, hi = c.get("test_lo"), c.get("test_hi")
    if lo is None or hi is None or lo != lo or hi != hi:
        return [[0.0], [0.0]]
    return [[max(0.0, c["test_mean"] - lo)], [max(0.0, hi - c["test_mean"])]]


def figure_metric_vs_params(cells: pd.DataFrame, style: Style, title: str):
    """Mean test score (95% CI) against trainable parameters, log x, Pareto front marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    metric = cells["main_metric"].iloc[0]
    points = []
    for _, c in cells.iterrows():
        label = c["label"]
        ax.errorbar(c["trainable_params"], c["test_mean"], yerr=_error_bar(c), fmt=style.marker(label),
                    color=style.color(label),
                    label=label, capsize=3, markersize=9 if style.marker(label) != "*" else 13, lw=1.2)
        points.append((c["trainable_params"], c["test_mean"]))
    front = pareto_front(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="grey",
            lw=1, zorder=0, label="Pareto front")
    ax.scatter([points[i][0] for i in front], [points[i][1] for i in front], s=260, facecolors="none",
               edgecolors="grey", lw=1, zorder=0)
    # legend entries as plain markers (an errorbar's own handle draws its caps over the marker)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker=style.marker(lab), color=style.color(lab),
                      markersize=8 if style.marker(lab) != "*" else 11) for lab in cells["label"]]
    handles.append(Line2D([], [], ls="--", color="grey", lw=1))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (count, log scale)")
    ax.set_ylabel(f"test {metric} (mean, 95% interval)")
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    _legend_outside(ax, handles, [*cells["label"], "Pareto front"])
    return fig


def figure_metric_per_method(runs: pd.DataFrame, cells: pd.DataFrame, style: Style, title: str):
    """A forest plot: one row per method (best mean on top), each seed a dot, the mean a
    diamond with the same 95% interval as the tables; full fine-tuning's mean as a line."""
    plt = _plt()
    order = cells.sort_values("test_mean", ascending=True)["label"].tolist()
    labels = [_label(m, v) for m, v in zip(runs["method"], runs["variant"], strict=True)]
    runs = runs.assign(label=labels)
    fig, ax = plt.subplots(figsize=(7.2, 0.38 * len(order) + 1.3))
    for i, label in enumerate(order):
        c = cells[cells["label"] == label].iloc[0]
        values = runs.loc[runs["label"] == label, "test_main"].to_numpy(dtype=float)
        ax.scatter(values, np.full(len(values), i + 0.18), color=style.color(label), alpha=0.6, s=22, lw=0)
        ax.errorbar(c["test_mean"], i, xerr=_error_bar(c), fmt="D", color=style.color(label), capsize=4,
                    markersize=6)
    full = cells[cells["method"] == "full"]
    if len(full):
        ax.axvline(float(full["test_mean"].iloc[0]), color="black", ls=":", lw=1)
    ax.set_yticks(range(len(order)), order)
    ax.set_ylim(-0.7, len(order) - 0.3)
    ax.set_xlabel(f"test {cells['main_metric'].iloc[0]} (dots: seeds; diamond: mean, 95% interval"
                  + ("; dotted: full fine-tuning's mean)" if len(full) else ")"))
    ax.set_title(title, fontsize=11)
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def _mean_curve(points: list[list[tuple[float, float]]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds at the steps all seeds share (seeds of one config log the same steps)."""
    by_step: dict[float, list[float]] = {}
    for curve in points:
        for s, v in curve:
            by_step.setdefault(s, []).append(v)
    steps = sorted(s for s, vs in by_step.items() if len(vs) == len(points))
    return np.array(steps), np.array([np.mean(by_step[s]) for s in steps])


def figure_training_curves(records: list[dict], style: Style, metric: str, title: str):
    """Training loss and validation metric against optimizer steps, mean over seeds."""
    plt = _plt()
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(_label(r["run"]["method"], r["run"]["variant"]), []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for label in sorted(groups):
        rs = groups[label]
        kw = dict(color=style.color(label), lw=1.5, alpha=0.9, label=label)
        x, y = _mean_curve([[(s, v) for s, v in r["curves"]["train_loss"]] for r in rs])
        if len(x):
            axes[0].plot(x, y, **kw)
        x, y = _mean_curve([[(p["step"], p[metric]) for p in r["curves"]["validation"] if p.get(metric) is not None]
                            for r in rs])
        if len(x):
            axes[1].plot(x, y, marker=style.marker(label), ms=4, **kw)
    n = len({r["run"]["seed"] for r in records})
    axes[0].set(xlabel="optimizer step", ylabel="training loss (mean over logged steps)", title="training loss")
    axes[1].set(xlabel="optimizer step", ylabel=f"validation {metric}", title=f"validation {metric}")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_outside(axes[1])
    fig.suptitle(f"{title} (mean over {n} seed{'s' if n != 1 else ''})", fontsize=11)
    return fig


def figure_intrinsic_dimension(d90: dict, title: str):
    """Test score against d (log x), full fine-tuning's score, the threshold and d90."""
    plt = _plt()
    ds = sorted(int(d) for d in d90["scores"])
    fig, ax = plt.subplots(figsize=(7.2, 3.9))
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
    ax.set(xlabel="subspace dimension d (trainable numbers, log scale)", ylabel=f"test {d90['metric']}")
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(ax)
    return fig


def figure_gradient_sparsity(sp: dict, title: str):
    """Share of gradient mass in the top p% entries (log x), overall and per role; per layer."""
    plt = _plt()
    import seaborn as sns

    percents = sp["summary"]["percents"]
    curves = sp["curves"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.9))
    ax = axes[0]
    ax.plot(percents, curves["all"]["per_batch"], "o-", color="black", lw=2, label="all (per batch)")
    ax.plot(percents, curves["all"]["accumulated"], "o--", color="grey", lw=1.5, label="all (sum of |g|)")
    roles = [k for k in curves if k.startswith("role:")]
    colors = dict(zip(roles, sns.color_palette("tab10", n_colors=10), strict=False))
    for k in roles:
        ax.plot(percents, curves[k]["per_batch"], ".-", color=colors[k], lw=1, label=k[5:])
    for key, name, color in (("null:random_init", "random-init model (null)", "tab:purple"),
                             ("null:gaussian", "Gaussian vector (null)", "tab:brown")):
        if key in curves:
            ax.plot(percents, curves[key]["per_batch"], "x--", color=color, lw=1.2, label=name)
    ax.plot(percents, [p / 100 for p in percents], ":", color="tab:red", label="uniform (no sparsity)")
    ax.set_xscale("log")
    ax.set(xlabel="top p% of entries by |gradient| (log scale)", ylabel="share of squared gradient mass",
           title="concentration", ylim=(0, 1.02))
    ax.grid(True, which="both", alpha=0.3)
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
    _legend_outside(axes[1] if layers and 1.0 in percents else ax, *ax.get_legend_handles_labels(), fontsize=8,
                    title="left panel")
    fig.suptitle(title, fontsize=11)
    return fig


def cross_analysis_table(cells: pd.DataFrame, analyses: dict) -> pd.DataFrame:
    """Per (model, task, method, variant): efficiency next to the task's d90 and gradient
    concentration. ``analyses``: (model, task) -> {"d90": record, "sparsity": record}."""
    rows = []
    if cells.empty:
        return pd.DataFrame(rows)
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


def figure_cross_analysis(cross: pd.DataFrame, style: Style):
    """Each method's gap to full fine-tuning against the task's d90 and top-1% gradient share."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.9), sharey=True)
    for ax, col, xlabel, log in ((axes[0], "d90", "d90 of the (model, task) (log scale)", True),
                                 (axes[1], "top1_share", "share of gradient mass in the top 1%", False)):
        sub = cross.dropna(subset=[col, "gap_to_full"]) if len(cross) else cross
        for label, g in (sub.groupby("label", sort=True) if len(sub) else []):
            ax.plot(g[col], g["gap_to_full"], "-" if len(g) > 1 else "", marker=style.marker(label),
                    color=style.color(label), label=label, alpha=0.85)
        if log and len(sub):  # ticks at the tasks' own d90 values (log minor labels collide)
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            values = sorted(set(sub[col]))
            ax.set_xticks(values, [f"{v:,.0f}" for v in values])
        elif len(sub):
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(5))
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
        _legend_outside(axes[1], list(legend.values()), list(legend), fontsize=8)
    fig.suptitle("cross-analysis: is a method's gap to full fine-tuning related to the task's "
                 "intrinsic dimension or gradient concentration?", fontsize=10)
    return fig


def figure_gift_tokens(view: dict, title: str):
    """GIFT's token projections in 2-D (PCA), coloured by cluster, as in the paper's figure."""
    plt = _plt()
    pts = np.asarray(view["pca"], dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for c in view["clusters"]:
        sel = pts[pts[:, 2] == c["id"]]
        ax.scatter(sel[:, 0], sel[:, 1], s=18, color=c["color"], label=f"cluster {c['id']} ({c['size']} tokens)",
                   edgecolors="black", linewidths=0.3)
    ax.set(xlabel="PC 1 of W·phi projections", ylabel="PC 2")
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    _legend_outside(ax, fontsize=8)
    return fig


def _overlay(rgb: np.ndarray, cluster_map: list[list[int]], colors: list[str], alpha: float = 0.5) -> np.ndarray:
    """An image with each patch tinted by its cluster's colour (the cluster map upsampled to the image)."""
    grid = np.asarray(cluster_map)
    cell = np.kron(grid, np.ones((rgb.shape[0] // grid.shape[0], rgb.shape[1] // grid.shape[1]), dtype=int))
    palette = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in colors], dtype=float)
    tint = palette[cell % len(palette)]
    return (rgb[:cell.shape[0], :cell.shape[1]] * (1 - alpha) + tint * alpha).astype(np.uint8)


def figure_gift_patches(view: dict, title: str):
    """Per image: the image, GIFT's patch clusters over it, and the frozen model's (the control)."""
    from PIL import Image

    plt = _plt()
    images, colors = view["images"], view["colors"]
    fig, axes = plt.subplots(len(images), 3, figsize=(7.2, 2.45 * len(images)), squeeze=False)
    for row, v in zip(axes, images, strict=True):
        rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(v["png"]))).convert("RGB"))
        label = f" [{v['label']}; predicted {v['predicted']}]" if v.get("label") is not None else ""
        panels = [(rgb, f"{v['source']}{label}"),
                  (_overlay(rgb, v["gift"]["map"], colors), f"GIFT W·φ: k={v['gift']['k']} (sil. {v['gift']['silhouette']:.2f})"),
                  (_overlay(rgb, v["control"]["map"], colors),
                   f"frozen model: k={v['control']['k']} (sil. {v['control']['silhouette']:.2f})")]
        for ax, (img, text) in zip(row, panels, strict=True):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(text, fontsize=7)
            ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    return fig


# ---------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1180px;margin:1.5em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.5em}
table{border-collapse:collapse;margin:.8em 0;font-size:.88em}
th,td{border:1px solid #ddd;padding:.25em .55em;text-align:right;vertical-align:top}th{background:#f4f4f4}
td.l,th.l{text-align:left}td.l{white-space:nowrap}td.w{white-space:normal;min-width:16em}img{max-width:100%;display:block;margin:.8em 0}
.note{color:#555;font-size:.9em}code{background:#f4f4f4;padding:0 .2em}
nav{font-size:.9em;margin:.6em 0 1em}nav a{margin-right:1em}
.banner{border:1px solid #d9a400;background:#fff8e1;padding:.6em 1em;margin:1em 0}
.banner.bad{border-color:#c62828;background:#fdecea}.ok{color:#2e7d32}
.glance td{white-space:normal}.glance td:first-child{font-weight:600}
tr.failed td,tr.missing td{background:#fdecea}
.tokens{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em;line-height:2.1;margin:.3em 0 .8em}
.tok{padding:.1em .15em;border-radius:3px;border:1px solid rgba(0,0,0,.12)}
.tok.sp{font-size:.8em;color:#444}.sent-label{color:#555;font-size:.85em;margin-right:.6em}
.legend span{margin-right:1.2em;white-space:nowrap}.swatch{display:inline-block;width:1em;height:1em;border-radius:2px;vertical-align:middle;margin-right:.3em;
border:1px solid rgba(0,0,0,.2)}
"""


def fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        if digits == 0 and float(v).is_integer():
            return f"{int(v):,}"
        return f"{float(v):,.{digits}f}" if digits == 0 else f"{float(v):.{digits}f}"
    return html.escape(str(v))


def fmt_bytes(n: Any) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    n = float(n)
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


WRAP = {"reason", "params", "labels", "best", "front"}  # long text columns wrap; the others stay on one line


def _table(df: pd.DataFrame, columns: list[tuple[str, str, int]], row_id: str | None = None,
           row_class: str | None = None, formatters: dict | None = None) -> str:
    formatters = formatters or {}

    def cls(c: str, d: int) -> str:
        return ("l" if d < 0 else "") + (" w" if c in WRAP else "")

    head = "".join(f'<th class="{cls(c, d)}">{html.escape(t)}</th>' for c, t, d in columns)
    body = []
    for _, r in df.iterrows():
        rid = f' id="{html.escape(row_id.format(**r))}"' if row_id else ""
        tr_class = f' class="{html.escape(str(r[row_class]))}"' if row_class and row_class in r else ""
        cells = "".join(
            f'<td class="{cls(c, d)}" data-col="{c}">'
            f'{formatters[c](r.get(c)) if c in formatters else fmt(r.get(c), max(d, 0))}</td>'
            for c, _, d in columns
        )
        body.append(f"<tr{rid}{tr_class}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(uri: str, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='{uri}'>"


def _interval_text(lo: float | None, hi: float | None, digits: int = 4) -> str | None:
    """"[lo, hi]", or None where there is no interval."""
    known = lo is not None and hi is not None and lo == lo and hi == hi
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]" if known else None


def _ci_text(mean: float, lo: float | None, hi: float | None, digits: int = 4) -> str:
    """"mean [lo, hi]" (the mean alone where there is no interval)."""
    interval = _interval_text(lo, hi, digits)
    return f"{mean:.{digits}f}" + (f" {interval}" if interval else "")


def _cell_text(c) -> str:
    return _ci_text(c["test_mean"], c["test_lo"], c["test_hi"])


def _winner(c: pd.DataFrame) -> str:
    """The glance's verdict: the best method where the data single it out, else the methods
    that cannot be told apart from the best at 95% (paired over seeds), or why none ranks."""
    trained = c[~c["not_trained"].astype(bool)].sort_values("test_mean", ascending=False)
    if not len(trained):
        return "none: every method is within noise of the no-learning baseline at this budget"
    best = trained.iloc[0]
    head = (f"<b>{html.escape(best['label'])}</b> {_cell_text(best)} "
            f"({fmt(best['trainable_percent'], 3)}% trainable)")
    tied = trained[trained["vs_best"] == "tied"]
    unknown = trained[trained["vs_best"].isna()] if len(trained) > 1 else trained.iloc[:0]
    if len(tied):
        return (f"no single winner: {head} and {', '.join(html.escape(x) for x in tied['label'])} cannot be told "
                "apart at 95%")
    if len(unknown):
        return f"{head}; not compared with {len(unknown)} method(s) (no paired predictions)"
    return head


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


def _glance(runs: pd.DataFrame, cells: pd.DataFrame) -> str:
    """What a reader sees first: per task, the best method, full fine-tuning and the front."""
    rows = []
    for (model, task), g in runs.groupby(["model", "task"], sort=False):
        c = cells[(cells["model"] == model) & (cells["task"] == task)] if len(cells) else cells
        counts = g["status"].value_counts().to_dict()
        row = {"task": f"{task} · {model}", "metric": g["main_metric"].dropna().iloc[0]
               if g["main_metric"].notna().any() else "–",
               "runs": ", ".join(f"{counts[s]} {s}" for s in (COMPLETED, FAILED, MISSING) if counts.get(s))}
        if len(c):
            row["best"] = _winner(c)
            full = c[c["method"] == "full"]
            row["full"] = _cell_text(full.iloc[0]) if len(full) else "not run"
            ranked = c[~c["not_trained"].astype(bool)]  # a run that learned nothing is on no front
            front = pareto_front(list(zip(ranked["trainable_params"], ranked["test_mean"], strict=True)))
            row["front"] = " → ".join(html.escape(ranked["label"].iloc[i]) for i in front) or "–"
        rows.append(row)
    head = ("<tr><th class='l'>task · model</th><th class='l'>metric</th><th class='l'>best method "
            "(mean [95% interval])</th><th class='l'>full fine-tuning</th><th class='l'>Pareto front "
            "(fewest parameters first)</th><th class='l'>runs</th></tr>")
    body = "".join(
        f"<tr><td class='l'>{html.escape(r['task'])}</td><td class='l'>{html.escape(str(r['metric']))}</td>"
        f"<td class='l'>{r.get('best', '–')}</td><td class='l'>{r.get('full', '–')}</td>"
        f"<td class='l'>{r.get('front', '–')}</td><td class='l'>{html.escape(r['runs'])}</td></tr>"
        for r in rows)
    return f"<table class='glance'><thead>{head}</thead><tbody>{body}</tbody></table>"


def _setup(config: dict, runs: pd.DataFrame, records: list[dict], stats: dict, tracking: dict | None) -> list[str]:
    any_record = next((r for r in records if r.get("status") == COMPLETED), records[0] if records else {})
    return (["<h2 id='setup'>Setup</h2>", _setup_models(config, runs, records)] + _setup_data(stats)
            + _setup_methods(records) + _setup_provenance(config, runs, records, any_record, tracking))


def _setup_models(config: dict, runs: pd.DataFrame, records: list[dict]) -> str:
    model_rows = []
    for name, entry in config["models"].items():
        total = runs.loc[runs["model"] == name, "total_params"].dropna() if "total_params" in runs else []
        rec = next((r for r in records if r["run"]["model"] == name and isinstance(r.get("model"), dict)), {})
        notes = (rec.get("model") or {}).get("notes") or ""
        model_rows.append({"model": name, "source": (entry or {}).get("pretrained") or "built-in"
                           + (f" ({notes})" if notes else ""),
                           "params": int(total.iloc[0]) if len(total) else None})
    return "<h3>Models</h3>" + _table(pd.DataFrame(model_rows), [
        ("model", "model", -1), ("source", "weights from", -1), ("params", "parameters", 0)])


def _setup_data(stats: dict) -> list[str]:
    """The tasks and their splits, as prepared (a task tested on several sets: each set's size)."""
    parts, task_rows, split_rows = [], [], []
    for (model, task), s in sorted(stats.items()):
        t = s.get("task", {})
        image = s.get("image_shape")
        task_rows.append({"model": model, "task": task, "source": generated_note(s) or t.get("source", "–"),
                          "problem": _problem_text(s), "metric": s.get("main_metric"),
                          "labels": ", ".join(s.get("label_names") or []) or "–",
                          "max_length": None if image else t.get("max_length"), "raw": s.get("raw_examples"),
                          "fingerprint": s.get("fingerprint")})
        for split, v in s["splits"].items():
            balance = v.get("label_balance") or v.get("test_sets") or {}
            lengths = v.get("length_tokens") or {}
            split_rows.append({"model": model, "task": task, "split": split, "size": v["size"],
                               "labels": ", ".join(f"{k}: {n}" for k, n in balance.items()),
                               "p50": lengths.get("p50"), "p95": lengths.get("p95"),
                               "truncated": v.get("truncated_share"), "fingerprint": v["fingerprint"]})
    if task_rows:
        parts.append("<h3>Tasks</h3>" + _table(pd.DataFrame(task_rows), [
            ("task", "task", -1), ("model", "tokenized for", -1), ("source", "source", -1),
            ("problem", "problem", -1), ("metric", "main metric", -1), ("labels", "labels", -1),
            ("max_length", "max tokens", 0), ("raw", "raw examples", 0), ("fingerprint", "data fingerprint", -1)]))
    if split_rows:
        parts.append("<h3>Data splits</h3>" + _table(pd.DataFrame(split_rows), [
            ("model", "model", -1), ("task", "task", -1), ("split", "split", -1), ("size", "examples", 0),
            ("labels", "label balance / test sets", -1), ("p50", "tokens p50", 0), ("p95", "tokens p95", 0),
            ("truncated", "share truncated", 3), ("fingerprint", "split fingerprint", -1)]))
    return parts


def _setup_methods(records: list[dict]) -> list[str]:
    """The methods and their training settings, from the records (what actually ran)."""
    method_rows, seen = [], set()
    for r in records:
        if not isinstance(r.get("config"), dict):
            continue
        lab = _label(r["run"]["method"], r["run"]["variant"])
        if lab in seen:
            continue
        seen.add(lab)
        tr = r["config"].get("training", {})
        params = r["config"].get("method_params") or {}
        method_rows.append({"label": lab, "family": (r.get("method") or {}).get("family"),
                            "lr": tr.get("learning_rate"), "batch": tr.get("batch_size"),
                            "budget": f"{tr['max_steps']} steps" if tr.get("max_steps") else f"{tr.get('epochs')} epochs",
                            "params": ", ".join(f"{k}={v}" for k, v in params.items()) or "–"})
    if not method_rows:
        return []
    return ["<h3>Methods</h3>" + _table(pd.DataFrame(method_rows), [
        ("label", "method", -1), ("family", "family", -1), ("lr", "learning rate", -1),
        ("batch", "batch size", 0), ("budget", "budget", -1), ("params", "method settings", -1)],
        formatters={"lr": lambda v: "–" if v is None else f"{v:g}"})]


def _setup_provenance(config: dict, runs: pd.DataFrame, records: list[dict], any_record: dict,
                      tracking: dict | None) -> list[str]:
    versions = any_record.get("versions", {})
    commits = sorted(set(runs["git_commit"].dropna())) if "git_commit" in runs else []
    parts = ["<h3>Protocol and provenance</h3><ul>",
             f"<li>evaluation protocol: {html.escape(any_record.get('protocol', '–'))}</li>",
             f"<li>seeds: {', '.join(map(str, config['seeds']))} (every cell: the mean over its completed "
             "seeds and a 95% interval over seeds and test examples, as each table states)</li>",
             f"<li>git commit: <code>{html.escape(', '.join(commits) or 'unknown')}</code></li>",
             "<li>versions: " + html.escape(", ".join(f"{k} {v}" for k, v in versions.items()
                                                      if k != "platform")) + "</li>"]
    if versions.get("platform"):
        precisions = sorted({str(r["precision"]) for r in records if r.get("precision")})
        names = sorted({str(r["device_name"]) for r in records if r.get("device_name")})
        parts.append(f"<li>platform: {html.escape(versions['platform'])}; device "
                     f"{html.escape(str(any_record.get('device', '–')))}"
                     + (f" ({html.escape(', '.join(precisions))})" if precisions else "")
                     + (f", {html.escape(names[0])}" if len(names) == 1 else "")
                     + f", {any_record.get('threads', '–')} thread(s) per job</li>")
        if len(names) > 1:  # e.g. a cluster's jobs on two GPU types: times and memory do not compare
            parts.append(f"<li><b>the runs ran on {len(names)} different devices</b> "
                         f"({html.escape('; '.join(names))}): training times, throughput and memory compare "
                         "only between runs on the same one (each record's <code>device_name</code>)</li>")
    if tracking:
        pending = tracking.get("pending", 0)
        parts.append(f"<li>tracking: MLflow store <code>{html.escape(tracking['uri'])}</code>, experiment "
                     f"<code>{html.escape(tracking['experiment'])}</code>; one run per job, tagged model, task, "
                     "method, variant, seed, rule"
                     + (f"; <b>{pending} record(s) not yet in the store</b> (they sync when it is reachable: "
                        "<code>python -m peftlab sync-mlflow</code>)" if pending else "") + "</li>")
        parts.append(_links_note(tracking))
    parts.append("</ul>")
    return parts


def generated_note(stats: dict) -> str | None:
    """What a generated task is (problems from a seeded generator, not a fixed benchmark), or None."""
    return (stats.get("source") or {}).get("generated")


def _problem_text(stats: dict) -> str:
    """A task's kind as the report states it; generative kinds with their scoring and loss."""
    kind = stats.get("kind") or stats.get("problem_type")
    t = stats.get("task", {})
    if stats.get("image_shape"):
        c, h, w = stats["image_shape"]
        grid = stats.get("patch_grid")
        patches = f", {grid[0]}x{grid[1]} patches" if grid else ""
        return f"{kind} ({c}x{h}x{w} pixels{patches}, through the model's image processor)"
    if kind not in ("generation", "multiple_choice"):
        return str(kind)
    loss = "loss on prompt + target" if t.get("train_on_prompt") else "loss on target only"
    return f"{kind} ({t.get('scoring')}; {loss}; greedy, max {t.get('max_new_tokens')} new tokens)"


def _efficiency(task_cells: pd.DataFrame) -> str:
    cols = [("label", "method", -1), ("family", "family", -1), ("trainable_params", "trainable params", 0),
            ("trainable_percent", "trainable %", 4), ("train_time_s", "train time (s)", 1),
            ("peak_rss_mb", "peak host memory (MB)", 0)]
    if task_cells["peak_gpu_mb"].notna().any():
        cols.append(("peak_gpu_mb", "peak GPU memory (MB)", 0))
    cols += [("stored_size_bytes", "stored size", -1), ("latency_ms_unmerged", "latency unmerged (ms/batch)", 1),
             ("latency_ms_merged", "latency merged (ms/batch)", 1), ("latency_ms_base", "base model (ms/batch)", 1),
             ("added_latency_ratio", "deployed / base", 2)]
    if task_cells["generation_speed_ratio"].notna().any():
        cols += [("gen_new_tokens_per_s", "test generation (new tokens/s)", 1),
                 ("generation_speed_ratio", "generation speed deployed / base", 2)]
    return _table(task_cells, cols, formatters={"stored_size_bytes": fmt_bytes})


def _examples_section(done: pd.DataFrame, per_kind: int = 2) -> list[str]:
    """A few right and wrong generations per method (its first completed seed's test examples)."""
    if "examples_json" not in done or not done["examples_json"].notna().any():
        return []
    rows = []
    for (method, variant), g in done.dropna(subset=["examples_json"]).sort_values("seed").groupby(
            ["method", "variant"], sort=True):
        ex = json.loads(g["examples_json"].iloc[0])
        for verdict in ("right", "wrong", "unscored"):
            for e in ex.get(verdict, [])[:per_kind]:
                rows.append({"label": _label(method, variant), "verdict": verdict,
                             "prompt": "…" + e["prompt"][-120:] if len(e["prompt"]) > 120 else e["prompt"],
                             "output": e["output"][:200], "answer": str(e["answer"])[:200]})
    return ["<h3>Example outputs</h3><p class='note'>Greedy generations on test examples (the first seed of "
            "each method; prompts cut to their last 120 characters). Every example's output is in "
            "<code>predictions.jsonl</code> beside the run's metrics.</p>",
            _table(pd.DataFrame(rows), [("label", "method", -1), ("verdict", "scored", -1), ("prompt", "prompt", -1),
                                        ("output", "output", -1), ("answer", "answer", -1)])]


def _gift_patch_section(view: dict, figures: Figures, name: str) -> list[str]:
    run = view["run"]
    return [f"<h3 id='gift-{html.escape(run['model'])}-{html.escape(run['task'])}'>GIFT: what its first "
            "projection sees in the patches</h3>",
            f"<p class='note'>GIFT generates its weights as W' = W (I + φψ), one (φ, ψ) per target role shared by all "
            f"layers. In layer {view['layer'] + 1} of {view['n_layers']}, each patch token's frozen output y = xWᵀ + b "
            f"is projected by the first linear map, y·W·φ (role <code>{html.escape(view['role'])}</code>, "
            f"r = {view['r']}), of the trained run <code>{html.escape(run['variant'])}/seed{run['seed']}</code>, and "
            "each image's patch projections (L2-normalised) are clustered with k-means, k from 2 to 6 by silhouette: "
            "the middle column, the image counterpart of the GIFT paper's figure. The right column is the control: "
            "the same clustering of the same module's output in the frozen pretrained model (no GIFT, full width). "
            "Test images come first (labels in turn, at the task's image size), then two real photos at 224 px "
            "(scikit-learn's samples, unlabelled, read by the same trained model).</p>",
            _img(figures.add(figure_gift_patches(view, f"{run['task']} · {run['model']}: GIFT patch clusters"), name),
                 f"{run['task']} GIFT patch clusters")]


def _gift_section(view: dict, figures: Figures, name: str) -> list[str]:
    if view.get("status") != COMPLETED:
        return [f"<p class='note'>GIFT token view not available: {html.escape(_failure_of(view)['reason'])}</p>"]
    if view.get("kind") == "image":
        return _gift_patch_section(view, figures, name)
    run = view["run"]
    parts = [f"<h3 id='gift-{html.escape(run['model'])}-{html.escape(run['task'])}'>GIFT: what its first "
             "projection sees in the tokens</h3>",
             f"<p class='note'>GIFT generates its weights as W' = W (I + φψ), one (φ, ψ) per target role shared by "
             f"all layers. In layer {view['layer'] + 1} of {view['n_layers']}, each token's frozen output y = xWᵀ + b "
             f"(before GIFT's residual, as the reference's visualiser reads it) is projected by the first linear map, "
             f"y·W·φ (role <code>{html.escape(view['role'])}</code>, "
             f"r = {view['r']}), of the trained run <code>{html.escape(run['variant'])}/seed{run['seed']}</code>; "
             f"the r-dimensional projections (L2-normalised) are clustered with k-means, k = {view['k']} chosen by "
             f"silhouette ({view['silhouette']:.2f}). Tokens of the same colour share a cluster: the text "
             "counterpart of the token-clustering figure of the GIFT paper.</p>"]
    legend = " ".join(
        f"<span><span class='swatch' style='background:{c['color']}'></span>cluster {c['id']}: "
        f"{html.escape(', '.join(c['top_tokens'][:6]))}</span>" for c in view["clusters"])
    parts.append(f"<p class='note legend'>{legend}</p>")
    colors = {c["id"]: c["color"] for c in view["clusters"]}
    for s in view["sentences"]:
        spans = []
        for t in s["tokens"]:
            sp = " sp" if t.get("special") else ""
            spans.append((" " if t.get("space") else "")
                         + f"<span class='tok{sp}' style='background:{colors[t['cluster']]}' "
                         f"title='cluster {t['cluster']}'>{html.escape(t['text'])}</span>")
        parts.append(f"<div class='tokens'><span class='sent-label'>[{html.escape(str(s['label']))}]</span>"
                     + "".join(spans) + "</div>")
    parts.append(_img(figures.add(figure_gift_tokens(view, f"{run['task']} · {run['model']}: GIFT token "
                                                            "projections (PCA)"), name),
                      f"{run['task']} GIFT token projections"))
    return parts


def _budget_text(b: dict) -> str:
    epochs = "/".join(f"{e:g}" for e in b.get("epochs") or []) or "?"
    return f"{fmt(b.get('steps'), 0)} steps ({epochs} epoch{'' if epochs == '1' else 's'})"


def _budget_note(d90: dict) -> str:
    """Both budgets beside d90: the subspace runs' and the full fine-tuning reference's."""
    budgets = d90.get("budgets") or {}
    sub, ref = budgets.get("subspace") or {}, budgets.get("reference") or {}
    if not sub.get("steps") or not ref.get("steps"):
        return ""
    text = (f"Budgets: each subspace run trained up to {_budget_text(sub)}, the full fine-tuning reference "
            f"{_budget_text(ref)}.")
    if sub["steps"] > ref["steps"]:
        text += (" <b>The reference trained less than the subspace runs</b>, so its score, and with it the "
                 "threshold, is lower than at an equal budget: d90 comes out lower than it would.")
    return f"<p class='note'>{text}</p>"


def model_size_table(analyses: dict, paper: dict | None = None) -> pd.DataFrame:
    """d90 per (task, model) beside the model's parameter count (Aghajanyan et al.'s view: larger
    pre-trained models have lower intrinsic dimension); tasks with more than one model only.
    ``paper``: the config's ``paper_d90`` (model -> task -> {value, source}), shown beside."""
    paper = paper or {}
    rows = [{"task": task, "model": model, "total_params": a["d90"].get("total_params"), "d90": a["d90"].get("d90"),
             "reached": a["d90"].get("reached"), "grid_max": max(a["d90"]["grid"]) if a["d90"].get("grid") else None,
             "paper_d90": (paper.get(model, {}).get(task) or {}).get("value")}
            for (model, task), a in analyses.items() if "d90" in a]
    frame = pd.DataFrame(rows)
    if not len(frame):
        return frame
    frame = frame[frame.groupby("task")["model"].transform("nunique") > 1]
    return frame.sort_values(["task", "total_params"]).reset_index(drop=True)


def figure_model_size(table: pd.DataFrame):
    """d90 against the model's parameter count (log-log), one line per task; a d90 beyond the
    grid is drawn at the grid's top as an open marker (a lower bound)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 3.9))
    for task, g in table.groupby("task", sort=False):
        y = [d if reached else top for d, reached, top in zip(g["d90"], g["reached"], g["grid_max"], strict=True)]
        line = ax.plot(g["total_params"], y, "-", label=task)[0]
        for x, v, reached in zip(g["total_params"], y, g["reached"], strict=True):
            ax.plot([x], [v], "o", color=line.get_color(), mfc=line.get_color() if reached else "none")
    ax.set(xscale="log", yscale="log", xlabel="model parameters (log)", ylabel="d90 (log)")
    ax.set_title("Intrinsic dimension against model size (open marker: above the grid)", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(ax)
    return fig


def _model_size_view(analyses: dict, figures: Figures, paper: dict | None = None) -> list[str]:
    table = model_size_table(analyses, paper)
    if not len(table):
        return []
    table = table.assign(d90_text=[fmt(d, 0) if reached else f"> {top:,}"
                                   for d, reached, top in zip(table["d90"], table["reached"], table["grid_max"],
                                                              strict=True)])
    return ["<h3 id='analyses-model-size'>Intrinsic dimension and model size</h3>",
            _img(figures.add(figure_model_size(table), "d90_vs_model_size"), "d90 against model parameters"),
            _table(table, [("task", "task", -1), ("model", "model", -1), ("total_params", "parameters", 0),
                           ("d90_text", "d90", -1), ("paper_d90", "paper's d90", 0)]),
            *_paper_d90_sources(paper, table)]


def _paper_d90_sources(paper: dict | None, table: pd.DataFrame) -> list[str]:
    shown = {(m, t) for m, t in zip(table["model"], table["task"], strict=True)}
    items = [f"<li>{html.escape(m)} / {html.escape(t)}: {e['value']:,}, {html.escape(e['source'])}</li>"
             for m, tasks in sorted((paper or {}).items()) for t, e in sorted(tasks.items()) if (m, t) in shown]
    if not items:
        return []
    return ["<p class='note'>paper's d90: the published value (the config's <code>paper_d90</code>); a gap may "
            "come from the protocol (budget, grid, normalisation), not the model.</p>", f"<ul class='note'>{''.join(items)}</ul>"]


def analyses_section(analyses: dict, cells: pd.DataFrame, style: Style, figures: Figures,
                     paper_d90: dict | None = None) -> list[str]:
    """HTML parts of the analyses section (empty when no analysis ran).
    ``analyses``: (model, task) -> {"d90": record, "sparsity": record} (completed records)."""
    if not analyses:
        return []
    parts = ["<h2 id='analyses'>Analyses of the tasks</h2>",
             "<p class='note'>Intrinsic dimension: random-subspace training (theta = theta0 + "
             "lambda * P(theta_d), Fastfood projection); d90 is the smallest d whose test score "
             "reaches the stated fraction of full fine-tuning's. Gradient sparsity: gradients at the "
             "pretrained point over a few training batches.</p>"]
    summary_rows = []
    for (model, task), a in analyses.items():
        title = f"{task} · {model}"
        parts.append(f"<h3 id='analyses-{html.escape(model)}-{html.escape(task)}'>{html.escape(title)}</h3>")
        row: dict[str, Any] = {"model": model, "task": task}
        if "d90" in a:
            d = a["d90"]
            fig = figure_intrinsic_dimension(d, f"{title}: test score vs subspace dimension")
            parts.append(_img(figures.add(fig, f"{model}--{task}--intrinsic_dimension"),
                              f"{task} intrinsic dimension"))
            row.update(d90=d.get("d90"), d90_share=d.get("d90_fraction_of_D"),
                       grid=", ".join(f"{x:,}" for x in d["grid"]), reached=d["reached"])
            parts.append(_budget_note(d))
            if not d["reached"]:
                parts.append(f"<p class='note'>No d of the grid reached {d['fraction']:.0%} of full "
                             f"fine-tuning's {d['metric']} ({d['reference']:.4f}); d90 is above "
                             f"{max(d['grid']):,}.</p>")
        if "sparsity" in a:
            sp = a["sparsity"]
            fig = figure_gradient_sparsity(sp, f"{title}: gradient concentration at the pretrained point")
            parts.append(_img(figures.add(fig, f"{model}--{task}--gradient_sparsity"), f"{task} gradient sparsity"))
            summ = sp["summary"]
            nulls = summ.get("null_top1_share") or {}
            row.update(top1=summ.get("top1_share"), top1_random=nulls.get("random_init"),
                       top1_gaussian=nulls.get("gaussian"), gini=summ.get("gini"), jaccard=summ.get("jaccard"),
                       jaccard_chance=summ.get("jaccard_chance"), overlap=summ.get("sift_pafi_overlap"),
                       overlap_chance=summ.get("overlap_chance"))
            role_rows = [{"role": r, **v} for r, v in summ["by_role"].items()]
            if nulls:
                parts.append(f"<p class='note'>Nulls: the same architecture at a random initialisation, on the same "
                             f"batches, puts {nulls['random_init']:.3f} of its gradient's squared mass in its top "
                             f"1% of entries, and a Gaussian vector of the same size {nulls['gaussian']:.3f}, "
                             f"against {summ['top1_share']:.3f} at the pretrained point: concentration above the "
                             "random-init curve is what pre-training adds (SIFT's claim).</p>")
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
                      ("top1", "top-1% gradient share", 3), ("top1_random", "top-1% share, random init", 3),
                      ("top1_gaussian", "top-1% share, Gaussian", 3), ("gini", "Gini of |g|", 3),
                      ("jaccard", "top-set Jaccard", 3), ("overlap", "SIFT ∩ PaFi / k", 4)):
        if c in frame:
            cols.append((c, t, dgt))
    parts.append("<h3 id='analyses-summary'>Summary and cross-analysis</h3>")
    parts.append(_table(frame, cols))
    parts.extend(_model_size_view(analyses, figures, paper_d90))
    cross = cross_analysis_table(cells, analyses)
    if len(cross):
        parts.append(_img(figures.add(figure_cross_analysis(cross, style), "cross_analysis"), "cross-analysis"))
        parts.append(_table(cross, [
            ("model", "model", -1), ("task", "task", -1), ("label", "method", -1), ("test_mean", "test (mean)", 4),
            ("gap_to_full", "gap to full", 4), ("trainable_params", "trainable params", 0),
            ("score_per_million_params", "score per 10⁶ trainable", 4), ("d90", "task d90", 0),
            ("top1_share", "task top-1% share", 3)]))
    return parts


def _grid_axis(rows: list[dict]) -> tuple[list, str, bool]:
    """The x values of a grid's points: the value of a single numeric key (log scale when it
    spans more than a decade), else the trial number."""
    keys = list(rows[0]["point"]) if rows else []
    values = [r["point"][keys[0]] for r in rows] if len(keys) == 1 else []
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        log = min(values) > 0 and max(values) / min(values) > 10
        return values, keys[0].replace("_", " "), log
    return [r["trial"] for r in rows], "trial (grid point)", False


def figure_tuning(selections: list[dict], style: Style, title: str):
    """Each tuned method's mean validation score over its grid, the chosen point starred."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 3.9))
    xlabels, any_log = set(), False
    for sel in selections:
        label = _label(sel["run"]["method"], sel["run"]["variant"])
        rows = [r for r in sel["grid"] if r["mean"] is not None]
        xs, xlabel, log = _grid_axis(rows)
        xlabels.add(xlabel)
        any_log |= log
        ax.plot(xs, [r["mean"] for r in rows], "-", marker=style.marker(label), color=style.color(label), label=label)
        chosen = next(i for i, r in enumerate(rows) if r["trial"] == sel["chosen"]["trial"])
        ax.plot([xs[chosen]], [rows[chosen]["mean"]], "*", ms=14, color=style.color(label), mec="black")
    if any_log:
        ax.set_xscale("log")
    ax.set(xlabel=" / ".join(sorted(xlabels)), ylabel=f"validation {selections[0].get('metric') or 'score'}")
    ax.set_title(title + " (star: chosen)", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(ax)
    return fig


def _edge_of(sel: dict) -> list[str]:
    """The keys whose chosen value is at the grid's edge (recomputed for records written before
    the selection stored them)."""
    from .tuning import edge_keys

    if "at_edge" in sel["chosen"]:
        return list(sel["chosen"]["at_edge"])
    return edge_keys([r["point"] for r in sel["grid"]], sel["chosen"]["point"])


def _grid_text(sel: dict) -> str:
    """Each point's mean validation score, the chosen one in bold; failed points say so."""
    out = []
    for r in sel["grid"]:
        point = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["point"].items())
        score = "failed" if r["mean"] is None else f"{r['mean']:.4f}"
        text = html.escape(f"{point}: {score}")
        out.append(f"<b>{text}</b>" if r["trial"] == sel["chosen"]["trial"] else text)
    return " · ".join(out)


def tuning_section(selections: list[dict], runs: pd.DataFrame, style: Style, figures: Figures) -> list[str]:
    """The tuning stage: per (model, task), every tuned method's grid with its validation
    scores, the chosen point and the budget; the methods left on stored settings are named."""
    if not selections:
        return []
    budgets = {json.dumps({k: s["budget"].get(k) for k in ("training", "seeds", "trials")}, sort_keys=True)
               for s in selections}
    first = selections[0]["budget"]
    parts = ["<h2 id='tuning'>Tuning</h2>",
             "<p class='note'>Each tuned method trained every point of its grid on the tuning seeds "
             f"{first['seeds']} at the tuning budget (training overrides {html.escape(json.dumps(first['training']))}"
             f"; up to {fmt(first.get('steps_per_trial'), 0)} steps per trial), and the point with the best mean "
             "validation score was kept (a tie goes to the earlier point). Test data played no part. The final "
             "runs above train at the chosen point. "
             + (f"Every method had the same effort: {first['trials']} trials." if len(budgets) == 1 else
                "<b>The methods did not have the same tuning effort</b> (see the trials column).") + "</p>"]
    by_task: dict[tuple[str, str], list[dict]] = {}
    for sel in selections:
        by_task.setdefault((sel["run"]["model"], sel["run"]["task"]), []).append(sel)
    for (model, task), sels in by_task.items():
        parts.append(f"<h3>{html.escape(task)} · {html.escape(model)}</h3>")
        rows = pd.DataFrame([{"method": _label(s["run"]["method"], s["run"]["variant"]), "trials": s["budget"]["trials"],
                              "runs": s["budget"]["trial_runs"], "chosen": _grid_text(s),
                              "validation": s["chosen"]["validation"],
                              "edge": ", ".join(_edge_of(s)) or "–"} for s in sels])
        parts.append(_table(rows, [("method", "method", -1), ("trials", "grid points", 0),
                                   ("runs", "trial runs", 0), ("chosen", "validation by grid point (chosen in bold)", -1),
                                   ("validation", "chosen: validation", 4), ("edge", "chosen at the grid's edge", -1)],
                            formatters={"chosen": lambda v: v}))
        edge = sorted(r["method"] for _, r in rows.iterrows() if r["edge"] != "–")
        if edge:
            parts.append("<p class='note'><b>Chosen at the edge of the grid:</b> " + html.escape(", ".join(edge))
                         + ". The best value may lie beyond the values searched; widen the grid that way before "
                         "reading these methods' rank as settled.</p>")
        tuned = {(s["run"]["method"], s["run"]["variant"]) for s in sels}
        here = runs[(runs["model"] == model) & (runs["task"] == task)]
        untuned = sorted({_label(m, v) for m, v in zip(here["method"], here["variant"], strict=True)
                          if (m, v) not in tuned})
        if untuned:
            parts.append("<p class='note'>Not tuned (stored settings of their variant files): "
                         + html.escape(", ".join(untuned)) + ".</p>")
        parts.append(_img(figures.add(figure_tuning(sels, style, f"{task} · {model}"), f"{model}--{task}--tuning"),
                          f"validation score over each method's tuning grid, {task}, {model}"))
    return parts


def _problems_section(runs: pd.DataFrame, other: list[dict]) -> list[str]:
    """Failed and missing runs (and analyses), each with its reason: never silently dropped."""
    bad = runs[runs["status"] != COMPLETED] if len(runs) else runs
    parts = ["<h2 id='problems'>Failed and missing runs</h2>"]
    if not len(bad) and not other:
        return parts + ["<p class='ok'>Every run and analysis completed.</p>"]
    parts.append("<p class='note'>Failed runs (e.g. a diverged loss) and runs whose job did not finish are "
                 "kept out of every mean, interval, Pareto front and figure above; they are listed here with "
                 "the reason.</p>")
    rows = [{"what": "{model}/{task}/{method}/{variant}/seed{seed}".format(**r), "status": r["status"],
             "stage": r.get("failure_stage"), "step": r.get("failure_step"), "reason": r.get("failure_reason")}
            for _, r in bad.iterrows()]
    rows += other
    return parts + [_table(pd.DataFrame(rows), [
        ("what", "run", -1), ("status", "status", -1), ("stage", "stage", -1), ("step", "at step", 0),
        ("reason", "reason", -1)], row_class="status")]


def paper_results_for(config: dict, model: str, task: str) -> dict[str, dict]:
    """The config's published numbers for a task, by method, that apply to this model (one
    naming the model wins over one for every model)."""
    from .config import paper_entries

    out = {}
    for method, entries in (((config or {}).get("paper_results") or {}).get(task) or {}).items():
        fits = sorted((e for e in paper_entries(entries) if e.get("model") in (None, model)),
                      key=lambda e: e.get("model") is None)
        if fits:
            out[method] = fits[0]
    return out


def _metric_table(task_cells: pd.DataFrame, metric: str, paper: dict[str, dict]) -> list[str]:
    """The per-method table of a task; with published numbers, a 'paper' column beside ours and
    their sources under it."""
    table = task_cells.sort_values("test_mean", ascending=False)
    table = table.assign(interval_text=[_interval_text(lo, hi) or "–"
                                        for lo, hi in zip(table["test_lo"], table["test_hi"], strict=True)],
                         marks=[_marks(c) for _, c in table.iterrows()])
    columns = [("label", "method", -1), ("family", "family", -1), ("n_seeds", "seeds", 0),
               ("test_mean", f"test {metric} (mean)", 4), ("interval_text", "95% interval", -1),
               ("marks", "compared (paired, 95%)", -1),
               ("trainable_params", "trainable params", 0), ("trainable_percent", "trainable %", 4)]
    notes = [_interval_note(task_cells, metric)]
    if not paper:
        return [_table(table, columns), *notes]
    table = table.assign(paper=[paper[m]["value"] if m in paper else None for m in table["method"]])
    columns.insert(6, ("paper", "paper", 4))
    sources = "".join(f"<li>{html.escape(m)}: {e['value']:.4f} test {html.escape(e.get('metric', metric))}, "
                      f"{html.escape(e['source'])}</li>" for m, e in sorted(paper.items()))
    return [_table(table, columns), *notes,
            "<p class='note'>paper: the method's published number on this task (from the config's "
            "<code>paper_results</code>), beside ours from this pipeline's protocol; a gap may come from the "
            f"protocol (prompt, splits, budget, seeds), not the method.</p><ul class='note'>{sources}</ul>"]


def _marks(c) -> str:
    """A cell's marks in words: not trained, or where it stands against full fine-tuning and the best."""
    if c["not_trained"]:
        return "not trained at this budget (within noise of the baseline)"
    words = {"best": "best", "tied": "tied with the best", "below": "below the best", "above": "above the best"}
    marks = [words[c["vs_best"]]] if c.get("vs_best") in words else []
    if c.get("vs_full") is not None:
        marks.append({"above": "above full FT", "below": "below full FT", "tied": "tied with full FT"}[c["vs_full"]]
                     + (f" ({c['vs_full_diff']:+.4f})" if c.get("vs_full_diff") is not None else ""))
    return "; ".join(marks) or "–"


def _interval_note(task_cells: pd.DataFrame, metric: str) -> str:
    """How this table's intervals and marks were computed, and the no-learning baseline."""
    kinds = set(task_cells["interval"].dropna())
    how = []
    if uncertainty.BOOTSTRAP in kinds:
        how.append(f"percentile bootstrap ({uncertainty.DRAWS} draws) over the test examples and the seeds, "
                   "which counts the test set's own noise")
    if uncertainty.STUDENT_T in kinds:
        how.append("Student t over the seeds, clipped to the metric's range (cells whose predictions do not "
                   "reproduce their score per example: corpus-level metrics, averages over test sets)")
    base = task_cells["baseline"].dropna()
    baseline = (f"No-learning baseline: {float(base.iloc[0]):.4f} test {html.escape(metric)} (always the most "
                "frequent class, or zero correlation); a method whose interval reaches it is marked not trained "
                "at this budget and is not ranked." if len(base) else "No fixed no-learning baseline for this task.")
    return (f"<p class='note'>95% intervals: {'; '.join(how) or 'none (one seed and no predictions)'}. Compared: "
            "each method against the best and against full fine-tuning, paired seed by seed on the same "
            "resampled examples; tied means the 95% interval of the difference contains 0. "
            f"{baseline}</p>")


def _set_cells(done: pd.DataFrame, set_cols: list[str], task_cells: pd.DataFrame) -> pd.DataFrame:
    """Per method and variant: each test set's mean main metric and 95% t interval over seeds
    (clipped to the metric's range), and their average, the task's headline (``cell_table``'s
    ``test_mean``, ``test_lo`` and ``test_hi``, as ``test_main``)."""
    rows = []
    metric = task_cells["main_metric"].iloc[0]
    for (method, variant), g in done.groupby(["method", "variant"], sort=False):
        row = {"method": method, "label": _label(method, variant)}
        for col in set_cols:
            values = g[col].to_numpy(dtype=float)
            row[col] = float(values.mean())
            row[f"{col}__lo"], row[f"{col}__hi"] = uncertainty.student_t_interval(values, metric) or (None, None)
        rows.append(row)
    average = task_cells[["label", "test_mean", "test_lo", "test_hi"]].rename(
        columns={"test_mean": "test_main", "test_lo": "test_main__lo", "test_hi": "test_main__hi"})
    return pd.DataFrame(rows).merge(average, on="label").sort_values("test_main", ascending=False)


def test_sets_table(done: pd.DataFrame, task_cells: pd.DataFrame, metric: str, config: dict, model: str,
                    task: str) -> list[str]:
    """A task tested on several sets: our mean ± CI on each set and on average, with the papers'
    numbers beside them where the config has them (``paper_results.<set>``; the papers' average is
    ``paper_results.<task>``, else the mean of their per-set numbers when every set has one)."""
    set_cols = [c for c in done.columns if c.startswith(SET_PREFIX) and done[c].notna().any()]
    if not set_cols or not len(done):
        return []
    table, columns = _set_cells(done, set_cols, task_cells), [("label", "method", -1)]
    papers = {c: paper_results_for(config, model, c[len(SET_PREFIX):]) for c in set_cols}
    average = paper_results_for(config, model, task)
    for m in {m for p in papers.values() for m in p} - set(average):
        if all(m in p for p in papers.values()):
            average[m] = {"value": float(np.mean([p[m]["value"] for p in papers.values()]))}
    papers["test_main"] = average
    for col in [*set_cols, "test_main"]:
        name = "average" if col == "test_main" else col[len(SET_PREFIX):]
        columns.append((col, name, 3))
        if papers[col]:
            table[f"{col}__paper"] = [papers[col].get(m, {}).get("value") for m in table["method"]]
            columns.append((f"{col}__paper", "paper", 3))
    ours = [*set_cols, "test_main"]
    table = table.assign(**{c: [_ci_text(m, lo, hi, 3) for m, lo, hi in zip(
        table[c], table[f"{c}__lo"], table[f"{c}__hi"], strict=True)] for c in ours})
    return [f"<h3>Test {html.escape(metric)} per test set</h3>",
            f"<p class='note'>One fine-tuning per run, tested on each of {len(set_cols)} sets: means over seeds "
            "with 95% Student-t intervals clipped to the metric's range; <b>average</b> is the unweighted mean "
            "over the sets (the headline metric above, as the papers report it), with its interval from the "
            "table above. paper: published numbers from the config's "
            "<code>paper_results</code> (an average without a source is the mean of the per-set numbers).</p>",
            _table(table, columns, formatters={c: html.escape for c in ours})]


def _task_section(model: str, task: str, task_runs: pd.DataFrame, cells: pd.DataFrame, records: list[dict],
                  style: Style, figures: Figures, gift_view: dict | None, config: dict | None = None,
                  generated: str | None = None) -> list[str]:
    title = f"{task} · {model}"
    anchor = f"task-{html.escape(model)}-{html.escape(task)}"
    parts = [f"<h2 id='{anchor}'>{html.escape(title)}</h2>"]
    if generated:
        parts.append(f"<p class='note'><b>Generated task:</b> {html.escape(generated)}.</p>")
    done = completed_runs(task_runs)
    task_cells = cells[(cells["model"] == model) & (cells["task"] == task)] if len(cells) else cells
    if not len(task_cells):
        return parts + ["<p class='note'>No completed run of this task yet: see "
                        "<a href='#problems'>failed and missing runs</a>.</p>"]
    metric = task_cells["main_metric"].iloc[0]
    n_bad = int((task_runs["status"] != COMPLETED).sum())
    parts.append(f"<p class='note'>Headline metric: test <b>{html.escape(metric)}</b>, from {len(done)} completed "
                 "runs" + (f" ({n_bad} failed or missing: <a href='#problems'>listed below</a>)" if n_bad else "")
                 + ". Points are means over seeds with 95% Student-t intervals; the dashed line joins the "
                 "Pareto front (no other method is both smaller and better).</p>")
    key = f"{model}--{task}"
    parts.append(_img(figures.add(figure_metric_vs_params(task_cells, style, f"{title}: test {metric} vs "
                                                          "trainable parameters"), f"{key}--metric_vs_params"),
                      f"{task} {metric} vs trainable parameters"))
    parts.append(_img(figures.add(figure_metric_per_method(done, task_cells, style, f"{title}: test {metric} "
                                                           "per method"), f"{key}--metric_per_method"),
                      f"{task} {metric} per method"))
    task_records = [r for r in records if r["run"]["model"] == model and r["run"]["task"] == task
                    and r.get("status") == COMPLETED]
    if task_records:
        parts.append(_img(figures.add(figure_training_curves(task_records, style, metric, f"{title}: training "
                                                             "curves"), f"{key}--training_curves"),
                          f"{task} training curves"))
    parts.append(f"<h3>Test {html.escape(metric)} per method</h3>")
    parts.extend(_metric_table(task_cells, metric, paper_results_for(config, model, task)))
    parts.extend(test_sets_table(done, task_cells, metric, config or {}, model, task))
    parts.append("<h3>Efficiency</h3><p class='note'>Means over the completed seeds. Memory: peak resident "
                 "memory of the training process. Stored size: what the method saves (all weights for full "
                 "fine-tuning). Latency: one forward pass over a test batch, as stored (unmerged), merged into "
                 "the base weights where the method allows it, and the plain pretrained model; the last column "
                 "is the deployed model's cost relative to the base model.</p>")
    parts.append(_efficiency(task_cells))
    parts.extend(_examples_section(done))
    if gift_view is not None:
        parts.extend(_gift_section(gift_view, figures, f"{key}--gift_tokens"))
    return parts


def _links_note(tracking: dict) -> str:
    """Where the table's MLflow links lead, and how to open that UI."""
    if tracking.get("links_error"):
        return (f"<li>no MLflow links: the store did not answer when this report was built "
                f"({html.escape(tracking['links_error'])})</li>")
    if not tracking.get("links"):
        return "<li>no MLflow links: the store holds no run of this experiment yet</li>"
    serve = ""
    if tracking["uri"].startswith("sqlite:"):
        serve = (f" (start it with <code>mlflow ui --backend-store-uri {html.escape(tracking['uri'])}</code>; "
                 "<code>mlflow.ui_url</code> names another address)")
    return (f"<li>the <a href='#runs'>all-runs table</a> links each run to its finetune and evaluate MLflow runs "
            f"in the MLflow UI at <code>{html.escape(tracking['ui'])}</code>{serve}</li>")


def build_report(runs: pd.DataFrame, records: list[dict], stats: dict, config: dict,
                 analysis_records: list[dict] = (), gift_views: list[dict] = (), tracking: dict | None = None,
                 missing_other: list[dict] = (), partial: bool = False, figures: Figures | None = None,
                 predictions: dict | None = None, selections: list[dict] = ()) -> str:
    """The report's HTML from the summary rows and the records (no file access;
    ``predictions``: ``read_predictions``'s, for the intervals and comparisons;
    ``selections``: the tuning stage's records)."""
    figures = figures or Figures()
    if "status" not in runs:
        runs = runs.assign(status=COMPLETED)
    cells = cell_table(runs, predictions, stats)
    style = Style(cells if len(cells) else runs.assign(family=runs.get("family", "weight")))
    analyses: dict[tuple[str, str], dict] = {}
    other = list(missing_other)
    for rec in analysis_records:
        what = "{model}/{task}".format(**rec["run"]) + f" {rec['rule']}"
        if rec.get("status", COMPLETED) != COMPLETED:
            f = _failure_of(rec)
            other.append({"what": what, "status": FAILED, "stage": rec["rule"], "step": f["step"],
                          "reason": f["reason"]})
            continue
        kind = {"d90": "d90", "gradient_sparsity": "sparsity"}[rec["rule"]]
        analyses.setdefault((rec["run"]["model"], rec["run"]["task"]), {})[kind] = rec
    gifts = {(g["run"]["model"], g["run"]["task"]): g for g in gift_views}
    counts = runs["status"].value_counts().to_dict()

    parts = ["<h1>peftlab comparison report</h1>",
             f"<p class='note'>Which parameter-efficient fine-tuning method for this model and task? Generated "
             f"{_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M UTC} from {len(runs)} runs: "
             + ", ".join(f"{counts[s]} {s}" for s in (COMPLETED, FAILED, MISSING) if counts.get(s)) + ".</p>"]
    n_bad = int((runs["status"] != COMPLETED).sum()) + len(other)
    if partial:
        parts.append(f"<div class='banner bad'><b>Partial report.</b> The pipeline stopped with failed jobs; "
                     f"this report shows what finished. {n_bad} run(s) or analyses are failed or missing, "
                     "<a href='#problems'>listed with their reason</a>. Fix them and rerun "
                     "<code>snakemake</code>: the full report replaces this one.</div>")
    elif n_bad:
        parts.append(f"<div class='banner'>{n_bad} run(s) or analyses failed or are missing: "
                     "<a href='#problems'>listed with their reason</a>; none of their numbers enter the "
                     "figures and tables.</div>")
    nav = ["<a href='#glance'>at a glance</a>", "<a href='#setup'>setup</a>"]
    nav += [f"<a href='#task-{html.escape(m)}-{html.escape(t)}'>{html.escape(t)} · {html.escape(m)}</a>"
            for m, t in runs[["model", "task"]].drop_duplicates().itertuples(index=False)]
    if selections:
        nav.append("<a href='#tuning'>tuning</a>")
    if analyses:
        nav.append("<a href='#analyses'>analyses</a>")
    nav += ["<a href='#problems'>failed / missing</a>", "<a href='#runs'>all runs</a>"]
    parts.append("<nav>" + " ".join(nav) + "</nav>")
    parts.append("<h2 id='glance'>At a glance</h2>" + _glance(runs, cells))
    parts.extend(_setup(config, runs, records, stats, tracking))
    for (model, task), task_runs in runs.groupby(["model", "task"], sort=False):
        parts.extend(_task_section(model, task, task_runs, cells, records, style, figures, gifts.get((model, task)),
                                   config, generated_note(stats.get((model, task), {}))))
    parts.extend(tuning_section(list(selections), runs, style, figures))
    parts.extend(analyses_section(analyses, cells, style, figures,
                                  ((config.get("analyses") or {}).get("intrinsic_dimension") or {}).get("paper_d90")))
    parts.extend(_problems_section(runs, other))

    parts.append("<h2 id='runs'>All runs</h2>")
    metric_cols = [c for c in runs.columns if c.startswith("test_") and c != "test_main"]
    links = (tracking or {}).get("links") or {}
    shown = runs.assign(mlflow=[_mlflow_cell(links, r) for r in runs.itertuples()]) if links else runs
    parts.append(_table(shown, [
        ("model", "model", -1), ("task", "task", -1), ("method", "method", -1), ("variant", "variant", -1),
        ("seed", "seed", 0), ("status", "status", -1), *[(c, c.replace("_", " "), 4) for c in metric_cols],
        ("validation_main", "best validation", 4), ("best_validation_step", "best step", 0),
        ("steps", "steps", 0), ("trainable_params", "trainable params", 0),
        ("train_time_s", "train time (s)", 1), *([("mlflow", "MLflow run", -1)] if links else [])],
        row_id="run-{model}-{task}-{method}-{variant}-{seed}", row_class="status",
        formatters={"mlflow": lambda v: v or "–"}))
    data = {"runs": json.loads(runs.to_json(orient="records")),
            "cells": json.loads(cells.to_json(orient="records")) if len(cells) else []}
    blob = json.dumps(data).replace("<", "\\u003c")  # safe inside <script>
    parts.append(f"<script type='application/json' id='peftlab-data'>{blob}</script>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>peftlab comparison{' (partial)' if partial else ''}</title>"
            "<link rel='icon' href='data:,'>"  # no favicon request: a file:// page stays offline
            f"<style>{CSS}</style></head><body>" + "\n".join(parts) + "</body></html>\n")


def read_predictions(runs: pd.DataFrame, results_dir: str | Path) -> dict[tuple, list[dict]]:
    """The completed runs' predictions files (the evaluate stage's), by (model, task, method,
    variant, seed); a run without one is left out (its cell's interval falls back to t)."""
    out = {}
    for r in completed_runs(runs).itertuples():
        path = Path(results_dir) / "evaluate" / f"{r.model}/{r.task}/{r.method}/{r.variant}/seed{r.seed}/predictions.jsonl"
        try:
            out[(r.model, r.task, r.method, r.variant, int(r.seed))] = [
                json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError):
            continue
    return out


def _tracking_info(mlflow_config: dict | None) -> dict | None:
    """The store, its experiment, what is still queued, and each run's MLflow UI address (none,
    with the reason, when the store does not answer: the report is built either way)."""
    if not mlflow_config:
        return None
    from .tracking import display_uri, pending_entries, run_links, tracking_uri, ui_url

    info = {"uri": display_uri(tracking_uri(mlflow_config)), "experiment": mlflow_config.get("experiment", "peftlab"),
            "pending": len(pending_entries(mlflow_config)), "ui": ui_url(mlflow_config), "links": {}}
    try:
        info["links"] = run_links(mlflow_config)
    except Exception as exc:  # noqa: BLE001 - the report never fails because of the store
        info["links_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return info


def _mlflow_cell(links: dict, r) -> str | None:
    """The run's finetune and evaluate MLflow runs, as links."""
    found = [(rule, links.get((rule, *map(str, (r.model, r.task, r.method, r.variant, r.seed)))))
             for rule in ("finetune", "evaluate")]
    return " · ".join(f"<a href='{html.escape(url)}'>{rule}</a>" for rule, url in found if url) or None


def figures_dir_for(html_path: str | Path) -> Path:
    """Where the report's figures are also written as PNG files (for ``snakemake --report``)."""
    p = Path(html_path)
    return p.with_name(p.stem + "_figures")


def partial_path_for(html_path: str | Path) -> Path:
    p = Path(html_path)
    return p.with_name(p.stem + ".partial" + p.suffix)


def write_report(summary_path: str, stats_paths: list[str], config: dict, html_path: str,
                 finetune_paths: list[str] | None = None, analysis_paths: list[str] = (),
                 gift_paths: list[str] = (), mlflow_config: dict | None = None,
                 figures_dir: str | Path | None = None, tuning_paths: list[str] = ()) -> str:
    """Render the comparison report; returns the HTML written to ``html_path``. A stale
    partial report (from an earlier failed run) is removed: this one supersedes it."""
    runs = pd.read_parquet(summary_path)
    stats = {(s["model"], s["task"]["name"]): s for s in map(read_json, stats_paths)}
    base = Path(summary_path).parent
    paths = finetune_paths or [base / "finetune" / f"{r.model}/{r.task}/{r.method}/{r.variant}/seed{r.seed}/result.json"
                               for r in runs.itertuples()]
    records = [rec for rec in map(_read, paths) if rec is not None]
    figures = Figures(figures_dir)
    if figures_dir is not None:
        Path(figures_dir).mkdir(parents=True, exist_ok=True)
    doc = build_report(runs, records, stats, config, [read_json(p) for p in analysis_paths],
                       [read_json(p) for p in gift_paths], _tracking_info(mlflow_config), figures=figures,
                       predictions=read_predictions(runs, base), selections=[read_json(p) for p in tuning_paths])
    if figures_dir is not None:  # leave only this report's figures in the folder
        for old in set(Path(figures_dir).glob("*.png")) - set(figures.written):
            old.unlink()
    write_text(html_path, doc)
    partial_path_for(html_path).unlink(missing_ok=True)
    return doc


def expected_outputs(config: dict) -> dict[str, list[Path]]:
    """Every record the configured pipeline produces (what the rules of workflow/ write)."""
    from .config import iter_runs
    from .tuning import tuned_variants

    results = Path(config["results_dir"])
    keys = list(iter_runs(config))
    tuned = tuned_variants(config)
    out: dict[str, list[Path]] = {
        "finetune": [results / "finetune" / k.path() / "result.json" for k in keys],
        "evaluate": [results / "evaluate" / k.path() / "metrics.json" for k in keys],
        "stats": [], "analyses": [], "gift": [],
        "tuning": [results / "tune" / m / t / method / variant / "selected.json" for m in config["models"]
                   for t in config["tasks"] for method, variant in tuned],
    }
    analyses = config.get("analyses") or {}
    for m in config["models"]:
        for t in config["tasks"]:
            out["stats"].append(results / "data" / m / t / "stats.json")
            if (analyses.get("gradient_sparsity") or {}).get("enabled"):
                out["analyses"].append(results / "analyses" / m / t / "gradient_sparsity" / "sparsity.json")
            if (analyses.get("intrinsic_dimension") or {}).get("dims"):
                out["analyses"].append(results / "analyses" / m / t / "intrinsic_dimension" / "d90.json")
            if "gift" in config["methods"]:
                out["gift"].append(results / "analyses" / m / t / "gift_tokens.json")
    return out


def _analysis_logs(path: Path, logs: Path) -> list[tuple[str, Path]]:
    model, task = path.parts[-4], path.parts[-3]
    if path.name == "gift_tokens.json":
        model, task = path.parts[-3], path.parts[-2]
        return [("prepare_data", logs / "prepare_data" / model / f"{task}.log"),
                ("gift_view", logs / "gift_view" / model / f"{task}.log")]
    rule = "gradient_sparsity" if path.name == "sparsity.json" else "d90"
    stage_logs = [("prepare_data", logs / "prepare_data" / model / f"{task}.log")]
    if rule == "d90":
        stage_logs += sorted(("intrinsic_dimension", p) for p in
                             (logs / "intrinsic_dimension" / model / task).rglob("*.log"))
    return stage_logs + [(rule, logs / rule / model / f"{task}.log")]


def write_partial_report(config: dict, logs_dir: str | Path = "logs", mlflow_config: dict | None = None) -> Path:
    """The report from whatever records exist (jobs failed or the pipeline was stopped), to
    ``<report>.partial.html`` beside the configured report (which keeps the last complete
    report), with the summary in ``<results>/summary.partial.csv``. Missing runs and
    analyses are listed with the reason found in their jobs' logs. Returns the report path."""
    exp = expected_outputs(config)
    logs = Path(logs_dir)
    rows = summary_rows([str(p) for p in exp["finetune"]], [str(p) for p in exp["evaluate"]], logs)
    runs = pd.DataFrame(rows)
    results = Path(config["results_dir"])
    with atomic_path(results / "summary.partial.csv", suffix=".csv") as tmp:
        runs.to_csv(tmp, index=False)
    records = [rec for rec in map(_read, exp["finetune"]) if rec is not None]
    stats = {}
    for p in exp["stats"]:
        s = _read(p)
        if s is not None:
            stats[(s["model"], s["task"]["name"])] = s
    analysis_records, gifts, other = [], [], []
    for p in exp["analyses"] + exp["gift"]:
        rec = _read(p)
        if rec is not None:
            (gifts if p.name == "gift_tokens.json" else analysis_records).append(rec)
            continue
        what = f"{p.parts[-3]}/{p.parts[-2]} gift_view" if p.name == "gift_tokens.json" else \
            f"{p.parts[-4]}/{p.parts[-3]} {'gradient_sparsity' if p.name == 'sparsity.json' else 'd90'}"
        other.append({"what": what, "status": MISSING, "stage": what.split()[-1], "step": None,
                      "reason": missing_reason(_analysis_logs(p, logs))})
    html_path = partial_path_for(config["report_path"])
    doc = build_report(runs, records, stats, config, analysis_records, gifts, _tracking_info(mlflow_config),
                       missing_other=other, partial=True, predictions=read_predictions(runs, results),
                       selections=[rec for rec in map(_read, exp["tuning"]) if rec is not None])
    write_text(html_path, doc)
    return html_path
