# Thin wrapper: gradient_sparsity[model,task] -> peftlab.sparsity.gradient_sparsity
from pathlib import Path

import _workflow_src  # noqa: F401  (this workflow's src/ first on sys.path)

from peftlab.cli import run_step
from peftlab.models import ModelSpec
from peftlab.sparsity import gradient_sparsity
from peftlab.tracking import log_record

sm = snakemake  # noqa: F821
w = sm.wildcards


def main():
    s = sm.params.settings
    record = gradient_sparsity(
        ModelSpec.from_config(w.model, sm.params.model),
        data_dir=Path(sm.input.stats).parent,
        out_dir=Path(sm.output.record).parent,
        batches=s["batches"],
        batch_size=s["batch_size"],
        seed=s["seed"],
        percents=tuple(float(p) for p in s["percents"]),
        jaccard_percent=float(s["jaccard_percent"]),
        overlap_rate=float(s["overlap_rate"]),
        sift_variants=sm.params.sift_variants,
        threads=sm.threads,
    )
    log_record(record, sm.output.record, sm.params.mlflow, artifacts=[sm.output.modules])


run_step("gradient_sparsity", sm.log[0], main)
