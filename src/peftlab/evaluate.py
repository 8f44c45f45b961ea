"""Evaluation: a fine-tuned run's stored weights -> metrics on the held-out test split."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import RunKey
from .data import REGRESSION, load_split
from .generation import evaluate_generative, generate, left_padded, prompts_of, rescore
from .io import read_json, write_json
from .memory import cast_frozen
from .methods import build_method, load_trained
from .metrics import compute_metrics
from .models import ModelSpec, load_model, load_tokenizer
from .provenance import device, device_name, git_commit, set_seed, versions
from .train import (
    autocast,
    autocast_dtype,
    collator_for,
    is_generative,
    make_eval_loader,
    make_loader,
    precision_name,
    predict,
)

GENERATIVE_PROBE = 8  # prompts in a generative task's latency and generation-speed probe


def forward_latency_ms(model: torch.nn.Module, batch: dict, repeats: int = 3, budget_s: float = 1.0) -> float:
    """Median wall time of one forward pass on ``batch`` after one warm-up pass: ``repeats``
    timed passes, fewer once the timed ones add up to ``budget_s`` (at least one). A pass that
    long varies little relative to its length, and a decoder's probe on a CPU takes seconds per
    pass, three models over."""
    model.eval()
    times: list[float] = []
    cuda = next(iter(batch.values())).is_cuda
    with torch.no_grad():
        for i in range(repeats + 1):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(**batch)
            if cuda:
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
                if sum(times) >= budget_s:
                    break
    return 1000 * statistics.median(times)


def generation_speed(tokenizer, frame, max_new_tokens: int, dev: torch.device):
    """A function timing greedy generation (new tokens/s) of a model on the prompts of
    ``frame``, every prompt forced to ``max_new_tokens`` so that all models do equal work."""
    prompts = prompts_of(frame)

    def speed(m) -> float:
        m.eval()
        with torch.no_grad():
            generate(m, tokenizer, prompts[:1], 2, 1, dev, desc="warm-up")
            batch = {k: v.to(dev) for k, v in left_padded(prompts, tokenizer.pad_token_id).items()}
            t0 = time.perf_counter()
            m.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                       num_beams=1, pad_token_id=tokenizer.pad_token_id, use_cache=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        return len(prompts) * max_new_tokens / (time.perf_counter() - t0)

    speed.batch, speed.new_tokens = len(prompts), max_new_tokens
    return speed


def inference_cost(method, model, base_model, batch: dict, gen_speed=None) -> dict[str, Any]:
    """Latency of the trained model as stored (unmerged), merged when the method allows it,
    and of the plain pretrained architecture on the same batch, which a merged model must
    match; a method that cannot be merged pays ``added_latency_ratio`` at inference.
    ``gen_speed`` (``generation_speed``): generative tasks also time generation, and
    ``generation_speed_ratio`` is the deployed model's new tokens/s over the base model's."""
    model.eval()  # the logits the merged model must match: no dropout
    base_model.eval()
    with torch.no_grad():
        unmerged_logits = model(**batch).logits
    out: dict[str, Any] = {
        "batch_size": batch_rows(batch),
        "base_ms_per_batch": forward_latency_ms(base_model, batch),
        "unmerged_ms_per_batch": forward_latency_ms(model, batch),
        "mergeable": method.mergeable,
    }
    if gen_speed is not None:
        out |= {"generation_batch": gen_speed.batch, "generation_new_tokens": gen_speed.new_tokens,
                "base_new_tokens_per_s": gen_speed(base_model), "unmerged_new_tokens_per_s": gen_speed(model)}
    if method.mergeable:
        merged = method.merge(model)
        with torch.no_grad():
            diff = (merged(**batch).logits - unmerged_logits).abs().max().item()
        out["merged_ms_per_batch"] = forward_latency_ms(merged, batch)
        out["merged_max_abs_diff"] = diff
        out["merged_class"] = type(merged).__name__
        if gen_speed is not None:
            out["merged_new_tokens_per_s"] = gen_speed(merged)
    deployed = out.get("merged_ms_per_batch", out["unmerged_ms_per_batch"])
    out["added_latency_ratio"] = deployed / out["base_ms_per_batch"]
    if gen_speed is not None:
        tps = out.get("merged_new_tokens_per_s", out["unmerged_new_tokens_per_s"])
        out["generation_speed_ratio"] = tps / out["base_new_tokens_per_s"]
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
    predictions_path: str | Path | None = None,
) -> dict[str, Any]:
    """Rebuild base model + method, load the stored tensors, score the test split.

    ``method``: a ready ``Method`` object instead of the registry's (analyses);
    ``measure_inference``: time base / unmerged / merged forwards (skipped by analyses);
    ``predictions_path``: a JSONL file of every test example's prediction (and, for
    generative tasks, the generated text)."""
    set_seed(key.seed, threads)
    dev = device()
    stats = read_json(Path(data_dir) / "stats.json")
    ft = read_json(finetune_record_path)
    if ft.get("status", "completed") != "completed":
        return failed_evaluation(key, stats, ft, out_path, predictions_path)
    test_df = load_split(data_dir, "test")
    tokenizer = load_tokenizer(model_spec)
    if method is None:
        method = build_method(key.method, ft["config"]["method_params"], model_spec.targets)
    model, base, amp = _trained_model(key, model_spec, method, ft, stats, weights_path, dev)
    batch_size = ft["config"]["training"]["eval_batch_size"]
    t0 = time.perf_counter()
    metrics, rows, speed, sets = _score_test(model, tokenizer, test_df, stats, batch_size, dev, amp)
    elapsed = time.perf_counter() - t0
    inference = None
    if measure_inference:
        with autocast(dev, amp if base == torch.bfloat16 else None):  # a bf16 base runs in bf16 only
            inference = _inference_probe(key, model_spec, method, model, tokenizer, test_df, stats, batch_size,
                                         dev, base)
    if predictions_path is not None:
        write_jsonl(predictions_path, rows)
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
        "test_sets": sets,
        "eval_time_s": elapsed,
        "examples_per_s": len(test_df) / elapsed if elapsed > 0 else None,
        "generation": speed,
        "examples": example_outputs(rows) if is_generative(stats) else None,
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


def _trained_model(key: RunKey, model_spec: ModelSpec, method, ft: dict, stats: dict, weights_path, dev):
    """The base model with the run's stored tensors loaded, its frozen base in the dtype it
    trained with (records written before that was a setting: fp32), on ``dev``; with the
    base's dtype and the autocast dtype the training used (a bf16 base: bf16)."""
    base = trained_base_dtype(ft)
    model = load_trained(method, model_spec, stats, weights_path, key.seed)
    cast_frozen(model, base)
    amp = torch.bfloat16 if base == torch.bfloat16 else autocast_dtype(
        ft["config"]["training"].get("precision", "auto"), dev)
    return model.to(dev), base, amp


def _score_test(model, tokenizer, test_df, stats: dict, batch_size: int, dev, amp):
    """Test metrics, one row per example, generation speed (generative tasks) and per-set metrics."""
    if is_generative(stats):
        metrics, rows, speed = evaluate_generative(model, tokenizer, test_df, stats["task"], batch_size, dev,
                                                   autocast(dev, amp), desc="test")
        metrics, sets = by_test_set(stats["task"], test_df, rows, metrics)
        return metrics, rows, speed, sets
    loader = make_eval_loader(test_df, batch_size, collator_for(stats, tokenizer), pin_memory=dev.type == "cuda")
    outputs, labels = predict(model, loader, dev, desc="test", dtype=amp)
    metrics = compute_metrics(stats["problem_type"], outputs, labels)
    return metrics, classifier_rows(test_df, outputs, labels, stats), None, None


def trained_base_dtype(finetune_record: dict) -> torch.dtype:
    """The dtype the run's frozen base trained in (its record's ``memory``; fp32 before that)."""
    name = (finetune_record.get("memory") or {}).get("base_dtype", "fp32")
    return torch.bfloat16 if name == "bf16" else torch.float32


def _inference_probe(key: RunKey, model_spec: ModelSpec, method, model, tokenizer, test_df, stats: dict,
                     batch_size: int, dev: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """``inference_cost`` of the trained model against a fresh pretrained one (in the same
    ``dtype``) on the first test rows."""
    base_model = load_model(model_spec, stats["num_labels"], stats["problem_type"], seed=key.seed)
    cast_frozen(base_model.requires_grad_(False), dtype)
    base_model = base_model.to(dev)
    # a causal LM's probe: at most GENERATIVE_PROBE prompts (each timed forward of a full eval
    # batch costs seconds on a CPU, and the probe times twelve of them and three generations)
    probe = min(batch_size, GENERATIVE_PROBE) if is_generative(stats) else batch_size
    gen_speed = (generation_speed(tokenizer, test_df.head(probe), stats["task"]["max_new_tokens"], dev)
                 if is_generative(stats) else None)
    return inference_cost(method, model, base_model, first_batch(test_df, probe, stats, tokenizer, dev), gen_speed)


def by_test_set(task: dict, frame, rows: list[dict], metrics: dict) -> tuple[dict, dict | None]:
    """A task tested on several sets (``test_sets``): each set's metrics, in the config's order,
    and as headline metrics their unweighted mean over sets (the papers' "Avg."); each row is
    tagged with its set. Other tasks: their metrics as they are, and None."""
    if "test_set" not in frame:
        return metrics, None
    for row, name in zip(rows, frame["test_set"], strict=True):
        row["test_set"] = name
    groups = frame.groupby("test_set", sort=False).indices
    order = [s["task"] for s in task.get("test_sets") or () if s["task"] in groups]
    order += [name for name in groups if name not in order]
    sets = {name: {"n_examples": len(groups[name]),
                   "metrics": rescore(task, frame.iloc[groups[name]], [rows[i] for i in groups[name]])}
            for name in order}
    mean = {k: float(np.mean([s["metrics"][k] for s in sets.values()])) for k in metrics}
    return mean, sets


def batch_rows(batch: dict) -> int:
    """The examples in a model-input batch (token ids or images)."""
    return int(next(iter(batch.values())).shape[0])


def first_batch(frame, batch_size: int, stats: dict, tokenizer, dev: torch.device) -> dict[str, torch.Tensor]:
    """Latency is timed on the first test rows in file order (a batch of typical lengths): the
    classifier's inputs, or a generative task's prompts (left-padded, as generation sees them)."""
    head = frame.head(batch_size)
    if is_generative(stats):
        batch = left_padded(prompts_of(head), tokenizer.pad_token_id)
    else:
        batch = next(iter(make_loader(head, batch_size, collator_for(stats, tokenizer), shuffle=False)))
    return {k: v.to(dev) for k, v in batch.items() if k != "labels"}


def classifier_rows(frame, outputs, labels, stats: dict) -> list[dict]:
    """One prediction per test example of a classifier (or regressor)."""
    if stats["problem_type"] == REGRESSION:
        preds = outputs.reshape(-1).tolist()
        return [{"example_id": int(e), "prediction": p, "label": float(y)}
                for e, p, y in zip(frame["example_id"], preds, labels, strict=True)]
    names = stats.get("label_names") or []
    preds = outputs.argmax(axis=-1)
    return [{"example_id": int(e), "prediction": names[int(p)] if names else int(p),
             "label": names[int(y)] if names else int(y), "correct": bool(p == y)}
            for e, p, y in zip(frame["example_id"], preds, labels, strict=True)]


def example_outputs(rows: list[dict], per_kind: int = 4) -> dict[str, list[dict]]:
    """A few right and wrong generations (in test order) for the report."""
    right = [r for r in rows if r["correct"] is True][:per_kind]
    wrong = [r for r in rows if r["correct"] is False][:per_kind]
    other = [r for r in rows if r["correct"] is None][:per_kind]
    return {"right": right, "wrong": wrong, "unscored": other}


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    from .io import atomic_path

    with atomic_path(Path(path)) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=_plain) + "\n")


def _plain(value):
    return value.item() if hasattr(value, "item") else str(value)


def failed_evaluation(key: RunKey, stats: dict, ft: dict, out_path: str | Path,
                      predictions_path: str | Path | None = None) -> dict[str, Any]:
    """The record of a run whose fine-tuning failed: no metrics (its stored tensors are not a
    trained model and are not loaded), the fine-tuning's failure, and ``status: failed``
    (its predictions file, when asked for, is empty)."""
    if predictions_path is not None:
        write_jsonl(predictions_path, [])
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
