"""Standard artifacts of a completed run, for use outside peftlab: ``python -m peftlab export``
and the ``export`` rule (config ``export: all``).

- ``peft/``: peft's adapter folder (LoRA, DoRA, IA3, VeRA, prompt tuning), with the trained head
  as ``modules_to_save``: ``PeftModel.from_pretrained(base, folder)``;
- ``merged/``: a plain transformers model folder with the tokenizer (every mergeable method):
  ``AutoModelFor...from_pretrained(folder)``, no peftlab needed;
- ``peftlab/``: the trained tensors and their config (LoReFT, the bottleneck adapter: neither
  folds into the base weights): ``load_exported(folder)``.

Each form is reloaded the way a user loads it and compared with the run on the first test
examples; ``export.json`` records the largest logit difference, and a form that does not
reproduce the run stops the export with nothing written.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .io import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)


EXPORT_SCHEMA = 1
VERIFY_EXAMPLES = 8  # test examples each exported form is checked on against the run itself
# largest |logit difference| (fp32) an exported form may show, relative to the largest |logit|
# (at least 1): a merge reorders sums, which moves a 49k-token LM's logits by ~1e-5 of their size
VERIFY_RTOL = 1e-4


def export_run(run_dir: str | Path, model_spec, data_dir: str | Path, out_dir: str | Path,
               verify_examples: int = VERIFY_EXAMPLES) -> dict:
    """Write a completed finetune run's standard artifacts into ``out_dir`` (atomically):

    - ``peft/``: a peft adapter folder (peft-backed methods), for ``PeftModel.from_pretrained``;
    - ``merged/``: a plain transformers model folder with the tokenizer (mergeable methods);
    - ``peftlab/``: the trained tensors and their config, for ``load_exported`` (methods with
      neither form: LoReFT, the bottleneck adapter, which cannot be merged);
    - ``export.json``: what is there, how to load it, and each form's largest logit difference
      from the run itself on the first test examples (checked against ``VERIFY_RTOL``).
    """
    from .config import RunKey
    from .evaluate import batch_rows
    from .methods import build_method, load_trained
    from .models import load_tokenizer

    run_dir = Path(run_dir)
    record = _completed_record(run_dir)
    stats = read_json(Path(data_dir) / "stats.json")
    key = RunKey(**record["run"])
    params = record["config"]["method_params"]
    tokenizer = _task_processor(load_tokenizer(model_spec), stats)
    batch = _probe_batch(data_dir, stats, tokenizer, verify_examples)
    method = build_method(key.method, params, model_spec.targets)
    trained = load_trained(method, model_spec, stats, run_dir / "trainable.safetensors", key.seed).eval()
    reference = _logits(trained, batch)
    manifest = {"schema": EXPORT_SCHEMA, "run": record["run"], "method_params": params,
                "base": _base_entry(model_spec), "task": _task_entry(stats),
                "verified_on": f"the first {batch_rows(batch)} test examples", "forms": {}}
    with atomic_dir(out_dir) as tmp:
        forms = manifest["forms"]
        if _is_peft(trained):
            forms["peft"] = _write_peft(trained, tmp / "peft", model_spec, stats, tokenizer, batch, reference)
        if method.mergeable:
            forms["merged"] = _write_merged(method.merge(trained), tmp / "merged", tokenizer, stats, batch,
                                            reference)
        if not forms:
            forms["peftlab"] = _write_peftlab(run_dir, tmp / "peftlab", record, model_spec, stats, batch, reference)
        write_json(tmp / "export.json", manifest)
    return manifest


def export_stage(run_dir: str | Path, model_spec, data_dir: str | Path, out_dir: str | Path) -> dict:
    """The ``export`` rule: ``export_run`` for a completed run; for a failed one, a folder
    whose ``export.json`` says why nothing was exported (the pipeline goes on, as evaluation
    does for a failed run)."""
    record = read_json(Path(run_dir) / "result.json")
    if record.get("status") == "completed":
        return export_run(run_dir, model_spec, data_dir, out_dir)
    failure = (record.get("failure") or {}).get("reason", "unknown")
    manifest = {"schema": EXPORT_SCHEMA, "run": record.get("run"), "forms": {},
                "not_exported": f"the run failed ({failure}): nothing to export"}
    log.warning("%s: not exported, the run failed (%s)", run_dir, failure)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "export.json", manifest)
    return manifest


def load_exported(folder: str | Path):
    """The model of a ``peftlab/`` export folder (LoReFT, the adapter): the base model with
    the method applied and the trained tensors restored, in eval mode."""
    from .methods import build_method, load_trained
    from .models import ModelSpec

    folder = Path(folder)
    meta = read_json(folder / "peftlab_run.json")
    spec = ModelSpec.from_config(meta["model"]["name"], meta["model"])
    method = build_method(meta["method"], meta["method_params"], spec.targets)
    return load_trained(method, spec, meta["task"], folder / "trainable.safetensors", meta["seed"]).eval()


def _completed_record(run_dir: Path) -> dict:
    from .errors import PeftlabError

    path = run_dir / "result.json"
    if not path.exists() or not (run_dir / "trainable.safetensors").exists():
        raise PeftlabError(f"{run_dir} holds no finetune run (result.json and trainable.safetensors): "
                           "give a run folder under results/finetune, or run its finetune job first")
    record = read_json(path)
    if record.get("status") != "completed":
        raise PeftlabError(f"run {run_dir} did not complete (status {record.get('status')!r}): "
                           "only a completed run is exported; rerun its finetune job")
    return record


def _probe_batch(data_dir, stats: dict, tokenizer, n: int) -> dict:
    import torch

    from .data import load_split
    from .evaluate import first_batch

    return first_batch(load_split(data_dir, "test"), n, stats, tokenizer, torch.device("cpu"))


def _logits(model, batch: dict):
    import torch

    with torch.no_grad():
        return model(**batch).logits.float()


def _checked(form: str, model, batch: dict, reference) -> float:
    """The largest |logit difference| of a reloaded form from the run; an error above VERIFY_RTOL of the largest logit."""
    from .errors import PeftlabError

    diff = float((_logits(model.eval(), batch) - reference).abs().max())
    allowed = VERIFY_RTOL * max(1.0, float(reference.abs().max()))
    if not diff <= allowed:
        raise PeftlabError(f"the exported {form} form differs from the run by up to {diff:.3g} in the logits "
                           f"(more than {allowed:.3g}): nothing was written; report this with the run's folder")
    return diff


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _auto_class(stats: dict):
    """The auto class and head arguments the run's model loaded with (``models.load_model``'s)."""
    from .imagedata import IMAGE_CLASSIFICATION
    from .models import auto_model_class

    return auto_model_class(stats["num_labels"], stats["problem_type"], stats.get("kind") == IMAGE_CLASSIFICATION)


def _base_id(spec) -> str:
    """Where the base model loads from elsewhere: the hub id the config names, else its folder."""
    from .models import resolve_model_path

    if spec.pretrained and not Path(spec.pretrained).expanduser().exists():
        return spec.pretrained
    return str(resolve_model_path(spec))


def _base_entry(spec) -> dict:
    return {"name": spec.name, "name_or_path": _base_id(spec), "revision": spec.revision}


def _task_entry(stats: dict) -> dict:
    entry = {k: stats[k] for k in ("kind", "num_labels", "problem_type", "label_names", "main_metric") if k in stats}
    if stats.get("image_shape"):  # the side images are processed to (a served model does the same)
        entry["image_size"] = stats["image_shape"][-1]
    return entry


def _task_processor(tokenizer, stats: dict):
    """The tokenizer, or for an image task a copy of the image processor set to the task's image
    size, so that an exported folder preprocesses images as training did."""
    if not stats.get("image_shape"):
        return tokenizer
    import copy

    from .imagedata import size_kwargs

    processor = copy.deepcopy(tokenizer)
    for key, value in size_kwargs(processor, stats["image_shape"][-1]).items():
        setattr(processor, key, value)
    return processor


def _write_peft(model, folder: Path, spec, stats: dict, tokenizer, batch: dict, reference) -> dict:
    """peft's own adapter folder (the trained head as ``modules_to_save``), reloaded on a plain
    transformers base and checked against the run."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig

    from .models import held_load_report, resolve_model_path

    config = model.peft_config[model.active_adapter]
    config.base_model_name_or_path, config.revision = _base_id(spec), spec.revision
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    path, (auto, kwargs) = resolve_model_path(spec), _auto_class(stats)
    if getattr(AutoConfig.from_pretrained(path), "pad_token_id", 0) is None:  # peftlab set it from the tokenizer
        kwargs["pad_token_id"] = model.config.pad_token_id
    with held_load_report():  # the base's head is new: the adapter's trained copy replaces it
        base = auto.from_pretrained(path, dtype=torch.float32, **kwargs)
    diff = _checked("peft", PeftModel.from_pretrained(base, folder), batch, reference)
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return {"path": "peft", "load": f"PeftModel.from_pretrained({auto.__name__}.from_pretrained(base{args}), folder)",
            "max_abs_logit_diff": diff}


def _write_merged(merged, folder: Path, tokenizer, stats: dict, batch: dict, reference) -> dict:
    """A plain transformers model folder (``save_pretrained``, with the tokenizer), reloaded
    with transformers alone and checked against the run."""
    import torch

    from .models import GENERATIVE_PROBLEMS

    names = stats.get("label_names") or []
    if stats["problem_type"] not in GENERATIVE_PROBLEMS and len(names) == merged.config.num_labels:
        # a classification pipeline then answers with the task's label names
        merged.config.id2label = dict(enumerate(names))
        merged.config.label2id = {n: i for i, n in enumerate(names)}
    merged.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    auto, _ = _auto_class(stats)
    diff = _checked("merged", auto.from_pretrained(folder, dtype=torch.float32), batch, reference)
    return {"path": "merged", "load": f"{auto.__name__}.from_pretrained(folder)", "max_abs_logit_diff": diff}


def _write_peftlab(run_dir: Path, folder: Path, record: dict, spec, stats: dict, batch: dict, reference) -> dict:
    """The trained tensors and their config, reloaded with ``load_exported`` and checked."""
    import shutil

    folder.mkdir()
    shutil.copyfile(run_dir / "trainable.safetensors", folder / "trainable.safetensors")
    write_json(folder / "peftlab_run.json", {
        "method": record["run"]["method"], "method_params": record["config"]["method_params"],
        "seed": record["run"]["seed"], "model": spec.to_dict(), "task": _task_entry(stats)})
    diff = _checked("peftlab", load_exported(folder), batch, reference)
    return {"path": "peftlab", "load": "peftlab.artifacts.load_exported(folder)", "max_abs_logit_diff": diff}
