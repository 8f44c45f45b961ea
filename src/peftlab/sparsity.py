"""Gradient sparsity at the pretrained point (SIFT's quasi-sparsity claim, PaFi's magnitude mask).

Over ``batches`` seeded training batches, with the model in eval mode (no dropout), the
gradient g_b of the loss with respect to every weight matrix that plays a target role
(query, key, value, attn_output, ffn_in, ffn_out) is taken. From them:

* concentration: the share of squared L2 mass sum(g^2) held by the top p% entries (by |g|),
  as a curve over p, per matrix, per role, per layer and over all matrices; for the per-batch
  gradients (what one optimizer step sees, averaged over batches) and for the accumulated
  score sum_b |g_b| (what SIFT ranks by);
* stability: the mean pairwise Jaccard index of the per-batch top-``jaccard_percent``% sets
  (a random set of the same size gives about p / (2 - p));
* mask overlap: |SIFT mask & PaFi mask| / k for k = round(overlap_rate * numel) per matrix
  (SIFT: top-k of sum_b |g_b|; PaFi: the k smallest |W0|); chance is k / numel;
* the Gini coefficient of the per-batch |g| per matrix (0: all entries equal; 1: one entry
  holds all); the overall figure is the numel-weighted mean over matrices;
* the null baselines the concentration is read against (``null_baselines``): a Gaussian vector
  with as many entries as the target matrices (its top 1% already holds 8.5% of the squared
  mass) and the same architecture at a random initialisation, on the same batches. SIFT's
  claim is about what pre-training does to the gradient: the pretrained curve has to stand
  above both to support it.

The SIFT index sets it writes (``sift_masks``) are what a SIFT variant with
``mask_source: analysis`` trains on.
"""

from __future__ import annotations

import logging
import math
import re
import time
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .data import load_split
from .errors import ModelError, TrainingError
from .io import atomic_path, read_json, write_json
from .models import ROLES, ModelSpec, load_model, load_tokenizer, resolve_targets
from .provenance import git_commit, set_seed, versions

log = logging.getLogger(__name__)

PERCENTS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)


class SortedMagnitudes:
    """|values| of one tensor sorted ascending, with the squared mass above every position,
    so top-k shares of any union of tensors follow from a threshold search (no re-sort)."""

    def __init__(self, values: torch.Tensor):
        # sorted in float32 (half the time of float64); sums run in float64
        self.asc = values.detach().reshape(-1).float().abs().sort().values
        sq = self.asc.double().pow(2)
        # above[j] = sum of squares of asc[j:], with above[n] = 0
        self.above = torch.cat([sq.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
        self.n = self.asc.numel()

    @property
    def total(self) -> float:
        return float(self.above[0])

    def count_above(self, t: float, strict: bool) -> int:
        return self.n - int(torch.searchsorted(self.asc, torch.tensor([t]), right=strict))

    def mass_above(self, t: float) -> float:
        return float(self.above[self.n - self.count_above(t, strict=True)])

    def gini(self) -> float:
        """sum_i (2i - n - 1) x_(i) / (n sum x), x ascending (1-based i)."""
        x = self.asc.double()
        total = float(x.sum())
        if self.n == 0 or total == 0.0:
            return float("nan")
        i = torch.arange(1, self.n + 1, dtype=torch.float64)
        return float(((2 * i - self.n - 1) * x).sum()) / (self.n * total)


def union_shares(parts: list[SortedMagnitudes], percents) -> list[float]:
    """Share of the squared mass of the union of ``parts`` held by its top p% entries: the
    k-th largest magnitude t is found by bisection over float32 bit patterns (monotone for
    non-negative floats), then share = (mass above t + (k - count above t) t^2) / total."""
    n = sum(p.n for p in parts)
    total = sum(p.total for p in parts)
    if n == 0 or total == 0.0:
        return [float("nan")] * len(percents)
    top = max(float(p.asc[-1]) for p in parts if p.n)
    out = []
    for pct in percents:
        k = min(n, max(1, math.ceil(pct / 100 * n)))
        lo, hi = 0, int(np.float32(top).view(np.int32))  # invariant: count(>= bits(lo)) >= k
        while lo < hi:
            mid = (lo + hi + 1) // 2
            t = float(np.int32(mid).view(np.float32))
            if sum(p.count_above(t, strict=False) for p in parts) >= k:
                lo = mid
            else:
                hi = mid - 1
        t = float(np.int32(lo).view(np.float32))
        above = sum(p.count_above(t, strict=True) for p in parts)
        mass = sum(p.mass_above(t) for p in parts) + (k - above) * t * t
        out.append(mass / total)
    return out


def top_share(values: torch.Tensor, percents) -> list[float]:
    """Share of sum(values^2) held by the top p% entries by |value|, for each p."""
    return union_shares([SortedMagnitudes(values)], percents)


def gini(values: torch.Tensor) -> float:
    """Gini coefficient of |values|: sum_i (2i - n - 1) x_(i) / (n sum x), x ascending."""
    return SortedMagnitudes(values).gini()


def top_k_set(values: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Sorted flat indices of the k largest (or smallest) |values| (ties to the lower index)."""
    from .methods._sparse import select_indices

    return select_indices(values.detach().abs(), k, largest)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0 and b.numel() == 0:
        return 1.0
    inter = int(torch.isin(a, b).sum())
    return inter / (a.numel() + b.numel() - inter)


def _layer(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def target_roles(model, overrides: dict | None = None) -> dict[str, str]:
    """Module name -> role for every role this architecture has."""
    out: dict[str, str] = {}
    for role in ROLES:
        try:
            names = resolve_targets(model, [role], overrides)
        except ModelError:
            continue
        for n in names:
            out.setdefault(n, role)
    if not out:
        raise ModelError("gradient sparsity: no target matrices resolved on this model; set 'targets:' "
                         "for the model in config.yaml")
    return dict(sorted(out.items()))


def collect_gradients(model, names: list[str], batches, n_batches: int):
    """Per-batch gradients of the named modules' weights (float32, CPU), in eval mode,
    without touching .grad (``methods._sparse.weight_gradients``, as SIFT's calibration)."""
    from .methods._sparse import weight_gradients

    def check_loss(loss, i):
        if not torch.isfinite(loss):
            raise TrainingError(f"gradient sparsity: loss became {loss.item()} on batch {i}")

    weights = [model.get_submodule(n).weight for n in names]
    batches = tqdm(batches, total=n_batches, desc="gradient sparsity", mininterval=2)
    grads = [[torch.zeros_like(w) if x is None else x.detach().float().cpu() for w, x in zip(weights, g, strict=True)]
             for g in weight_gradients(model, names, batches, n_batches, check_loss)]
    if not grads:
        raise TrainingError("gradient sparsity got no batches: the training split is empty")
    return grads


def null_baselines(model, names: list[str], batches, n_batches: int, percents=PERCENTS,
                   seed: int = 0) -> dict[str, list[float]]:
    """Concentration curves (share of squared mass in the top p%, each p of ``percents``) of
    what carries nothing from pre-training: ``gaussian``, i.i.d. N(0, 1) entries as many as the
    named matrices hold; ``random_init``, the per-batch gradients (averaged over batches) of the
    same architecture freshly initialised from ``seed`` (its config's initialiser), on ``batches``."""
    total = sum(model.get_submodule(n).weight.numel() for n in names)
    noise = torch.randn(total, generator=torch.Generator().manual_seed(seed))
    gaussian = union_shares([SortedMagnitudes(noise)], percents)
    del noise
    torch.manual_seed(seed)
    fresh = type(model)(model.config)
    for key, value in vars(model).items():  # peftlab's flags on the loaded model (causal LM, name)
        if key.startswith("peftlab_"):
            setattr(fresh, key, value)
    grads = collect_gradients(fresh, names, batches, n_batches)
    per_batch = np.mean([union_shares([SortedMagnitudes(t) for t in g], percents) for g in grads], axis=0)
    return {"gaussian": [float(v) for v in gaussian], "random_init": [float(v) for v in per_batch]}


def analyse(model, roles: dict[str, str], grads: list[list[torch.Tensor]], percents=PERCENTS,
            jaccard_percent: float = 1.0, overlap_rate: float = 0.008) -> dict[str, Any]:
    """Every statistic of the module docstring from per-batch gradients (``grads[b][i]`` is
    batch b's gradient of ``names[i]``)."""
    names = list(roles)
    nb = len(grads)
    per_module, curves = [], {}
    groups: dict[str, list[int]] = {"all": list(range(len(names)))}
    for i, n in enumerate(names):
        groups.setdefault(f"role:{roles[n]}", []).append(i)
        layer = _layer(n)
        if layer is not None:
            groups.setdefault(f"layer:{layer}", []).append(i)
    accumulated = [sum(g[i].abs() for g in grads) for i in range(len(names))]

    # one sort per (batch, matrix); every share (matrix, role, layer, all) comes from it
    batch_curves: dict[str, list[list[float]]] = {group: [] for group in groups}
    module_shares = [[] for _ in names]
    module_gini = [[] for _ in names]
    for g in grads:
        ordered = [SortedMagnitudes(t) for t in g]
        for group, idx in groups.items():
            batch_curves[group].append(union_shares([ordered[i] for i in idx], percents))
        for i, o in enumerate(ordered):
            module_shares[i].append(union_shares([o], percents))
            module_gini[i].append(o.gini())
        del ordered
    acc_ordered = [SortedMagnitudes(a) for a in accumulated]
    for group, idx in groups.items():
        curves[group] = {"per_batch": [float(v) for v in np.mean(batch_curves[group], axis=0)],
                         "accumulated": union_shares([acc_ordered[i] for i in idx], percents)}
    del acc_ordered

    for i, n in enumerate(names):
        w = model.get_submodule(n).weight.detach().cpu()
        numel = w.numel()
        kj = max(1, math.ceil(jaccard_percent / 100 * numel))
        sets = [top_k_set(g[i], kj) for g in grads]
        jac = [jaccard(a, b) for a, b in combinations(sets, 2)]
        k = int(round(overlap_rate * numel))
        sift = top_k_set(accumulated[i], k, largest=True)
        pafi = top_k_set(w, k, largest=False)
        shares = np.mean(module_shares[i], axis=0)
        row = {
            "module": n, "role": roles[n], "layer": _layer(n), "numel": numel,
            **{f"top{p:g}%_share": float(s) for p, s in zip(percents, shares, strict=True)},
            "gini": float(np.mean(module_gini[i])),
            "jaccard": float(np.mean(jac)) if jac else float("nan"),
            "sift_pafi_overlap": (int(torch.isin(sift, pafi).sum()) / k) if k else float("nan"),
            "overlap_chance": k / numel,
            "grad_norm": float(np.mean([float(g[i].norm()) for g in grads])),
        }
        per_module.append(row)
    table = pd.DataFrame(per_module)
    p1 = jaccard_percent / 100
    summary = {
        "batches": nb,
        "percents": list(percents),
        "top1_share": curves["all"]["per_batch"][list(percents).index(1.0)] if 1.0 in percents else None,
        "gini": _weighted(table, "gini"),  # per-matrix Gini, averaged with numel weights
        "jaccard_percent": jaccard_percent,
        "jaccard": _weighted(table, "jaccard"),
        "jaccard_chance": p1 / (2 - p1),
        "overlap_rate": overlap_rate,
        "sift_pafi_overlap": _weighted(table, "sift_pafi_overlap"),
        "overlap_chance": overlap_rate,
        "by_role": {r: {"top1_share": curves[f"role:{r}"]["per_batch"][list(percents).index(1.0)]
                        if 1.0 in percents else None,
                        "jaccard": _weighted(table[table.role == r], "jaccard"),
                        "sift_pafi_overlap": _weighted(table[table.role == r], "sift_pafi_overlap")}
                    for r in dict.fromkeys(roles.values())},
    }
    return {"summary": summary, "curves": curves, "modules": table, "accumulated": dict(zip(names, accumulated, strict=True))}


def _weighted(frame: pd.DataFrame, col: str) -> float | None:
    ok = frame[col].notna()
    if not ok.any():
        return None
    return float(np.average(frame.loc[ok, col], weights=frame.loc[ok, "numel"]))


def sift_masks(model, accumulated: dict[str, torch.Tensor], params: dict, overrides: dict | None):
    """The index sets a SIFT variant with these method params would train, from the
    accumulated scores (its targets, rate and ranking; ``accumulate: abs`` scoring)."""
    from .methods import build_method
    from .methods.sift import Sift  # imported by name, so the rule's code includes SIFT's module

    method = build_method(Sift.name, params, overrides)
    names = method.target_names(model)
    missing = [n for n in names if n not in accumulated]
    if missing:
        raise ModelError(f"gradient sparsity measured no gradient for SIFT targets {missing[:3]}")
    return method.select({n: accumulated[n] for n in names})


def gradient_sparsity(
    model_spec: ModelSpec,
    data_dir: str | Path,
    out_dir: str | Path,
    batches: int = 8,
    batch_size: int = 16,
    seed: int = 0,
    percents=PERCENTS,
    jaccard_percent: float = 1.0,
    overlap_rate: float = 0.008,
    sift_variants: dict[str, dict] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run the analysis for one (model, task); write ``sparsity.json``, ``modules.csv`` and
    one ``sift_mask_<variant>.safetensors`` per entry of ``sift_variants`` (name -> params)."""
    from safetensors.torch import save_file

    from .methods._sparse import INDEX_SUFFIX
    from .train import collator_for, make_loader

    set_seed(seed, threads)
    out = Path(out_dir)
    stats = read_json(Path(data_dir) / "stats.json")
    train = load_split(data_dir, "train")
    tokenizer = load_tokenizer(model_spec)
    model = load_model(model_spec, stats["num_labels"], stats["problem_type"], seed=seed)
    roles = target_roles(model, model_spec.targets)
    collator = collator_for(stats, tokenizer)

    def seeded_batches():  # the same batches each time
        return iter(make_loader(train, batch_size, collator, shuffle=True, seed=seed))

    t0 = time.perf_counter()
    grads = collect_gradients(model, list(roles), seeded_batches(), batches)
    result = analyse(model, roles, grads, percents, jaccard_percent, overlap_rate)
    n_batches = len(grads)
    del grads
    nulls = null_baselines(model, list(roles), seeded_batches(), batches, percents, seed)
    result["curves"] |= {f"null:{k}": {"per_batch": v} for k, v in nulls.items()}
    if 1.0 in percents:
        result["summary"]["null_top1_share"] = {k: v[list(percents).index(1.0)] for k, v in nulls.items()}
    masks_written = {}
    for variant, params in (sift_variants or {}).items():
        masks = sift_masks(model, result["accumulated"], params, model_spec.targets)
        path = out / f"sift_mask_{variant}.safetensors"
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file({f"{n}{INDEX_SUFFIX}": m.contiguous() for n, m in masks.items()}, str(tmp),
                      metadata={"source": "gradient_sparsity", "batches": str(n_batches)})
        masks_written[variant] = str(path)
    with atomic_path(out / "modules.csv") as tmp:
        result["modules"].to_csv(tmp, index=False)
    record = {
        "schema_version": 1,
        "rule": "gradient_sparsity",
        "status": "completed",
        "run": {"model": model_spec.name, "task": stats["task"]["name"], "method": "gradient_sparsity",
                "variant": "-", "seed": seed},
        "params": {"batches": batches, "batch_size": batch_size, "seed": seed, "percents": list(percents),
                   "jaccard_percent": jaccard_percent, "overlap_rate": overlap_rate},
        "data_fingerprint": stats["fingerprint"],
        "summary": result["summary"],
        "curves": result["curves"],
        "batch_size": batch_size,
        "modules": len(roles),
        "entries": int(sum(model.get_submodule(n).weight.numel() for n in roles)),
        "sift_masks": masks_written,
        "time_s": time.perf_counter() - t0,
        "versions": versions(),
        "git_commit": git_commit(),
    }
    write_json(out / "sparsity.json", record)
    return record
