"""Fine-tuning: one (model, task, method, variant, seed) -> stored weights + result record.

The loop: dynamic padding, AdamW with warmup + decay, a progress bar, periodic validation
and model selection on the validation split only (the best step's trainable tensors are
kept and stored). Deterministic: the same seed gives the same numbers on CPU.

Resumable (``checkpoint.py``): the loop checkpoints periodically, on SIGTERM and before a
SLURM job's time limit; a run started again resumes from its checkpoint and ends with the
same numbers, bitwise on CPU, as one that was never stopped.

For large models (``memory.py``, ``distributed.py``): the frozen base in bf16, gradient
checkpointing, and one optimizer step over a global batch of ``batch_size`` x
``gradient_accumulation_steps`` x processes rows, cut into micro-batches whose losses are
weighed so that the update is the mean over the whole global batch.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import checkpoint, memory
from .codegraph import default_graph
from .config import Experiment, RunKey
from .data import REGRESSION, load_split
from .distributed import Context, ShardedBatches
from .errors import TrainingError
from .gendata import GENERATIVE_KINDS
from .generation import IGNORE, CausalCollator, evaluate_generative, loss_of
from .imagedata import IMAGE_CLASSIFICATION
from .io import dir_size_bytes, fingerprint, read_json, write_json
from .methods import build_method
from .metrics import compute_metrics
from .models import ModelSpec, count_parameters, load_model, load_tokenizer
from .provenance import device, device_name, git_commit, peak_memory_mb, set_seed, versions

log = logging.getLogger(__name__)

PROTOCOL = ("fixed seeded train/validation/test splits; model selection on validation "
            "(best evaluation step by the task's main metric); metrics reported on test")


class Collator:
    """Pads a list of tokenized rows to the longest in the batch (dynamic padding)."""

    def __init__(self, pad_token_id: int, regression: bool):
        self.pad = pad_token_id
        self.regression = regression

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        has_tt = "token_type_ids" in rows[0]
        tt = torch.zeros((len(rows), n), dtype=torch.long) if has_tt else None
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(r["input_ids"], dtype=torch.long)
            mask[i, :k] = 1
            if has_tt:
                tt[i, :k] = torch.tensor(r["token_type_ids"], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask}
        if has_tt:
            batch["token_type_ids"] = tt
        dtype = torch.float32 if self.regression else torch.long
        batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=dtype)
        return batch


class ImageCollator:
    """Stacks prepared images (flattened float16 pixel values) into a float32 ``pixel_values``
    batch of ``shape`` (C, H, W) each."""

    def __init__(self, shape: list[int]):
        self.shape = tuple(int(x) for x in shape)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        pixels = np.stack([np.asarray(r["pixel_values"], dtype=np.float32).reshape(self.shape) for r in rows])
        return {"pixel_values": torch.from_numpy(pixels), "labels": torch.tensor([r["label"] for r in rows])}


def _rows(frame: pd.DataFrame) -> list[dict]:
    cols = [c for c in ("input_ids", "token_type_ids", "pixel_values", "label", "prompt_length") if c in frame]
    return frame[cols].to_dict("records")


def row_lengths(frame: pd.DataFrame) -> np.ndarray:
    """Each row's token count (a prepared image: all the same, its patches)."""
    if "input_ids" not in frame:
        return np.ones(len(frame), dtype=int)
    return frame["input_ids"].map(len).to_numpy()


def is_generative(stats: dict) -> bool:
    """A generation / multiple-choice task (a causal LM scored on what it generates)."""
    return stats.get("kind", "classification") in GENERATIVE_KINDS


def is_image(stats: dict) -> bool:
    """An image-classification task (pixel values through a ViT)."""
    return stats.get("kind") == IMAGE_CLASSIFICATION


def collator_for(stats: dict, tokenizer) -> Collator | CausalCollator | ImageCollator:
    """The batches of a prepared task: classifier rows, images, or prompt + target rows of a causal LM."""
    if is_image(stats):
        return ImageCollator(stats["image_shape"])
    if is_generative(stats):
        return CausalCollator(tokenizer.pad_token_id, bool(stats["task"].get("train_on_prompt", False)))
    return Collator(tokenizer.pad_token_id, stats["problem_type"] == REGRESSION)


def make_loader(frame: pd.DataFrame, batch_size: int, collator: Collator, shuffle: bool, seed: int = 0,
                pin_memory: bool = False) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(_rows(frame), batch_size=batch_size, shuffle=shuffle, collate_fn=collator, generator=gen,
                      pin_memory=pin_memory)


def autocast_dtype(precision: str, dev: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``training.precision`` on ``dev`` (None: plain fp32). ``auto`` is
    bf16 autocast on a CUDA GPU that supports it and fp32 elsewhere; ``bf16`` asks for it on
    any device (on a CPU it is slower than fp32 unless the CPU has bf16 instructions)."""
    if precision == "bf16" or (precision == "auto" and dev.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """How a record names what ran (``autocast_dtype``'s result)."""
    return "bf16 autocast" if dtype == torch.bfloat16 else "fp32"


def autocast(dev: torch.device, dtype: torch.dtype | None):
    """Mixed precision for the forward pass (weights and optimizer state stay fp32)."""
    return torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def to_device(batch: dict[str, torch.Tensor], dev: torch.device) -> dict[str, torch.Tensor]:
    """A batch on ``dev``; from pinned host memory (a GPU's loaders) the copies are asynchronous."""
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


def defer_loss_readback(dev: torch.device) -> bool:
    """Whether the loop reads each step's loss back only at logging, validation and checkpoint
    steps instead of after every step: on a GPU a read-back waits for the step's kernels,
    so the host cannot queue the next step meanwhile; on a CPU it costs nothing."""
    return dev.type == "cuda"


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Training batches of rows of similar length, in random order (``training.group_by_length``).

    Each epoch draws a random permutation of the rows, cuts it into groups of ``group``
    batches, sorts each group by length (longest first), cuts it into batches and shuffles the
    order of all batches. Every row still comes once per epoch and batch composition stays
    random across epochs, but a batch pads to about its rows' own length: on rotten_tomatoes
    (1,000 rows, 27 tokens mean, batch 16) the padded tokens per epoch fall from 1.79x
    the real ones to 1.03x. The draws use ``generator`` (the loader's), so a resumed run
    that restores it gets the same batches."""

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator, group: int = 50):
        self.lengths, self.batch_size, self.generator = list(lengths), batch_size, generator
        self.span = batch_size * group

    def __len__(self) -> int:
        n, full = len(self.lengths), len(self.lengths) // self.span
        return full * math.ceil(self.span / self.batch_size) + math.ceil((n - full * self.span) / self.batch_size)

    def __iter__(self):
        perm = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        batches = []
        for start in range(0, len(perm), self.span):
            chunk = sorted(perm[start:start + self.span], key=lambda i: -self.lengths[i])
            batches += [chunk[k:k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
        for b in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[b]


class Throughput:
    """Steady-state training speed of this process: steps after the first ``warmup``, each
    timed from the end of the previous step's work to the end of its optimizer step (data
    loading included; validation, checkpoints and skipped batches excluded)."""

    def __init__(self, warmup: int = 5):
        self.warmup, self.seen, self.steps, self.seconds = warmup, 0, 0, 0.0
        self.examples = self.tokens = self.padded = 0
        self.mark = time.perf_counter()

    def restart(self) -> None:
        self.mark = time.perf_counter()

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        """Count a finished step of ``batch`` (an image batch, with no attention mask, counts
        one token per image)."""
        now = time.perf_counter()
        self.seen += 1
        if self.seen > self.warmup:
            self.steps += 1
            self.seconds += now - self.mark
            mask = batch.get("attention_mask")
            rows = len(batch["labels"])
            self.examples += rows
            self.tokens += int(mask.sum()) if mask is not None else rows
            self.padded += int(mask.numel()) if mask is not None else rows
        self.mark = now

    def summary(self) -> dict[str, Any] | None:
        if not self.steps or self.seconds <= 0:
            return None
        return {"warmup_steps": self.warmup, "steps": self.steps, "seconds": self.seconds,
                "steps_per_s": self.steps / self.seconds, "examples_per_s": self.examples / self.seconds,
                "tokens_per_s": self.tokens / self.seconds, "padded_tokens_per_s": self.padded / self.seconds,
                "padding_share": 1 - self.tokens / self.padded}


def make_train_loader(frame: pd.DataFrame, batch_size: int, collator: Collator, seed: int,
                      group_by_length: bool, pin_memory: bool = False, rank: int = 0, world: int = 1) -> DataLoader:
    """The shuffled training loader: plain random batches, or ``LengthGroupedBatches``, of
    ``batch_size`` rows (a global batch); with ``world`` processes, this ``rank``'s shard of each
    (``distributed.ShardedBatches``: every process draws the same order)."""
    group_by_length = group_by_length and "input_ids" in frame  # images all have one length
    if not group_by_length and world == 1:
        return make_loader(frame, batch_size, collator, shuffle=True, seed=seed, pin_memory=pin_memory)
    gen = torch.Generator().manual_seed(seed)
    if group_by_length:
        sampler = LengthGroupedBatches(row_lengths(frame).tolist(), batch_size, gen)
    else:  # what DataLoader(shuffle=True) builds, drawing from the same generator
        sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(range(len(frame)), generator=gen),
                                                batch_size, drop_last=False)
    if world > 1:
        sampler = ShardedBatches(sampler, rank, world)
    return DataLoader(_rows(frame), batch_sampler=sampler, collate_fn=collator, generator=gen,
                      pin_memory=pin_memory)


def micro_batches(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """``batch`` cut into batches of ``size`` rows (gradient accumulation), each trimmed to its
    own longest row (rows are right-padded; images are not cut)."""
    n = len(batch["labels"])
    if n <= size:
        return [batch]
    out = []
    for start in range(0, n, size):
        part = {k: v[start:start + size] for k, v in batch.items()}
        if "attention_mask" not in part:
            out.append(part)
            continue
        width = int(part["attention_mask"].sum(dim=1).max())
        out.append({k: v[:, :width] if v.ndim == 2 else v for k, v in part.items()})
    return out


def loss_items(batch: dict[str, torch.Tensor]) -> int:
    """What a batch's loss is the mean over: its labelled (shifted) tokens for a causal LM, its
    rows for a classifier. Micro-batches and processes weigh their losses by it, so the update
    is the mean over the whole global batch, as one batch would make it."""
    if "prompt_length" in batch:
        return int((batch["labels"][:, 1:] != IGNORE).sum())
    return len(batch["labels"])


def make_eval_loader(frame: pd.DataFrame, batch_size: int, collator: Collator,
                     pin_memory: bool = False) -> DataLoader:
    """Batches of rows sorted by token count, so each batch pads to a similar length (on
    rotten_tomatoes' validation split, half the time of batches in file order). ``predict``
    puts the outputs back in the frame's row order."""
    order = np.argsort(row_lengths(frame), kind="stable")
    loader = make_loader(frame.iloc[order], batch_size, collator, shuffle=False, pin_memory=pin_memory)
    loader.row_order = order
    return loader


def eval_steps(steps_per_epoch: int, evals_per_epoch: int, total_steps: int) -> set[int]:
    """Steps after which validation runs: ``evals_per_epoch`` evenly spaced points per
    epoch, the last at the epoch's end, and the final step (never two passes a step apart)."""
    per = max(1, min(evals_per_epoch, steps_per_epoch))
    epochs = math.ceil(total_steps / steps_per_epoch)
    steps = {e * steps_per_epoch + math.ceil(j * steps_per_epoch / per)
             for e in range(epochs) for j in range(1, per + 1)}
    return {s for s in steps if s < total_steps} | {total_steps}


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, dev: torch.device, desc: str = "predict",
            dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits (or regression outputs) and labels over a loader, in the rows' order (the
    frame's order for a ``make_eval_loader``); ``dtype``: autocast (``autocast_dtype``).
    The outputs stay on the device until the end (one read-back, not one per batch)."""
    model.eval()
    outs, labels = [], []
    for batch in tqdm(loader, desc=desc, leave=False, mininterval=5):
        labels.append(batch.pop("labels").numpy())
        with autocast(dev, dtype):
            outs.append(model(**to_device(batch, dev)).logits.float())
    outputs, labels = torch.cat(outs).cpu().numpy(), np.concatenate(labels)
    order = getattr(loader, "row_order", None)
    if order is not None:
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        outputs, labels = outputs[inverse], labels[inverse]
    return outputs, labels


def validation_metrics(model: nn.Module, tokenizer, loader: DataLoader, frame: pd.DataFrame, stats: dict,
                       batch_size: int, dev: torch.device, dtype: torch.dtype | None,
                       synced: bool = False) -> dict[str, float]:
    """The task's metrics on a split: predictions of a classifier, or generations scored
    (``synced``: every process generates until all have finished, as a sharded model needs)."""
    if is_generative(stats):
        return evaluate_generative(model, tokenizer, frame, stats["task"], batch_size, dev, autocast(dev, dtype),
                                   desc="validation", synced=synced)[0]
    outputs, labels = predict(model, loader, dev, desc="validation", dtype=dtype)
    return compute_metrics(stats["problem_type"], outputs, labels)


def _optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # biases and norms are not decayed; a sparse weight delta is (it pulls W back to W0)
        is_weight = p.ndim >= 2 or name.endswith("sparse_delta")
        (decay if is_weight and "layernorm" not in name.lower() else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel (as the Trainer's default adamw_torch_fused): on a GPU one launch for every
    # tensor; on a CPU a vectorised update instead of a Python loop over the tensors
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate, fused=True)


def _schedule(total_steps: int, cfg):
    warmup = int(math.ceil(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


class LossGuard:
    """What a NaN or infinite loss does (``training.on_nonfinite_loss``): ``stop`` ends the
    run as failed; ``skip`` drops that batch without an optimizer step (counted in the
    record), and still fails after a whole epoch of such batches in a row."""

    def __init__(self, policy: str, fix: str, batches_per_epoch: int):
        self.policy, self.fix, self.patience = policy, fix, max(1, batches_per_epoch)
        self.skipped, self.in_a_row = 0, 0
        self.failure: dict[str, Any] | None = None

    def ok(self, value: float, step: int) -> bool:
        """True when the batch (its loss ``value``) trains; False to skip it (``failure`` is
        set when the run stops)."""
        if math.isfinite(value):
            self.in_a_row = 0
            return True
        what = "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        if self.policy == "skip":
            self.skipped += 1
            self.in_a_row += 1
            log.warning("loss became %s at step %d: batch skipped (%d so far)", what, step, self.skipped)
            if self.in_a_row < self.patience:
                return False
            reason = (f"loss became {what} at step {step} on {self.in_a_row} batches in a row "
                      f"(a whole epoch skipped); {self.fix}")
        else:
            reason = f"loss became {what} at step {step}; {self.fix}"
        self.failure = {"reason": reason, "step": step}
        log.error(reason)
        return False


def nonfinite_fix(experiment: Experiment) -> str:
    """The advice of a diverged run: where its learning rate is set."""
    where = experiment.files[-1] if experiment.files else "analyses.intrinsic_dimension.training in config.yaml"
    skip = "" if experiment.training.on_nonfinite_loss == "skip" else ", or set on_nonfinite_loss: skip there"
    return f"lower learning_rate (now {experiment.training.learning_rate}) in {where}{skip}"


def _run_fingerprint(key: RunKey, model_spec: ModelSpec, experiment: Experiment, method, stats: dict,
                     total_steps: int, code_fingerprint: str) -> str:
    """What a checkpoint must match to be resumed: the run, its resolved config, the data, and
    the code of the training loop and the method (whoever calls, with or without a workflow
    fingerprint)."""
    modules = [__name__] + [c.__module__ for c in type(method).__mro__ if c.__module__.startswith("peftlab.")]
    return fingerprint(key.tags(), asdict(model_spec), experiment.resolved(), method.config.to_dict(),
                       stats["fingerprint"], total_steps, code_fingerprint,
                       default_graph().modules_fingerprint(modules))


def finetune(
    key: RunKey,
    model_spec: ModelSpec,
    experiment: Experiment,
    data_dir: str | Path,
    weights_path: str | Path,
    record_path: str | Path,
    threads: int | None = None,
    code_fingerprint: str = "",
    method=None,
    parallel: str = "ddp",
) -> dict[str, Any]:
    """Train one run; write the trainable tensors to ``weights_path`` and the record.

    ``method``: a ready ``Method`` object instead of the registry's ``key.method`` (the
    intrinsic-dimension analysis trains its random-subspace reparametrisation this way).
    ``parallel``: under torchrun, "fsdp" shards full fine-tuning (``distributed``); else DDP.

    Resumes from the checkpoint beside ``record_path`` when one of this run exists, and
    removes it once the outputs are written. Raises ``checkpoint.TrainingInterrupted`` (after
    saving) when SIGTERM arrives or the SLURM job's time is nearly up."""
    with checkpoint.StopSignal() as stop:
        return _finetune(key, model_spec, experiment, data_dir, weights_path, record_path, threads,
                         code_fingerprint, method, stop, parallel)


def _finetune(key, model_spec, experiment, data_dir, weights_path, record_path, threads, code_fingerprint,
              method, stop: checkpoint.StopSignal, parallel: str) -> dict[str, Any]:
    if method is None:
        method = build_method(key.method, experiment.method_params, model_spec.targets)
    ctx = Context.from_env(shard=parallel == "fsdp" and method.family == "full")
    set_seed(key.seed, threads, deterministic=experiment.training.deterministic)
    dev = ctx.device() if ctx.active else device()
    stats = read_json(Path(data_dir) / "stats.json")
    train_df, val_df = load_split(data_dir, "train"), load_split(data_dir, "validation")
    tokenizer = load_tokenizer(model_spec)
    collator = collator_for(stats, tokenizer)
    # sharded: the model stays on the host until FSDP moves each process's shard to its device
    model, base_params, trainable = _model_with_method(key, model_spec, experiment, method, stats, train_df,
                                                       collator, torch.device("cpu") if ctx.sharded else dev)
    if ctx.active:  # the same start everywhere (DDP copies process 0's weights); dropout differs per process
        torch.manual_seed(key.seed + ctx.rank)
    loop = _Loop(key, experiment, model, method, stats, (train_df, val_df), (tokenizer, collator), dev, ctx)
    ckpt_path = checkpoint.checkpoint_path(record_path)
    run_fp = _run_fingerprint(key, model_spec, experiment, method, stats, (loop.total_steps, ctx.world),
                              code_fingerprint)
    loop.resume(ckpt_path, run_fp)
    loop.run(stop, ckpt_path, run_fp)
    # keep the best validation step (model selection on validation only); a failed run
    # stores its state at the failure (a valid file of the method's tensors, not a trained model)
    kept = loop.best_state if loop.best_state is not None and loop.guard.failure is None else None
    if ctx.sharded:  # the full tensors, gathered on process 0 (every process takes part)
        kept = loop.trainable_state() if kept is None else kept
    if not ctx.main:  # process 0 writes the outputs
        return None
    if ctx.sharded:
        method.save(model, weights_path, state=kept)
    else:
        if kept is not None:
            model.load_state_dict(kept, strict=False)
        method.save(model, weights_path)
    record = _finetune_record(
        key, model_spec, experiment, method, stats, code_fingerprint,
        sizes={"trainable": trainable, "base": base_params, "steps_per_epoch": loop.steps_per_epoch},
        progress={"step": loop.step, "resumed_from": loop.resumed_from, "curves": loop.curves, "best": loop.best,
                  "train_time": loop.train_time_s, "speed": loop.speed, "guard": loop.guard},
        dev=dev, amp=loop.amp, weights_path=weights_path) | {"memory": loop.memory_settings()}
    write_json(record_path, record)
    checkpoint.remove(ckpt_path)
    return record


class _Loop:
    """One run's training loop and its state: the position in the data, the optimizer and
    schedule, the running loss, the curves and the best validation step so far, all of which
    a checkpoint saves and a resumed run restores."""

    def __init__(self, key: RunKey, experiment: Experiment, model: nn.Module, method, stats: dict,
                 frames: tuple[pd.DataFrame, pd.DataFrame], text: tuple, dev: torch.device, ctx: Context):
        cfg = self.cfg = experiment.training
        self.key, self.model, self.method, self.stats, self.dev, self.ctx = key, model, method, stats, dev, ctx
        (train_df, self.val_df), (self.tokenizer, collator) = frames, text
        pin = dev.type == "cuda"
        # a bf16 base computes in bf16 whatever ``precision`` says (its auto is fp32 on a CPU)
        base_bf16 = memory.frozen_dtype(model) == torch.bfloat16
        self.amp = torch.bfloat16 if base_bf16 else autocast_dtype(cfg.precision, dev)
        # one optimizer step: a global batch of batch_size x accumulation x processes rows
        self.global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * ctx.world
        self.train_loader = make_train_loader(train_df, self.global_batch, collator, key.seed, cfg.group_by_length,
                                              pin, ctx.rank, ctx.world)
        self.trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
        self.net = ctx.wrap(model)  # what the training forward calls (DDP's wrapper on several processes)
        self.val_loader = make_eval_loader(self.val_df, cfg.eval_batch_size, collator, pin)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = cfg.max_steps or max(1, int(math.ceil(cfg.epochs * self.steps_per_epoch)))
        self.evaluate_at = eval_steps(self.steps_per_epoch, cfg.evals_per_epoch, self.total_steps)
        self.optimizer = _optimizer(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(self.total_steps, cfg))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.curves: dict[str, list] = {"train_loss": [], "validation": [], "learning_rate": []}
        self.best: dict[str, Any] = {"step": 0, "value": -math.inf, "metrics": {}}
        self.best_state = None
        self.step, self.running, self.n_running = 0, 0.0, 0
        # position in the data order: the loader's generator state when this epoch's shuffle was
        # drawn, and how many of the epoch's batches have been trained
        self.epoch, self.batch_in_epoch = 0, 0
        self.epoch_rng = self.train_loader.generator.get_state()
        self.guard = LossGuard(cfg.on_nonfinite_loss, nonfinite_fix(experiment), self.steps_per_epoch)
        # each loss is read back at once (``skip`` needs it: the step depends on it; so does a
        # CPU run), or with ``stop`` on a GPU kept here, as (steps done before the batch, loss on
        # the device), until a logging, validation or checkpoint step reads them (``settle``)
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.defer = cfg.on_nonfinite_loss == "stop" and defer_loss_readback(dev)
        self.trained_before, self.resumed_from = 0.0, []
        self.t0, self.train_time_s = time.perf_counter(), 0.0
        self.speed = Throughput()

    def memory_settings(self) -> dict[str, Any]:
        """How the run used memory and processes, as it ran (the record's ``memory``)."""
        return {"base_dtype": memory.dtype_name(memory.frozen_dtype(self.model)), "trainable_dtype": "fp32",
                "gradient_checkpointing": memory.checkpointing_on(self.model),
                "gradient_accumulation_steps": self.cfg.gradient_accumulation_steps,
                "processes": self.ctx.world, "global_batch_size": self.global_batch,
                "parallel": ("fsdp" if self.ctx.sharded else "ddp") if self.ctx.active else None,
                "deterministic_kernels": torch.are_deterministic_algorithms_enabled()}

    def elapsed(self) -> float:
        """Training time so far, over every resumed start."""
        return self.trained_before + time.perf_counter() - self.t0

    def settle(self) -> None:
        """Read the deferred losses back in one go: the running mean takes the finite ones;
        the first non-finite one ends the run (at the step it came from)."""
        if not self.pending:
            return
        values = torch.stack([loss for _, loss in self.pending]).tolist()
        for (at, _), value in zip(self.pending, values, strict=True):
            if not self.guard.ok(value, at):
                break
            self.running += value
            self.n_running += 1
        self.pending.clear()

    def save_checkpoint(self, path: Path, run_fp: str) -> bool:
        """Save (process 0 writes; every process takes part); a failed write (disk full,
        quota) is a warning, never the end of the run."""
        self.settle()
        if self.guard.failure:  # the pending losses ended the run: nothing to resume
            return False
        rngs = self.ctx.gather(checkpoint.rng_state())  # each process's generators (dropout differs)
        states = (self.trainable_state(), self.ctx.optimizer_state(self.model, self.optimizer)) if (
            self.ctx.main or self.ctx.sharded) else None  # sharded: gathered by every process
        saved = self._write_checkpoint(path, run_fp, rngs, *states) if self.ctx.main else True
        return not self.ctx.agree([int(not saved)])[0]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The method's tensors, on the host (sharded: the full ones, on process 0; every
        process must call it)."""
        if self.ctx.sharded:
            return self.ctx.full_state(self.model, self.trainable_names)
        return self.method.trainable_state(self.model)

    def _write_checkpoint(self, path: Path, run_fp: str, rngs: list, trainable: dict, optimizer: dict) -> bool:
        t = time.perf_counter()
        tensors = {f"trainable.{k}": v for k, v in trainable.items()}
        tensors |= {f"best.{k}": v for k, v in (self.best_state or {}).items()}
        optim_tensors, optim_meta = checkpoint.optimizer_state(optimizer)
        (rng_tensors, rng_meta), others = rngs[0], rngs[1:]
        for r, (t_r, _) in enumerate(others, start=1):
            rng_tensors |= {f"rank{r}.{k}": v for k, v in t_r.items()}
        tensors |= optim_tensors | rng_tensors | {"loader.epoch_rng": self.epoch_rng}
        meta = {"processes": self.ctx.world, "rng_ranks": [m for _, m in others], "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "training": self.model.training, "running": self.running, "n_running": self.n_running,
                "curves": self.curves, "best": self.best, "has_best_state": self.best_state is not None,
                "optimizer": optim_meta, "scheduler": self.scheduler.state_dict(), "rng": rng_meta,
                "train_time_s": self.elapsed(), "resumed_from": self.resumed_from,
                "skipped_batches": self.guard.skipped, "nonfinite_in_a_row": self.guard.in_a_row}
        try:
            checkpoint.save(path, run_fp, tensors, meta)
        except OSError as exc:
            log.warning("checkpoint at step %d not saved to %s: %s", self.step, path, exc)
            return False
        log.info("checkpoint at step %d saved to %s (%.1f s)", self.step, path, time.perf_counter() - t)
        return True

    def resume(self, path: Path, run_fp: str) -> None:
        """Restore the state a checkpoint of this very run saved (none: start at step 0)."""
        saved = checkpoint.load(path, run_fp)
        if saved is None:
            return
        tensors, meta = saved
        restored = {k[len("trainable."):]: v for k, v in tensors.items() if k.startswith("trainable.")}
        expected = self.trainable_names if self.ctx.sharded else set(self.method.trainable_state(self.model))
        if set(restored) != expected:
            raise TrainingError(f"checkpoint {path} does not hold this run's trainable tensors: "
                                "delete it to train from step 0")
        if self.ctx.sharded:
            self.ctx.load_full_state(self.model, restored)
        else:
            self.model.load_state_dict(restored, strict=False)
        if meta["has_best_state"]:
            self.best_state = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
        self.ctx.load_optimizer_state(self.model, self.optimizer,
                                      checkpoint.optimizer_state_dict(tensors, meta["optimizer"]))
        self.scheduler.load_state_dict(meta["scheduler"])
        self.step, self.epoch, self.batch_in_epoch = meta["step"], meta["epoch"], meta["batch_in_epoch"]
        self.running, self.n_running = meta["running"], meta["n_running"]
        self.curves = {k: [tuple(p) if isinstance(p, list) else p for p in v] for k, v in meta["curves"].items()}
        self.best.update(meta["best"])
        self.epoch_rng = tensors["loader.epoch_rng"]
        self.model.train(meta["training"])
        self.trained_before, self.resumed_from = meta["train_time_s"], meta["resumed_from"] + [self.step]
        self.guard.skipped, self.guard.in_a_row = meta["skipped_batches"], meta["nonfinite_in_a_row"]
        if self.ctx.rank == 0:
            checkpoint.set_rng_state(tensors, meta["rng"])
        else:
            mine = f"rank{self.ctx.rank}."
            checkpoint.set_rng_state({k[len(mine):]: v for k, v in tensors.items() if k.startswith(mine)},
                                     meta["rng_ranks"][self.ctx.rank - 1])
        log.info("resuming %s from its checkpoint at step %d of %d", self.key.path(), self.step, self.total_steps)

    def validate_now(self) -> None:
        """Validation and model selection, on process 0 (the others wait for it; a sharded
        model's forward needs them all: they validate too, and process 0's metrics decide)."""
        self.settle()
        if self.guard.failure:
            return
        if self.ctx.main or self.ctx.sharded:
            self._validate()
        self.ctx.barrier()
        self.model.train()  # validation left it in eval mode: dropout back on for the epoch's remaining steps

    def _validate(self) -> None:
        metrics = validation_metrics(self.model, self.tokenizer, self.val_loader, self.val_df, self.stats,
                                     self.cfg.eval_batch_size, self.dev, self.amp, synced=self.ctx.sharded)
        main = self.stats["main_metric"]
        better = metrics[main] > self.best["value"]
        if self.ctx.sharded:  # process 0's decision, everywhere (a rounding difference must not split them)
            better = bool(self.ctx.agree([int(better and self.ctx.main)])[0])
        if self.ctx.main:
            self.curves["validation"].append({"step": self.step, **metrics})
            log.info("step %d validation %s", self.step, {k: round(v, 4) for k, v in metrics.items()})
        if better:
            self.best.update(step=self.step, value=metrics[main], metrics=metrics)
            self.best_state = self.trainable_state()

    def run(self, stop: checkpoint.StopSignal, ckpt_path: Path, run_fp: str) -> None:
        """Train up to ``total_steps`` (or a failure); a stop signal or the SLURM deadline saves a
        checkpoint and raises ``checkpoint.TrainingInterrupted``."""
        policy = checkpoint.CheckpointPolicy.from_env()
        deadline = checkpoint.SlurmDeadline() if policy.margin_seconds else None
        self.last_save, self.t0 = time.monotonic(), time.perf_counter()
        key = self.key
        self.bar = tqdm(total=self.total_steps, initial=self.step, mininterval=2,
                        desc=f"finetune {key.method}/{key.variant} seed{key.seed}")
        while self.step < self.total_steps and self.guard.failure is None:
            self.speed.restart()
            if self.batch_in_epoch == 0:
                self.model.train()
                self.epoch_rng = self.train_loader.generator.get_state()
            else:  # resumed mid-epoch: the epoch's shuffle again, its trained batches skipped
                self.train_loader.generator.set_state(self.epoch_rng)
            for batch in itertools.islice(self.train_loader, self.batch_in_epoch, None):
                outcome = self._train_batch(batch)
                if outcome == "skipped":
                    continue
                if outcome == "stop" or self._after_step(stop, policy, deadline, ckpt_path, run_fp):
                    break
            else:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.bar.close()
        self.train_time_s = self.elapsed()

    def _train_batch(self, batch: dict) -> str:
        """One optimizer step on ``batch`` (this process's share of a global batch):
        "trained", "skipped" (a non-finite loss under ``skip``) or "stop" (the run failed)."""
        cfg, guard = self.cfg, self.guard
        self.last_batch = batch
        loss = self._backward(batch)
        if self.defer:
            self.pending.append((self.step, loss))
        elif not guard.ok(value := loss.item(), self.step):
            self.optimizer.zero_grad(set_to_none=True)
            if guard.failure:
                return "stop"
            self.batch_in_epoch += 1  # skipped: the data position moves on (a resume skips it too)
            self.speed.restart()
            return "skipped"
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        if self.step % cfg.log_every_steps == 0:
            self.curves["learning_rate"].append((self.step, self.scheduler.get_last_lr()[0]))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if not self.defer:
            self.running += value
            self.n_running += 1
        self.bar.update(1)
        return "trained"

    def _backward(self, batch: dict) -> torch.Tensor:
        """Forward and backward over the batch's micro-batches; the gradient is that of the
        mean loss over the global batch (``loss_items``), which is returned (detached, the
        same on every process). One micro-batch on one process: exactly its own loss."""
        parts = micro_batches(batch, self.cfg.batch_size)
        if len(parts) == 1 and not self.ctx.active:
            with autocast(self.dev, self.amp):
                loss = loss_of(self.model, to_device(batch, self.dev), self.net, batch["labels"])
            loss.backward()
            return loss.detach()
        items = [loss_items(p) for p in parts]
        total = self.ctx.agree_sum(sum(items))
        scale = self.ctx.world / total  # DDP averages the processes' gradients: undo its 1/world
        step_loss = torch.zeros((), device=self.dev)
        for i, (part, n) in enumerate(zip(parts, items, strict=True)):
            sync = i == len(parts) - 1 or not self.ctx.active  # DDP reduces on the last micro-batch only
            with (contextlib.nullcontext() if sync else self.ctx.no_sync(self.net)), autocast(self.dev, self.amp):
                loss = loss_of(self.model, to_device(part, self.dev), self.net, part["labels"]) * (n * scale)
            loss.backward()
            step_loss += loss.detach().float()
        return self.ctx.all_sum(step_loss) / self.ctx.world

    def _after_step(self, stop, policy, deadline, ckpt_path: Path, run_fp: str) -> bool:
        """Logging, validation and checkpoints after a step; True when the epoch loop ends."""
        if self.step % self.cfg.log_every_steps == 0 or self.step == self.total_steps:
            self.settle()
            if self.guard.failure:
                return True
            self.curves["train_loss"].append((self.step, self.running / self.n_running))
            self.bar.set_postfix(loss=f"{self.running / self.n_running:.4f}")
            self.running, self.n_running = 0.0, 0
        self.batch_in_epoch += 1
        self.speed.step(self.last_batch)
        if self.step in self.evaluate_at:
            self.validate_now()
            self.speed.restart()
        if self.guard.failure or self.step >= self.total_steps:
            return True  # at the last step the outputs follow at once: no checkpoint, no stop
        left = deadline.seconds_left() if deadline and self.ctx.main else None
        stop_now, save_now = self.ctx.agree([  # taken together: every process saves and stops at one step
            int(bool(stop.received) or (left is not None and left < policy.margin_seconds)),
            int(bool(policy.every_steps and self.step % policy.every_steps == 0) or bool(
                policy.every_seconds and time.monotonic() - self.last_save >= policy.every_seconds))])
        if stop_now:
            why = (f"{stop.received} received" if stop.received else
                   f"{left:.0f} s left in SLURM job {deadline.job_id}" if left is not None else "another process stopped")
            outcome = (f"checkpoint saved to {ckpt_path}: run the job again to resume"
                       if self.save_checkpoint(ckpt_path, run_fp) else "the checkpoint could not be saved (see the log)")
            if self.guard.failure:
                return True
            raise checkpoint.TrainingInterrupted(f"{self.key.path()}: stopped at step {self.step} of "
                                                 f"{self.total_steps} ({why}); {outcome}")
        if save_now:
            self.save_checkpoint(ckpt_path, run_fp)
            if self.guard.failure:
                return True
            self.last_save = time.monotonic()
            self.speed.restart()
        return False


def _model_with_method(key, model_spec, experiment, method, stats, train_df, collator, dev):
    """The pretrained model with ``method`` calibrated and applied (in fp32), on the device,
    its frozen base then in ``training.base_dtype``; the trainable count must match the
    method's formula. Returns (model, base parameter count, trainable count)."""
    model = load_model(model_spec, stats["num_labels"], stats["problem_type"], seed=key.seed)
    base_params = count_parameters(model)
    if method.needs_calibration:
        calib = make_loader(train_df, experiment.training.batch_size, collator, shuffle=True, seed=key.seed)
        method.calibrate(model.to(dev), (to_device(b, dev) for b in calib))
    expected = method.expected_trainable_parameters(model)
    model = method.apply(model)
    memory.cast_frozen(model, memory.base_dtype(experiment.training.base_dtype, method.family, dev))
    if experiment.training.gradient_checkpointing:
        memory.enable_gradient_checkpointing(model)
    model = model.to(dev)
    trainable = count_parameters(model, trainable_only=True)
    if trainable != expected:
        raise TrainingError(
            f"method '{key.method}' trains {trainable} parameters but its formula gives {expected}: "
            "this is a bug in the method module"
        )
    log.info("%s: %d trainable of %d (%.4f%%)", key.path(), trainable, base_params, 100 * trainable / base_params)
    return model, base_params, trainable


def _finetune_record(key, model_spec, experiment, method, stats, code_fingerprint, sizes, progress, dev, amp,
                     weights_path) -> dict[str, Any]:
    """The result record of a finished (or failed) run."""
    guard, curves, best, step = progress["guard"], progress["curves"], progress["best"], progress["step"]
    trainable, base_params = sizes["trainable"], sizes["base"]
    return {
        "schema_version": 1,
        "rule": "finetune",
        "status": "failed" if guard.failure else "completed",
        "failure": guard.failure,
        "skipped_batches": guard.skipped,
        "run": key.tags() | {"seed": key.seed},
        "model": model_spec.to_dict() | {"notes": model_spec.notes, "total_params": base_params},
        "task": stats["task"],
        "data_fingerprint": stats["fingerprint"],
        "split_fingerprints": {k: v["fingerprint"] for k, v in stats["splits"].items()},
        "main_metric": stats["main_metric"],
        "method": {"name": key.method, "family": method.family, "params": method.config.to_dict(),
                   "selection": getattr(method, "selection", None)},
        "config": experiment.resolved(),
        "config_hash": fingerprint(experiment.resolved(), stats["task"], model_spec.name),
        "code_fingerprint": code_fingerprint,
        "trainable_params": trainable,
        "trainable_percent": 100.0 * trainable / base_params,
        "steps": step,
        "epochs": step / sizes["steps_per_epoch"],
        "resumed_from_steps": progress["resumed_from"],
        "curves": curves,
        "best_validation": {"step": best["step"], **best["metrics"]},
        "final_validation": curves["validation"][-1] if curves["validation"] else {},
        "train_time_s": progress["train_time"],
        "train_throughput": progress["speed"].summary(),
        "peak_memory": peak_memory_mb(dev),
        "stored_size_bytes": dir_size_bytes(weights_path),
        "device": str(dev),
        "device_name": device_name(dev),
        "precision": precision_name(amp),
        "threads": torch.get_num_threads(),
        "protocol": PROTOCOL,
        "versions": versions(),
        "git_commit": git_commit(),
    }
