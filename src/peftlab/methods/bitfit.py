"""BitFit (Ben Zaken et al., 2022): only the bias terms of the backbone (and the head) train.

The paper's models (BERT) have a bias on every linear layer. Decoders such as Llama have
none, so BitFit as written would train nothing there. ``missing_biases: add`` (the default)
gives every backbone ``nn.Linear`` without a bias a zero-initialised one, so the model still
computes the pretrained function at step 0 and BitFit trains one vector per linear layer;
``missing_biases: none`` keeps the paper's literal rule (and fails on a model with no bias
at all, where it would train nothing). For Llama-type models the added biases are what
``attention_bias`` / ``mlp_bias`` in the model's config switch on, so the trained model is
still a plain model of its architecture."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..method_configs.bitfit import BitFitConfig
from ..models import head_module_names
from . import register
from .base import Method


def _bias_parameters(model: nn.Module):
    return [(n, p) for n, p in model.named_parameters() if n.endswith(".bias") or n == "bias"]


def _linears_without_bias(model: nn.Module) -> list[nn.Linear]:
    """Backbone linear layers with no bias (the head and a causal LM's output layer excluded)."""
    heads = tuple(f"{h}." for h in head_module_names(model))
    out_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.bias is None and m is not out_layer and not n.startswith(heads)]


def _add_biases(model: nn.Module) -> None:
    for lin in _linears_without_bias(model):
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
    for flag in ("attention_bias", "mlp_bias"):  # Llama-type configs: the architecture now has them
        if hasattr(model.config, flag):
            setattr(model.config, flag, True)


@register
class BitFit(Method):
    name = "bitfit"
    family = "weight"
    mergeable = True  # the trained tensors are the base weights themselves
    config_cls = BitFitConfig
    description = "bias terms only"

    def apply(self, model: nn.Module) -> nn.Module:
        if self.config.missing_biases == "add":
            _add_biases(model)
        elif not _bias_parameters(model) and not (self.config.train_head and head_module_names(model)):
            raise ConfigError(f"method 'bitfit': model type '{getattr(model.config, 'model_type', '?')}' has no "
                              "bias terms, so BitFit would train nothing; set missing_biases: add")
        self.freeze(model)
        for _, p in _bias_parameters(model):
            p.requires_grad_(True)
        if self.config.train_head:
            self.unfreeze_head(model)
        return model

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        heads = tuple(f"{h}." for h in head_module_names(model)) if self.config.train_head else ()
        biases = sum(p.numel() for n, p in _bias_parameters(model) if not n.startswith(heads))
        if self.config.missing_biases == "add":
            biases += sum(lin.out_features for lin in _linears_without_bias(model))
        return biases + (self.head_parameters(model) if self.config.train_head else 0)
