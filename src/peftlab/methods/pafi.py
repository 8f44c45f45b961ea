"""PaFi (Liao, Meng and Monz, 2023, "Parameter-Efficient Fine-Tuning without Introducing New
Latency", Sec. 3): sparse fine-tuning of the pretrained weights with the smallest magnitude.

theta = theta0 + scatter(I, delta) where I holds the entries with the smallest |W0|, chosen
once from the pretrained weights, before and independently of the task (no calibration).
The update mechanism is shared with SIFT (``_sparse.py``); only the mask differs.

``ranking``:
* ``per_matrix`` (default): k = round(rate * numel) smallest entries of every target matrix;
* ``global``: the round(rate * sum of numel) smallest entries over all target matrices ranked
  together, so matrices with many small weights get more; the per-matrix counts then differ
  (``Pafi.selection`` after ``apply``, and the saved file's ``counts`` metadata).
"""

from __future__ import annotations

import torch
from torch import nn

from ..method_configs.pafi import PafiConfig
from . import register
from ._sparse import SparseUpdateMethod


@register
class Pafi(SparseUpdateMethod):
    name = "pafi"
    config_cls = PafiConfig
    description = "sparse update of the smallest-magnitude pretrained entries (task-agnostic)"
    select_largest = False

    def compute_masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.select({n: model.get_submodule(n).weight.detach().abs() for n in self.target_names(model)})
