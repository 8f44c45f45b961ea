"""Helpers shared by the ``peft``-backed methods (DoRA, IA3, VeRA, prompt tuning).

Not a method itself (the leading underscore keeps the registry from importing it as one).

* ``peft_task_type``: ``CAUSAL_LM`` for generative tasks, ``SEQ_CLS`` for classifiers;
* ``linear_layers``: the resolved target ``nn.Linear`` modules of an unmodified model, for the
  closed-form trainable counts;
* ``merge_peft_model``: peft's ``merge_and_unload`` where it works, otherwise a merge by hand.
  peft 0.21's generic unload (IA3, VeRA...) copies ``.weight`` from every
  ``ModulesToSaveWrapper`` onto the unwrapped module, so it raises ``AttributeError`` when the
  trained head is a composite module without a ``weight`` (MPNet's ``MPNetClassificationHead``,
  RoBERTa's ``RobertaClassificationHead``); the model is then left half-unloaded. We decide
  *before* calling it, and otherwise fold the update into a fresh plain model ourselves.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ..models import resolve_targets

# fold(tuner_layer, adapter_name) -> the merged state of the wrapped base layer ({"weight", "bias"})
Fold = Callable[[nn.Module, str], dict[str, torch.Tensor | None]]


def peft_task_type(model: nn.Module):
    """peft's task type for the loaded model: a causal LM (generative tasks; no head to save)
    or a sequence classifier."""
    import peft

    return peft.TaskType.CAUSAL_LM if getattr(model, "peftlab_causal_lm", False) else peft.TaskType.SEQ_CLS


def linear_layers(model: nn.Module, roles, overrides: dict[str, str] | None) -> list[nn.Linear]:
    """The target linear modules (sorted by name) of the *unmodified* model."""
    return [model.get_submodule(n) for n in resolve_targets(model, list(roles), overrides)]


def _wrappers():
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    return BaseTunerLayer, ModulesToSaveWrapper


def peft_merge_supported(model: nn.Module) -> bool:
    """True when peft's generic ``merge_and_unload`` can unwrap every trained head copy.

    It assigns ``head.weight`` (and ``head.bias``) from the wrapper to the unwrapped module,
    which only exists on leaf heads such as BERT's or Llama's ``nn.Linear``.
    """
    _, wrapper_cls = _wrappers()
    adapter = model.active_adapter
    return all(
        hasattr(m.modules_to_save[adapter], "weight")
        for m in model.modules()
        if isinstance(m, wrapper_cls)
    )


def assert_plain(model: nn.Module) -> nn.Module:
    """Raise unless ``model`` holds no peft tuner layer or head wrapper any more."""
    tuner_cls, wrapper_cls = _wrappers()
    left = [n for n, m in model.named_modules() if isinstance(m, (tuner_cls, wrapper_cls))]
    if left:
        raise RuntimeError(f"merge left peft wrappers in the model: {left[:3]}")
    return model


@torch.no_grad()
def merge_by_hand(model: nn.Module, fold: Fold) -> nn.Module:
    """A fresh plain base-architecture model holding the folded weights and the trained head.

    Every tuner layer's base weight is replaced by ``fold(layer)``; every trained head copy
    (``ModulesToSaveWrapper``) contributes its trained module; all other tensors are the
    pretrained ones. The plain model is loaded with ``strict=True``, so a tensor that was not
    accounted for is an error rather than a silently random weight.
    """
    tuner_cls, wrapper_cls = _wrappers()
    inner = model.get_base_model()
    adapter = model.active_adapter
    sources: dict[str, dict[str, torch.Tensor | None]] = {}
    for name, module in inner.named_modules():
        if isinstance(module, tuner_cls):
            sources[name] = fold(module, adapter)
        elif isinstance(module, wrapper_cls):
            sources[name] = dict(module.modules_to_save[adapter].state_dict())
    current = inner.state_dict()
    param = next(inner.parameters())
    plain = type(inner)(copy.deepcopy(inner.config)).to(device=param.device, dtype=param.dtype)
    state = {}
    for key in plain.state_dict():
        prefixes = [p for p in sources if key.startswith(p + ".")]
        if prefixes:
            prefix = max(prefixes, key=len)
            value = sources[prefix][key[len(prefix) + 1:]]
        else:
            value = current[key]
        state[key] = value.detach().clone()
    plain.load_state_dict(state, strict=True)
    plain.train(inner.training)
    return plain


def merge_peft_model(model: nn.Module, fold: Fold | None) -> nn.Module:
    """peft's ``merge_and_unload`` where it supports the head, else ``merge_by_hand(fold)``."""
    if fold is None or peft_merge_supported(model):
        return assert_plain(model.merge_and_unload())
    return assert_plain(merge_by_hand(model, fold))
