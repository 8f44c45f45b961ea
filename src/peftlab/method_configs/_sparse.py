"""The settings of the sparse methods (SIFT, PaFi): rate, targets, ranking."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models import ROLES
from . import MethodConfig

RANKINGS = ("per_matrix", "global")


@dataclass
class SparseConfig(MethodConfig):
    rate: float = 0.008  # share of each target matrix that trains (SIFT paper: 0.8%)
    targets: list[str] = field(default_factory=lambda: ["query", "key", "value", "attn_output"])
    ranking: str = "per_matrix"  # per_matrix: k per matrix; global: one ranking over all targets

    def __post_init__(self):
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or not 0 < self.rate <= 1:
            raise ValueError(f"rate must be a number in (0, 1], got {self.rate!r}")
        self.rate = float(self.rate)
        if not isinstance(self.targets, (list, tuple)):
            raise ValueError(f"targets must be a list of roles from {list(ROLES)}, got {self.targets!r}")
        bad = [t for t in self.targets if t not in ROLES]
        if not self.targets or bad:
            raise ValueError(f"targets {bad or self.targets} invalid; use roles from {list(ROLES)}")
        self.targets = list(self.targets)
        if self.ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {list(RANKINGS)}, got {self.ranking!r}")
