"""Where a training step's time goes on a GPU: our loop under ``torch.profiler``.

Trains one method (default LoRA) for ``--steps`` steps through ``peftlab.train.finetune`` and
records ``--active`` steps after ``--skip`` steady ones (a profiler schedule: the model's load,
the first steps and the final validation are not recorded, which keeps the whole run within
a minute on a GPU). It reports, over the recorded steps: the GPU's busy share of their wall
time (the rest is the host launching work, copying batches or waiting), the host-device
synchronisations and copies per step, and the kernels and operators that take the most
device time. On a CPU it profiles the CPU side only (a check of the script itself).

    python bench/gpu_profile.py --model mpnet-base --pretrained DIR --data DIR --batch-size 32
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
COPY_EVENTS = ("cudaMemcpyAsync", "cudaMemcpy")


@contextlib.contextmanager
def _stepping(prof, skip: int, active: int):
    """Advance the profiler's schedule after each optimizer step of the training loop, and time
    the recorded steps (synchronised at both ends on a GPU)."""
    import torch

    from peftlab import train

    real = train._Loop._after_step
    window = {"seconds": 0.0, "start": None}

    def after_step(loop, *a, **kw):
        if torch.cuda.is_available() and loop.step in (skip, skip + active):
            torch.cuda.synchronize()
        if loop.step == skip:
            window["start"] = time.perf_counter()
        elif loop.step == skip + active and window["start"] is not None:
            window["seconds"] = time.perf_counter() - window["start"]
        prof.step()
        return real(loop, *a, **kw)

    train._Loop._after_step = after_step
    try:
        yield window
    finally:
        train._Loop._after_step = real


def main(argv: list[str] | None = None) -> int:
    import torch
    from throughput import experiment, model_spec, prepare
    from torch.profiler import ProfilerActivity, profile

    from peftlab.config import RunKey
    from peftlab.train import finetune

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--method", default="lora")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=8, help="steps before the recorded ones (warm-up)")
    ap.add_argument("--active", type=int, default=10, help="steps recorded")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args(argv)
    opts = {"model": args.model, "pretrained": args.pretrained, "data": args.data, "task": "rotten_tomatoes",
            "max_train": 1000, "max_length": 64, "epochs": 1.0, "batch_size": args.batch_size, "threads": 1}
    work = Path(tempfile.mkdtemp(prefix="gpu_profile_"))
    data_dir = prepare(opts, work)
    exp = experiment(args.method, opts)
    exp = dataclasses.replace(exp, training=dataclasses.replace(exp.training, max_steps=args.steps,
                                                                  evals_per_epoch=1))
    key = RunKey(args.model, data_dir.name, args.method, "default", 0)
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    schedule = torch.profiler.schedule(wait=max(0, args.skip - 2), warmup=min(2, args.skip), active=args.active,
                                       repeat=1)
    t0 = time.perf_counter()
    with profile(activities=activities, schedule=schedule) as prof, _stepping(prof, args.skip, args.active) as window:
        rec = finetune(key, model_spec(opts), exp, data_dir, work / "w.safetensors", work / "r.json", threads=1)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events) if cuda else 0.0
    steps = args.active
    calls = {name: sum(e.count for e in events if e.key == name) for name in (*SYNC_EVENTS, *COPY_EVENTS)}
    tp = rec["train_throughput"] or {}
    print(f"{args.method} on {args.model} ({'CUDA ' + torch.cuda.get_device_name() if cuda else 'CPU'}), "
          f"batch {exp.training.batch_size}, {steps} steps, precision {rec['precision']}")
    print(f"whole finetune call (model load, steps, validation, save): {wall:.1f} s; recorded steps "
          f"{args.skip + 1}-{args.skip + args.active}: {window['seconds']:.2f} s")
    print(f"steady state: {tp.get('steps_per_s', 0):.1f} steps/s, {tp.get('examples_per_s', 0):.0f} examples/s, "
          f"{tp.get('tokens_per_s', 0):.0f} tokens/s, padding {100 * tp.get('padding_share', 0):.1f}%")
    if cuda and window["seconds"]:
        print(f"GPU busy: device time {device_us / 1e6:.3f} s over {window['seconds']:.3f} s of the recorded steps: "
              f"{100 * device_us / 1e6 / window['seconds']:.0f}%")
    print("host calls over the recorded steps: " + ", ".join(f"{k} {v} ({v / max(1, steps):.1f}/step)" for k, v in calls.items()))
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
