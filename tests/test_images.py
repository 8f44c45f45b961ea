"""Image classification: Fashion-MNIST (Debian's idx files) and image folders / tables / hub
copies, through DINOv2-S's own image processor; every method defined on a ViT trains on
images, merges where it claims to, and LoReFT edits the CLS and first patch; methods with no
meaning on images, and models of the other modality, are refused at DAG build."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch

from conftest import REPO
from peftlab.config import load_yaml, validate_config
from peftlab.data import TaskSpec, load_split, prepare_task
from peftlab.errors import ConfigError, DataError, ModelError
from peftlab.methods import build_method
from peftlab.models import ModelSpec, check_modality, count_parameters, load_model
from peftlab.train import collator_for, make_loader

DINO = ModelSpec.from_config("dinov2-s", {})
# every method defined on a ViT, with small settings; (method, params)
IMAGE_METHODS = [
    ("full", {}),
    ("bitfit", {}),
    ("lora", {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["query", "value"]}),
    ("dora", {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["query", "value"]}),
    ("ia3", {"targets": ["key", "value", "ffn_out"], "feedforward": ["ffn_out"]}),
    ("vera", {"r": 16, "targets": ["value"]}),
    ("gift", {"r": 4, "targets": ["query", "value"]}),
    ("hiwi", {"r": 4, "adapt": "weights"}),
    ("adapter", {"placement": "houlsby", "bottleneck": 8}),
    ("loreft", {"r": 2, "layers": [0, 11], "dropout": 0.0}),
    ("sift", {"rate": 0.01, "targets": ["query", "value"], "calibration_batches": 1}),
    ("pafi", {"rate": 0.01, "targets": ["query", "value"]}),
]


@pytest.fixture(scope="session")
def dino_processor(peftlab_cache):
    from peftlab.models import load_tokenizer

    return load_tokenizer(DINO)


@pytest.fixture(scope="session")
def fashion_task(dino_processor, tmp_path_factory):
    """Fashion-MNIST at 28x28 (2x2 DINOv2 patches), capped to a few dozen images."""
    spec = TaskSpec.from_config("fashion_mnist", {"image_size": 28, "max_train_examples": 40,
                                                  "max_eval_examples": 20})
    out = tmp_path_factory.mktemp("images") / "fashion_mnist"
    prepare_task(spec, dino_processor, out, model_name="dinov2-s", patch_size=14)
    return out


def _batch(task_dir, n: int = 8) -> dict:
    from peftlab.io import read_json

    stats = read_json(task_dir / "stats.json")
    frame = load_split(task_dir, "train").iloc[:n]
    return next(iter(make_loader(frame, n, collator_for(stats, None), shuffle=False)))


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def test_fashion_mnist_splits_are_seeded_processed_and_fingerprinted(fashion_task, dino_processor, tmp_path):
    from peftlab.io import read_json

    stats = read_json(fashion_task / "stats.json")
    assert stats["kind"] == "image_classification" and stats["num_labels"] == 10
    assert stats["image_shape"] == [3, 28, 28] and stats["patch_grid"] == [2, 2]
    assert stats["label_names"][0] == "T-shirt/top" and stats["raw_examples"] == 70000
    assert {k: v["size"] for k, v in stats["splits"].items()} == {"train": 40, "validation": 20, "test": 20}
    test = load_split(fashion_task, "test")
    assert test["text"].str.startswith("t10k #").all()  # Fashion-MNIST's own test images are the test split
    pixels = np.stack(test["pixel_values"].map(np.asarray).tolist())
    assert pixels.shape == (20, 3 * 28 * 28) and abs(float(pixels.mean())) < 3  # ImageNet-normalised
    spec = TaskSpec.from_config("fashion_mnist", {"image_size": 28, "max_train_examples": 40, "max_eval_examples": 20})
    again = prepare_task(spec, dino_processor, tmp_path / "again", model_name="dinov2-s", patch_size=14)
    assert again["fingerprint"] == stats["fingerprint"]
    with pytest.raises(DataError, match="not a multiple of the model's patch size 14; set 'image_size'"):
        prepare_task(TaskSpec.from_config("fashion_mnist", {"image_size": 30, "max_train_examples": 40,
                                                           "max_eval_examples": 20}),
                     dino_processor, tmp_path / "bad", patch_size=14)


def _write_images(root, per_label: int = 6):
    """A few real Fashion-MNIST images as PNG files, ``root/<label>/<n>.png``."""
    from PIL import Image

    from peftlab.imagedata import load_fashion_mnist

    frame = load_fashion_mnist().frame
    rows = []
    for label, name in ((0, "tshirt"), (1, "trouser"), (7, "sneaker")):
        (root / name).mkdir(parents=True)
        for i, image in enumerate(frame[frame["label"] == label]["image"].head(per_label)):
            Image.fromarray(image).save(root / name / f"{i}.png")
            rows.append((f"{name}/{i}.png", name))
    return rows


def test_image_folder_table_and_hub_copy_load_the_same_images(tmp_path, dino_processor):
    import datasets
    import pandas as pd

    from peftlab.data import load_raw

    rows = _write_images(tmp_path / "folder")
    folder = load_raw(TaskSpec.from_config("clothes", {"source": "file", "kind": "image_classification",
                                                       "path": str(tmp_path / "folder")}))
    assert folder.label_names == ["sneaker", "trouser", "tshirt"] and len(folder.frame) == 18
    pd.DataFrame(rows, columns=["file", "kind"]).to_csv(tmp_path / "folder" / "index.csv", index=False)
    table = load_raw(TaskSpec.from_config("clothes", {"source": "file", "kind": "image_classification",
                                                      "path": str(tmp_path / "folder" / "index.csv"),
                                                      "image_column": "file", "label_column": "kind"}))
    assert sorted(table.frame["text_a"]) == sorted(folder.frame["text_a"])  # the same image bytes
    # a hub dataset's local copy, laid out as the hub stores it (parquet shards with its features)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    paths = [str(tmp_path / "folder" / f) for f, _ in rows]
    labels = [["tshirt", "trouser", "sneaker"].index(k) for _, k in rows]
    hub = tmp_path / "hub"
    for split, keep in (("train", lambda i: i % 3 != 0), ("test", lambda i: i % 3 == 0)):  # 12 / 6 images
        rows_of = [i for i in range(len(paths)) if keep(i)]
        ds = datasets.Dataset.from_dict({"image": [paths[i] for i in rows_of], "label": [labels[i] for i in rows_of]},
                                        features=features)
        (hub / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(hub / "data" / f"{split}-00000-of-00001.parquet"))
    spec = TaskSpec.from_config("clothes", {"source": "hub", "kind": "image_classification", "hub_path": str(hub),
                                            "test_split": "test", "validation_fraction": 0.25})
    raw = load_raw(spec)
    assert raw.label_names == ["a", "b", "c"] and (raw.frame["split"] == "test").sum() == 6
    assert sorted(raw.frame["text_a"]) == sorted(folder.frame["text_a"])
    stats = prepare_task(spec, dino_processor, tmp_path / "prepared", patch_size=14)
    assert stats["image_shape"] == [3, 224, 224] and stats["splits"]["test"]["size"] == 6  # the processor's size


def test_a_corrupt_image_is_one_line(tmp_path, dino_processor):
    _write_images(tmp_path / "folder", per_label=3)
    (tmp_path / "folder" / "tshirt" / "0.png").write_bytes(b"not a png")
    spec = TaskSpec.from_config("clothes", {"source": "file", "kind": "image_classification",
                                            "path": str(tmp_path / "folder"), "validation_fraction": 0.3,
                                            "test_fraction": 0.3})
    with pytest.raises(DataError, match=r"0\.png\) cannot be decoded .*remove or replace the corrupt file"):
        prepare_task(spec, dino_processor, tmp_path / "out", patch_size=14)


@pytest.mark.parametrize(("method", "params"), IMAGE_METHODS, ids=[m for m, _ in IMAGE_METHODS])
def test_every_image_method_trains_and_merges_where_it_claims(method, params, fashion_task, tmp_path):
    torch.manual_seed(0)
    base = load_model(DINO, 10, "single_label_classification", seed=0)
    assert type(base).__name__ == "Dinov2ForImageClassification"
    batch = _batch(fashion_task)
    m = build_method(method, params)
    if m.needs_calibration:
        m.calibrate(base, [batch])
    expected = m.expected_trainable_parameters(base)
    model = m.apply(base)
    assert count_parameters(model, trainable_only=True) == expected
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(2):
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, initial[n])]
    # no gradient reaches DINOv2's mask token (pretraining only) or a key bias (the softmax ignores it)
    unchanged = [n for n in unchanged if not n.endswith(("mask_token", "k_proj.bias"))]
    assert not unchanged, f"trainable tensors that never changed: {unchanged[:5]}"
    model.eval()
    with torch.no_grad():
        ref = model(**_inputs(batch)).logits
    m.save(model, tmp_path / "w.safetensors")
    loaded = build_method(method, params).load(load_model(DINO, 10, "single_label_classification", seed=0),
                                               tmp_path / "w.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**_inputs(batch)).logits, ref)
    if m.mergeable:
        plain = m.merge(copy.deepcopy(loaded))
        assert type(plain).__name__ == "Dinov2ForImageClassification"
        with torch.no_grad():
            assert (plain(**_inputs(batch)).logits - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_loreft_edits_the_cls_and_first_patch_of_an_image(fashion_task):
    torch.manual_seed(0)
    base = load_model(DINO, 10, "single_label_classification", seed=0).eval()
    pixels = _batch(fashion_task, 2)["pixel_values"]
    with torch.no_grad():
        before = base.dinov2(pixel_values=pixels).last_hidden_state
    model = build_method("loreft", {"r": 2, "layers": [11], "dropout": 0.0}).apply(base).eval()
    with torch.no_grad():
        after = model.dinov2(pixel_values=pixels).last_hidden_state
    moved = (after - before).abs().amax(dim=(0, 2))
    assert moved.shape[0] == 1 + 4  # CLS + a 2x2 patch grid
    assert (moved[:2] > 1e-3).all() and torch.equal(after[:, 2:], before[:, 2:])


def _images_config():
    cfg = load_yaml(REPO / "config" / "presets" / "images_cpu.yaml")
    cfg.pop("results_dir"), cfg.pop("report_path")
    return cfg


def test_the_cpu_preset_validates_and_inapplicable_methods_and_models_are_refused():
    validate_config(_images_config())
    cfg = _images_config()
    cfg["methods"]["prompt_tuning"] = ["default"]
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert "method 'prompt_tuning' does not apply to the image task 'fashion_mnist'" in str(err.value)
    assert "\n" not in str(err.value)
    cfg = _images_config()
    cfg["models"] = {"minilm-l6": {}}
    with pytest.raises(ConfigError, match="task 'fashion_mnist' is an image task, but model 'minilm-l6' reads text"):
        validate_config(cfg)
    cfg = _images_config()
    cfg["tasks"] = {"rotten_tomatoes": {}}
    with pytest.raises(ConfigError, match="task 'rotten_tomatoes' is a text task, but model 'dinov2-s' reads images"):
        validate_config(cfg)
    with pytest.raises(ModelError, match="is a text task, but model 'dinov2-s' reads images"):
        check_modality(DINO, TaskSpec.from_config("rotten_tomatoes", {}))


def test_gift_patch_view_clusters_images_beside_the_frozen_model(fashion_task, tmp_path):
    """A trained GIFT run's patch view: test images (labels in turn) and the two photos, each
    with GIFT's and the frozen model's cluster maps over its patch grid; the report draws them."""
    from _runs import train_run
    from peftlab.gift_images import decode_png
    from peftlab.gift_view import gift_token_view
    from peftlab.report import figure_gift_patches

    data = tmp_path / "data" / "fashion_mnist"
    shutil.copytree(fashion_task, data)
    run = train_run(REPO, DINO, data, tmp_path / "results", "gift", steps=2)
    rec = gift_token_view(DINO, data, [str(run / "result.json")], [str(run / "trainable.safetensors")],
                          tmp_path / "gift.json", n_sentences=3)
    assert rec["status"] == "completed" and rec["kind"] == "image"
    assert [v["source"].split(":")[0] for v in rec["images"]] == ["test"] * 3 + ["photo"] * 2
    assert len({v["label"] for v in rec["images"][:3]}) == 3
    for v in rec["images"]:
        grid = v["grid"]
        for view in ("gift", "control"):
            assert np.asarray(v[view]["map"]).shape == tuple(grid) and 1 <= v[view]["k"] <= 6
        assert decode_png(v["png"]).shape == (grid[0] * 14, grid[1] * 14, 3)
    assert rec["images"][-1]["grid"] == [16, 16] and rec["images"][-1]["gift"]["k"] >= 2
    fig = figure_gift_patches(rec, "test")
    assert len(fig.axes) == 3 * len(rec["images"])


@pytest.mark.parametrize("method", ["lora", "loreft"])
def test_an_image_run_exports_and_serves_encoded_images(method, fashion_task, tmp_path):
    """A trained image run exports (peft + merged for LoRA, peftlab's own form for LoReFT), each
    form reloaded to the run's logits; the served model reads PNG bytes at the task's size."""
    import io

    import pandas as pd
    from PIL import Image

    from _runs import train_run
    from peftlab import serving
    from peftlab.artifacts import export_run
    from peftlab.imagedata import load_fashion_mnist
    from peftlab.io import read_json

    data = tmp_path / "data" / "fashion_mnist"
    shutil.copytree(fashion_task, data)
    run = train_run(REPO, DINO, data, tmp_path / "results", method, steps=2)
    manifest = export_run(run, DINO, data, tmp_path / "export")
    forms = {"lora": {"peft", "merged"}, "loreft": {"peftlab"}}[method]
    assert set(manifest["forms"]) == forms and manifest["task"]["image_size"] == 28
    assert all(f["max_abs_logit_diff"] <= 1e-3 for f in manifest["forms"].values())
    if "merged" in forms:
        saved = read_json(tmp_path / "export" / "merged" / "preprocessor_config.json")
        assert saved["crop_size"] == {"height": 28, "width": 28}  # preprocesses as training did
    frame = load_fashion_mnist().frame
    pngs = []
    for image in frame[frame["split"] == "test"]["image"].head(3):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    form = "peft" if "peft" in forms else "peftlab"
    model, processor = serving._load(tmp_path / "export" / form, manifest)
    out = serving._classify(model, processor, pngs, manifest["task"])
    assert list(out.columns) == ["label", "score"] and len(out) == 3
    assert set(out["label"]) <= set(manifest["task"]["label_names"]) and (out["score"] > 0).all()
    assert [c.name for c in serving.signature(manifest["task"]).inputs.inputs] == ["image"]
    assert isinstance(out, pd.DataFrame)


@pytest.mark.parametrize("arch", ["vit", "deit"])
def test_vit_and_deit_folders_resolve_roles_and_train(arch, tmp_path):
    """A ViT and a DeiT saved as local folders (small random weights, their own processors, which
    resize both edges with no crop): known as image models before loading, every role resolves
    to one linear per layer, Fashion-MNIST is processed at their size and LoRA trains on it."""
    import transformers

    from peftlab.io import read_json
    from peftlab.models import ROLES, is_image_spec, load_tokenizer, resolve_targets

    config_cls, model_cls = {"vit": ("ViTConfig", "ViTForImageClassification"),
                             "deit": ("DeiTConfig", "DeiTForImageClassification")}[arch]
    config = getattr(transformers, config_cls)(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, image_size=32, patch_size=16)
    torch.manual_seed(0)
    getattr(transformers, model_cls)(config).save_pretrained(tmp_path / arch)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / arch)
    spec = ModelSpec.from_config(arch, {"pretrained": str(tmp_path / arch)})
    assert is_image_spec(spec) is True
    model = load_model(spec, 10, "single_label_classification", seed=0)
    assert type(model).__name__ == model_cls
    for role in ROLES:
        assert len(resolve_targets(model, [role])) == 2, role
    task = TaskSpec.from_config("fashion_mnist", {"max_train_examples": 40, "max_eval_examples": 20})
    stats = prepare_task(task, load_tokenizer(spec), tmp_path / "data", patch_size=16)
    assert stats["image_shape"] == [3, 32, 32] and stats["patch_grid"] == [2, 2]
    assert read_json(tmp_path / "data" / "stats.json")["kind"] == "image_classification"
    lora = build_method("lora", {"r": 2, "targets": ["query", "value"]}).apply(model)
    loss = lora(**_batch(tmp_path / "data", 4)).loss
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0
                                        for n, p in lora.named_parameters() if "lora_" in n)
