"""LoRA's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import MethodConfig, check_positive_int, check_roles


@dataclass
class LoraConfig(MethodConfig):
    r: int = 8
    alpha: float = 16
    dropout: float = 0.1
    targets: list[str] = field(default_factory=lambda: ["query", "value"])

    def __post_init__(self):
        check_positive_int("r", self.r)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha!r}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, int | float)
            or not 0 <= self.dropout < 1
        ):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        check_roles("targets", self.targets)
