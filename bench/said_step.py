"""One SAID training step vs one full fine-tuning step on the same batch: time and peak memory.

A step is forward + backward + AdamW update (+ the gradient clipping the trainer does).
Both are timed in the same process, alternating, on the same real rotten_tomatoes batch,
after warm-up; the figure is the ratio of medians (target: SAID <= 1.5x full). Memory is
each mode's peak resident set while building the model and running 3 steps, above the
process's RSS before (its own process per mode): a full step holds gradients and AdamW
state for all D parameters; a SAID step holds the projections' buffers (O(D)), the merged
parameters and their gradients, and optimizer state for d numbers.

    python bench/said_step.py                       # MiniLM-L6, batch 16 x <=64 tokens, d = 1000
    python bench/said_step.py --batch-size 32 --max-length 128 --d 4000 --threads 2

Writes ``<out>/said_step.json`` and ``<out>/said_step.md``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _common import PeakRSS, in_fresh_process, write_outputs  # noqa: E402


def make_batch(model_name: str, batch_size: int, max_length: int):
    from peftlab.data import TaskSpec, load_raw
    from peftlab.models import ModelSpec, load_tokenizer

    frame = load_raw(TaskSpec.from_config("rotten_tomatoes", {})).frame.sample(batch_size, random_state=0)
    tok = load_tokenizer(ModelSpec.from_config(model_name, {}))
    enc = tok([str(t) for t in frame["text_a"]], truncation=True, max_length=max_length, padding=True,
              return_tensors="pt")
    labels = torch.tensor([int(x) for x in frame["label"]])
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")} | {"labels": labels}


def build(mode: str, model_name: str, d: int):
    from peftlab.intrinsic import subspace_method
    from peftlab.models import ModelSpec, load_model

    model = load_model(ModelSpec.from_config(model_name, {}), 2, "single_label_classification", seed=0)
    if mode == "said":
        model = subspace_method({"d": d, "said": True}).apply(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, torch.optim.AdamW(params, lr=1e-5)


def step(model, params, opt, batch) -> None:
    model.train()
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_steps(args) -> dict:
    batch = make_batch(args.model, args.batch_size, args.max_length)
    built = {m: build(m, args.model, args.d) for m in ("full", "said")}
    times: dict[str, list[float]] = {"full": [], "said": []}
    for i in range(args.warmup + args.repeats):
        for mode in ("full", "said"):  # alternating: both see the same machine state
            t0 = time.perf_counter()
            step(*built[mode], batch)
            if i >= args.warmup:
                times[mode].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"median_s": med, "all_s": times, "ratio": med["said"] / med["full"],
            "tokens": int(batch["attention_mask"].sum()), "shape": list(batch["input_ids"].shape),
            "trainable": {m: sum(p.numel() for p in built[m][1]) for m in built}}


def mode_memory_mb(mode: str, model_name: str, d: int, batch_size: int, max_length: int, threads: int) -> float:
    """Peak RSS while building one mode and running 3 steps, minus the RSS before (imports
    and the batch): the memory the mode itself needs."""
    torch.set_num_threads(threads)
    batch = make_batch(model_name, batch_size, max_length)
    with PeakRSS() as mem:
        m = build(mode, model_name, d)
        for _ in range(3):
            step(*m, batch)
    return mem.mb


def peak_rss_mb(args, mode: str) -> float:
    """``mode_memory_mb`` in a fresh process (no allocator state shared with the other mode)."""
    return in_fresh_process("said_step", f"mode_memory_mb({mode!r}, {args.model!r}, {args.d}, {args.batch_size}, "
                                         f"{args.max_length}, {args.threads})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--d", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, **time_steps(args),
              "peak_rss_mb": {m: peak_rss_mb(args, m) for m in ("full", "said")},
              "torch": torch.__version__, "maxrss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    result["memory_ratio"] = result["peak_rss_mb"]["said"] / result["peak_rss_mb"]["full"]
    med = result["median_s"]
    table = (
        "| model | batch (shape) | d | full step (s) | SAID step (s) | SAID / full | target | "
        "memory full (MB) | memory SAID (MB) |\n|---|---|---|---|---|---|---|---|---|\n"
        f"| {args.model} | {result['shape']} | {args.d} | {med['full']:.3f} | {med['said']:.3f} | "
        f"{result['ratio']:.2f}x | <= 1.5x | {result['peak_rss_mb']['full']:.0f} | {result['peak_rss_mb']['said']:.0f} |\n"
    )
    write_outputs(args.out, "said_step", result, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
