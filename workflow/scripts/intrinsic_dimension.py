# Thin wrapper: intrinsic_dimension[model,task,d,seed] -> peftlab.intrinsic.run_subspace
from pathlib import Path

import _workflow_src  # noqa: F401  (this workflow's src/ first on sys.path)

from peftlab.cli import run_step
from peftlab.config import TrainConfig
from peftlab.intrinsic import run_subspace
from peftlab.models import ModelSpec
from peftlab.tracking import log_record

sm = snakemake  # noqa: F821
w = sm.wildcards


def main():
    s = sm.params.settings
    record = run_subspace(
        ModelSpec.from_config(w.model, sm.params.model),
        data_dir=Path(sm.input.stats).parent,
        out_dir=Path(sm.output.record).parent,
        d=int(w.d),
        seed=int(w.seed),
        training=TrainConfig(**sm.params.training),
        said=s["kind"] == "said",
        projection=s["projection"],
        projection_seed=s["projection_seed"],
        threads=sm.threads,
        lr_reference_d=s.get("lr_reference_d"),
        normalisation=s["normalisation"],
    )
    log_record(record, sm.output.record, sm.params.mlflow)
    return record


run_step("intrinsic_dimension", sm.log[0], main)
