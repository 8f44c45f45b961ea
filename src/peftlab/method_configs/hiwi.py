"""HiWi's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import MethodConfig, check_positive_int, check_roles

# the activations f ``methods.hiwi`` maps to torch functions
ACTIVATIONS = ("gelu", "identity", "relu", "tanh")


@dataclass
class HiwiConfig(MethodConfig):
    r: int = 8  # adapter bottleneck width
    targets: list[str] = field(default_factory=lambda: ["ffn_in", "ffn_out"])
    # biases: b' = b + A(b) (the paper's); weights: W' = W + A(W) row-wise. (Not named "on":
    # YAML 1.1 reads an unquoted ``on:`` key as the boolean true.)
    adapt: str = "biases"
    share_across_layers: bool = False  # one adapter per role for all layers (default: per layer)
    activation: str = "relu"  # f in A(X) = f(X U + c) V + e
    adapter_bias: bool = True  # the adapter's own biases c and e
    # adapt: biases: store the trained biases b' = b + A(b) (what the paper counts), not the
    # adapter; false stores U, c, V, e. adapt: weights always stores the adapter (W' is whole matrices)
    store_merged_biases: bool = True

    def __post_init__(self):
        check_positive_int("r", self.r)
        check_roles("targets", self.targets)
        if self.adapt not in ("weights", "biases"):
            raise ValueError(f"adapt must be 'weights' or 'biases', got {self.adapt!r}")
        if not isinstance(self.share_across_layers, bool):
            raise ValueError(f"share_across_layers must be true or false, got {self.share_across_layers!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not isinstance(self.adapter_bias, bool):
            raise ValueError(f"adapter_bias must be true or false, got {self.adapter_bias!r}")
        if not isinstance(self.store_merged_biases, bool):
            raise ValueError(f"store_merged_biases must be true or false, got {self.store_merged_biases!r}")
