"""Image-classification tasks (``kind: image_classification``): labelled images -> the rows
``data.make_splits`` splits -> pixel values through the model's own image processor.

Sources (``TaskSpec.source``):

* ``builtin``: ``fashion_mnist`` (Debian's ``dataset-fashion-mnist`` idx files, its own
  60,000 / 10,000 train / test split);
* ``file``: a folder laid out ``root/<label>/<image>``, or a CSV / TSV / JSONL / parquet table
  of image paths (relative to the table's folder) or image bytes, and labels;
* ``hub``: a hub image dataset through ``datasets.load_dataset`` (hub id or a local copy laid
  out like the hub repository), ``image_column`` / ``label_column``, ``test_split``.

A raw row holds the image (an array, bytes, a ``{bytes, path}`` mapping or a path), ``text_a``
(the SHA-1 of the image's bytes: exact duplicates are dropped before splitting, as texts are),
``label`` and ``name`` (where the image came from, shown in reports). Only the rows the splits
keep are decoded and processed; each becomes ``pixel_values`` (float16, flattened; the shape is
in ``stats.json``'s ``image_shape``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .errors import DataError

if TYPE_CHECKING:
    from .data import RawTask, TaskSpec

log = logging.getLogger(__name__)

IMAGE_CLASSIFICATION = "image_classification"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_KEYS = ("image_column", "image_size")  # the task keys only image tasks read

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot"]
IMAGE_BUILTIN_SETTINGS = {"fashion_mnist": {"kind": IMAGE_CLASSIFICATION}}
IMAGE_BUILTINS = {
    "fashion_mnist": "Fashion-MNIST: 28x28 grey images of clothing, 10 classes (60,000 + 10,000; Debian package "
                     "dataset-fashion-mnist)",
}


# ---------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _read_idx(path: Path, header: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path} is missing: the built-in task fashion_mnist needs Debian's package "
                        "dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    try:
        return np.frombuffer(gzip.decompress(path.read_bytes()), dtype=np.uint8, offset=header)
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"{path} is unreadable ({exc}); reinstall dataset-fashion-mnist") from exc


def load_fashion_mnist(root: Path = FASHION_MNIST_DIR) -> RawTask:
    """Fashion-MNIST's idx files: images after a 16-byte header, labels after 8; its own test split."""
    from .data import RawTask

    parts = []
    for prefix, tag in (("train", "pool"), ("t10k", "test")):
        labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8)
        pixels = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 16)
        if pixels.size != 28 * 28 * len(labels):
            raise DataError(f"{root}/{prefix}-images-idx3-ubyte.gz holds {pixels.size} bytes, not {len(labels)} "
                            "28x28 images; reinstall dataset-fashion-mnist")
        images = list(pixels.reshape(len(labels), 28, 28))
        parts.append(pd.DataFrame({"image": images, "text_a": [_digest(x.tobytes()) for x in images],
                                   "label": labels.astype(int), "split": tag,
                                   "name": [f"{prefix} #{i}" for i in range(len(labels))]}))
    info = {"package": "dataset-fashion-mnist (Debian)", "folder": str(root), "rows": {"train": len(parts[0]),
                                                                                       "test": len(parts[1])}}
    return RawTask(pd.concat(parts, ignore_index=True), list(FASHION_MNIST_LABELS), info, origin=str(root))


def load_image_folder(spec: TaskSpec) -> RawTask:
    """``root/<label>/<image>``: one folder per class (sorted names are the label order)."""
    from .data import RawTask

    root = Path(spec.path).expanduser()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    rows = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).rglob("*"))
            if f.suffix.lower() in IMAGE_SUFFIXES]
    if not rows:
        raise DataError(f"task '{spec.name}': no images ({', '.join(IMAGE_SUFFIXES)}) in class folders under "
                        f"{root}; lay it out as {root}/<label>/<image>")
    frame = pd.DataFrame({"image": [str(f) for f, _ in rows],
                          "text_a": [_digest(f.read_bytes()) for f, _ in rows],
                          "label": [i for _, i in rows], "name": [str(f.relative_to(root)) for f, _ in rows]})
    return RawTask(frame, classes, {"path": str(root), "format": "image folder", "rows": len(frame)}, origin=str(root))


def image_rows(df: pd.DataFrame, spec: TaskSpec, origin: str, base: Path | None = None) -> tuple[pd.DataFrame, list]:
    """A table's image column (paths under ``base``, bytes or ``{bytes, path}``) and labels as raw rows."""
    missing = [c for c in (spec.image_column, spec.label_column) if c not in df.columns]
    if missing:
        raise DataError(f"task '{spec.name}': column(s) {missing} not in {origin} (columns: {list(df.columns)}); "
                        "fix 'image_column' / 'label_column'")
    df = df.dropna(subset=[spec.image_column, spec.label_column]).reset_index(drop=True)
    images = [_resolve(x, base) for x in df[spec.image_column]]
    raw = df[spec.label_column]
    names = [str(v) for v in sorted(raw.unique(), key=lambda v: (str(type(v)), v))]
    names = list(dict.fromkeys(names))
    index = {n: i for i, n in enumerate(names)}
    frame = pd.DataFrame({"image": images, "text_a": [_digest(image_bytes(x, spec.name)) for x in images],
                          "label": [index[str(v)] for v in raw], "name": [_image_name(x, i) for i, x in
                                                                            enumerate(images)]})
    return frame, names


def _resolve(value: Any, base: Path | None) -> Any:
    """A path relative to the table's folder made absolute; other values as they are."""
    if isinstance(value, str) and base is not None and not Path(value).expanduser().is_absolute():
        return str(base / value)
    return value


def _image_name(value: Any, i: int) -> str:
    if isinstance(value, str):
        return Path(value).name
    if isinstance(value, dict) and value.get("path"):
        return Path(str(value["path"])).name
    return f"row {i}"


def image_bytes(value: Any, task: str) -> bytes:
    """The encoded bytes (or raw pixels) an image value stands for."""
    if isinstance(value, np.ndarray):
        return value.tobytes()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_file():
            raise DataError(f"task '{task}': image file {path} does not exist; fix the paths in the image column "
                            "(relative paths are read from the table's folder)")
        return path.read_bytes()
    if hasattr(value, "tobytes"):  # a decoded PIL image
        return value.tobytes()
    raise DataError(f"task '{task}': an image value of type {type(value).__name__} is neither a path, bytes nor "
                    "an image; fix the image column")


def to_pil(value: Any, task: str):
    """An image value decoded to an RGB PIL image (grey images repeat their channel)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, np.ndarray):
        image = Image.fromarray(value)
    elif hasattr(value, "convert") and not isinstance(value, (dict, str, bytes)):
        image = value
    else:
        try:
            image = Image.open(io.BytesIO(image_bytes(value, task)))
            image.load()
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"task '{task}': an image ({_image_name(value, 0)}) cannot be decoded ({exc}); "
                            "remove or replace the corrupt file") from exc
    return image.convert("RGB")


def load_hub_images(spec: TaskSpec) -> RawTask:
    """A hub image dataset: its train split is the pool, ``test_split`` (when set) the test split."""
    from .data import RawTask
    from .gendata import _open_hub

    ds = _open_hub(spec)
    wanted = ["train"] + ([spec.test_split] if spec.test_split else [])
    for split in wanted:
        if split not in ds:
            raise DataError(f"task '{spec.name}': '{spec.hub_path}' has no '{split}' split (it has {list(ds)}); "
                            "set test_split (or test_split: null to split the training set)")
    parts = [_hub_split(ds[split], spec, tag) for split, tag in zip(wanted, ("pool", "test"), strict=False)]
    frame = pd.concat(parts, ignore_index=True)
    if not spec.test_split:
        frame = frame.drop(columns=["split"])
    feature = ds["train"].features.get(spec.label_column)
    names = list(getattr(feature, "names", None) or [])
    if not names:  # labels that are not a ClassLabel: their sorted values
        values = sorted(frame["label"].unique(), key=lambda v: (str(type(v)), v))
        index = {v: i for i, v in enumerate(values)}
        frame["label"] = frame["label"].map(index)
        names = [str(v) for v in values]
    info = {"hub_path": spec.hub_path, "hub_config": spec.hub_config, "test_split": spec.test_split,
            "rows": {s: int(len(ds[s])) for s in wanted}}
    return RawTask(frame, names, info, origin=spec.hub_path)


def _hub_split(split, spec: TaskSpec, tag: str) -> pd.DataFrame:
    """One hub split's rows, its images kept encoded (``{bytes, path}``) until the splits are drawn."""
    import datasets

    for col in (spec.image_column, spec.label_column):
        if col not in split.column_names:
            raise DataError(f"task '{spec.name}': '{spec.hub_path}' has no column '{col}' (columns: "
                            f"{split.column_names}); set 'image_column' / 'label_column'")
    if isinstance(split.features[spec.image_column], datasets.Image):
        split = split.cast_column(spec.image_column, datasets.Image(decode=False))
    images, labels = split[spec.image_column], split[spec.label_column]
    return pd.DataFrame({"image": images, "text_a": [_digest(image_bytes(x, spec.name)) for x in images],
                         "label": labels, "split": tag, "name": [_image_name(x, i) for i, x in enumerate(images)]})


# ---------------------------------------------------------------------------------------
# Processing
# ---------------------------------------------------------------------------------------


def size_kwargs(processor, side: int | None) -> dict:
    """The processor arguments that make a ``side`` x ``side`` image: resize (the shortest edge,
    or both edges) and, where the processor crops, a centre crop of that side."""
    if side is None:
        return {}
    size = dict(getattr(processor, "size", None) or {})
    kw: dict[str, Any] = {"size": {"shortest_edge": side} if "shortest_edge" in size else {"height": side,
                                                                                            "width": side}}
    if getattr(processor, "do_center_crop", False):
        kw["crop_size"] = {"height": side, "width": side}
    return kw


def process_images(images: list, processor, side: int | None, task: str, batch: int = 256) -> np.ndarray:
    """Pixel values (N, C, H, W), float32, through the model's image processor."""
    kw = size_kwargs(processor, side)
    out = []
    for start in range(0, len(images), batch):
        pil = [to_pil(x, task) for x in images[start:start + batch]]
        out.append(np.asarray(processor(images=pil, return_tensors="np", **kw)["pixel_values"], dtype=np.float32))
    return np.concatenate(out)


def check_patch_grid(shape: tuple[int, ...], patch_size: int | None, task: str) -> None:
    """An image side that is not a whole number of patches loses its last pixels silently: refuse it."""
    if not patch_size:
        return
    h, w = shape[-2:]
    if h % patch_size or w % patch_size:
        raise DataError(f"task '{task}': images come out {h}x{w}, not a multiple of the model's patch size "
                        f"{patch_size}; set 'image_size' to a multiple of {patch_size}")


def image_split(part: pd.DataFrame, processor, spec: TaskSpec, patch_size: int | None = None
                ) -> tuple[pd.DataFrame, dict]:
    """One split's rows as pixel values (float16, flattened) beside label and name; its shape."""
    pixels = process_images(part["image"].tolist(), processor, spec.image_size, spec.name)
    check_patch_grid(pixels.shape, patch_size, spec.name)
    out = pd.DataFrame({
        "example_id": part["example_id"].to_numpy(),
        "pixel_values": [x.astype(np.float16).ravel() for x in pixels],
        "label": part["label"].to_numpy(),
        "text": part["name"].astype(str).to_numpy(),
    })
    grid = [pixels.shape[-2] // patch_size, pixels.shape[-1] // patch_size] if patch_size else None
    return out, {"image_shape": list(pixels.shape[1:]), "patch_grid": grid}


def pixels_of(frame: pd.DataFrame, shape: list[int]) -> np.ndarray:
    """A prepared split's pixel values as an (N, C, H, W) float32 array."""
    return np.stack([np.asarray(x, dtype=np.float32).reshape(shape) for x in frame["pixel_values"]])


def display_image(pixels: np.ndarray, processor) -> np.ndarray:
    """A processed image (C, H, W) back to uint8 RGB (H, W, 3) for display: its normalisation undone."""
    mean = np.asarray(getattr(processor, "image_mean", None) or [0.0] * pixels.shape[0]).reshape(-1, 1, 1)
    std = np.asarray(getattr(processor, "image_std", None) or [1.0] * pixels.shape[0]).reshape(-1, 1, 1)
    rgb = pixels * std + mean
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
