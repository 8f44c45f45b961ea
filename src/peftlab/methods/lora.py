"""LoRA (Hu et al., 2021) through the ``peft`` library: W' = W + (alpha / r) B A.

Targets are architecture-neutral roles (``query``, ``value``...) resolved per model, so
the same variant file works on BERT (``query``), MPNet (``q``) and Llama (``q_proj``).
"""

from __future__ import annotations

from torch import nn

from ..method_configs.lora import LoraConfig
from ..models import head_module_names, resolve_targets
from . import register
from ._peft_common import peft_task_type
from .base import Method


@register
class Lora(Method):
    name = "lora"
    family = "weight"
    config_cls = LoraConfig
    mergeable = True
    description = "low-rank update of the target matrices (peft)"
    use_dora = False  # DoRA is this method with peft's weight decomposition switched on

    def apply(self, model: nn.Module) -> nn.Module:
        import peft

        cfg = self.config
        peft_config = peft.LoraConfig(
            task_type=peft_task_type(model),
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            use_dora=self.use_dora,
            target_modules=resolve_targets(model, cfg.targets, self.target_overrides),
            modules_to_save=head_module_names(model),
        )
        return peft.get_peft_model(model, peft_config)

    def merge(self, model: nn.Module) -> nn.Module:
        # W + (alpha / r) B A folded into W; peft unwraps the trained head copy as well
        return model.merge_and_unload()

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        # r (d_in + d_out) per target matrix, plus the (fully trained) head
        total = 0
        for name in resolve_targets(model, self.config.targets, self.target_overrides):
            lin = model.get_submodule(name)
            total += self.config.r * (lin.in_features + lin.out_features)
        return total + self.head_parameters(model)
