"""What each method costs beside full fine-tuning: peak memory, step time, inference latency.

Every registered method (its default variant) and SAID are built on the same model, in a
fresh process each, and run on the same real rotten_tomatoes batch:
- memory: peak resident set while building the model, applying the method (with its
  calibration pass for SIFT) and running 3 training steps (our optimizer and clipping), above
  the process's RSS before (imports and the batch); full fine-tuning holds gradients and
  AdamW state for every weight, SIFT and PaFi for their k entries only;
- step time: median of 8 steps after 2 warm-up steps (forward + backward + AdamW);
- inference: the latency of the trained model as stored (unmerged) and merged (where the
  method allows it) against the plain pretrained model on the same batch, after the 3
  steps (so adapters are not at their zero init); a merged model must match the plain one.
Ratios are to full fine-tuning (memory, step) and to the plain model (latency).

    python bench/method_costs.py
    python bench/method_costs.py --methods full sift pafi --batch-size 32

Writes ``<out>/method_costs.json`` and ``<out>/method_costs.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import PeakRSS, in_fresh_process, write_outputs  # noqa: E402
from said_step import make_batch, step  # noqa: E402  (the SAID benchmark's real batch and training step)


def measure(method: str, model_name: str, batch_size: int, max_length: int, threads: int, d: int) -> dict:
    """One method in this process: memory while building + 3 steps, then step time, latency."""
    import torch

    from peftlab.config import load_experiment
    from peftlab.evaluate import inference_cost
    from peftlab.intrinsic import subspace_method
    from peftlab.methods import build_method
    from peftlab.models import ModelSpec, count_parameters, load_model
    from peftlab.train import _optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = ModelSpec.from_config(model_name, {})
    batch = make_batch(model_name, batch_size, max_length)
    exp = load_experiment(ROOT / "config" / "experiments", "full" if method == "said" else method, "default")

    with PeakRSS() as mem:
        model = load_model(spec, 2, "single_label_classification", seed=0)
        obj = subspace_method({"d": d, "said": True}) if method == "said" else build_method(
            method, exp.method_params, spec.targets)
        if obj.needs_calibration:
            obj.calibrate(model, iter([batch] * 8))
        model = obj.apply(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = _optimizer(model, exp.training)
        for _ in range(3):
            step(model, params, opt, batch)
    memory = mem.mb
    times = []
    for i in range(10):
        t0 = time.perf_counter()
        step(model, params, opt, batch)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    trainable = count_parameters(model, trainable_only=True)  # before merging (it may unwrap in place)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    plain = load_model(spec, 2, "single_label_classification", seed=0)
    model.eval()
    inference = inference_cost(obj, model, plain, inputs)
    return {"method": method, "trainable_params": trainable, "memory_mb": memory,
            "step_s": statistics.median(times), "inference": inference}


def main(argv: list[str] | None = None) -> int:
    from peftlab.methods import METHODS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--methods", nargs="+", default=[*sorted(METHODS), "said"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--d", type=int, default=4000, help="SAID's subspace size")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "method_costs")
    args = ap.parse_args(argv)
    methods = ["full", *[m for m in args.methods if m != "full"]]
    results = {}
    for m in methods:
        print(f"{m} ...", flush=True)
        results[m] = in_fresh_process("method_costs", f"measure({m!r}, {args.model!r}, {args.batch_size}, "
                                                      f"{args.max_length}, {args.threads}, {args.d})")
    full = results["full"]
    rows = ["| method | trainable | peak memory (MB) | memory / full | step (s) | step / full | "
            "unmerged / plain latency | merged / plain latency | merged max abs diff |",
            "|---|---|---|---|---|---|---|---|---|"]
    for m, r in results.items():
        inf = r["inference"]
        r["memory_ratio"] = r["memory_mb"] / full["memory_mb"]
        r["step_ratio"] = r["step_s"] / full["step_s"]
        base = inf["base_ms_per_batch"]
        merged = inf.get("merged_ms_per_batch")
        rows.append(f"| {m} | {r['trainable_params']:,} | {r['memory_mb']:.0f} | {r['memory_ratio']:.2f} | "
                    f"{r['step_s']:.3f} | {r['step_ratio']:.2f}x | {inf['unmerged_ms_per_batch'] / base:.2f}x | "
                    + (f"{merged / base:.2f}x | {inf['merged_max_abs_diff']:.1e} |" if merged else "not mergeable | - |"))
    write_outputs(args.out, "method_costs", {"args": vars(args), "results": results}, "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
