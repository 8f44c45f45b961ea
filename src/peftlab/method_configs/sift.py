"""SIFT's settings."""

from __future__ import annotations

from dataclasses import dataclass

from ._sparse import SparseConfig

MASK_SOURCES = ("gradient", "file", "random", "analysis")


@dataclass
class SiftConfig(SparseConfig):
    calibration_batches: int = 8  # training batches whose gradients choose the mask
    accumulate: str = "abs"  # abs: sum of |grad| over batches; signed: |sum of grad|
    # gradient: calibrate here; file: read mask_path; random: a seeded random index set of the
    # same size (the control SIFT's claim is measured against); analysis: the index sets the
    # gradient-sparsity stage wrote for this variant (the pipeline sets mask_path)
    mask_source: str = "gradient"
    mask_path: str | None = None  # safetensors file of '<module>.sparse_index' tensors
    mask_seed: int = 0  # seed of the random index set (mask_source: random)

    def __post_init__(self):
        super().__post_init__()
        if (
            isinstance(self.calibration_batches, bool)
            or not isinstance(self.calibration_batches, int)
            or self.calibration_batches < 1
        ):
            raise ValueError(
                f"calibration_batches must be a positive integer, got {self.calibration_batches!r}"
            )
        if self.accumulate not in ("abs", "signed"):
            raise ValueError(f"accumulate must be 'abs' or 'signed', got {self.accumulate!r}")
        if self.mask_source not in MASK_SOURCES:
            raise ValueError(f"mask_source must be one of {list(MASK_SOURCES)}, got {self.mask_source!r}")
        if self.mask_source == "file" and not self.mask_path:
            raise ValueError("mask_source 'file' needs mask_path (a safetensors file of index sets)")
