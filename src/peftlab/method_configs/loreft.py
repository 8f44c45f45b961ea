"""LoReFT's settings."""

from __future__ import annotations

from dataclasses import dataclass

from . import MethodConfig, check_dropout


@dataclass
class LoreftConfig(MethodConfig):
    layers: list[int] | str = "all"  # block indices (0-based) or "all"
    r: int = 1  # rank of the edit (rows of R)
    first_n: int = 1  # p: edit the first p non-pad tokens
    last_n: int = 1  # s: edit the last s non-pad tokens
    tied_positions: bool = True  # one edit shared by first and last positions, else two
    dropout: float = 0.05  # dropout while training, on what ``dropout_on`` names
    # "output": on the edited state h + R^T (W h + b - R h), as pyreft's LoreftIntervention;
    # "edit": on the added term R^T (W h + b - R h) only (h passes untouched)
    dropout_on: str = "output"

    def __post_init__(self):
        if isinstance(self.layers, str):
            if self.layers != "all":
                raise ValueError(f"layers must be 'all' or a list of block indices, got {self.layers!r}")
        else:
            layers = list(self.layers) if isinstance(self.layers, list | tuple) else None
            if (
                not layers
                or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers)
                or len(set(layers)) != len(layers)
            ):
                raise ValueError(
                    f"layers must be 'all' or a non-empty list of distinct block indices >= 0, got {self.layers!r}"
                )
            self.layers = layers
        for key in ("r", "first_n", "last_n"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "r" else 0):
                bound = "a positive integer" if key == "r" else "an integer >= 0"
                raise ValueError(f"{key} must be {bound}, got {value!r}")
        if self.first_n == 0 and self.last_n == 0:
            raise ValueError("first_n and last_n are both 0: no position would be edited")
        if not isinstance(self.tied_positions, bool):
            raise ValueError(f"tied_positions must be true or false, got {self.tied_positions!r}")
        check_dropout("dropout", self.dropout)
        if self.dropout_on not in ("output", "edit"):
            raise ValueError(f"dropout_on must be 'output' (pyreft's) or 'edit', got {self.dropout_on!r}")

    def edits_per_layer(self) -> list[str]:
        """Names of the separate edits each chosen block gets."""
        if self.first_n and self.last_n and not self.tied_positions:
            return ["first", "last"]
        return ["tied"]
