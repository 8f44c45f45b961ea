# Thin wrapper: prepare_data[model,task] -> peftlab.data.prepare_task
from pathlib import Path

import _workflow_src  # noqa: F401  (this workflow's src/ first on sys.path)

from peftlab.cli import run_step
from peftlab.data import TaskSpec, prepare_task
from peftlab.models import ModelSpec, load_tokenizer

sm = snakemake  # noqa: F821
w = sm.wildcards


def main():
    spec = TaskSpec.from_config(w.task, sm.params.task, sm.params.data)
    tokenizer = load_tokenizer(ModelSpec.from_config(w.model, sm.params.model))
    prepare_task(spec, tokenizer, Path(sm.output.stats).parent, model_name=w.model)


run_step("prepare_data", sm.log[0], main)
