"""HiWi (Liao, Meng & Monz, "Parameter-Efficient Fine-Tuning without Introducing New Latency",
ACL 2023, arXiv 2305.16742): an adapter applied to the pretrained *weights*, not to the activations.

A classic adapter maps a hidden state h to h + f(h U) V. HiWi feeds the frozen pretrained
parameters of the feed-forward block to such an adapter instead, and adds its output to
them. No reference code was available to us (see DESIGN.md); this module implements the
following reading of the paper, stated exactly:

* ``adapt: biases`` (default: the paper's setting behind its storage figure, 0.03% of full
  fine-tuning, less than BitFit). For a target ``nn.Linear`` (y = x W^T + b) the adapter's
  input is the bias vector b (d_out) itself, as one row::

      b' = b + A(b),   A(X) = f(X U + c) V + e,
      U: d_out x r,  c: r,  V: r x d_out (zero at init),  e: d_out (zero at init),  f = ReLU.

  W is kept. After training only the modified biases differ from the base. Bias-free layers
  (Llama's MLP) cannot take it: that is an error naming the module and the ``weights`` variant.
* ``adapt: weights`` (the variant ``weights``). The adapter runs row-wise over W (d_out x d_in,
  the PyTorch layout): every row w_i (a d_in vector, the weights feeding output unit i) is
  one adapter input, ``W' = W + A(W)`` with U: d_in x r, V: r x d_in; the bias b is kept.
  Row-wise is the choice that keeps the adapter small and shape-agnostic: its size depends
  only on d_in, so one adapter can serve several matrices of a role (Llama's ``gate_proj``
  and ``up_proj``) and, when shared, all layers.
* ``adapter_bias: false`` drops c and e (then A(X) = f(X U) V).
* Placement: one adapter per target role (``ffn_in``, ``ffn_out``). ``share_across_layers:
  false`` (default) gives every layer its own adapter per role (the matrices of one role in
  one layer, e.g. ``gate_proj`` + ``up_proj``, share it); ``true`` gives one adapter per role
  for the whole network. Per layer is the default because the pretrained weights differ in
  scale and spectrum from layer to layer, so a single map from rows to updates must fit all
  layers at once (which is what GIFT already does, linearly); per-layer adapters are the
  placement of the adapters HiWi is derived from (one per block) and still train only
  2 r d + r + d parameters per (role, layer).

V = 0 and e = 0 at init, so A(.) = 0 exactly and step 0 computes the pretrained model. During
training W' is recomputed once per forward pass (cost independent of the number of tokens);
``merge`` computes W' once, writes it into plain ``nn.Linear`` layers and throws the adapter
away: the merged model is the base architecture, with no added inference latency.

Trainable parameters: per adapter ``2 r d + (r + d if adapter_bias)``, d = d_in (weights) or
d_out (biases); adapters = roles (shared) or (role, layer) pairs; plus the head.

Storage: with ``adapt: biases`` the weights file holds what the paper counts, the trained
biases b' of the target layers (and the head), not the adapter (``store_merged_biases: false``
keeps U, c, V, e instead); loading it sets those biases in the plain base model, which is then
already the merged model. ``adapt: weights`` stores the adapter (W' would be whole matrices).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..method_configs.hiwi import ACTIVATIONS, HiwiConfig
from ..models import head_module_names, resolve_targets
from . import register
from .base import Method, set_submodule

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "identity": lambda t: t}
assert sorted(_ACTIVATIONS) == list(ACTIVATIONS), "method_configs.hiwi lists other activations"


class HiwiAdapter(nn.Module):
    """A(X) = f(X U + c) V + e over the rows of X (..., d); zero at init (V = 0, e = 0)."""

    def __init__(self, d: int, r: int, activation: str, bias: bool, *, device=None, dtype=None):
        super().__init__()
        bound = 1.0 / d ** 0.5  # nn.Linear's default range for a fan-in of d
        self.down = nn.Parameter(torch.empty(d, r, device=device, dtype=dtype).uniform_(-bound, bound))
        self.up = nn.Parameter(torch.zeros(r, d, device=device, dtype=dtype))
        self.down_bias = nn.Parameter(torch.zeros(r, device=device, dtype=dtype)) if bias else None
        self.up_bias = nn.Parameter(torch.zeros(d, device=device, dtype=dtype)) if bias else None
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.down
        if self.down_bias is not None:
            h = h + self.down_bias
        out = _ACTIVATIONS[self.activation](h) @ self.up
        return out + self.up_bias if self.up_bias is not None else out

    def extra_repr(self) -> str:
        return f"d={self.down.shape[0]}, r={self.down.shape[1]}, activation={self.activation}"


class HiwiLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight (or bias) is replaced by itself + adapter(itself).

    The base ``weight``/``bias`` Parameters keep their names, so the pretrained state-dict
    keys are unchanged; the (possibly shared) adapter is the child ``hiwi``.
    """

    def __init__(self, base: nn.Linear, adapter: HiwiAdapter, adapt: str, role: str):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.hiwi = adapter
        self.adapt = adapt
        self.role = role

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', b'): the parameters this layer computes with, in the adapter's dtype (a bf16
        base has fp32 adapters, so W' or b' is formed, stored and merged at fp32)."""
        dtype = self.hiwi.down.dtype
        if self.adapt == "weights":
            weight = self.weight.to(dtype)
            return weight + self.hiwi(weight), self.bias
        bias = self.bias.to(dtype)
        return self.weight, bias + self.hiwi(bias.unsqueeze(0)).squeeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.effective()
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapt={self.adapt}, role={self.role}"


@register
class Hiwi(Method):
    name = "hiwi"
    family = "weight"
    config_cls = HiwiConfig
    mergeable = True
    description = "adapter on the pretrained FFN biases (or weights): b' = b + f(b U) V, merged after training"

    def _adapter_input_size(self, name: str, lin: nn.Linear) -> int:
        if self.config.adapt == "weights":
            return lin.in_features
        if lin.bias is None:
            raise ConfigError(f"hiwi adapt: biases needs biases, but {name} has none: run the hiwi variant 'weights' "
                              "(adapt: weights) on this model")
        return lin.out_features

    def _groups(self, model: nn.Module) -> dict[tuple[str, str], list[tuple[str, str]]]:
        """adapter key -> [(module name, role)]; key = (role, layer module) or (role, '*')."""
        groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
        seen: dict[str, str] = {}
        for role in self.config.targets:
            for name in resolve_targets(model, [role], self.target_overrides):
                if name in seen:
                    raise ConfigError(f"module {name} plays both roles '{seen[name]}' and '{role}': hiwi needs distinct targets")
                seen[name] = role
                # per layer: the matrices of a role under one parent module (one FFN block)
                where = "*" if self.config.share_across_layers else name.rpartition(".")[0]
                groups.setdefault((role, where), []).append((name, role))
        for (role, where), members in groups.items():
            sizes = {self._adapter_input_size(n, model.get_submodule(n)) for n, _ in members}
            if len(sizes) > 1:
                scope = "across layers" if where == "*" else f"in {where}"
                raise ConfigError(
                    f"hiwi: role '{role}' {scope} has {self.config.adapt} of different sizes {sorted(sizes)}, "
                    "so one adapter cannot take them all; set share_across_layers: false or change targets"
                )
        return groups

    def _adapter_parameters(self, d: int) -> int:
        r = self.config.r
        return 2 * r * d + ((r + d) if self.config.adapter_bias else 0)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        # per adapter: U (d x r) + V (r x d) [+ c (r) + e (d)]; d = d_in (weights) or d_out (biases)
        total = 0
        for members in self._groups(model).values():
            name = members[0][0]
            total += self._adapter_parameters(self._adapter_input_size(name, model.get_submodule(name)))
        return total + self.head_parameters(model)

    def apply(self, model: nn.Module) -> nn.Module:
        cfg = self.config
        groups = self._groups(model)
        self.freeze(model)
        for members in groups.values():
            name0 = members[0][0]
            first = model.get_submodule(name0)
            adapter = HiwiAdapter(self._adapter_input_size(name0, first), cfg.r, cfg.activation, cfg.adapter_bias,
                                  device=first.weight.device, dtype=first.weight.dtype)
            for name, role in members:
                set_submodule(model, name, HiwiLinear(model.get_submodule(name), adapter, cfg.adapt, role))
        self.unfreeze_head(model)
        return model

    def _stores_biases(self) -> bool:
        return self.config.adapt == "biases" and self.config.store_merged_biases

    @torch.no_grad()
    def trainable_state(self, model: nn.Module) -> dict:
        """The adapter's tensors, or (biases, stored merged) b' of every target layer plus the head."""
        if not self._stores_biases():
            return super().trainable_state(model)
        wrapped = {n: m for n, m in model.named_modules() if isinstance(m, HiwiLinear)}
        state = {f"{n}.bias": m.effective()[1].detach().cpu().clone() for n, m in wrapped.items()}
        adapters = tuple(f"{n}.hiwi." for n in wrapped)
        return state | {n: p.detach().cpu().clone() for n, p in model.named_parameters()
                        if p.requires_grad and not n.startswith(adapters)}

    def save(self, model: nn.Module, path, state: dict | None = None) -> None:
        if state is not None and self._stores_biases():  # gathered adapter tensors: into the model first
            model.load_state_dict(state, strict=False)
            state = None
        super().save(model, path, state)

    def load(self, model: nn.Module, path) -> nn.Module:
        """A file of merged biases sets them in the plain base model (the merged model); an
        adapter file restores the adapter."""
        if not self._stores_biases():
            return super().load(model, path)
        from safetensors.torch import load_file

        names = [n for group in self._groups(model).values() for n, _ in group]
        state = load_file(str(path))
        self.check_stored(state, {f"{n}.bias" for n in names} | set(self._head_names(model)), path)
        self.freeze(model)
        self.unfreeze_head(model)  # as apply leaves it: a bf16 base keeps its head fp32
        model.load_state_dict(state, strict=False)
        return model

    @staticmethod
    def _head_names(model: nn.Module) -> list[str]:
        return [f"{m}.{n}" for m in head_module_names(model) for n, _ in getattr(model, m).named_parameters()]

    @torch.no_grad()
    def merge(self, model: nn.Module) -> nn.Module:
        """Compute W' (or b') once into plain ``nn.Linear`` layers, dropping the adapters (in place)."""
        wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, HiwiLinear)]
        for name, mod in wrapped:
            weight, bias = mod.effective()
            lin = nn.Linear(mod.in_features, mod.out_features, bias=bias is not None, device="meta")
            lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            if bias is not None:
                lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
            set_submodule(model, name, lin)
        return model
