"""VeRA's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import MethodConfig, check_dropout, check_positive_int, check_positive_number, check_roles


@dataclass
class VeraConfig(MethodConfig):
    r: int = 256
    d_initial: float = 0.1
    dropout: float = 0.0
    projection_seed: int = 0
    targets: list[str] = field(default_factory=lambda: ["query", "value"])

    def __post_init__(self):
        check_positive_int("r", self.r)
        check_positive_number("d_initial", self.d_initial)
        check_dropout("dropout", self.dropout)
        if (
            isinstance(self.projection_seed, bool)
            or not isinstance(self.projection_seed, int)
            or self.projection_seed < 0
        ):
            raise ValueError(f"projection_seed must be a non-negative integer, got {self.projection_seed!r}")
        check_roles("targets", self.targets)
