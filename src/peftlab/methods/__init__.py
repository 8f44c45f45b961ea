"""The method registry: name in config -> ``Method`` class.

``METHODS`` must equal the ``methods`` enum of ``workflow/schemas/config.schema.yaml``
(a test checks it).
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import Method, MethodConfig

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise ValueError(f"method '{cls.name}' registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method '{name}': use one of {', '.join(sorted(METHODS))}") from None


def build_method(name: str, params: dict | None, target_overrides: dict | None = None) -> Method:
    cls = get_method(name)
    return cls(cls.config_cls.from_dict(name, params), target_overrides)


def load_trained(method: Method, model_spec, stats: dict, weights_path, seed: int):
    """A run's trained model: the task's base model (``stats``: the task's stats.json, the head
    initialised from ``seed``) with the run's stored tensors restored by ``method``."""
    from ..models import load_model

    model = load_model(model_spec, stats["num_labels"], stats["problem_type"], seed=seed)
    return method.load(model, weights_path)


def _discover() -> None:
    """Import every module of this package: each registers its method on import."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


_discover()

__all__ = ["METHODS", "Method", "MethodConfig", "build_method", "get_method", "register"]
