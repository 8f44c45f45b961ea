"""Every benchmark, one command: one table per benchmark in ``<out>/bench.md``, all figures
in ``<out>/bench.json``.

    python bench/run.py                  # throughput, method costs, SAID step, pipeline scale
    python bench/run.py --only throughput said_step --quick
    python bench/run.py --collect        # bench.md again from the outputs already there

Run it on a quiet machine: every figure is a ratio of two things measured side by side in
the same run, but a busy machine still adds noise. ``--quick`` uses one seed and fewer
methods (a smoke run, not figures to quote). The throughput benchmark reports achieved
TFLOP/s against the device's measured matrix-product peak and, on a known GPU, model FLOPs
utilisation against the datasheet (``--gpu-models`` adds MPNet-base and SmolLM2-135M). On a
lent GPU machine, ``bench/device.sh`` runs it with ``--model-root`` / ``--data-root`` (see
``bench/device_pack.py``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from _common import write_outputs  # noqa: E402

BENCHES = ("throughput", "method_costs", "said_step", "pipeline_scale")


def main(argv: list[str] | None = None) -> int:
    import method_costs
    import pipeline_scale
    import said_step
    import throughput
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES))
    ap.add_argument("--quick", action="store_true", help="one seed, fewer methods: a smoke run")
    ap.add_argument("--gpu-models", action="store_true", help="throughput also on mpnet-base and smollm2-135m")
    ap.add_argument("--models", nargs="+", default=None, help="throughput on these models instead")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="throughput seeds (default 0 1 2)")
    ap.add_argument("--batch-size", type=int, default=None, help="throughput batch size (default: the variants')")
    ap.add_argument("--epochs", type=float, default=None, help="throughput epochs (default 1)")
    ap.add_argument("--methods", nargs="+", default=None, help="throughput methods (default: all it compares)")
    ap.add_argument("--seq-len", type=int, default=None, help="throughput rows at exactly this length")
    ap.add_argument("--tag", default="", help="throughput: a suffix of each model's output folder (e.g. a shape)")
    ap.add_argument("--model-root", type=Path, default=None,
                    help="throughput: each model's folder is <this>/<model> (device_pack.py materialize)")
    ap.add_argument("--data-root", type=Path, default=None,
                    help="throughput: each model's prepared task is <this>/<model>/rotten_tomatoes")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--collect", action="store_true",
                    help="run nothing: rebuild bench.md / bench.json from the outputs already in --out")
    args = ap.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    header = (f"Machine: {platform.machine()}, {torch.get_num_threads()} threads available, "
              f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}; "
              f"torch {torch.__version__}.")
    models = args.models or ["minilm-l6"] + (["mpnet-base", "smollm2-135m"] if args.gpu_models else [])
    for name in [] if args.collect else args.only:
        t0 = time.time()
        print(f"== {name}", flush=True)
        if name == "throughput":
            for model in models:
                extra = ["--seeds", "0", "--methods", "full", "lora", "gift"] if args.quick else []
                extra += ["--seeds", *map(str, args.seeds)] if args.seeds else []
                extra += ["--batch-size", str(args.batch_size)] if args.batch_size else []
                extra += ["--epochs", str(args.epochs)] if args.epochs else []
                extra += ["--methods", *args.methods] if args.methods else []
                extra += ["--seq-len", str(args.seq_len)] if args.seq_len else []
                extra += ["--pretrained", str(args.model_root / model)] if args.model_root else []
                extra += ["--data", str(args.data_root / model / "rotten_tomatoes")] if args.data_root else []
                throughput.main(["--model", model, "--out", str(out / "throughput" / f"{model}{args.tag}"), *extra])
        elif name == "method_costs":
            extra = ["--methods", "full", "lora", "sift", "pafi", "said"] if args.quick else []
            method_costs.main(["--out", str(out / "method_costs"), *extra])
        elif name == "said_step":
            for d, bs in SAID_SHAPES:
                said_step.main(["--d", str(d), "--batch-size", str(bs), "--out", str(out / "said_step" / f"d{d}_b{bs}")])
        elif name == "pipeline_scale":
            pipeline_scale.main(["--out", str(out / "pipeline_scale")])
        print(f"== {name}: {time.time() - t0:.0f} s", flush=True)
    collect(out, header, args.quick, None if args.collect else time.time() - started)
    return 0


SAID_SHAPES = ((1000, 16), (4000, 16), (16000, 16), (4000, 32))


def _measured(path: Path) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(path.stat().st_mtime))


def collect(out: Path, header: str, quick: bool, seconds: float | None) -> tuple[str, dict]:
    """``bench.md`` / ``bench.json`` from every benchmark's outputs found under ``out``, each
    section stamped with when it was measured (a partial rerun keeps the other sections)."""
    sections, figures = [], {}
    for model_dir in sorted((out / "throughput").glob("*/throughput.json")):
        model = model_dir.parent.name
        sections.append((f"Training throughput, {model}", model_dir.with_suffix(".md"), model_dir))
        figures[f"throughput/{model}"] = json.loads(model_dir.read_text())
    if (out / "method_costs" / "method_costs.json").exists():
        sections.append(("Method costs (memory, step time, inference latency)", out / "method_costs" / "method_costs.md",
                         out / "method_costs" / "method_costs.json"))
        figures["method_costs"] = json.loads((out / "method_costs" / "method_costs.json").read_text())
    said = [(out / "said_step" / f"d{d}_b{bs}", d, bs) for d, bs in SAID_SHAPES]
    said = [x for x in said if (x[0] / "said_step.json").exists()]
    if said:
        lines = []
        for i, (sub, d, bs) in enumerate(said):
            table = (sub / "said_step.md").read_text().splitlines()
            lines += table if i == 0 else table[2:]
            figures[f"said_step/d{d}_b{bs}"] = json.loads((sub / "said_step.json").read_text())
        (out / "said_step" / "said_step.md").write_text("\n".join(lines) + "\n")
        newest = max((sub / "said_step.json" for sub, _, _ in said), key=lambda p: p.stat().st_mtime)
        sections.append(("One SAID step vs one full fine-tuning step", out / "said_step" / "said_step.md", newest))
    if (out / "pipeline_scale" / "pipeline_scale.json").exists():
        sections.append(("Pipeline scale", out / "pipeline_scale" / "pipeline_scale.md",
                         out / "pipeline_scale" / "pipeline_scale.json"))
        figures["pipeline_scale"] = json.loads((out / "pipeline_scale" / "pipeline_scale.json").read_text())
    md = [f"# peftlab benchmarks\n\n{header}"
          + (f" This run took {seconds:.0f} s." if seconds is not None else "")
          + (" Quick run: not figures to quote." if quick else "")]
    if "CUDA" not in header:
        md.append("\nNo GPU on this machine: model FLOPs utilisation against a GPU's datasheet is not measured "
                  "(achieved TFLOP/s is, against this CPU's measured matrix-product peak).")
    for title, path, measured in sections:
        md.append(f"\n## {title}\n\nMeasured {_measured(measured)}.\n\n{path.read_text()}")
    text = "\n".join(md)
    write_outputs(out, "bench", {"machine": header, "quick": quick, "figures": figures}, text)
    return text, figures


if __name__ == "__main__":
    raise SystemExit(main())
