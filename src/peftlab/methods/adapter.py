"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021), hand-written.

In: a pretrained classifier. Out: the same model, frozen, with a small residual bottleneck
after chosen sublayer outputs (Houlsby et al., Section 2.1 / Figure 2):

    a(x) = x + W_up f(W_down x + b_down) + b_up,   W_down: m x d,  W_up: d x m

W_up and b_up start at zero, so before training the model computes exactly the pretrained
function. Placement:
* ``houlsby``: after the attention output projection and after the FFN output projection of
  every block (two adapters per block);
* ``pfeiffer``: after the FFN output projection only (one adapter per block).

The adapter acts on the sublayer's projection output, before its residual add and LayerNorm
(BERT/MPNet: ``LayerNorm(dropout(a(dense(x))) + residual)``; Llama: ``residual +
a(o_proj(x))`` and ``residual + a(down_proj(x))``). The projections are found through the
architecture-neutral roles ``attn_output`` / ``ffn_out`` (``resolve_targets``), so no module
name is hard-coded. Each adapter is a child of its projection (``<proj>.adapter.{down,up}``)
applied by a forward hook: base tensor names stay unchanged. The nonlinearity makes the
update input-dependent, so it cannot be folded into the weights (not mergeable).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..method_configs.adapter import NONLINEARITIES as NONLINEARITY_NAMES
from ..method_configs.adapter import PLACEMENTS, AdapterConfig
from ..models import resolve_targets
from . import register
from .base import Method

NONLINEARITIES = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "swish": nn.SiLU}
assert sorted(NONLINEARITIES) == list(NONLINEARITY_NAMES), "method_configs.adapter lists other activations"


class BottleneckAdapter(nn.Module):
    """x -> x + up(f(down(x))); ``up`` is zero at init (identity map)."""

    def __init__(self, d: int, m: int, nonlinearity: str, dtype=None, device=None):
        super().__init__()
        self.down = nn.Linear(d, m, dtype=dtype, device=device)  # default (Kaiming-uniform) init
        self.act = NONLINEARITIES[nonlinearity]()
        self.up = nn.Linear(m, d, dtype=dtype, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the projection the adapter follows."""
        return self(output)


@register
class Adapter(Method):
    name = "adapter"
    family = "weight"
    config_cls = AdapterConfig
    mergeable = False  # nonlinear bottleneck: adds a little inference latency
    description = "bottleneck adapters after the attention/FFN outputs (Houlsby, Pfeiffer)"

    def _targets(self, model: nn.Module) -> list[str]:
        return resolve_targets(model, PLACEMENTS[self.config.placement], self.target_overrides)

    def _sizes(self, model: nn.Module, name: str) -> tuple[int, int]:
        d = model.get_submodule(name).out_features
        m = self.config.bottleneck_size(d)
        return d, m

    def apply(self, model: nn.Module) -> nn.Module:
        if any(isinstance(m, BottleneckAdapter) for m in model.modules()):
            raise ConfigError("method 'adapter' applied twice to the same model")
        self.freeze(model)
        for name in self._targets(model):
            proj = model.get_submodule(name)
            d, m = self._sizes(model, name)
            adapter = BottleneckAdapter(
                d, m, self.config.nonlinearity, dtype=proj.weight.dtype, device=proj.weight.device
            )
            proj.add_module("adapter", adapter)
            proj.register_forward_hook(adapter.hook)
        self.unfreeze_head(model)
        return model

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        # per adapter: down (m d + m) + up (d m + d) = 2 d m + m + d; + head
        total = 0
        for name in self._targets(model):
            d, m = self._sizes(model, name)
            total += 2 * d * m + m + d
        return total + self.head_parameters(model)
