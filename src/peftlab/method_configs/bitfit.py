"""BitFit's settings."""

from __future__ import annotations

from dataclasses import dataclass

from . import MethodConfig


@dataclass
class BitFitConfig(MethodConfig):
    train_head: bool = True  # the task head is new, so it trains unless asked otherwise
    missing_biases: str = "add"  # add: zero biases on linear layers that have none | none

    def __post_init__(self):
        if not isinstance(self.train_head, bool):
            raise ValueError(f"train_head must be true or false, got {self.train_head!r}")
        if self.missing_biases not in ("add", "none"):
            raise ValueError(f"missing_biases must be 'add' or 'none', got {self.missing_biases!r}")
