"""SIFT (Song et al., 2024, "Sparse is Enough in Fine-tuning Pre-trained LLMs").

theta = theta0 + scatter(I, delta) (the paper's Eq. 2 with a fixed support): per target
matrix, I holds the k = round(rate * numel) entries with the largest gradient magnitude at the
pretrained point, measured over ``calibration_batches`` training batches; only delta trains.
The update mechanism is shared with PaFi (``_sparse.py``).

Score accumulated over the calibration batches b (``accumulate``):
* ``abs`` (default): s = sum_b |dL_b/dW|. SIFT's quasi-sparsity claim is about the
  magnitude of the per-batch gradient, and the optimizer follows per-batch gradients; the
  sum of magnitudes estimates E|g|, so entries that are large on many batches win and a few
  batches of opposite sign cannot cancel an entry out of the mask.
* ``signed``: s = |sum_b dL_b/dW|, the magnitude of the gradient of the loss over all
  calibration examples (a large-batch gradient), for comparison.

Not repeated from the reference code: selection from a single batch (here any number), an
index layout that breaks on current torch (here explicit flat indices, tested against a
brute-force top-k), and updates landing one step late (here the next forward sees them).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import ConfigError, TrainingError
from ..method_configs.sift import SiftConfig
from . import register
from ._sparse import SparseUpdateMethod, read_mask_file, weight_gradients

log = logging.getLogger(__name__)




@register
class Sift(SparseUpdateMethod):
    name = "sift"
    config_cls = SiftConfig
    description = "sparse update of the entries with the largest calibration gradients"
    needs_calibration = True
    select_largest = True
    calibration_batches_used: int | None = None  # set by calibrate (fewer when the split is small)

    def calibrate(self, model: nn.Module, batches) -> None:
        """Choose the index sets from gradients at the pretrained point; ``model`` is not changed.

        Gradients are taken in eval mode (no dropout: the mask reflects the loss at theta0,
        not dropout noise) with ``torch.autograd.grad``, so no ``.grad`` is left behind and
        every ``requires_grad`` flag is restored.
        """
        cfg = self.config
        if cfg.mask_source in ("file", "analysis"):
            self.masks = self._masks_from_file(model)
            return
        names = self.target_names(model)
        if cfg.mask_source == "random":
            self.masks = self.random_masks(model)
            return
        scores = [torch.zeros_like(model.get_submodule(n).weight, dtype=torch.float32) for n in names]

        def check_loss(loss, _):
            if loss is None:
                raise TrainingError("sift calibration: the model returned no loss (batches need labels)")

        used = 0
        for grads in weight_gradients(model, names, batches, cfg.calibration_batches, check_loss):
            for score, grad in zip(scores, grads, strict=True):
                if grad is not None:
                    score.add_(grad.abs() if cfg.accumulate == "abs" else grad.float())
            used += 1
        if used == 0:
            raise TrainingError("sift calibration got no batches: the training split is empty")
        if used < cfg.calibration_batches:
            log.warning("sift: only %d of %d calibration batches available", used, cfg.calibration_batches)
        if cfg.accumulate == "signed":
            scores = [s.abs() for s in scores]
        self.calibration_batches_used = used
        self.masks = self.select(dict(zip(names, scores, strict=True)))

    def _masks_from_file(self, model: nn.Module) -> dict[str, torch.Tensor]:
        path = self.config.mask_path
        if not path:
            raise ConfigError("sift with mask_source 'analysis' reads the gradient-sparsity stage's masks: "
                              "run it through the pipeline (which sets mask_path) or use mask_source 'file'")
        masks = read_mask_file(path)
        self.check_masks(model, masks, path)
        return masks

    def random_masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Uniformly random index sets with the same counts as the gradient-selected ones."""
        gen = torch.Generator().manual_seed(self.config.mask_seed)
        names = self.target_names(model)
        scores = {n: torch.rand(model.get_submodule(n).weight.shape, generator=gen) for n in names}
        return self.select(scores)

    def compute_masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.config.mask_source == "random":
            return self.random_masks(model)
        if self.config.mask_source in ("file", "analysis"):
            return self._masks_from_file(model)
        raise ConfigError("sift needs calibrate(model, batches) before apply: its mask comes from gradients")
