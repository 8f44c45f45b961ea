"""GIFT (Savadikar, Song & Wu, "GIFT: Generative Interpretable Fine-Tuning", arXiv 2312.00700).

The fine-tuned weights are *generated* from the pretrained ones by two linear layers
(the paper's defining equation, as stated in its abstract)::

    W' = W (I + phi psi),    W: d_out x d_in (nn.Linear layout), phi: d_in x r, psi: r x d_in

One pair Theta = (phi, psi) per target role (e.g. one for every ``query`` and one for every
``value`` matrix of the network), shared by all layers having that role; with
``share_across_targets`` a single pair serves every role (their d_in must be equal).
psi starts at zero, so step 0 computes exactly the pretrained model.

Forward without building W' (the paper's "activation-space" reading of the same equation):
``x W'^T = x (I + phi psi)^T W^T = (x + (x psi^T) phi^T) W^T``: a rank-r correction of the
layer input (O(tokens * r * d_in) extra work), then the frozen linear layer.

Merge folds it once: ``W <- W + (W phi) psi`` into a plain ``nn.Linear`` (bias unchanged).

Interpretability (the paper's token-clustering reading): ``W phi`` (d_out x r) is the
output of GIFT's first linear layer; projecting a token's frozen output on it,
``(x W^T + b) W phi``, as the reference's visualiser does, gives an r-dim score per token
(``gift_token_projection``; ``gift_view.frozen_output``).

Trainable parameters: ``2 r d_in`` per pair (number of pairs = number of roles, or 1 when
shared) + the classification head.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..method_configs.gift import GiftConfig
from ..models import resolve_targets
from . import register
from .base import Method, set_submodule


class GiftPair(nn.Module):
    """Theta = (phi, psi): phi d_in x r (random: ``phi_init``, times ``init_scale``), psi
    r x d_in (zero), as the reference's in_projection (nn.Linear(d_in, r)) and zero-initialised
    out_projection."""

    def __init__(self, d_in: int, r: int, init_scale: float, *, phi_init: str = "linear", device=None, dtype=None):
        super().__init__()
        if phi_init == "linear":  # nn.Linear(d_in, r)'s weight (r x d_in), transposed
            phi = nn.init.kaiming_uniform_(torch.empty(r, d_in, device=device, dtype=dtype), a=math.sqrt(5)).T
        else:
            phi = torch.randn(d_in, r, device=device, dtype=dtype) / math.sqrt(d_in)
        self.phi = nn.Parameter((phi * init_scale).contiguous())
        self.psi = nn.Parameter(torch.zeros(r, d_in, device=device, dtype=dtype))


class GiftLinear(nn.Module):
    """A frozen ``nn.Linear`` computing ``x (W (I + phi psi))^T + b`` with a (shared) pair.

    It holds the base ``weight``/``bias`` Parameters under their original names, so the
    state-dict keys of the pretrained tensors do not change.
    """

    def __init__(self, base: nn.Linear, pair: GiftPair, role: str):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias  # a Parameter or None
        self.gift = pair
        self.role = role

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (I + phi psi)^T = x + (x psi^T) phi^T: never forms a d_in x d_in matrix
        x = x + (x @ self.gift.psi.t()) @ self.gift.phi.t()
        return F.linear(x, self.weight, self.bias)

    def merged_weight(self) -> torch.Tensor:
        w = self.weight.detach()
        phi, psi = self.gift.phi.detach().double(), self.gift.psi.detach().double()
        return (w.double() + (w.double() @ phi) @ psi).to(w.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, role={self.role}, r={self.gift.psi.shape[0]}"


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def gift_modules(model: nn.Module, role: str | None = None) -> list[tuple[str, GiftLinear]]:
    """The GIFT-wrapped linear layers of ``model`` (in layer order), optionally of one role."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, GiftLinear)]
    found = [(n, m) for n, m in found if role is None or m.role == role]
    return sorted(found, key=lambda nm: _natural_key(nm[0]))


def gift_token_projection(model: nn.Module, hidden_states: torch.Tensor, role: str, layer: int) -> torch.Tensor:
    """``h W phi`` for the ``layer``-th (0-based) GIFT module of ``role``: (..., d_out) -> (..., r).

    ``hidden_states`` are token representations of size d_out of that module: the token view
    passes its frozen output x W^T + b (``gift_view.frozen_output``), as the reference does.
    Each token gets r scores against the columns of ``W phi``, the output of GIFT's first
    linear layer; a report can colour tokens by them.
    """
    mods = gift_modules(model, role)
    if not mods:
        raise ConfigError(f"model has no GIFT module of role '{role}': apply gift with that role in 'targets'")
    if not 0 <= layer < len(mods):
        raise ConfigError(f"layer {layer} out of range: role '{role}' has {len(mods)} GIFT modules")
    name, mod = mods[layer]
    if hidden_states.shape[-1] != mod.out_features:
        raise ConfigError(
            f"hidden states of size {hidden_states.shape[-1]} cannot be projected by {name} "
            f"(h W phi needs size d_out = {mod.out_features})"
        )
    w_phi = mod.weight @ mod.gift.phi  # d_out x r
    return hidden_states.to(w_phi.dtype) @ w_phi


@register
class Gift(Method):
    name = "gift"
    family = "weight"
    config_cls = GiftConfig
    mergeable = True
    description = "W' = W (I + phi psi), one (phi, psi) per target role shared by all layers"

    # -- layout ----------------------------------------------------------------------------
    def _groups(self, model: nn.Module) -> dict[str, list[tuple[str, str]]]:
        """pair key -> [(module name, role)]; validates that each pair sees one d_in."""
        cfg = self.config
        groups: dict[str, list[tuple[str, str]]] = {}
        seen: dict[str, str] = {}
        for role in cfg.targets:
            for name in resolve_targets(model, [role], self.target_overrides):
                if name in seen:
                    raise ConfigError(f"module {name} plays both roles '{seen[name]}' and '{role}': gift needs distinct targets")
                seen[name] = role
                groups.setdefault("all" if cfg.share_across_targets else role, []).append((name, role))
        for key, members in groups.items():
            dims = {model.get_submodule(n).in_features for n, _ in members}
            if len(dims) > 1:
                sizes = ", ".join(sorted({f"{r}: {model.get_submodule(n).in_features}" for n, r in members}))
                if cfg.share_across_targets:
                    raise ConfigError(f"gift: share_across_targets needs one input size for all targets "
                                      f"(d_in {sizes}); set share_across_targets: false")
                raise ConfigError(f"gift: role '{key}' mixes matrices of different input sizes (d_in {sizes}); "
                                  "narrow the role with a 'targets:' override in config.yaml")
        return groups

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        # 2 r d_in per pair (phi: d_in x r, psi: r x d_in), plus the (fully trained) head
        total = 0
        for members in self._groups(model).values():
            total += 2 * self.config.r * model.get_submodule(members[0][0]).in_features
        return total + self.head_parameters(model)

    def apply(self, model: nn.Module) -> nn.Module:
        cfg = self.config
        groups = self._groups(model)
        self.freeze(model)
        for members in groups.values():
            first = model.get_submodule(members[0][0])
            pair = GiftPair(first.in_features, cfg.r, cfg.init_scale, phi_init=cfg.phi_init,
                            device=first.weight.device, dtype=first.weight.dtype)
            for name, role in members:
                set_submodule(model, name, GiftLinear(model.get_submodule(name), pair, role))
        self.unfreeze_head(model)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold W (I + phi psi) into plain ``nn.Linear`` layers (in place); returns ``model``."""
        for name, mod in gift_modules(model):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            lin.weight = nn.Parameter(mod.merged_weight(), requires_grad=False)
            if mod.bias is not None:
                lin.bias = mod.bias
            set_submodule(model, name, lin)
        return model
