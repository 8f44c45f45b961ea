"""(IA)^3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
than In-Context Learning") through ``peft``.

Eq. in Sec. 3.3 of the paper: softmax(Q (l_k * K)^T / sqrt(d)) (l_v * V) and
(l_ff * gamma(W1 x)) W2 -- learned vectors rescale the key and value activations and the
input of the second feed-forward matrix; all start at 1, so training starts at the
pretrained model. In peft terms, ``ffn_out`` is a *feedforward* target (l scales its input,
one entry per input feature); the others scale their output (one entry per output feature).

Merge: diag(l) W, diag(l) b for output-scaled targets; W diag(l) (bias unchanged) for
feedforward ones. peft's ``merge_and_unload`` cannot unwrap composite heads (MPNet): then
``_peft_common.merge_by_hand`` folds with ``_fold`` below.
"""

from __future__ import annotations

import torch
from torch import nn

from ..method_configs.ia3 import IA3Config
from ..models import head_module_names, resolve_targets
from . import register
from ._peft_common import linear_layers, merge_peft_model, peft_task_type
from .base import Method


@torch.no_grad()
def _fold(layer: nn.Module, adapter: str) -> dict[str, torch.Tensor | None]:
    base = layer.get_base_layer()
    scale = layer.ia3_l[adapter]
    if layer.is_feedforward:  # scale (1, d_in) on the input: W diag(l), bias untouched
        return {"weight": base.weight * scale, "bias": base.bias}
    # scale (d_out, 1) on the output: diag(l) (W x + b)
    bias = None if base.bias is None else base.bias * scale.reshape(-1)
    return {"weight": base.weight * scale, "bias": bias}


@register
class IA3(Method):
    name = "ia3"
    family = "weight"  # grouped with the peft weight-based baselines (see DESIGN.md)
    config_cls = IA3Config
    mergeable = True
    description = "learned vectors rescaling keys, values and the FFN inner activations (peft)"

    def apply(self, model: nn.Module) -> nn.Module:
        import peft

        cfg = self.config
        ff = resolve_targets(model, cfg.feedforward, self.target_overrides) if cfg.feedforward else []
        peft_config = peft.IA3Config(
            task_type=peft_task_type(model),
            target_modules=resolve_targets(model, cfg.targets, self.target_overrides),
            feedforward_modules=ff,
            modules_to_save=head_module_names(model),
        )
        return peft.get_peft_model(model, peft_config)

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_peft_model(model, fold=_fold)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        # d_in per feedforward target, d_out per other target, plus the head
        cfg = self.config
        ff = {id(m) for m in linear_layers(model, cfg.feedforward, self.target_overrides)} if cfg.feedforward else set()
        total = sum(
            lin.in_features if id(lin) in ff else lin.out_features
            for lin in linear_layers(model, cfg.targets, self.target_overrides)
        )
        return total + self.head_parameters(model)
