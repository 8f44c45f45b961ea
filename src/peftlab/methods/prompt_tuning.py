"""Prompt tuning (Lester et al., 2021) through ``peft``.

Sec. 2 of the paper: the input becomes [P_e; X_e], a trained matrix P_e of
``num_virtual_tokens`` x hidden "soft prompt" embeddings concatenated before the frozen word
embeddings X_e of the text; the backbone stays frozen (the task head trains as well here).
peft prepends the prompt, extends the attention mask with ones and the token type ids with 0.

Last-token pooling on decoders (Llama, Mistral, Qwen: transformers'
``GenericForSequenceClassification``): the classifier pools the rightmost non-pad token, which
it finds from ``input_ids``; peft passes ``inputs_embeds`` instead, so transformers falls
back to the *last position*, a pad token for every shorter row of a right-padded batch (the
limitation discussed in transformers issue #16372). ``_pool_last_attended`` fixes this
without touching peft's prompt logic: a forward hook on the backbone moves the hidden state of
the rightmost attended position (from the prompt-extended attention mask peft passes down)
into the last position, which is what transformers then pools. Encoders pool position 0 and
mask the padding, so they need nothing.

Not mergeable: the prompt lengthens every input (report its latency).
"""

from __future__ import annotations

import torch
from torch import nn

from ..method_configs.prompt_tuning import PromptTuningConfig
from ..models import head_module_names
from . import register
from ._peft_common import peft_task_type
from .base import Method


def pools_last_token(model: nn.Module) -> bool:
    """True for classifiers that pool the last non-pad token found from ``input_ids``."""
    from transformers.modeling_layers import GenericForSequenceClassification

    return isinstance(model, GenericForSequenceClassification)


def _pool_last_attended(module: nn.Module, args, kwargs, output):
    """Forward hook on the backbone: last position <- rightmost attended position."""
    input_ids = args[0] if args else kwargs.get("input_ids")
    mask = kwargs.get("attention_mask")
    if input_ids is not None or mask is None or mask.dim() != 2:
        return None  # transformers finds the token itself, or there is no padding to skip
    hidden = output[0]
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = (positions * (mask != 0)).argmax(-1).to(hidden.device)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    hidden = torch.cat([hidden[:, :-1], hidden[rows, last].unsqueeze(1)], dim=1)
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    output.last_hidden_state = hidden
    return output


@register
class PromptTuning(Method):
    name = "prompt_tuning"
    family = "weight"  # grouped with the peft weight-based baselines (see DESIGN.md)
    config_cls = PromptTuningConfig
    mergeable = False
    description = "trained soft prompt prepended to the input embeddings (peft)"

    def apply(self, model: nn.Module) -> nn.Module:
        import peft

        cfg = self.config
        extra = {}
        if cfg.init == "text":
            extra = {"prompt_tuning_init_text": cfg.init_text,
                     "tokenizer_name_or_path": model.config.name_or_path}
        peft_config = peft.PromptTuningConfig(
            task_type=peft_task_type(model),
            num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init=cfg.init.upper(),
            modules_to_save=head_module_names(model),
            **extra,
        )
        peft_model = peft.get_peft_model(model, peft_config)
        if pools_last_token(model):
            backbone = getattr(model, model.base_model_prefix)
            backbone.register_forward_hook(_pool_last_attended, with_kwargs=True)
        return peft_model

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        # num_virtual_tokens x embedding width, plus the head
        width = model.get_input_embeddings().embedding_dim
        return self.config.num_virtual_tokens * width + self.head_parameters(model)
