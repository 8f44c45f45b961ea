"""The MLflow pyfunc of a run with no merged form (prompt tuning, LoReFT, the bottleneck adapter),
logged by ``registry.log_exported`` with this package as its code: ``mlflow.pyfunc.load_model(uri)
.predict(["some text", ...])`` (or a DataFrame with a ``text`` column).

- classification: one row per text, ``label`` (the task's label name) and ``score`` (its
  probability); regression: ``score``;
- generation and multiple choice: ``text``, the greedy continuation of each prompt (the prompt
  as the task's template writes it), up to the task's ``max_new_tokens`` (``params``
  ``max_new_tokens`` overrides it).

The base model loads from where the run's base came from (the hub id the config names, else its
local folder): neither form carries the base weights.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc

DEFAULT_MAX_NEW_TOKENS = 32


def is_image_task(task: dict) -> bool:
    return task.get("kind") == "image_classification"


def signature(task: dict):
    """Input: a ``text`` column (an image task: an ``image`` column of encoded image bytes);
    output: ``label`` and ``score`` (classification), ``score`` (regression) or ``text``
    (generative tasks)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from .models import GENERATIVE_PROBLEMS

    if task["problem_type"] in GENERATIVE_PROBLEMS:
        out = [ColSpec("string", "text")]
    elif task["problem_type"] == "regression":
        out = [ColSpec("double", "score")]
    else:
        out = [ColSpec("string", "label"), ColSpec("double", "score")]
    params = ParamSchema([ParamSpec("max_new_tokens", "long", task.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)])
    inputs = ColSpec("binary", "image") if is_image_task(task) else ColSpec("string", "text")
    return ModelSignature(inputs=Schema([inputs]), outputs=Schema(out), params=params)


class PeftlabModel(mlflow.pyfunc.PythonModel):
    """A run's ``peft/`` or ``peftlab/`` export folder behind MLflow's pyfunc interface."""

    def load_context(self, context):
        from .io import read_json

        folder = Path(context.artifacts["model"])
        manifest = read_json(context.artifacts["export"])
        self.task = manifest["task"]
        self.model, self.tokenizer = _load(folder, manifest)

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from .models import GENERATIVE_PROBLEMS

        column = "image" if is_image_task(self.task) else "text"
        texts = list(model_input[column]) if isinstance(model_input, pd.DataFrame) else list(model_input)
        if self.task["problem_type"] in GENERATIVE_PROBLEMS:
            limit = int((params or {}).get("max_new_tokens") or self.task.get("max_new_tokens")
                        or DEFAULT_MAX_NEW_TOKENS)
            return pd.DataFrame({"text": _generate(self.model, self.tokenizer, texts, limit)})
        return _classify(self.model, self.tokenizer, texts, self.task)


def _load(folder: Path, manifest: dict):
    """The trained model (eval mode) and the base's tokenizer, from either export form."""
    from .models import ModelSpec, load_tokenizer

    if (folder / "peftlab_run.json").exists():
        from .artifacts import load_exported
        from .io import read_json

        meta = read_json(folder / "peftlab_run.json")
        return load_exported(folder), load_tokenizer(ModelSpec.from_config(meta["model"]["name"], meta["model"]))
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .models import auto_model_class

    task = manifest["task"]
    auto, kwargs = auto_model_class(task["num_labels"], task["problem_type"], is_image_task(task))
    if is_image_task(task):
        from transformers import AutoImageProcessor

        tokenizer = AutoImageProcessor.from_pretrained(folder)
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    base = auto.from_pretrained(manifest["base"]["name_or_path"], revision=manifest["base"].get("revision"),
                                dtype=torch.float32, **kwargs)
    return PeftModel.from_pretrained(base, folder).eval(), tokenizer


def _classify(model, tokenizer, texts: list[str], task: dict):
    import pandas as pd
    import torch

    if is_image_task(task):  # encoded images (bytes) through the image processor
        from .imagedata import size_kwargs, to_pil

        batch = tokenizer(images=[to_pil(x, "served model") for x in texts], return_tensors="pt",
                          **size_kwargs(tokenizer, task.get("image_size")))
    else:
        batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits.float()
    if task["problem_type"] == "regression":
        return pd.DataFrame({"score": logits[:, 0].tolist()})
    probs = logits.softmax(-1)
    best = probs.argmax(-1).tolist()
    names = task.get("label_names") or [str(i) for i in range(logits.shape[-1])]
    return pd.DataFrame({"label": [names[i] for i in best], "score": probs.max(-1).values.tolist()})


def _generate(model, tokenizer, texts: list[str], max_new_tokens: int) -> list[str]:
    import numpy as np
    import torch

    from .generation import generate

    prompts = [np.asarray(tokenizer(t)["input_ids"]) for t in texts]
    outputs, _ = generate(model, tokenizer, prompts, max_new_tokens, batch_size=8, dev=torch.device("cpu"))
    return outputs
