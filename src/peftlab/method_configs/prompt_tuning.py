"""Prompt tuning's settings."""

from __future__ import annotations

from dataclasses import dataclass

from . import MethodConfig, check_positive_int

INITS = ("sample_vocab", "random", "text")


@dataclass
class PromptTuningConfig(MethodConfig):
    num_virtual_tokens: int = 20
    init: str = "sample_vocab"
    init_text: str | None = None

    def __post_init__(self):
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {self.init!r}")
        if self.init == "text" and not (isinstance(self.init_text, str) and self.init_text.strip()):
            raise ValueError(f"init 'text' needs a non-empty init_text, got {self.init_text!r}")
        if self.init != "text" and self.init_text is not None:
            raise ValueError(f"init_text is only used with init 'text' (init is {self.init!r})")
