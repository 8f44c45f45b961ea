"""The GPU throughput benchmark on a machine that holds no models, data or project packages.

A lent GPU machine (``bench/device.sh``) has PyTorch with CUDA but none of the project's
model or data packages, and what travels to it is capped (64 MiB): the MPNet-base and
SmolLM2 weights do not fit. Throughput and FLOPs do not depend on the weights' values, so
the benchmark trains each model's real architecture from random weights there: its
config.json and tokenizer travel, and ``materialize`` writes random weights (seed 0) on
the machine. Test accuracies of such runs are not the models' (say so wherever they are
quoted); the CPU benchmark, on the real weights, is where accuracy parity is checked.

    python bench/device_pack.py pack [--dir .device]           # here: configs, tokenizers, data, wheels
    python bench/device_pack.py materialize .device/models DIR  # there: random-weight model folders

``pack`` writes ``<dir>/models/<model>/`` (every file of the model's folder but its weights),
``<dir>/data/<model>/<task>/`` (the task tokenized for that model, as the pipeline prepares
it) and ``<dir>/wheels/`` (the pinned pure-Python packages peftlab needs there, Python 3.12).
It adds ``llama-1b-shape``: a Llama of Llama-3.2-1B's dimensions (2,048 hidden, 16 layers, 32
query and 8 key-value heads, 8,192 FFN, tied embeddings) on SmolLM2's tokenizer and vocabulary
(1.07B parameters), with SmolLM2's tokenized data: the shape of the decoders users fine-tune,
which no package here ships.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODELS = ("minilm-l6", "mpnet-base", "smollm2-135m")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")
# peftlab's imports the GPU machine's image lacks or holds at other versions (its huggingface_hub,
# tokenizers, safetensors, accelerate, pandas, pyarrow, scikit-learn and PyTorch are used as they are)
WHEELS = ("transformers==5.23.0", "peft==0.21.2", "regex==2026.11.19", "jsonschema==4.26.0",
          "jsonschema-specifications==2025.9.1", "referencing==0.37.0", "rpds-py==2026.9.1")


# what one call of the device tool may carry (its working tree, this folder included)
CARRY_LIMIT_MIB = 64


LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 64, "rope_theta": 500000.0, "max_position_embeddings": 131072,
            "tie_word_embeddings": True, "rms_norm_eps": 1e-5}


def llama_1b_shape(out: Path) -> Path:
    """``<out>/models/llama-1b-shape``: SmolLM2's folder (tokenizer, config) with Llama-3.2-1B's
    dimensions in its config, and SmolLM2's tokenized data (the same tokenizer)."""
    import json

    src, dest = out / "models" / "smollm2-135m", out / "models" / "llama-1b-shape"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text()) | LLAMA_1B
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    (dest / "PEFTLAB_SOURCE.txt").write_text(
        "Llama-3.2-1B's dimensions on SmolLM2's tokenizer; bench/device_pack.py materialize gives it random "
        "weights (a throughput benchmark only).\n")
    data = out / "data" / "llama-1b-shape"
    shutil.rmtree(data, ignore_errors=True)
    shutil.copytree(out / "data" / "smollm2-135m", data)
    return dest


def pack(out: Path, task: str, max_train: int, max_length: int, models: tuple[str, ...] = MODELS,
         wheels: bool = True) -> float:
    """Gather ``out`` (see the module's docstring); returns its size in MiB."""
    from peftlab.data import TaskSpec, prepare_task
    from peftlab.models import ModelSpec, load_tokenizer, resolve_model_path

    for name in models:
        spec = ModelSpec.from_config(name, {})
        src = Path(resolve_model_path(spec))
        dest = out / "models" / name
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(f, dest / f.name)
        (dest / "PEFTLAB_SOURCE.txt").write_text(
            f"The configuration and tokenizer of built-in model '{name}' without its weights: "
            "bench/device_pack.py materialize gives it random weights (a throughput benchmark only).\n")
        data = out / "data" / name / task
        if not (data / "stats.json").exists():
            tspec = TaskSpec.from_config(task, {"max_train_examples": max_train, "max_eval_examples": 500,
                                                "max_length": max_length})
            prepare_task(tspec, load_tokenizer(spec), data, model_name=name)
        print(f"{name}: {sorted(p.name for p in dest.iterdir())}", flush=True)
    if "smollm2-135m" in models:
        print(f"llama-1b-shape: {llama_1b_shape(out)}", flush=True)
    if wheels:
        (out / "wheels").mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                        "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                        "-d", str(out / "wheels"), *WHEELS], check=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"{out}: {size:.1f} MiB", flush=True)
    if size > CARRY_LIMIT_MIB - 8:  # the rest of the working tree travels too
        raise SystemExit(f"{out} is {size:.0f} MiB: too much to carry ({CARRY_LIMIT_MIB} MiB per call with the "
                         "repository); lower --max-train")
    return size


def materialize(src: Path, dest: Path, seed: int = 0) -> list[Path]:
    """Each model folder of ``src`` again under ``dest``, with random weights (safetensors)."""
    import torch
    from transformers import AutoConfig, AutoModel

    made = []
    for folder in sorted(p for p in src.iterdir() if (p / "config.json").exists()):
        target = dest / folder.name
        made.append(target)
        shutil.copytree(folder, target, dirs_exist_ok=True)
        torch.manual_seed(seed)
        config = AutoConfig.from_pretrained(folder)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # 1B: seconds on a GPU
            model = AutoModel.from_config(config)
        model.save_pretrained(target)
        del model
        print(f"{folder.name}: random weights in {target}", flush=True)
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--dir", type=Path, default=ROOT / ".device")
    p.add_argument("--task", default="rotten_tomatoes")
    p.add_argument("--max-train", type=int, default=2000)
    p.add_argument("--max-length", type=int, default=64)
    m = sub.add_parser("materialize")
    m.add_argument("src", type=Path)
    m.add_argument("dest", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        pack(args.dir, args.task, args.max_train, args.max_length)
    else:
        materialize(args.src, args.dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
