"""Configuration: validation of config.yaml, layered experiments, the typed TrainConfig.

``validate_config`` checks the workflow config against ``workflow/schemas/config.schema.yaml``
(filling defaults) and raises ``ConfigError`` with one line naming the key, the bad value
and what is allowed. An experiment is ``config/experiments/defaults.yaml`` overridden by
``config/experiments/<method>/<variant>.yaml`` (peft ``method_comparison``'s layering);
the experiment's identity comes from its path.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = REPO_ROOT / "workflow" / "schemas"


def load_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc


def load_schema(name: str) -> dict:
    return load_yaml(SCHEMA_DIR / f"{name}.schema.yaml")


def _validator_with_defaults(schema: dict):
    from jsonschema import Draft7Validator, validators

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from Draft7Validator.VALIDATORS["properties"](validator, properties, instance, schema)

    cls = validators.extend(Draft7Validator, {"properties": set_defaults})
    return cls(schema)


def _format_error(err, where: str) -> str:
    path = ".".join(str(p) for p in err.absolute_path) or "<top level>"
    if "propertyNames" in err.absolute_schema_path:
        # the offending key itself is bad (e.g. an unknown method name)
        sub = err.context[0] if err.validator == "propertyNames" and err.context else err
        allowed = sub.validator_value if sub.validator == "enum" else sub.schema.get("pattern", sub.message)
        return f"{where}: key '{sub.instance}' under '{path}' is not allowed; use one of {allowed}"
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        return f"{where}: at '{path}': {err.message}; allowed keys: {allowed}"
    if err.validator == "enum":
        return f"{where}: '{path}' = {err.instance!r} is not allowed; use one of {err.validator_value}"
    return f"{where}: '{path}' = {err.instance!r}: {err.message}"


def validate(instance: Any, schema_name: str, where: str) -> Any:
    """Validate (and fill defaults into) ``instance``; one-line ``ConfigError`` on failure."""
    from jsonschema.exceptions import best_match

    validator = _validator_with_defaults(load_schema(schema_name))
    errors = list(validator.iter_errors(instance))
    if errors:
        raise ConfigError(_format_error(best_match(errors), where))
    return instance


def validate_config(config: dict, where: str = "config") -> dict:
    """Check the whole workflow config, including every experiment file it names."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a mapping of models, tasks, methods, seeds")
    validate(config, "config", where)
    from .data import TaskSpec
    from .models import ModelSpec

    for name, entry in config["models"].items():
        try:
            ModelSpec.from_config(name, entry)
        except Exception as exc:
            raise ConfigError(f"{where}: models.{name}: {exc}") from None
    for name, entry in config["tasks"].items():
        try:
            TaskSpec.from_config(name, entry, config["data"])
        except Exception as exc:
            raise ConfigError(f"{where}: tasks.{name}: {exc}") from None
    for method, variants in config["methods"].items():
        for variant in variants:
            load_experiment(config["experiments_dir"], method, variant)
    intrinsic = config["analyses"]["intrinsic_dimension"]
    if intrinsic["dims"]:
        analysis_training(config)
        ref = Path(config["experiments_dir"]) / "full" / f"{intrinsic['reference']}.yaml"
        if not ref.exists():
            raise ConfigError(
                f"{where}: analyses.intrinsic_dimension.reference '{intrinsic['reference']}' needs "
                f"{ref} (the full fine-tuning variant d90 is measured against)"
            )
    return config


def analysis_training(config: dict) -> TrainConfig:
    """Training settings of the intrinsic-dimension runs: experiments_dir/defaults.yaml's
    ``training`` with ``analyses.intrinsic_dimension.training`` over it."""
    defaults = load_yaml(Path(config["experiments_dir"]) / "defaults.yaml") or {}
    merged = deep_merge(defaults.get("training") or {},
                        config["analyses"]["intrinsic_dimension"].get("training") or {})
    try:
        return TrainConfig(**merged)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config: analyses.intrinsic_dimension.training: {exc}") from None


def sift_analysis_variants(config: dict) -> dict[str, dict]:
    """SIFT variants in the config whose mask comes from the gradient-sparsity stage
    (``mask_source: analysis``): variant -> its method params."""
    out = {}
    for variant in config["methods"].get("sift", []):
        exp = load_experiment(config["experiments_dir"], "sift", variant)
        if exp.method_params.get("mask_source") == "analysis":
            out[variant] = dict(exp.method_params)
    return out


# ---------------------------------------------------------------------------------------
# Experiments
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters of one experiment (defaults.yaml + variant overrides)."""

    epochs: float = 2.0
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 64
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    lr_scheduler: str = "linear"
    max_grad_norm: float | None = 1.0
    evals_per_epoch: int = 2
    log_every_steps: int = 10

    def __post_init__(self):
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.lr_scheduler not in ("linear", "constant", "cosine"):
            raise ValueError(f"lr_scheduler must be linear, constant or cosine, got {self.lr_scheduler!r}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@dataclass(frozen=True)
class Experiment:
    method: str
    variant: str
    training: TrainConfig
    method_params: dict
    files: tuple[str, ...]

    def resolved(self) -> dict:
        return {"method": self.method, "variant": self.variant,
                "training": self.training.to_dict(), "method_params": self.method_params}


def experiment_files(experiments_dir: str | Path, method: str, variant: str) -> list[Path]:
    d = Path(experiments_dir)
    return [d / "defaults.yaml", d / method / f"{variant}.yaml"]


def load_experiment(experiments_dir: str | Path, method: str, variant: str) -> Experiment:
    """Merge defaults.yaml with ``<method>/<variant>.yaml`` and type-check the result."""
    from .methods import get_method

    defaults_path, variant_path = experiment_files(experiments_dir, method, variant)
    cls = get_method(method)
    if not variant_path.exists():
        have = sorted(p.stem for p in variant_path.parent.glob("*.yaml"))
        raise ConfigError(
            f"method '{method}' has no variant '{variant}': create {variant_path} "
            f"(existing variants: {have or 'none'})"
        )
    defaults = load_yaml(defaults_path) or {}
    override = load_yaml(variant_path) or {}
    merged = validate(deep_merge(defaults, override), "experiment", str(variant_path))
    try:
        training = TrainConfig(**(merged.get("training") or {}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{variant_path}: training: {exc}") from None
    params = merged.get("method") or {}
    try:
        cls.config_cls.from_dict(method, params)
    except ConfigError as exc:
        raise ConfigError(f"{variant_path}: {exc}") from None
    return Experiment(method, variant, training, params, tuple(str(p) for p in (defaults_path, variant_path)))


@dataclass(frozen=True)
class RunKey:
    model: str
    task: str
    method: str
    variant: str
    seed: int

    def path(self) -> str:
        return f"{self.model}/{self.task}/{self.method}/{self.variant}/seed{self.seed}"

    def tags(self) -> dict[str, str]:
        return {k: str(v) for k, v in dataclasses.asdict(self).items()}


def iter_runs(config: dict) -> Iterator[RunKey]:
    """Every (model, task, method, variant, seed) the config asks for."""
    for model in config["models"]:
        for task in config["tasks"]:
            for method, variants in config["methods"].items():
                for variant in variants:
                    for seed in config["seeds"]:
                        yield RunKey(model, task, method, variant, int(seed))
