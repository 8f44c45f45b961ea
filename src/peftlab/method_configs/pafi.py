"""PaFi's settings: the sparse methods'."""

from __future__ import annotations

from dataclasses import dataclass

from ._sparse import SparseConfig


@dataclass
class PafiConfig(SparseConfig):
    """rate, targets and ranking (per_matrix | global): see ``SparseConfig``."""
