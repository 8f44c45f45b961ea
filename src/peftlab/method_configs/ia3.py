"""IA3's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import MethodConfig, check_roles


@dataclass
class IA3Config(MethodConfig):
    targets: list[str] = field(default_factory=lambda: ["key", "value", "ffn_out"])
    # subset of targets whose *input* is rescaled (the paper's l_ff before W2)
    feedforward: list[str] = field(default_factory=lambda: ["ffn_out"])

    def __post_init__(self):
        check_roles("targets", self.targets)
        check_roles("feedforward", self.feedforward, allow_empty=True)
        extra = [r for r in self.feedforward if r not in self.targets]
        if extra:
            raise ValueError(f"feedforward roles {extra} must also be in targets {self.targets}")
