"""Training throughput: our fine-tuning loop vs ``transformers.Trainer`` (+ peft), same run.

For each method compared with the Trainer (full fine-tuning, LoRA, IA3) both sides train the
same model (for LoRA and IA3 the very peft model our method module builds), on the same
prepared, tokenized training split, at the same batch size, number of examples, learning
rate and schedule (AdamW, linear decay after 6% warm-up, gradient clipping at 1.0), the same
seeds and thread count, one after the other in one process. Our loop runs as the pipeline's
``finetune`` (length-grouped batches, the default) with one validation pass at the end; the
Trainer runs as a user who knows it configures it: length-grouped batches too
(``train_sampling_strategy="group_by_length"``, transformers 5.x; ``--trainer-random-batches``
gives it random ones), padded by ``DataCollatorWithPadding``, no evaluation, no saving, no
reporting. Throughput is steady
state: the steps after the first 5, timed step end to step end (data loading included, our
final validation excluded), in examples/s and real (non-padding) tokens/s. Both final
models are then scored on the same test split. Our LoReFT and GIFT are compared with our
LoRA the same way (the cost of the method itself).

Peak memory is each run's peak resident set (CPU; ``torch.cuda.max_memory_allocated`` on a
GPU), measured in a fresh process per run.

Compute: each run's model FLOPs per token are counted on the model it trains
(``flops.py``); achieved TFLOP/s = that x real tokens/s, and utilisation is against this
device's measured matrix-product peak (fp32 with the same thread count on a CPU, bf16 on a
GPU) and, on a known GPU, against its datasheet peak (MFU). On a GPU both sides train with
bf16 autocast (ours: ``precision: auto``; the Trainer: ``bf16=True``).

    python bench/throughput.py                          # MiniLM-L6, rotten_tomatoes, 3 seeds
    python bench/throughput.py --seeds 0 --methods lora # quick look
    python bench/throughput.py --model mpnet-base --pretrained DIR --data DIR  # a given folder / prepared data

Writes ``<out>/throughput.json`` and ``<out>/throughput.md`` at the end, and each run's figures
to ``<out>/throughput_runs.jsonl`` as soon as that run ends (a time limit loses no finished run).
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

from _common import in_fresh_process, write_outputs  # noqa: E402
from flops import spec_peak_tflops, training_flops_per_token  # noqa: E402

HF_METHODS = ("full", "lora", "ia3")  # against transformers.Trainer (+ peft)
OWN_METHODS = ("loreft", "gift")  # against our LoRA
WARMUP = 5


def model_spec(args: dict):
    """The benchmarked model: a built-in name, or that name on the folder ``--pretrained``."""
    from peftlab.models import ModelSpec

    return ModelSpec.from_config(args["model"], {"pretrained": args["pretrained"]} if args.get("pretrained") else {})


def prepare(args: dict, out: Path) -> Path:
    """The tokenized task (``--data``, or prepared once under ``out/data``); with ``--seq-len``,
    its rows at that exact length (``fixed_length``)."""
    from peftlab.data import TaskSpec, prepare_task
    from peftlab.models import load_tokenizer

    if args.get("data"):
        data_dir = Path(args["data"])
    else:
        data_dir = out / "data" / args["model"] / args["task"]
        if not (data_dir / "stats.json").exists():
            spec = TaskSpec.from_config(args["task"], {"max_train_examples": args["max_train"],
                                                       "max_eval_examples": 500, "max_length": args["max_length"]})
            prepare_task(spec, load_tokenizer(model_spec(args)), data_dir, model_name=args["model"])
    return fixed_length(data_dir, args["seq_len"], out) if args.get("seq_len") else data_dir


def fixed_length(data_dir: Path, length: int, out: Path) -> Path:
    """A copy of the prepared task whose every row has exactly ``length`` tokens: its own
    tokens repeated (a shape for throughput, e.g. the generative 8 x 512; the labels stay the
    rows' own, so both sides still learn the same task)."""
    import shutil

    import numpy as np

    from peftlab.data import load_split

    dest = out / "data" / f"{data_dir.parent.name}-len{length}" / data_dir.name
    if (dest / "stats.json").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        frame = load_split(data_dir, split)
        for col in ("input_ids", "token_type_ids"):
            if col in frame:
                frame[col] = [np.resize(np.asarray(ids), length) for ids in frame[col]]
        frame.to_parquet(dest / f"{split}.parquet", index=False)
    shutil.copy(data_dir / "stats.json", dest / "stats.json")
    return dest


def experiment(method: str, args: dict):
    """The method's default variant at the pipeline's budget (``--batch-size`` overrides its
    batch size); one validation pass (at the end)."""
    from dataclasses import replace

    from peftlab.config import load_experiment

    exp = load_experiment(ROOT / "config" / "experiments", method, "default")
    extra = {"batch_size": args["batch_size"]} if args.get("batch_size") else {}
    return replace(exp, training=replace(exp.training, epochs=args["epochs"], evals_per_epoch=1, **extra))


def run_ours(method: str, seed: int, data_dir: Path, args: dict, out: Path) -> dict:
    from peftlab.config import RunKey
    from peftlab.evaluate import evaluate
    from peftlab.train import finetune

    spec, threads = model_spec(args), args["threads"]
    key = RunKey(args["model"], data_dir.name, method, "default", seed)
    run_dir = out / "ours" / method / f"seed{seed}"
    rec = finetune(key, spec, experiment(method, args), data_dir, run_dir / "w.safetensors",
                   run_dir / "result.json", threads=threads)
    ev = evaluate(key, spec, data_dir, run_dir / "result.json", run_dir / "w.safetensors",
                  run_dir / "metrics.json", threads=threads, measure_inference=False)
    tp = rec["train_throughput"]
    return {"examples_per_s": tp["examples_per_s"], "tokens_per_s": tp["tokens_per_s"],
            "padded_tokens_per_s": tp["padded_tokens_per_s"], "steps": rec["steps"],
            "trainable_params": rec["trainable_params"], "total_params": rec["model"]["total_params"],
            "test_main": ev["metrics"][ev["main_metric"]], "train_time_s": rec["train_time_s"],
            "precision": rec["precision"]}


def run_hf(method: str, seed: int, data_dir: Path, args: dict, out: Path) -> dict:
    """The same training with transformers.Trainer; the model is our method module's (peft)."""
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    from peftlab.data import load_split
    from peftlab.io import read_json
    from peftlab.methods import build_method
    from peftlab.metrics import compute_metrics
    from peftlab.models import load_model, load_tokenizer
    from peftlab.provenance import set_seed
    from peftlab.train import Collator, autocast_dtype, make_eval_loader, precision_name, predict

    set_seed(seed, args["threads"])
    spec = model_spec(args)
    stats = read_json(data_dir / "stats.json")
    exp = experiment(method, args)
    tok = load_tokenizer(spec)
    net = load_model(spec, stats["num_labels"], stats["problem_type"], seed=seed)
    method_obj = build_method(method, exp.method_params, spec.targets)
    net = method_obj.apply(net)
    train = load_split(data_dir, "train")
    cols = [c for c in ("input_ids", "token_type_ids") if c in train]
    # the rows as a plain list of features, the form DataCollatorWithPadding pads
    ds = [{**{c: [int(x) for x in r[c]] for c in cols}, "attention_mask": [1] * len(r["input_ids"]),
           "labels": r["label"].item() if hasattr(r["label"], "item") else r["label"]}
          for r in train[cols + ["label"]].to_dict("records")]
    batches: list[tuple[int, int]] = []  # (rows, real tokens) per collated batch, in order
    padding = DataCollatorWithPadding(tok)

    def collate(rows):
        batch = padding(rows)
        batches.append((len(rows), int(batch["attention_mask"].sum())))
        return batch

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    cfg = exp.training
    cuda = torch.cuda.is_available()
    amp = autocast_dtype(cfg.precision, torch.device("cuda" if cuda else "cpu"))
    training_args = TrainingArguments(
        output_dir=str(out / "hf" / method / f"seed{seed}"), per_device_train_batch_size=cfg.batch_size,
        num_train_epochs=args["epochs"], learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio, lr_scheduler_type="linear", max_grad_norm=cfg.max_grad_norm,
        eval_strategy="no", save_strategy="no", report_to="none", logging_steps=cfg.log_every_steps,
        seed=seed, data_seed=seed, use_cpu=not cuda, dataloader_num_workers=0,
        disable_tqdm=True, bf16=amp == torch.bfloat16,  # the same precision as ours
        # the same batching as ours unless asked otherwise: rows of similar length per batch
        train_sampling_strategy="random" if args.get("trainer_random_batches") else "group_by_length",
    )
    trainer = Trainer(model=net, args=training_args, train_dataset=ds, data_collator=collate, callbacks=[Stamp()])
    t0 = time.perf_counter()
    trainer.train()
    train_time = time.perf_counter() - t0
    # steps WARMUP+1..N, timed from step WARMUP's end: batches WARMUP..N-1 (a look-ahead
    # batch collated by the loader, if any, comes after them)
    seconds = stamps[-1] - stamps[WARMUP - 1]
    steady = batches[WARMUP:len(stamps)]
    test = load_split(data_dir, "test")
    dev = next(net.parameters()).device
    outputs, labels = predict(net, make_eval_loader(test, cfg.eval_batch_size, Collator(tok.pad_token_id, False)),
                              dev, desc="test", dtype=amp)
    metrics = compute_metrics(stats["problem_type"], outputs, labels)
    return {"examples_per_s": sum(n for n, _ in steady) / seconds, "tokens_per_s": sum(t for _, t in steady) / seconds,
            "steps": len(stamps), "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in net.parameters()),
            "test_main": metrics[stats["main_metric"]], "train_time_s": train_time,
            "precision": precision_name(amp)}


def flops_per_token(method: str, data_dir: Path, args: dict) -> float:
    """Counted model FLOPs per token of one training step of ``method`` (``flops.py``), on a
    batch of the run's size at the training split's mean real length."""
    import torch

    from peftlab.data import load_split
    from peftlab.io import read_json
    from peftlab.methods import build_method
    from peftlab.models import load_model
    from peftlab.provenance import device

    spec, exp = model_spec(args), experiment(method, args)
    stats = read_json(data_dir / "stats.json")
    train = load_split(data_dir, "train")
    net = load_model(spec, stats["num_labels"], stats["problem_type"], seed=0)
    net = build_method(method, exp.method_params, spec.targets).apply(net).to(device())
    length = max(1, round(float(train["input_ids"].map(len).mean())))
    flops = training_flops_per_token(net, exp.training.batch_size, length, net.config.vocab_size,
                                     stats["num_labels"], "token_type_ids" in train)
    del net
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return flops


def _plain(args) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def in_process(kind: str, method: str, seed: int, args: dict) -> dict:
    """One run (``kind`` ours or hf), meant for a fresh process (``_common.in_fresh_process``)."""
    import resource

    import torch

    out = Path(args["out"])
    data_dir = prepare(args, out)
    fn = run_ours if kind == "ours" else run_hf
    result = fn(method, seed, data_dir, args, out / "runs")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
    # after the run (its peak memory is taken): the same model again, one counted step
    result["flops_per_token"] = flops_per_token(method, data_dir, args)
    result["achieved_tflops"] = result["flops_per_token"] * result["tokens_per_s"] / 1e12
    return result


def summarise(runs: list[dict]) -> dict:
    def stat(key):
        vals = [r[key] for r in runs if r.get(key) is not None]
        if not vals:
            return None
        return {"mean": statistics.mean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "values": vals}

    return {k: stat(k) for k in ("examples_per_s", "tokens_per_s", "test_main", "peak_rss_mb", "peak_gpu_mb",
                                 "flops_per_token", "achieved_tflops")}


def compute_table(summary: dict, peak: dict, spec_peak: float | None) -> list[str]:
    """Achieved TFLOP/s per run kind, against the measured matrix-product peak and (on a known
    GPU) the datasheet's: model FLOPs utilisation."""
    md = ["", f"Compute: model FLOPs counted per token (forward + backward, matrix products); achieved = FLOPs "
              f"per token x real tokens/s. Measured matrix-product peak on {peak['device']}: "
              f"{peak['tflops']:.3f} TFLOP/s ({peak['dtype']}, {peak['n']}^3"
              + (f", {peak['threads']} threads" if peak["device"] == "cpu" else "") + ")"
              + (f"; datasheet dense bf16 peak {spec_peak:.0f} TFLOP/s." if spec_peak else "."),
          "",
          "| run | GFLOP per token | achieved TFLOP/s | of measured peak | MFU (datasheet) | peak GPU memory (MB) |",
          "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        if not s.get("achieved_tflops"):
            continue
        kind, method = name.split("/")
        tf = s["achieved_tflops"]["mean"]
        gpu = f"{s['peak_gpu_mb']['mean']:.0f}" if s.get("peak_gpu_mb") else "-"
        md.append(f"| {'ours' if kind == 'ours' else 'Trainer'} {method} | {s['flops_per_token']['mean'] / 1e9:.3f} | "
                  f"{tf:.3f} | {100 * tf / peak['tflops']:.1f}% | "
                  f"{f'{100 * tf / spec_peak:.1f}%' if spec_peak else '-'} | {gpu} |")
    return md


def record_run(out: Path, kind: str, method: str, seed: int, run: dict) -> None:
    """One finished run's figures, appended at once to ``throughput_runs.jsonl`` and printed."""
    import json

    line = {"kind": kind, "method": method, "seed": seed} | run
    with open(out / "throughput_runs.jsonl", "a") as fh:
        fh.write(json.dumps(line) + "\n")
    print(f"  {kind} {method} seed {seed}: {run['examples_per_s']:.1f} ex/s, {run['tokens_per_s']:.0f} tokens/s, "
          f"{run['achieved_tflops']:.3f} TFLOP/s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--task", default="rotten_tomatoes")
    ap.add_argument("--max-train", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=[*HF_METHODS, *OWN_METHODS])
    ap.add_argument("--batch-size", type=int, default=None, help="instead of the variants' batch size")
    ap.add_argument("--pretrained", type=Path, default=None, help="the model's folder (instead of the built-in)")
    ap.add_argument("--data", type=Path, default=None, help="a prepared task folder (instead of preparing one)")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="every row at exactly this many tokens (its own repeated): e.g. 512 with --batch-size 8")
    ap.add_argument("--trainer-random-batches", action="store_true",
                    help="the Trainer with random batches (its default) instead of length-grouped ones")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "throughput")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    peak = in_fresh_process("flops", f"peak_in_process({args.threads})")
    print(f"matrix-product peak on {peak['device']}: {peak['tflops']:.3f} TFLOP/s ({peak['dtype']})", flush=True)
    pairs = [("ours", m) for m in args.methods] + [("hf", m) for m in args.methods if m in HF_METHODS]
    if any(m in OWN_METHODS for m in args.methods) and "lora" not in args.methods:
        pairs.append(("ours", "lora"))
    runs: dict[str, list[dict]] = {}
    for seed in args.seeds:  # seed-major: both sides of a comparison see the same machine state
        for kind, method in pairs:
            print(f"{kind} {method} seed {seed} ...", flush=True)
            call = f"in_process({kind!r}, {method!r}, {seed}, {_plain(args)!r})"
            run = in_fresh_process("throughput", call)
            runs.setdefault(f"{kind}/{method}", []).append(run)
            record_run(args.out, kind, method, seed, run)
    summary = {k: summarise(v) for k, v in runs.items()}
    rows = []
    for method in args.methods:
        ours = summary[f"ours/{method}"]
        if method in HF_METHODS:
            base, base_name, target = summary[f"hf/{method}"], "Trainer + peft" if method != "full" else "Trainer", 1.2
        else:
            base, base_name, target = summary["ours/lora"], "our LoRA", None
        rows.append({"method": method, "baseline": base_name,
                     "ratio_examples_per_s": ours["examples_per_s"]["mean"] / base["examples_per_s"]["mean"],
                     "ratio_tokens_per_s": ours["tokens_per_s"]["mean"] / base["tokens_per_s"]["mean"],
                     "target": target, "ours": ours, "baseline_stats": base})
    spec_peak = spec_peak_tflops(peak["device"]) if peak["device"] != "cpu" else None
    result = {"args": _plain(args), "runs": runs, "summary": summary, "rows": rows, "matmul_peak": peak,
              "spec_peak_tflops": spec_peak}
    md = ["| method | vs | ours ex/s | theirs ex/s | ratio (ex/s) | ratio (tokens/s) | target | "
          "test acc ours | test acc theirs | peak RSS ours / theirs (MB) |",
          "|---|---|---|---|---|---|---|---|---|---|"]

    def ms(s, d=3):
        return f"{s['mean']:.{d}f} ± {s['sd']:.{d}f}" if s else "-"

    for r in rows:
        o, b = r["ours"], r["baseline_stats"]
        md.append(f"| {r['method']} | {r['baseline']} | {o['examples_per_s']['mean']:.1f} | "
                  f"{b['examples_per_s']['mean']:.1f} | {r['ratio_examples_per_s']:.2f}x | "
                  f"{r['ratio_tokens_per_s']:.2f}x | {'>= 1.2x' if r['target'] else '-'} | {ms(o['test_main'])} | "
                  f"{ms(b['test_main'])} | {o['peak_rss_mb']['mean']:.0f} / {b['peak_rss_mb']['mean']:.0f} |")
    md += compute_table(summary, peak, spec_peak)
    source = args.pretrained / "PEFTLAB_SOURCE.txt" if args.pretrained else None
    if source and source.exists():  # e.g. random weights on a GPU machine: accuracy is not the model's
        md = [f"Model folder {args.pretrained}: {source.read_text().strip()}", ""] + md
    write_outputs(args.out, "throughput", result, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
