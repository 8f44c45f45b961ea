"""Weights a finetune run logs to MLflow (``mlflow.log_weights``).

``none``: none (the record only); ``trainable``: the stored trainable tensors
(``trainable.safetensors``); ``merged``: also the whole model with the trained update folded
into the base weights (mergeable methods; a deployable plain model), written into the MLflow
queue folder and removed once it is in the store.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .io import atomic_path, read_json

log = logging.getLogger(__name__)


def export_merged(model_spec, key, experiment_params: dict, data_dir: str | Path, weights_path: str | Path,
                  out_path: str | Path) -> bool:
    """Write the merged model's state dict; False when the method cannot be merged."""
    from safetensors.torch import save_model

    from .methods import build_method, load_trained

    stats = read_json(Path(data_dir) / "stats.json")
    method = build_method(key.method, experiment_params, model_spec.targets)
    if not method.mergeable:
        return False
    merged = method.merge(load_trained(method, model_spec, stats, weights_path, key.seed))
    with atomic_path(out_path, suffix=".safetensors") as tmp:
        save_model(merged, str(tmp), metadata={"method": key.method, "merged": "true"})
    return True


def weights_to_log(mlflow_config: dict, key, model_spec, record: dict, data_dir: str | Path,
                   weights_path: str | Path) -> list[Path]:
    """The weight files to log with a finetune run's record; never raises (a failed export
    is logged and the run goes without it)."""
    what = mlflow_config.get("log_weights", "none")
    if what == "none" or record.get("status") != "completed":
        return []
    files = [Path(weights_path)]
    if what == "merged":
        from .tracking import IDENTITY_TAGS, pending_dir

        name = "__".join(str(record["run"][k]) for k in IDENTITY_TAGS)
        out = pending_dir(mlflow_config) / "artifacts" / name / "merged.safetensors"
        try:
            if export_merged(model_spec, key, record["config"]["method_params"], data_dir, weights_path, out):
                files.append(out)
            else:
                log.info("method %s cannot be merged: logging its trainable tensors only", key.method)
        except Exception as exc:  # noqa: BLE001 - an export never fails the training job
            log.warning("merged export of %s failed (%s: %s); logging the trainable tensors only",
                        key.path(), type(exc).__name__, exc)
    return files
