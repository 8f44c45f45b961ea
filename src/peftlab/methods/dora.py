"""DoRA (Liu et al., 2024) through ``peft`` (``LoraConfig(use_dora=True)``).

Eq. (5) of the paper: W' = m * (W0 + B A) / ||W0 + B A||_c, the pretrained weight
decomposed into a magnitude vector m (one entry per output unit, initialised to the row norms
of W0) and a direction updated by a LoRA pair (B A scaled by alpha / r, B = 0 at init).
peft keeps the norm out of the gradient graph as the paper's Sec. 4.3 recommends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..models import head_module_names, resolve_targets
from . import register
from ._peft_common import check_positive_int, check_roles, linear_layers, merge_peft_model
from .base import Method, MethodConfig


@dataclass
class DoraConfig(MethodConfig):
    r: int = 8
    alpha: float = 16
    dropout: float = 0.1
    targets: list[str] = field(default_factory=lambda: ["query", "value"])

    def __post_init__(self):
        check_positive_int("r", self.r)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        check_roles("targets", self.targets)


@register
class Dora(Method):
    name = "dora"
    family = "weight"
    config_cls = DoraConfig
    mergeable = True
    description = "weight-decomposed low-rank update: trained magnitude + LoRA direction (peft)"

    def apply(self, model: nn.Module) -> nn.Module:
        import peft

        cfg = self.config
        peft_config = peft.LoraConfig(
            task_type=peft.TaskType.SEQ_CLS,
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            use_dora=True,
            target_modules=resolve_targets(model, cfg.targets, self.target_overrides),
            modules_to_save=head_module_names(model),
        )
        return peft.get_peft_model(model, peft_config)

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
