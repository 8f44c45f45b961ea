# Thin wrapper: gift_view[model,task] -> peftlab.gift_view.gift_token_view
from pathlib import Path

import _workflow_src  # noqa: F401  (this workflow's src/ first on sys.path)

from peftlab.cli import run_step
from peftlab.gift_view import gift_token_view
from peftlab.models import ModelSpec

sm = snakemake  # noqa: F821
w = sm.wildcards

run_step(
    "gift_view",
    sm.log[0],
    lambda: gift_token_view(
        ModelSpec.from_config(w.model, sm.params.model),
        data_dir=Path(sm.input.stats).parent,
        record_paths=list(sm.input.records),
        weights_paths=list(sm.input.weights),
        out_path=sm.output.record,
        threads=sm.threads,
    ),
)
