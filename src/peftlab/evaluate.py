"""Evaluation: a fine-tuned run's stored weights -> metrics on the held-out test split."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .config import RunKey
from .data import REGRESSION, load_split
from .io import read_json, write_json
from .methods import build_method
from .metrics import compute_metrics
from .models import ModelSpec, load_model, load_tokenizer
from .provenance import device, device_name, git_commit, set_seed, versions
from .train import Collator, autocast_dtype, make_eval_loader, make_loader, precision_name, predict


def forward_latency_ms(model: torch.nn.Module, batch: dict, repeats: int = 3) -> float:
    """Median wall time of one forward pass on ``batch`` (after one warm-up pass)."""
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            if batch["input_ids"].is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(**batch)
            if batch["input_ids"].is_cuda:
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def inference_cost(method, model, base_model, batch: dict) -> dict[str, Any]:
    """Latency of the trained model as stored (unmerged), merged when the method allows it,
    and of the plain pretrained architecture on the same batch, which a merged model must
    match; a method that cannot be merged pays ``added_latency_ratio`` at inference."""
    with torch.no_grad():
        unmerged_logits = model(**batch).logits
    out: dict[str, Any] = {
        "batch_size": int(batch["input_ids"].shape[0]),
        "base_ms_per_batch": forward_latency_ms(base_model, batch),
        "unmerged_ms_per_batch": forward_latency_ms(model, batch),
        "mergeable": method.mergeable,
    }
    if method.mergeable:
        merged = method.merge(model)
        with torch.no_grad():
            diff = (merged(**batch).logits - unmerged_logits).abs().max().item()
        out["merged_ms_per_batch"] = forward_latency_ms(merged, batch)
        out["merged_max_abs_diff"] = diff
        out["merged_class"] = type(merged).__name__
    deployed = out.get("merged_ms_per_batch", out["unmerged_ms_per_batch"])
    out["added_latency_ratio"] = deployed / out["base_ms_per_batch"]
    return out


def evaluate(
    key: RunKey,
    model_spec: ModelSpec,
    data_dir: str | Path,
    finetune_record_path: str | Path,
    weights_path: str | Path,
    out_path: str | Path,
    threads: int | None = None,
    method=None,
    measure_inference: bool = True,
) -> dict[str, Any]:
    """Rebuild base model + method, load the stored tensors, score the test split.

    ``method``: a ready ``Method`` object instead of the registry's (analyses);
    ``measure_inference``: time base / unmerged / merged forwards (skipped by analyses)."""
    set_seed(key.seed, threads)
    dev = device()
    stats = read_json(Path(data_dir) / "stats.json")
    ft = read_json(finetune_record_path)
    if ft.get("status", "completed") != "completed":
        return failed_evaluation(key, stats, ft, out_path)
    test_df = load_split(data_dir, "test")
    tokenizer = load_tokenizer(model_spec)
    model = load_model(model_spec, stats["num_labels"], stats["problem_type"], seed=key.seed)
    if method is None:
        method = build_method(key.method, ft["config"]["method_params"], model_spec.targets)
    model = method.load(model, weights_path).to(dev)
    collator = Collator(tokenizer.pad_token_id, stats["problem_type"] == REGRESSION)
    batch_size = ft["config"]["training"]["eval_batch_size"]
    loader = make_eval_loader(test_df, batch_size, collator, pin_memory=dev.type == "cuda")
    # the training's precision (records written before it was a setting: auto)
    amp = autocast_dtype(ft["config"]["training"].get("precision", "auto"), dev)
    t0 = time.perf_counter()
    outputs, labels = predict(model, loader, dev, desc="test", dtype=amp)
    elapsed = time.perf_counter() - t0
    metrics = compute_metrics(stats["problem_type"], outputs, labels)
    inference = None
    if measure_inference:
        # latency on the first test rows in file order: a batch of typical lengths
        first = next(iter(make_loader(test_df.head(batch_size), batch_size, collator, shuffle=False)))
        batch = {k: v.to(dev) for k, v in first.items() if k != "labels"}
        base_model = load_model(model_spec, stats["num_labels"], stats["problem_type"], seed=key.seed).to(dev)
        inference = inference_cost(method, model, base_model, batch)
    record = {
        "schema_version": 1,
        "rule": "evaluate",
        "status": "completed",
        "failure": None,
        "run": key.tags() | {"seed": key.seed},
        "split": "test",
        "n_examples": int(len(test_df)),
        "data_fingerprint": stats["fingerprint"],
        "main_metric": stats["main_metric"],
        "metrics": metrics,
        "eval_time_s": elapsed,
        "examples_per_s": len(test_df) / elapsed if elapsed > 0 else None,
        "inference": inference,
        "device": str(dev),
        "device_name": device_name(dev),
        "precision": precision_name(amp),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "git_commit": git_commit(),
    }
    write_json(out_path, record)
    return record


def failed_evaluation(key: RunKey, stats: dict, ft: dict, out_path: str | Path) -> dict[str, Any]:
    """The record of a run whose fine-tuning failed: no metrics (its stored tensors are not a
    trained model and are not loaded), the fine-tuning's failure, and ``status: failed``."""
    record = {
        "schema_version": 1,
        "rule": "evaluate",
        "status": "failed",
        "failure": ft.get("failure") or {"reason": f"fine-tuning ended with status {ft.get('status')!r}",
                                         "step": None},
        "run": key.tags() | {"seed": key.seed},
        "split": "test",
        "n_examples": int(stats["splits"]["test"]["size"]),
        "data_fingerprint": stats["fingerprint"],
        "main_metric": stats["main_metric"],
        "metrics": {},
        "versions": versions(),
        "git_commit": git_commit(),
    }
    write_json(out_path, record)
    return record
