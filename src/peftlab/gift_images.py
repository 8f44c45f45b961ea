"""The GIFT patch view: GIFT's first projection clusters an image's patch tokens.

The GIFT paper reads the output of its first linear map, W phi, as interpretable: on images,
clustering the patch tokens' projections localises objects and their parts. For a trained GIFT
run on an image task this module takes a few test images (the labels in turn) and two real
photos (scikit-learn's ``flower.jpg`` and ``china.jpg``, at 224 px, which the trained model
also reads), and, per image:

* projects each patch token's frozen output ``x W^T + b`` of the last layer's GIFT module on
  ``W phi`` (as the text view does, ``gift_view.frozen_output``) and clusters the projections
  with k-means, k from 2..6 by silhouette;
* as the control, clusters the same module's output of the frozen pretrained model (no GIFT
  anywhere: what the backbone's own features give, at full width) the same way.

The record holds every image as a PNG (base64) and both cluster maps over the patch grid; the
report draws them side by side.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import torch

from .imagedata import display_image, pixels_of, process_images
from .methods.gift import gift_modules, gift_token_projection

PHOTOS = ("flower.jpg", "china.jpg")  # scikit-learn's bundled photos (unlabelled)
PHOTO_SIDE = 224


def png_base64(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def labels_in_turn(labels: list, candidates, n: int) -> list[int]:
    """``n`` of the ``candidates`` (positions), taking the labels in turn (order kept within a
    label): deterministic and covering the classes."""
    by_label: dict[Any, list[int]] = {}
    for i in candidates:
        by_label.setdefault(labels[i], []).append(int(i))
    queues = [by_label[k] for k in sorted(by_label, key=str)]
    chosen: list[int] = []
    while len(chosen) < n and any(queues):
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop(0))
    return chosen


def photo_pixels(processor, patch: int | None) -> list[tuple[str, np.ndarray]]:
    """scikit-learn's two sample photos through the model's image processor, at 224 px (a
    whole number of patches)."""
    from sklearn.datasets import load_sample_image

    side = PHOTO_SIDE - PHOTO_SIDE % patch if patch else PHOTO_SIDE
    return [(name, process_images([load_sample_image(name)], processor, side, "gift view")[0]) for name in PHOTOS]


@torch.no_grad()
def module_output(model, batch: dict, module) -> tuple[Any, torch.Tensor]:
    """The model's output and ``module``'s frozen output x W^T + b (x as the forward saw it)."""
    import torch.nn.functional as F

    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        out = model(**batch)
    finally:
        handle.remove()
    return out, F.linear(seen[0].to(module.weight.dtype), module.weight, module.bias)


def _clusters(z: np.ndarray, grid: list[int]) -> dict:
    from .gift_view import cluster_projections

    labels, k, silhouette, _ = cluster_projections(z)
    return {"k": int(k), "silhouette": silhouette, "map": labels.reshape(grid).tolist()}


@torch.no_grad()
def patch_view(model, base, pixels: np.ndarray, role: str, layer: int, patch: int) -> dict:
    """One image (C, H, W): GIFT's patch clusters, the frozen model's, and the prediction."""
    name, mod = gift_modules(model, role)[layer]
    grid = [pixels.shape[-2] // patch, pixels.shape[-1] // patch]
    n = grid[0] * grid[1]
    batch = {"pixel_values": torch.from_numpy(np.ascontiguousarray(pixels[None])).float()}
    out, frozen = module_output(model, batch, mod)
    z = gift_token_projection(model, frozen[0, -n:], role, layer).float().numpy()  # the patches: after CLS
    _, control = module_output(base, batch, base.get_submodule(name))
    return {"grid": grid, "predicted": int(out.logits[0].argmax()), "gift": _clusters(z, grid),
            "control": _clusters(control[0, -n:].float().numpy(), grid)}


def image_views(model, base, processor, test, stats: dict, role: str, layer: int, n_images: int) -> list[dict]:
    """The patch view of ``n_images`` test images (labels in turn) and the two photos."""
    names = stats.get("label_names") or []
    patch = int(model.config.patch_size if not isinstance(model.config.patch_size, (list, tuple))
                else model.config.patch_size[0])
    rows = labels_in_turn(test["label"].tolist(), range(len(test)), n_images)
    shown = [(f"test: {test['text'].iloc[i]}", pixels_of(test.iloc[[i]], stats["image_shape"])[0],
              names[int(test["label"].iloc[i])] if names else int(test["label"].iloc[i])) for i in rows]
    shown += [(f"photo: {name} (scikit-learn)", px, None) for name, px in photo_pixels(processor, patch)]
    views = []
    for source, px, label in shown:
        v = patch_view(model, base, px, role, layer, patch)
        v.update(source=source, label=label, png=png_base64(display_image(px, processor)),
                 predicted=names[v["predicted"]] if names else v["predicted"])
        views.append(v)
    return views
