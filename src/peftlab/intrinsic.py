"""Intrinsic dimension by random-subspace training (Li et al. 2018; Aghajanyan et al. 2021).

Every tensor theta_i of the model is reparametrised as

    theta_i = theta0_i + lambda_i * P_i(theta_d)        (SAID)
    theta_i = theta0_i + P_i(theta_d)                   (DID)

with theta_d in R^d shared by all tensors and zero at the start (so step 0 is the pretrained
model), and P_i: R^d -> R^{D_i} a Fastfood transform F_i with unit-norm columns, one per tensor
(``normalisation: per_tensor``, the default: Aghajanyan et al.'s code divides each tensor's
transform by its own column norm, so a step in theta_d moves a 384-entry LayerNorm as far, in
L2, as a 12M-entry embedding). ``normalisation: global`` scales each F_i by sqrt(D_i / D)
instead, so that the stacked P = [P_1; ...; P_m] has unit-norm columns over all D parameters
(Li et al.'s single projection of the whole parameter vector: a step spreads over the tensors
in proportion to their size); its d90 is not comparable with Aghajanyan et al.'s. F_i stacks Fastfood blocks H G_b Pi H B pad(x) over L = a power of
two >= d (Le et al.'s construction for D_i > d), truncated to D_i rows: H the unnormalised
Walsh-Hadamard matrix (applied in O(L log L) without forming it), B a random +-1 diagonal
and Pi a random permutation shared by a tensor's blocks, G_b independent Gaussian diagonals.
Le et al. draw B and Pi per block too; sharing them means Pi H B x is computed once per
tensor (length L), so a step costs one D-sized transform forward and one backward instead
of two each, and given that shared vector the blocks are still independent (zero-mean G_b).
A scale makes every column exactly unit-norm without truncation and unit-norm in
expectation with it. Memory: about one number per parameter (G_b) plus B and Pi per tensor,
O(D) while d <= the block length (a tensor smaller than d costs O(d)); no D x d matrix is
formed.

SAID spends m of its d trainable numbers on the per-tensor scales lambda (init 1), so
theta_d has d - m entries and the run trains exactly d numbers, as in Aghajanyan et al.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .errors import ConfigError, TrainingError
from .methods.base import Method, MethodConfig, check_positive_int


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def hadamard(n: int) -> torch.Tensor:
    """The explicit n x n Sylvester Hadamard matrix (+-1 entries, H @ H = n I)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


_RADIX_BITS = 5  # each pass multiplies by a 32 x 32 Hadamard block (measured fastest on CPU)
_HADAMARD: dict[tuple, torch.Tensor] = {}


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform over the last dimension (a power of two):
    ``fwht(x) = x @ H``, H the Sylvester Hadamard matrix, in O(L log L) without forming H.

    H_L is a Kronecker product of small Hadamard blocks, so the transform runs as a few
    passes, each multiplying one group of index bits by a 32 x 32 block (a matmul), rather
    than log2(L) butterfly passes over memory."""
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    bits, done, h = n.bit_length() - 1, 0, 1
    while h < n:
        r = min(_RADIX_BITS, bits - done)
        k = 1 << r
        key = (k, x.dtype, x.device)
        if key not in _HADAMARD:
            _HADAMARD[key] = hadamard(k).to(dtype=x.dtype, device=x.device)
        hk = _HADAMARD[key]
        if h == 1:
            x = x.reshape(-1, k) @ hk
        else:
            x = torch.matmul(hk, x.reshape(-1, k, h))
        h, done = h * k, done + r
    return x.reshape(*lead, n)


class Fastfood(nn.Module):
    """P: R^d -> R^D as a stack of Fastfood blocks (Le et al., 2013): block b maps x to
    H G_b Pi H B pad(x) over L = the next power of two above max(d, min(D, block)), with B
    and Pi shared by the blocks and G_b independent; the blocks are stacked to ceil(D / L) * L
    rows, truncated to D and rescaled so every column has unit norm (exactly without
    truncation, in expectation with it). Buffers: one (blocks x L) array, B and one
    permutation of L, about D numbers; no D x d matrix."""

    def __init__(self, d: int, D: int, generator: torch.Generator, block: int = 1024):
        super().__init__()
        self.d, self.D = int(d), int(D)
        self.L = next_pow2(max(self.d, min(self.D, block)))
        nb = -(-self.D // self.L)
        sign = torch.randint(0, 2, (self.L,), generator=generator).to(torch.float32) * 2 - 1
        # B and Pi shared by the blocks of a tensor, G_b independent per block: given the
        # shared y = Pi H B x, blocks are independent Gaussian mixtures of y (zero-mean G_b),
        # and the projection costs one D-sized transform per pass instead of two
        perm = torch.randperm(self.L, generator=generator)
        gauss = torch.randn(nb, self.L, generator=generator)
        self.register_buffer("B", sign, persistent=False)
        self.register_buffer("Pi", perm, persistent=False)
        self.register_buffer("G", gauss, persistent=False)
        # column j of block b has squared norm L * ||G_b||^2 before truncation; keeping D of
        # the nb * L rows keeps D / (nb L) of the total on average
        total = self.L * float(gauss.pow(2).sum())
        self.scale = 1.0 / math.sqrt(total * self.D / (nb * self.L))

    def forward(self, x: torch.Tensor, coef: torch.Tensor | float = 1.0) -> torch.Tensor:
        """``coef * P x``; a scalar ``coef`` (SAID's lambda_i times sqrt(D_i / D)) is applied
        to the length-L vector, not to the D outputs."""
        # Pi H B pad(x) is one length-L vector shared by the blocks (O(L log L)); the only
        # D-sized work is G_b * y and one transform over all blocks, forward and backward
        y = fwht(nn.functional.pad(x, (0, self.L - x.shape[-1])) * self.B)
        y = y.index_select(-1, self.Pi) * (coef * self.scale)
        z = fwht(self.G * y).reshape(-1)
        return z if z.numel() == self.D else z[: self.D]

    def matrix(self) -> torch.Tensor:
        """The D x d matrix this transform applies, built explicitly (tests only)."""
        H = hadamard(self.L)
        blocks = []
        for b in range(self.G.shape[0]):
            Pi = torch.eye(self.L)[self.Pi]  # (Pi z)_i = z[perm[i]]
            blocks.append(H @ torch.diag(self.G[b]) @ Pi @ H @ torch.diag(self.B))
        return torch.cat(blocks)[: self.D, : self.d] * self.scale


class DenseProjection(nn.Module):
    """P: R^d -> R^D, a dense Gaussian matrix with unit-norm columns (small models only:
    O(D d) memory); the reference the Fastfood transform is tested against."""

    def __init__(self, d: int, D: int, generator: torch.Generator):
        super().__init__()
        self.d, self.D = int(d), int(D)
        m = torch.randn(self.D, self.d, generator=generator)
        self.register_buffer("M", m / m.norm(dim=0, keepdim=True), persistent=False)

    def forward(self, x: torch.Tensor, coef: torch.Tensor | float = 1.0) -> torch.Tensor:
        return self.M @ (x * coef)

    def matrix(self) -> torch.Tensor:
        return self.M


PROJECTIONS = {"fastfood": Fastfood, "dense": DenseProjection}
# per_tensor: each P_i has unit-norm columns (the reference's); global: the stacked P has them
NORMALISATIONS = ("per_tensor", "global")


@dataclass
class SubspaceConfig(MethodConfig):
    d: int = 1000                 # trainable numbers in all (SAID: d - m directions + m scales)
    said: bool = True             # one scale lambda_i per tensor (SAID) or none (DID)
    projection: str = "fastfood"  # fastfood | dense (dense: O(D d) memory, small models only)
    projection_seed: int = 0      # seeds B, Pi, G of every tensor (fixed across runs)
    normalisation: str = "per_tensor"  # per_tensor (the reference's) | global (sqrt(D_i / D) per tensor)

    def __post_init__(self):
        check_positive_int("d", self.d)
        if not isinstance(self.said, bool):
            raise ValueError(f"said must be true or false, got {self.said!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {sorted(PROJECTIONS)}, got {self.projection!r}")
        if isinstance(self.projection_seed, bool) or not isinstance(self.projection_seed, int):
            raise ValueError(f"projection_seed must be an integer, got {self.projection_seed!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {list(NORMALISATIONS)}, got {self.normalisation!r}")


class SubspaceModel(nn.Module):
    """A frozen model whose every parameter is theta0 + (lambda_i *) P_i(theta_d)."""

    def __init__(self, model: nn.Module, config: SubspaceConfig):
        super().__init__()
        self.config = config
        self.base = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.names = [n for n, _ in model.named_parameters()]
        m = len(self.names)
        n_dirs = config.d - m if config.said else config.d
        if n_dirs < 1:
            raise ConfigError(
                f"SAID with d={config.d} leaves no direction: the model has {m} tensors, each with "
                f"its own scale; use d > {m} (or said: false)"
            )
        gen = torch.Generator().manual_seed(config.projection_seed)
        proj = PROJECTIONS[config.projection]
        self.projections = nn.ModuleList(proj(n_dirs, p.numel(), gen) for _, p in model.named_parameters())
        total = sum(p.numel() for p in model.parameters())
        # per_tensor: each P_i has unit-norm columns; global: sqrt(D_i / D), so the stacked
        # projection has unit-norm columns over all D parameters
        self.tensor_scales = [1.0 if config.normalisation == "per_tensor" else math.sqrt(p.numel() / total)
                              for p in model.parameters()]
        self.theta_d = nn.Parameter(torch.zeros(n_dirs))
        self.lambdas = nn.Parameter(torch.ones(m)) if config.said else None
        self._cache: tuple | None = None

    @property
    def n_directions(self) -> int:
        return self.theta_d.numel()

    def deltas(self) -> dict[str, torch.Tensor]:
        params = dict(self.base.named_parameters())
        out = {}
        for i, (name, proj) in enumerate(zip(self.names, self.projections, strict=True)):
            coef = self.tensor_scales[i] * self.lambdas[i] if self.lambdas is not None else self.tensor_scales[i]
            out[name] = proj(self.theta_d, coef).view_as(params[name])
        return out

    def _version(self) -> tuple:
        return (self.theta_d._version, None if self.lambdas is None else self.lambdas._version)

    def merged_parameters(self) -> dict[str, torch.Tensor]:
        """theta0 + delta per tensor; without autograd (evaluation) computed once per update."""
        if not torch.is_grad_enabled():
            if self._cache is not None and self._cache[0] == self._version():
                return self._cache[1]
        params = dict(self.base.named_parameters())
        merged = {n: params[n] + delta for n, delta in self.deltas().items()}
        self._cache = None if torch.is_grad_enabled() else (self._version(), merged)
        return merged

    def forward(self, **batch):
        return functional_call(self.base, self.merged_parameters(), args=(), kwargs=batch)

    @torch.no_grad()
    def generate(self, **kwargs):
        """Greedy generation (generative tasks) with theta0 + delta, as ``forward`` computes."""
        from torch.nn.utils.stateless import _reparametrize_module

        with _reparametrize_module(self.base, self.merged_parameters(), tie_weights=True):
            return self.base.generate(**kwargs)

    @torch.no_grad()
    def materialize(self) -> nn.Module:
        """The base model with theta0 + delta written into its weights (a plain model)."""
        deltas = self.deltas()
        for name, p in self.base.named_parameters():
            p.add_(deltas[name])
        return self.base


class Subspace(Method):
    """Random-subspace training as a trainer-compatible method (not in the method registry:
    it is the intrinsic-dimension analysis, not a fine-tuning method to compare)."""

    name = "subspace"
    family = "analysis"
    mergeable = True
    config_cls = SubspaceConfig
    description = "theta = theta0 + lambda * P(theta_d): intrinsic-dimension measurement"

    def apply(self, model: nn.Module) -> nn.Module:
        return SubspaceModel(model, self.config)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        return self.config.d

    def merge(self, model: nn.Module) -> nn.Module:
        return model.materialize()


def subspace_method(values: dict[str, Any]) -> Subspace:
    return Subspace(SubspaceConfig.from_dict("intrinsic_dimension", values))


def d90(points: list[dict], reference: float, fraction: float = 0.9) -> dict[str, Any]:
    """Smallest d whose score reaches ``fraction`` of ``reference`` (full fine-tuning's).

    ``points``: [{"d": int, "score": float}, ...] (several seeds per d are averaged).
    Returns the threshold, the per-d means and d90 (None when no d reaches it).
    """
    by_d: dict[int, list[float]] = {}
    for p in points:
        by_d.setdefault(int(p["d"]), []).append(float(p["score"]))
    means = {d: sum(v) / len(v) for d, v in sorted(by_d.items())}
    threshold = fraction * reference
    reached = [d for d, s in means.items() if s >= threshold]
    return {"threshold": threshold, "reference": reference, "fraction": fraction,
            "scores": {str(d): s for d, s in means.items()},
            "d90": min(reached) if reached else None,
            "reached": bool(reached)}


def bisection_point(means: dict[int, float], threshold: float) -> int | None:
    """Geometric midpoint between the largest d below the threshold and the smallest d
    reaching it (None when there is no such bracket or it cannot be split further)."""
    reached = [d for d, s in means.items() if s >= threshold]
    if not reached:
        return None
    hi = min(reached)
    below = [d for d, s in means.items() if d < hi and s < threshold]
    if not below:
        return None
    lo = max(below)
    mid = int(round(math.sqrt(lo * hi)))
    return mid if lo < mid < hi else None


# ---------------------------------------------------------------------------------------
# The analysis stage: one subspace run per (model, task, d, seed), then d90
# ---------------------------------------------------------------------------------------


def subspace_variant(d: int) -> str:
    return f"d{d}"


def subspace_learning_rate(learning_rate: float, d: int, reference_d: int | None) -> float:
    """The rate for a run at ``d`` when ``learning_rate`` was tuned at ``reference_d``:
    lr * sqrt(reference_d / d) (unchanged when ``reference_d`` is None). Adam moves every
    coordinate of theta_d by about lr per step, and P has unit, nearly orthogonal columns,
    so a step moves theta by about lr * sqrt(d); the scaling keeps that step the same
    across the grid (one rate for every d, instead of a rate that diverges at large d)."""
    if reference_d is None:
        return float(learning_rate)
    return float(learning_rate) * math.sqrt(int(reference_d) / int(d))


def run_subspace(
    model_spec,
    data_dir: str | Path,
    out_dir: str | Path,
    d: int,
    seed: int,
    training,
    said: bool = True,
    projection: str = "fastfood",
    projection_seed: int = 0,
    threads: int | None = None,
    lr_reference_d: int | None = None,
    normalisation: str = "per_tensor",
) -> dict[str, Any]:
    """Train theta_d (and the SAID scales) for one d with the fine-tuning loop (model
    selection on validation), then score the selected point on the test split. Writes
    ``subspace.safetensors``, ``finetune.json``, ``metrics.json`` and ``result.json``.
    With ``lr_reference_d``, the rate is scaled to d (``subspace_learning_rate``)."""
    from dataclasses import replace

    from .config import Experiment, RunKey
    from .evaluate import evaluate
    from .io import read_json, write_json
    from .train import finetune

    out = Path(out_dir)
    training = replace(training, learning_rate=subspace_learning_rate(training.learning_rate, d, lr_reference_d))
    params = {"d": int(d), "said": said, "projection": projection, "projection_seed": projection_seed,
              "normalisation": normalisation}
    task = read_json(Path(data_dir) / "stats.json")["task"]["name"]
    key = RunKey(model_spec.name, task, "said" if said else "did", subspace_variant(d), int(seed))
    experiment = Experiment(key.method, key.variant, training, params, ())
    weights = out / "subspace.safetensors"
    ft = finetune(key, model_spec, experiment, data_dir, weights, out / "finetune.json",
                  threads=threads, method=subspace_method(params))
    ev = evaluate(key, model_spec, data_dir, out / "finetune.json", weights, out / "metrics.json",
                  threads=threads, method=subspace_method(params), measure_inference=False)
    record = {
        "schema_version": 1,
        "rule": "intrinsic_dimension",
        "status": ft["status"],
        "failure": ft["failure"],
        "skipped_batches": ft["skipped_batches"],
        "run": ft["run"],
        "d": int(d),
        "kind": key.method,
        "params": {"config": ft["config"]},
        "projection": projection,
        "total_params": ft["model"]["total_params"],
        "trainable_params": ft["trainable_params"],
        "main_metric": ft["main_metric"],
        "test": ev["metrics"],
        "test_main": ev["metrics"].get(ft["main_metric"]),  # None when the run failed
        "best_validation": ft["best_validation"],
        "curves": ft["curves"],
        "steps": ft["steps"],
        "epochs": ft.get("epochs"),
        "train_time_s": ft["train_time_s"],
        "peak_memory": ft["peak_memory"],
        "config": ft["config"],
        "data_fingerprint": ft["data_fingerprint"],
        "versions": ft["versions"],
        "git_commit": ft["git_commit"],
    }
    write_json(out / "result.json", record)
    return record


def d90_stage(records: list[dict], reference_metrics: list[dict], fraction: float = 0.9,
              refine: int = 0, run_more=None) -> dict[str, Any]:
    """d90 from the grid's subspace records against full fine-tuning's test score (mean
    over its seeds); with ``refine`` > 0, up to that many bisection points between the
    largest d below the threshold and the smallest reaching it, trained by ``run_more(d)``
    (which returns that d's records, one per seed)."""
    if not reference_metrics:
        raise ConfigError("d90 needs full fine-tuning's test metrics for this (model, task)")
    # failed runs (a NaN loss) carry no score: d90 ignores them and lists them
    failed_reference = [_failure_of(m) for m in reference_metrics if not _completed(m)]
    reference_metrics = [m for m in reference_metrics if _completed(m)]
    if not reference_metrics:
        raise TrainingError(
            f"d90: every full fine-tuning reference run failed ({'; '.join(failed_reference)}), so there "
            "is no score to compare against; fix that variant (lower its learning_rate) and rerun"
        )
    failed = [_failure_of(r) for r in records if not _completed(r)]
    records = [r for r in records if _completed(r)]
    if not records:
        raise TrainingError(
            f"d90: every intrinsic-dimension run of the grid failed ({'; '.join(failed)}); lower "
            "analyses.intrinsic_dimension.training.learning_rate in config.yaml and rerun"
        )
    metric = records[0]["main_metric"]
    reference = sum(m["metrics"][metric] for m in reference_metrics) / len(reference_metrics)
    points = [{"d": r["d"], "score": r["test_main"]} for r in records]
    refined: list[int] = []
    for _ in range(refine):
        current = d90(points, reference, fraction)
        mid = bisection_point({int(k): v for k, v in current["scores"].items()}, current["threshold"])
        if mid is None or run_more is None:
            break
        more = run_more(mid)
        failed += [_failure_of(r) for r in more if not _completed(r)]
        more = [r for r in more if _completed(r)]
        points += [{"d": r["d"], "score": r["test_main"]} for r in more]
        records = records + more
        refined.append(mid)
    out = d90(points, reference, fraction)
    out.update(metric=metric, reference_runs=len(reference_metrics), refined=refined,
               failed_runs=failed, failed_reference_runs=failed_reference,
               total_params=records[0]["total_params"] if records else None,
               kind=records[0]["kind"] if records else None,
               grid=sorted({int(r["d"]) for r in records}))
    if out["d90"] is not None and out["total_params"]:
        out["d90_fraction_of_D"] = out["d90"] / out["total_params"]
    return out


def _completed(record: dict) -> bool:
    return record.get("status", "completed") == "completed"


def _failure_of(record: dict) -> str:
    run = record.get("run", {})
    who = f"d{record['d']} seed{run.get('seed')}" if "d" in record else f"{run.get('method')} seed{run.get('seed')}"
    return f"{who}: {(record.get('failure') or {}).get('reason', 'failed')}"


def training_budget(records: list[dict]) -> dict[str, Any]:
    """The training budget of completed runs as their records state it: optimizer steps taken
    (the largest), the epochs those steps made (the configured epochs for a record that
    predates ``epochs``: a ``max_steps`` run stops before them) and the batch size."""
    done = [r for r in records if _completed(r)]
    training = [(r.get("config") or {}).get("training") or {} for r in done]
    run = [round(r["epochs"], 2) if r.get("epochs") is not None else t.get("epochs") for r, t in zip(done, training, strict=True)]
    return {"steps": max((r.get("steps") or 0 for r in done), default=None),
            "epochs": sorted(set(run) - {None}),
            "batch_size": sorted({t.get("batch_size") for t in training} - {None}), "runs": len(done)}


def d90_record(model_spec, data_dir, record_paths, reference_paths, out_path, settings: dict,
               training, threads: int | None = None, reference_run_paths=()) -> dict[str, Any]:
    """The d90 stage: read the grid's records and full fine-tuning's test metrics, bisect
    when ``settings['refine']`` > 0 (runs under ``<out>/refine/d<d>/seed<s>/``), write d90.json.
    ``reference_run_paths``: the reference's finetune records, whose budget d90.json states
    beside the subspace runs' (a reference trained less than them makes d90 come out low)."""
    from .io import read_json, write_json

    records = [read_json(p) for p in record_paths]
    reference = [read_json(p) for p in reference_paths]
    budgets = {"subspace": training_budget(records),
               "reference": training_budget([read_json(p) for p in reference_run_paths])}
    out_dir = Path(out_path).parent

    def run_more(d: int) -> list[dict]:
        return [run_subspace(model_spec, data_dir, out_dir / "refine" / subspace_variant(d) / f"seed{s}",
                             d, s, training, said=settings["kind"] == "said",
                             projection=settings["projection"], projection_seed=settings["projection_seed"],
                             threads=threads, lr_reference_d=settings.get("lr_reference_d"),
                             normalisation=settings.get("normalisation", "per_tensor"))
                for s in settings["seeds"]]

    result = d90_stage(records, reference, settings["fraction"], settings["refine"], run_more)
    task = read_json(Path(data_dir) / "stats.json")["task"]["name"]
    record = {
        "schema_version": 1,
        "rule": "d90",
        "status": "completed",
        "run": {"model": model_spec.name, "task": task, "method": "intrinsic_dimension", "variant": "d90",
                "seed": "-"},
        "params": {"fraction": settings["fraction"], "reference": f"full/{settings['reference']}",
                   "kind": settings["kind"], "projection": settings["projection"], "refine": settings["refine"],
                   "normalisation": settings.get("normalisation", "per_tensor")},
        "budgets": budgets,
        **result,
    }
    write_json(out_path, record)
    return record
