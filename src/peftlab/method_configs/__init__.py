"""The methods' typed settings (a variant's ``method:`` keys), apart from their torch code.

Config validation at DAG build checks every variant's settings through these classes: one
module per method, each free of torch, so planning a DAG never imports torch. The method
modules (``peftlab.methods.<name>``) take their ``config_cls`` from here; a test checks the
two agree for every registered method.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..models import ROLES


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


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def check_positive_number(key: str, value) -> None:
    if not _is_number(value) or value <= 0:
        raise ValueError(f"{key} must be a positive number, got {value!r}")


def check_dropout(key: str, value) -> None:
    if not _is_number(value) or not 0 <= value < 1:
        raise ValueError(f"{key} must be in [0, 1), got {value!r}")


# methods with no meaning on an image task, and why (config validation refuses them at DAG build)
TEXT_ONLY_METHODS = {
    "prompt_tuning": "it prepends trained virtual tokens to a text model's input embeddings, and an image "
                     "model reads pixels (visual prompt tuning is a different method, not implemented here)",
}


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


def method_names() -> list[str]:
    """The registered methods' names, without importing them: one module each in ``methods/``
    (the registry imports the same modules: ``methods._discover``)."""
    folder = Path(__file__).resolve().parent.parent / "methods"
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_") and p.stem != "base")


def config_class(method: str) -> type[MethodConfig]:
    """The settings class of ``method``; a method without settings (full) has the base class."""
    names = method_names()
    if method not in names:
        raise ConfigError(f"unknown method '{method}': use one of {', '.join(names)}")
    if not (Path(__file__).parent / f"{method}.py").is_file():
        return MethodConfig
    module = importlib.import_module(f"{__name__}.{method}")
    found = [
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, MethodConfig) and v.__module__ == module.__name__
    ]
    if len(found) != 1:
        raise RuntimeError(
            f"{module.__name__} must define exactly one MethodConfig subclass, found {len(found)}"
        )
    return found[0]
