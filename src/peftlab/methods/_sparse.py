"""The sparse update shared by SIFT and PaFi: theta = theta0 + scatter(I, delta).

For every target matrix W0 (d_out x d_in) a FIXED set I of k flat indices is chosen before
training (by the method: gradient magnitude for SIFT, smallest |W0| for PaFi) and a vector
delta of size k, initialised to 0, is the only thing that trains. The forward uses
W = W0 + scatter(I, delta) (SIFT, Song et al. 2024, Eq. 2 restricted to a fixed support; PaFi,
Liao et al. 2023, Sec. 3), so:

* W0 stays frozen (``requires_grad`` False): no dense ``.grad`` and no AdamW state is ever
  kept for a target matrix; the optimizer holds O(k) state per matrix. (Autograd forms the
  dense dL/dW of the effective weight transiently inside backward and gathers k entries.)
* an optimizer step on delta changes the very next forward: no deferred update, unlike the
  SIFT reference code, which applies each step's sparse update one step late;
* merging writes W0 + scatter(I, delta) into a plain ``nn.Linear``: exact, zero latency.

Stored state (``trainable_state``/``save``): per target ``<module>.sparse_index`` (int64 flat
indices into W0, sorted) and ``<module>.sparse_delta``, plus the head. ``load`` rebuilds the
sparse modules from the stored indices, so it never recalibrates.

This module registers no method (its name starts with ``_``): ``sift.py`` and ``pafi.py`` do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..generation import loss_of
from ..method_configs._sparse import SparseConfig
from ..models import resolve_targets
from .base import Method, set_submodule

INDEX_SUFFIX = ".sparse_index"
DELTA_SUFFIX = ".sparse_delta"


class SparseDeltaLinear(nn.Module):
    """y = x (W0 + scatter(I, delta))^T + b with W0 and b frozen and only delta trainable.

    Keeps the wrapped linear's ``weight`` and ``bias`` under their own names (so state-dict
    keys of the base model are unchanged) and adds ``sparse_index`` (buffer, int64 flat
    indices into ``weight``) and ``sparse_delta`` (parameter, same dtype as ``weight``).
    """

    def __init__(self, linear: nn.Linear, index: torch.Tensor):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.register_parameter("bias", linear.bias)
        w = self.weight
        self.register_buffer("sparse_index", index.to(device=w.device, dtype=torch.long).contiguous())
        self.sparse_delta = nn.Parameter(torch.zeros(index.numel(), dtype=w.dtype, device=w.device))

    def merged_weight(self) -> torch.Tensor:
        # theta = theta0 + scatter(I, delta): a new tensor every call, so gradients reach
        # delta only and W0 is never written
        # (a bf16 base: the fp32 delta is added in the base's dtype, as autocast would compute)
        flat = self.weight.reshape(-1).index_put((self.sparse_index,), self.sparse_delta.to(self.weight.dtype),
                                                 accumulate=True)
        return flat.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.merged_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, k={self.sparse_index.numel()}")


def sparse_modules(model: nn.Module) -> dict[str, SparseDeltaLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}


def weight_gradients(model: nn.Module, names: list[str], batches, limit: int, check_loss=None):
    """Yield, for up to ``limit`` batches, the loss's gradients with respect to the weights of
    the named modules (None where unused), taken in eval mode (no dropout) with
    ``torch.autograd.grad``: no ``.grad`` is left behind, and every ``requires_grad`` flag and
    the train/eval mode are restored when the generator ends. ``check_loss(loss, i)`` may
    raise before batch i's gradients are taken."""
    weights = [model.get_submodule(n).weight for n in names]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        used = 0
        for batch in batches:
            if used >= limit:
                break
            loss = loss_of(model, batch)
            if check_loss is not None:
                check_loss(loss, used)
            yield torch.autograd.grad(loss, weights, allow_unused=True)
            used += 1
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def sparse_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Module name -> its (sorted, int64, CPU) flat index set, read from an applied model."""
    return {n: m.sparse_index.detach().cpu().clone() for n, m in sparse_modules(model).items()}


def entry_count(rate: float, numel: int) -> int:
    """k = round(rate * numel) (Python's round: ties to even)."""
    return int(round(rate * numel))


def select_indices(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Sorted flat indices of the ``k`` largest (or smallest) ``scores``.

    Ties at the threshold go to the lower flat index, so the choice is the same on every
    device (``torch.topk`` leaves ties unspecified, and dequantized weights tie a lot).
    """
    s = scores.detach().reshape(-1).float().cpu()  # ranked on CPU: the same answer on every device
    n = s.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    if k >= n:
        if torch.isnan(s).any():
            raise ValueError("cannot rank entries: the scores contain NaN")
        return torch.arange(n, dtype=torch.long)
    if not largest:
        s = -s
    values, index = torch.topk(s, k, sorted=False)
    if torch.isnan(values).any():  # topk ranks NaN above everything, so any NaN shows up here
        raise ValueError("cannot rank entries: the scores contain NaN")
    threshold = values.min()  # the k-th largest score
    if int((values == threshold).sum()) == int((s == threshold).sum()):
        return index.sort().values  # every entry tied with the k-th one is in: no choice to make
    above = index[values > threshold]
    tied = (s == threshold).nonzero().flatten()[: k - above.numel()]
    return torch.cat([above, tied]).sort().values


class SparseUpdateMethod(Method):
    """Base of the sparse methods: subclasses say how the index sets are chosen."""

    family = "sparse"
    mergeable = True
    config_cls = SparseConfig
    # the entries to train are the highest scores (SIFT: gradient) or the lowest (PaFi: |W0|)
    select_largest: bool = True

    def __init__(self, config: SparseConfig, target_overrides: dict[str, str] | None = None):
        super().__init__(config, target_overrides)
        self.masks: dict[str, torch.Tensor] | None = None  # set by calibrate / a mask file
        self.selection: dict[str, int] = {}  # module -> k of the last apply (for the record)

    # -- selection --------------------------------------------------------------------------
    def target_names(self, model: nn.Module) -> list[str]:
        return resolve_targets(model, self.config.targets, self.target_overrides)

    def compute_masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The index sets for ``model`` when none were given (subclasses)."""
        raise NotImplementedError

    def select(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-matrix or global ranking of ``scores`` (module -> score tensor shaped like W0)."""
        rate = self.config.rate
        if self.config.ranking == "per_matrix":
            return {n: select_indices(s, entry_count(rate, s.numel()), self.select_largest)
                    for n, s in scores.items()}
        names = sorted(scores)
        sizes = [scores[n].numel() for n in names]
        flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names])
        chosen = select_indices(flat, entry_count(rate, flat.numel()), self.select_largest)
        masks, start = {}, 0
        for name, size in zip(names, sizes, strict=True):
            lo, hi = torch.searchsorted(chosen, torch.tensor([start, start + size])).tolist()
            masks[name] = chosen[lo:hi] - start
            start += size
        return masks

    def check_masks(self, model: nn.Module, masks: dict[str, torch.Tensor], source: str) -> None:
        """Index sets must fit the targets of ``model`` and the closed-form count of the config."""
        targets = {n: model.get_submodule(n).weight.numel() for n in self.target_names(model)}
        unknown = sorted(set(masks) - set(targets))
        if unknown:
            raise ConfigError(f"{self.name}: masks from {source} name modules that are not targets: {unknown[:3]}")
        for name, idx in masks.items():
            if idx.dtype != torch.long or idx.ndim != 1:
                raise ConfigError(f"{self.name}: mask of {name} from {source} is not a 1-D int64 tensor")
            if idx.numel() and (idx[0] < 0 or idx[-1] >= targets[name] or not bool((idx[1:] > idx[:-1]).all())):
                raise ConfigError(f"{self.name}: mask of {name} from {source} is not sorted, unique and in range")
        rate = self.config.rate
        if self.config.ranking == "per_matrix":
            for n, size in targets.items():
                have, want = (masks[n].numel() if n in masks else 0), entry_count(rate, size)
                if have != want:
                    raise ConfigError(f"{self.name}: mask of {n} from {source} has {have} entries but rate "
                                      f"{rate} gives {want}: recompute the masks for this config")
        else:
            have = sum(m.numel() for m in masks.values())
            want = entry_count(rate, sum(targets.values()))
            if have != want:
                raise ConfigError(f"{self.name}: masks from {source} hold {have} entries but global rate "
                                  f"{rate} gives {want}: recompute the masks for this config")

    # -- the protocol -----------------------------------------------------------------------
    def expected_trainable_parameters(self, model: nn.Module) -> int:
        # sum_W round(rate * numel(W)) per matrix, or round(rate * sum_W numel(W)) globally,
        # plus the (fully trained) head
        sizes = [model.get_submodule(n).weight.numel() for n in self.target_names(model)]
        rate = self.config.rate
        if self.config.ranking == "per_matrix":
            sparse = sum(entry_count(rate, s) for s in sizes)
        else:
            sparse = entry_count(rate, sum(sizes))
        return sparse + self.head_parameters(model)

    def apply(self, model: nn.Module) -> nn.Module:
        self._check_fresh(model)
        masks = self.masks if self.masks is not None else self.compute_masks(model)
        return self.apply_masks(model, masks, source="calibration" if self.masks is not None else "selection")

    def _check_fresh(self, model: nn.Module) -> None:
        if sparse_modules(model):
            raise ConfigError(f"{self.name}: the model already carries sparse updates; apply to a fresh model")

    def apply_masks(self, model: nn.Module, masks: dict[str, torch.Tensor], source: str) -> nn.Module:
        self._check_fresh(model)
        self.check_masks(model, masks, source)
        self.freeze(model)
        for name, idx in sorted(masks.items()):
            if idx.numel() == 0:  # global ranking may give a matrix nothing to train
                continue
            set_submodule(model, name, SparseDeltaLinear(model.get_submodule(name), idx))
        self.unfreeze_head(model)
        self.selection = {n: int(m.numel()) for n, m in sorted(masks.items())}
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        # W0 + scatter(I, delta) written into plain nn.Linear modules: the same tensor the
        # sparse forward builds, so the merged model computes the same function
        for name, mod in sparse_modules(model).items():
            with torch.no_grad():
                weight = mod.merged_weight().detach().clone()
            plain = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            plain.weight = nn.Parameter(weight, requires_grad=False)
            if mod.bias is not None:
                plain.bias = mod.bias
            set_submodule(model, name, plain)
        return model

    # -- persistence ------------------------------------------------------------------------
    def trainable_state(self, model: nn.Module) -> dict[str, Any]:
        state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        for name, mod in sparse_modules(model).items():
            state[f"{name}{INDEX_SUFFIX}"] = mod.sparse_index.detach().cpu().clone()
        return state

    def save(self, model: nn.Module, path: str | Path) -> None:
        from safetensors.torch import save_file

        from ..io import atomic_path

        state = {k: v.contiguous() for k, v in self.trainable_state(model).items()}
        counts = {n: int(m.sparse_index.numel()) for n, m in sparse_modules(model).items()}
        metadata = {"method": self.name, "config": json.dumps(self.config.to_dict()),
                    "counts": json.dumps(counts)}
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(state, str(tmp), metadata=metadata)

    def load(self, model: nn.Module, path: str | Path) -> nn.Module:
        """Rebuild the sparse modules of a fresh base ``model`` from the stored index sets."""
        from safetensors.torch import load_file

        state = load_file(str(path))
        masks = {k[: -len(INDEX_SUFFIX)]: v for k, v in state.items() if k.endswith(INDEX_SUFFIX)}
        model = self.apply_masks(model, masks, source=str(path))
        expected = set(self.trainable_state(model))
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ConfigError(
                f"stored weights at {path} do not fit method '{self.name}' with this config "
                f"(missing {missing[:3]}, unexpected {extra[:3]}); rerun its finetune job"
            )
        model.load_state_dict(state, strict=False)
        return model


def read_mask_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Index sets from a safetensors file with keys ``<module>.sparse_index`` (int64 flat indices)."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ConfigError(f"mask file {path} does not exist: run the gradient-sparsity stage or fix mask_path")
    state = load_file(str(path))
    masks = {k[: -len(INDEX_SUFFIX)]: v.to(torch.long) for k, v in state.items() if k.endswith(INDEX_SUFFIX)}
    if not masks:
        raise ConfigError(f"mask file {path} holds no '<module>{INDEX_SUFFIX}' tensors")
    return masks
