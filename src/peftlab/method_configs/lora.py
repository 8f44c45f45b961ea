"""LoRA's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import MethodConfig, check_dropout, check_positive_int, check_positive_number, check_roles


@dataclass
class LoraConfig(MethodConfig):
    r: int = 8
    alpha: float = 16
    dropout: float = 0.1
    targets: list[str] = field(default_factory=lambda: ["query", "value"])

    def __post_init__(self):
        check_positive_int("r", self.r)
        check_positive_number("alpha", self.alpha)
        check_dropout("dropout", self.dropout)
        check_roles("targets", self.targets)
