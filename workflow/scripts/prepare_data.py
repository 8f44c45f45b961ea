# Thin wrapper: prepare_data[model,task] -> peftlab.data.prepare_task
from pathlib import Path

import _workflow_src  # noqa: F401  (this workflow's src/ first on sys.path)

from peftlab.cli import run_step
from peftlab.data import TaskSpec, prepare_task
from peftlab.models import ModelSpec, check_modality, image_patch_size, load_tokenizer

sm = snakemake  # noqa: F821
w = sm.wildcards


def main():
    spec = TaskSpec.from_config(w.task, sm.params.task, sm.params.data)
    model = ModelSpec.from_config(w.model, sm.params.model)
    check_modality(model, spec)
    prepare_task(spec, load_tokenizer(model), Path(sm.output.stats).parent, model_name=w.model,
                 patch_size=image_patch_size(model) if spec.image else None)


run_step("prepare_data", sm.log[0], main)
