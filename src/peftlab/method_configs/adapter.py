"""The bottleneck adapter's settings."""

from __future__ import annotations

from dataclasses import dataclass

from . import MethodConfig

# the activations ``methods.adapter`` maps to torch modules (swish = silu)
NONLINEARITIES = ("gelu", "relu", "silu", "swish", "tanh")
PLACEMENTS = {"houlsby": ["attn_output", "ffn_out"], "pfeiffer": ["ffn_out"]}


@dataclass
class AdapterConfig(MethodConfig):
    placement: str = "houlsby"  # houlsby (after attention and FFN) | pfeiffer (after FFN only)
    bottleneck: int | None = None  # m; null: m = d // reduction_factor
    reduction_factor: int | None = None  # d / m when bottleneck is null (default 16)
    nonlinearity: str = "relu"  # relu | gelu | tanh | silu (= swish)

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {sorted(PLACEMENTS)}, got {self.placement!r}")
        for key in ("bottleneck", "reduction_factor"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{key} must be a positive integer or null, got {value!r}")
        if self.bottleneck is not None and self.reduction_factor is not None:
            raise ValueError(
                f"give bottleneck ({self.bottleneck}) or reduction_factor ({self.reduction_factor}), not both"
            )
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(
                f"nonlinearity must be one of {sorted(NONLINEARITIES)}, got {self.nonlinearity!r}"
            )

    def bottleneck_size(self, d: int) -> int:
        if self.bottleneck is not None:
            return self.bottleneck
        return max(1, d // (self.reduction_factor or 16))
