"""The method protocol: every fine-tuning method is one module registering one ``Method``.

A method takes a freshly loaded pretrained classifier and its typed config, decides what
trains (``apply``), and can save/restore exactly what it trained. Adding a method means:
a new module here, a ``register`` call, a variant file under ``config/experiments/<name>/``
and a row in the parametrized tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from ..errors import ConfigError
from ..models import ROLES, count_parameters, head_module_names


def check_roles(key: str, roles, allow_empty: bool = False) -> None:
    """One-line ValueError unless ``roles`` is a list of known target roles."""
    if not isinstance(roles, (list, tuple)) or (not roles and not allow_empty):
        raise ValueError(f"{key} must be a list of roles from {list(ROLES)}, got {roles!r}")
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ValueError(f"{key} {bad} invalid; use roles from {list(ROLES)}")
    twice = sorted({r for r in roles if list(roles).count(r) > 1})
    if twice:
        raise ValueError(f"{key} lists {twice} twice")


def check_positive_int(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (e.g. a target Linear by its wrapper)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@dataclass
class MethodConfig:
    """Base class of the typed per-method configs (fields = the variant's ``method:`` keys)."""

    @classmethod
    def from_dict(cls, method: str, values: dict[str, Any] | None) -> MethodConfig:
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"method '{method}': unknown parameter(s) {unknown}; allowed: {sorted(known) or 'none'}"
            )
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"method '{method}': {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Method:
    """Base class; subclasses set ``name``, ``family``, ``config_cls`` and implement ``apply``."""

    name: ClassVar[str]
    family: ClassVar[str]  # "full", "weight", "representation" or "sparse"
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    description: ClassVar[str] = ""
    # True when the trained update folds into the base weights: ``merge`` then returns a plain
    # base-architecture model with no added inference cost
    mergeable: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, target_overrides: dict[str, str] | None = None):
        self.config = config
        self.target_overrides = target_overrides or {}

    # True when ``calibrate`` must see training batches before ``apply`` (e.g. a gradient-
    # selected mask); the trainer then calls it with the run's own seeded loader
    needs_calibration: ClassVar[bool] = False

    def calibrate(self, model: nn.Module, batches) -> None:
        """Look at training batches (an iterable of model inputs with labels) before ``apply``."""

    def apply(self, model: nn.Module) -> nn.Module:
        """Return the model to train, with ``requires_grad`` set on exactly what trains."""
        raise NotImplementedError

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        """Closed-form count of trainable parameters on the *unmodified* ``model``."""
        raise NotImplementedError

    def merge(self, model: nn.Module) -> nn.Module:
        """A plain base-architecture model computing what ``model`` computes (mergeable only)."""
        if not self.mergeable:
            raise TypeError(f"method '{self.name}' cannot be merged into the base weights")
        return model

    # -- helpers shared by methods ---------------------------------------------------------
    @staticmethod
    def freeze(model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(False)

    @staticmethod
    def unfreeze_head(model: nn.Module) -> list[str]:
        names = head_module_names(model)
        for name in names:
            for p in getattr(model, name).parameters():
                p.requires_grad_(True)
        return names

    @staticmethod
    def head_parameters(model: nn.Module) -> int:
        return sum(count_parameters(getattr(model, n)) for n in head_module_names(model))

    # -- persistence -----------------------------------------------------------------------
    def trainable_state(self, model: nn.Module) -> dict[str, Any]:
        """What this method must store: the tensors that train (everything else is the base)."""
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

    def save(self, model: nn.Module, path: str | Path) -> None:
        from safetensors.torch import save_file

        from ..io import atomic_path

        state = {k: v.contiguous() for k, v in self.trainable_state(model).items()}
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(state, str(tmp), metadata={"method": self.name})

    def load(self, model: nn.Module, path: str | Path) -> nn.Module:
        """Apply the method to a fresh base ``model`` and restore the stored tensors."""
        from safetensors.torch import load_file

        model = self.apply(model)
        state = load_file(str(path))
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ConfigError(
                f"stored weights at {path} do not fit method '{self.name}' with this config "
                f"(missing {missing[:3]}, unexpected {extra[:3]}); rerun its finetune job"
            )
        model.load_state_dict(state, strict=False)
        return model
