"""VeRA (Kopiczko et al., 2024, "Vector-based Random Matrix Adaptation") through ``peft``.

Eq. (2) of the paper: h = W0 x + Lambda_b B Lambda_d A x. A (r x d_in) and B (d_out x r)
are frozen random matrices *shared by every adapted layer* (peft draws one pair of the largest
needed shape from ``projection_seed`` and slices it per layer); only the scaling vectors
train: lambda_d (r entries, init ``d_initial``) and lambda_b (d_out entries, init 0, so
training starts at the pretrained model).

Merge: W0 + Lambda_b B[:d_out] Lambda_d A[:, :d_in]. peft's ``merge_and_unload`` cannot unwrap
composite heads (MPNet): then ``_peft_common.merge_by_hand`` folds with ``_fold`` below.
Saved checkpoints hold the trainable vectors only; ``load`` re-applies the method, which
redraws the same A and B from ``projection_seed``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..method_configs.vera import VeraConfig
from ..models import head_module_names, resolve_targets
from . import register
from ._peft_common import linear_layers, merge_peft_model, peft_task_type
from .base import Method


@torch.no_grad()
def _fold(layer: nn.Module, adapter: str) -> dict[str, torch.Tensor | None]:
    base = layer.get_base_layer()
    a = layer.vera_A[adapter][:, : layer.in_features]
    b = layer.vera_B[adapter][: layer.out_features, :]
    lam_b = layer.vera_lambda_b[adapter].unsqueeze(-1)
    lam_d = layer.vera_lambda_d[adapter].unsqueeze(-1)
    return {"weight": base.weight + (lam_b * b) @ (lam_d * a), "bias": base.bias}


@register
class Vera(Method):
    name = "vera"
    family = "weight"
    config_cls = VeraConfig
    mergeable = True
    description = "frozen shared random low-rank pair, trained scaling vectors (peft)"

    def apply(self, model: nn.Module) -> nn.Module:
        import peft

        cfg = self.config
        peft_config = peft.VeraConfig(
            task_type=peft_task_type(model),
            r=cfg.r,
            d_initial=cfg.d_initial,
            vera_dropout=cfg.dropout,
            projection_prng_key=cfg.projection_seed,
            target_modules=resolve_targets(model, cfg.targets, self.target_overrides),
            modules_to_save=head_module_names(model),
        )
        return peft.get_peft_model(model, peft_config)

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_peft_model(model, fold=_fold)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        # lambda_d (r) + lambda_b (d_out) per target; the shared A, B are frozen; plus the head
        total = sum(
            self.config.r + lin.out_features
            for lin in linear_layers(model, self.config.targets, self.target_overrides)
        )
        return total + self.head_parameters(model)
