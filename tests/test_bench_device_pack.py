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


def test_kit_has_a_one_billion_parameter_llama_shape_on_smollm2s_tokenizer(tmp_path, smollm):
    """Llama-3.2-1B's dimensions on SmolLM2's vocabulary: 1.07B parameters (counted on the meta
    device: nothing is allocated), with SmolLM2's tokenizer and tokenized data beside it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    pack(tmp_path / "kit", "rotten_tomatoes", 32, 32, models=("smollm2-135m",), wheels=False)
    folder = tmp_path / "kit" / "models" / "llama-1b-shape"
    config = AutoConfig.from_pretrained(folder)
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (2048, 16, 8)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert 1.05e9 < sum(p.numel() for p in model.parameters()) < 1.09e9
    assert (folder / "tokenizer.json").read_bytes() == (tmp_path / "kit" / "models" / "smollm2-135m"
                                                         / "tokenizer.json").read_bytes()
    data = tmp_path / "kit" / "data" / "llama-1b-shape" / "rotten_tomatoes"
    assert len(load_split(data, "train")) == 32 and "Llama-3.2-1B" in (folder / "PEFTLAB_SOURCE.txt").read_text()
