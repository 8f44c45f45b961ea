"""The method protocol: every fine-tuning method is one module registering one ``Method``.

A method takes a freshly loaded pretrained classifier and its typed config, decides what
trains (``apply``), and can save/restore exactly what it trained. Adding a method means:
a new module here, a ``register`` call, its settings class in ``method_configs/<name>.py``
(torch-free: config validation reads it at DAG build), a variant file under ``config/experiments/<name>/``
and a row in the parametrized tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from ..errors import ConfigError
from ..method_configs import MethodConfig, check_positive_int, check_roles
from ..models import count_parameters, head_module_names

__all__ = ["Method", "MethodConfig", "check_positive_int", "check_roles", "set_submodule"]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (e.g. a target Linear by its wrapper)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


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

    def save(self, model: nn.Module, path: str | Path, state: dict[str, Any] | None = None) -> None:
        """Write the trainable tensors (``state``: these, gathered already, instead of the model's)."""
        from safetensors.torch import save_file

        from ..io import atomic_path

        state = {k: v.contiguous() for k, v in (state or self.trainable_state(model)).items()}
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(state, str(tmp), metadata={"method": self.name})

    def load(self, model: nn.Module, path: str | Path) -> nn.Module:
        """Apply the method to a fresh base ``model`` and restore the stored tensors."""
        from safetensors.torch import load_file

        model = self.apply(model)
        state = load_file(str(path))
        self.check_stored(state, {n for n, p in model.named_parameters() if p.requires_grad}, path)
        model.load_state_dict(state, strict=False)
        return model

    def check_stored(self, state: dict, expected: set[str], path: str | Path) -> None:
        """A stored file holds exactly the tensors this method's config expects, else a one-line error."""
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ConfigError(
                f"stored weights at {path} do not fit method '{self.name}' with this config "
                f"(missing {missing[:3]}, unexpected {extra[:3]}); rerun its finetune job"
            )
