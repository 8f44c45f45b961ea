"""DoRA (Liu et al., 2024) through ``peft`` (``LoraConfig(use_dora=True)``).

Eq. (5) of the paper: W' = m * (W0 + B A) / ||W0 + B A||_c, the pretrained weight
decomposed into a magnitude vector m (one entry per output unit, initialised to the row norms
of W0) and a direction updated by a LoRA pair (B A scaled by alpha / r, B = 0 at init).
peft keeps the norm out of the gradient graph as the paper's Sec. 4.3 recommends.
"""

from __future__ import annotations

from torch import nn

from ..method_configs.dora import DoraConfig
from . import register
from ._peft_common import linear_layers, merge_peft_model
from .lora import Lora


@register
class Dora(Lora):
    name = "dora"
    config_cls = DoraConfig
    description = "weight-decomposed low-rank update: trained magnitude + LoRA direction (peft)"
    use_dora = True

    def merge(self, model: nn.Module) -> nn.Module:
        # peft folds m * (W0 + s B A) / ||W0 + s B A|| into W0 and unwraps the trained head
        # on every architecture (its LoRA unload handles composite heads)
        return merge_peft_model(model, fold=None)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        # per target: LoRA A (r x d_in) + B (d_out x r) + magnitude m (d_out); plus the head
        total = sum(
            self.config.r * (lin.in_features + lin.out_features) + lin.out_features
            for lin in linear_layers(model, self.config.targets, self.target_overrides)
        )
        return total + self.head_parameters(model)
