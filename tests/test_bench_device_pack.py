"""The GPU benchmark's kit (bench/device_pack.py): what travels to a GPU machine holds no
weights, and what it builds there loads through the pipeline's own model and data code."""

from __future__ import annotations

import sys

import torch

from peftlab.config import REPO_ROOT
from peftlab.data import load_split
from peftlab.io import read_json
from peftlab.models import ModelSpec, load_model

sys.path.insert(0, str(REPO_ROOT / "bench"))

from device_pack import WEIGHT_SUFFIXES, materialize, pack  # noqa: E402


def test_pack_then_materialize_gives_a_loadable_random_weight_model(tmp_path, minilm_spec):
    size = pack(tmp_path / "kit", "rotten_tomatoes", 64, 32, models=("minilm-l6",), wheels=False)
    kit = tmp_path / "kit" / "models" / "minilm-l6"
    assert size < 8 and (kit / "config.json").exists() and (kit / "tokenizer.json").exists()
    assert not [p for p in kit.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)]  # no weights travel
    data = tmp_path / "kit" / "data" / "minilm-l6" / "rotten_tomatoes"
    assert read_json(data / "stats.json")["model"] == "minilm-l6" and len(load_split(data, "train")) == 64

    (folder,) = materialize(tmp_path / "kit" / "models", tmp_path / "random")
    spec = ModelSpec.from_config("minilm-l6", {"pretrained": str(folder)})
    random_net = load_model(spec, 2, "single_label_classification", seed=0)
    real_net = load_model(minilm_spec, 2, "single_label_classification", seed=0)
    shapes = {k: v.shape for k, v in real_net.state_dict().items()}
    assert {k: v.shape for k, v in random_net.state_dict().items()} == shapes  # the real architecture
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(random_net.state_dict()[name], real_net.state_dict()[name])  # not its weights
    assert "random weights" in (folder / "PEFTLAB_SOURCE.txt").read_text()
