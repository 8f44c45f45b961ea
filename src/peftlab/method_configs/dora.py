"""DoRA's settings: LoRA's."""

from __future__ import annotations

from dataclasses import dataclass

from .lora import LoraConfig


@dataclass
class DoraConfig(LoraConfig):
    """Same fields and checks as LoRA's: r, alpha, dropout, targets."""
