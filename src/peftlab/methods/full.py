"""Full fine-tuning: every weight of the pretrained model and the head trains."""

from __future__ import annotations

from torch import nn

from ..models import count_parameters
from . import register
from .base import Method, MethodConfig


@register
class FullFineTuning(Method):
    name = "full"
    family = "full"
    mergeable = True  # the trained tensors are the base weights themselves
    config_cls = MethodConfig
    description = "all weights train (the reference every PEFT method is measured against)"

    def apply(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        return count_parameters(model)
