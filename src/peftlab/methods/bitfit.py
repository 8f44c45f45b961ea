"""BitFit (Ben Zaken et al., 2022): only the bias terms of the backbone (and the head) train."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from . import register
from .base import Method, MethodConfig


@dataclass
class BitFitConfig(MethodConfig):
    train_head: bool = True  # the task head is new, so it trains unless asked otherwise

    def __post_init__(self):
        if not isinstance(self.train_head, bool):
            raise ValueError(f"train_head must be true or false, got {self.train_head!r}")


def _bias_parameters(model: nn.Module):
    return [(n, p) for n, p in model.named_parameters() if n.endswith(".bias") or n == "bias"]


@register
class BitFit(Method):
    name = "bitfit"
    family = "weight"
    mergeable = True  # the trained tensors are the base weights themselves
    config_cls = BitFitConfig
    description = "bias terms only"

    def apply(self, model: nn.Module) -> nn.Module:
        self.freeze(model)
        for _, p in _bias_parameters(model):
            p.requires_grad_(True)
        if self.config.train_head:
            self.unfreeze_head(model)
        return model

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        from ..models import head_module_names

        heads = tuple(f"{h}." for h in head_module_names(model)) if self.config.train_head else ()
        biases = sum(p.numel() for n, p in _bias_parameters(model) if not n.startswith(heads))
        return biases + (self.head_parameters(model) if self.config.train_head else 0)
