"""Memory for large models: the frozen base in bf16 and gradient checkpointing.

``training.base_dtype`` decides the dtype the frozen base weights load in:

- ``auto`` (the default): bf16 on a CUDA GPU that supports it, for every method but full
  fine-tuning; fp32 on a CPU, where runs stay bitwise reproducible;
- ``bf16`` / ``fp32``: that dtype on any device.

The model loads in fp32 and the method is calibrated and applied there, so what trains
starts from the exact pretrained values and a gradient-selected mask does not depend on the
base's dtype; then the frozen weights are cast (``cast_frozen``). What trains, the
normalization layers and the optimizer's state stay fp32. Full fine-tuning, where every
weight trains, keeps fp32 master weights: its base is always fp32, as is the
intrinsic-dimension analysis's (its update moves every weight). A bf16 base halves the frozen
weights' memory on the device (LLaMA-7B: 13.5 GB instead of 27 GB; the host holds the fp32
model while it loads) and its forward runs under bf16 autocast.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


FP32_FAMILIES = ("full", "analysis")  # every base weight trains


def base_dtype(setting: str, family: str, dev: torch.device) -> torch.dtype:
    """The dtype the frozen base of a method of ``family`` loads in (``training.base_dtype``;
    see the module's text)."""
    if family in FP32_FAMILIES:
        return torch.float32
    if setting == "auto":
        return torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return _DTYPES[setting]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def is_norm(module: nn.Module) -> bool:
    """A normalization layer (LayerNorm, RMSNorm...): kept in fp32 under a bf16 base."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("Norm")


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast the frozen parameters of ``model`` to ``dtype``, except those of normalization
    layers, which stay fp32 (small, and a norm with a trainable bias, as BitFit's, must not mix
    dtypes); what trains stays fp32. Returns how many tensors were cast."""
    if dtype == torch.float32:
        return 0
    keep = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    cast = 0
    for p in model.parameters():
        if not p.requires_grad and id(p) not in keep and p.is_floating_point():
            p.data = p.data.to(dtype)
            cast += 1
    return cast


def frozen_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the frozen base: bf16 when any frozen weight is (``cast_frozen``), else fp32."""
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    return torch.bfloat16 if torch.bfloat16 in frozen else torch.float32


def enable_gradient_checkpointing(model: nn.Module) -> bool:
    """Recompute each layer's activations in the backward pass (non-reentrant, so frozen
    embeddings and a method's hooks need no special handling). False when the model under
    ``model`` (a peft wrapper or not) does not support it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        log.warning("%s does not support gradient checkpointing: training without it", type(base).__name__)
        return False
    enable = getattr(base, "activation_checkpointing_enable", None)  # its name from transformers 5.x on
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return True


def checkpointing_on(model: nn.Module) -> bool:
    """Whether any layer of ``model`` recomputes its activations in the backward pass."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
