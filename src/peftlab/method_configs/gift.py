"""GIFT's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import MethodConfig, check_positive_int, check_positive_number, check_roles


@dataclass
class GiftConfig(MethodConfig):
    r: int = 32  # rank of phi psi (the paper's default on query/value)
    targets: list[str] = field(default_factory=lambda: ["query", "value"])
    share_across_targets: bool = False  # one (phi, psi) for every role instead of one per role
    # phi's draw: "linear", nn.Linear's default (U(-1/sqrt(d_in), 1/sqrt(d_in)), kaiming_uniform
    # with a = sqrt(5)), as the reference's in_projection; "normal", N(0, 1/d_in) (columns of
    # norm ~1, peftlab's earlier init); either times init_scale
    phi_init: str = "linear"
    init_scale: float = 1.0

    def __post_init__(self):
        check_positive_int("r", self.r)
        check_roles("targets", self.targets)
        if not isinstance(self.share_across_targets, bool):
            raise ValueError(f"share_across_targets must be true or false, got {self.share_across_targets!r}")
        check_positive_number("init_scale", self.init_scale)
        if self.phi_init not in ("linear", "normal"):
            raise ValueError(f"phi_init must be 'linear' (the reference's) or 'normal', got {self.phi_init!r}")
