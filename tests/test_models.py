"""Tests of peftlab.models: the three built-in models, local folders, target roles, padding.

MiniLM ships as a plain folder inside its package, so its tests are fast. MPNet (unzipped from
five packages) and SmolLM2 (dequantized from GGUF) are built into ``$PEFTLAB_CACHE`` on first
use; those tests are marked ``slow`` and share one session-wide cache in a tmp folder, so no
test writes to the home folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from peftlab.errors import ModelError
from peftlab.models import (
    BUILTIN_MODELS,
    ROLES,
    ModelSpec,
    count_parameters,
    head_module_names,
    load_model,
    load_tokenizer,
    resolve_model_path,
    resolve_targets,
    transformer_blocks,
)

SENTENCES = [
    "A short one.",
    "This sentence is considerably longer, so the first one needs several pad tokens.",
]
PADDING_ATOL = 1e-4


@dataclass(frozen=True)
class Expected:
    model_type: str
    layers: int
    backbone_params: int  # parameters of the pretrained backbone inside the classifier
    padding_sides: tuple[str, ...]  # sides on which a padded batch must match single inputs


# Backbone counts as loaded into *ForSequenceClassification: MiniLM 22.7M (BERT incl. pooler),
# MPNet 108.9M (its classifier drops the 0.59M pooler of the 109.5M checkpoint), SmolLM2
# 134.5M (embeddings tied with the LM head). Encoders use absolute positions, so only right
# padding is position-preserving; the Llama head reads the last non-pad token on either side.
EXPECTED = {
    "minilm-l6": Expected("bert", 6, 22_713_216, ("right",)),
    "mpnet-base": Expected("mpnet", 12, 108_895_872, ("right",)),
    "smollm2-135m": Expected("llama", 30, 134_515_008, ("right", "left")),
}
BUILTIN_PARAMS = [
    pytest.param(name, marks=() if name == "minilm-l6" else pytest.mark.slow, id=name)
    for name in EXPECTED
]


@dataclass
class Loaded:
    name: str
    spec: ModelSpec
    tokenizer: object
    model: nn.Module


@pytest.fixture(scope="session", params=BUILTIN_PARAMS)
def builtin(request, peftlab_cache) -> Loaded:
    name = request.param
    spec = ModelSpec.from_config(name, {})
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, num_labels=2, problem_type="single_label_classification", seed=0)
    model.eval()
    return Loaded(name, spec, tokenizer, model)


@pytest.fixture(scope="session")
def minilm(peftlab_cache) -> Loaded:
    spec = ModelSpec.from_config("minilm-l6", {})
    model = load_model(spec, num_labels=2, problem_type="single_label_classification", seed=0)
    return Loaded("minilm-l6", spec, load_tokenizer(spec), model.eval())


def _logits(loaded: Loaded, sentences: list[str], padding_side: str = "right"):
    tokenizer = loaded.tokenizer
    before, tokenizer.padding_side = tokenizer.padding_side, padding_side
    try:
        batch = tokenizer(sentences, padding=True, return_tensors="pt")
        with torch.no_grad():
            return loaded.model(**batch).logits, batch
    finally:
        tokenizer.padding_side = before


# ---------------------------------------------------------------------------------------
# Built-in models
# ---------------------------------------------------------------------------------------


def test_builtin_model_architecture_and_size(builtin):
    exp = EXPECTED[builtin.name]
    config = builtin.model.config
    assert config.model_type == exp.model_type
    assert config.num_hidden_layers == exp.layers
    assert config.num_labels == 2
    assert config.problem_type == "single_label_classification"
    assert next(builtin.model.parameters()).dtype == torch.float32
    backbone = getattr(builtin.model, builtin.model.base_model_prefix)
    assert count_parameters(backbone) == pytest.approx(exp.backbone_params, rel=1e-3)
    head = head_module_names(builtin.model)
    assert head and builtin.model.base_model_prefix not in head
    head_params = count_parameters(builtin.model) - count_parameters(backbone)
    assert 0 < head_params < 1_000_000


def test_builtin_model_forward_on_padded_batch(builtin):
    logits, batch = _logits(builtin, SENTENCES)
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()
    mask = batch["attention_mask"]
    assert mask[0].sum() < mask[1].sum() == mask.shape[1]  # the short row is really padded


def test_padded_batch_matches_single_sentences(builtin):
    alone = torch.cat([_logits(builtin, [s])[0] for s in SENTENCES])
    pad_id = builtin.tokenizer.pad_token_id
    for side in EXPECTED[builtin.name].padding_sides:
        batched, batch = _logits(builtin, SENTENCES, side)
        pad_at = 0 if side == "left" else -1
        assert batch["input_ids"][0, pad_at] == pad_id
        diff = (batched - alone).abs().max().item()
        assert diff <= PADDING_ATOL, f"{side} padding changes the logits by {diff:.2e}"


def test_pad_token_is_defined_and_shared_with_the_head(builtin):
    pad_id = builtin.tokenizer.pad_token_id
    assert pad_id is not None
    assert builtin.model.config.pad_token_id == pad_id


@pytest.mark.parametrize("role", ROLES)
def test_every_role_resolves_to_one_linear_per_layer(builtin, role):
    exp = EXPECTED[builtin.name]
    names = resolve_targets(builtin.model, [role])
    per_layer = 2 if (exp.model_type == "llama" and role == "ffn_in") else 1  # gate + up
    assert len(names) == exp.layers * per_layer
    modules = dict(builtin.model.named_modules())
    assert all(isinstance(modules[n], nn.Linear) for n in names)
    layer_ids = {int(part) for n in names for part in n.split(".") if part.isdigit()}
    assert layer_ids == set(range(exp.layers))


def test_query_value_targets(builtin):
    layers = EXPECTED[builtin.name].layers
    names = resolve_targets(builtin.model, ["query", "value"])
    assert len(names) == 2 * layers == len(set(names))
    assert names == sorted(names)
    assert not set(names) & set(resolve_targets(builtin.model, ["key"]))


def test_all_roles_together_are_disjoint(builtin):
    exp = EXPECTED[builtin.name]
    names = resolve_targets(builtin.model, list(ROLES))
    per_layer = 7 if exp.model_type == "llama" else 6  # Llama has gate_proj and up_proj
    assert len(names) == exp.layers * per_layer


def test_transformer_blocks_are_the_layer_list_and_a_model_without_one_is_named(builtin):
    blocks = transformer_blocks(builtin.model)
    assert len(blocks) == EXPECTED[builtin.name].layers
    assert all(type(b).__name__.endswith(("Layer", "DecoderLayer")) for b in blocks)
    flat = nn.Sequential(nn.Linear(4, 4))
    flat.config = type("C", (), {"num_hidden_layers": 3, "model_type": "toy"})()
    with pytest.raises(ModelError, match="found no list of 3 transformer blocks in model type 'toy'"):
        transformer_blocks(flat)


# ---------------------------------------------------------------------------------------
# Cached conversions (MPNet zip, SmolLM2 GGUF)
# ---------------------------------------------------------------------------------------


def _no_leftovers(models_dir: Path) -> None:
    assert not [p.name for p in models_dir.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_mpnet_is_unpacked_once_into_the_cache(peftlab_cache):
    spec = ModelSpec.from_config("mpnet-base", {})
    path = Path(resolve_model_path(spec))
    assert path == peftlab_cache / "models" / "mpnet-base"
    weights = path / "model.safetensors"
    assert weights.stat().st_size > 400_000_000
    assert (path / "tokenizer.json").exists()
    stamp = weights.stat().st_mtime_ns
    assert Path(resolve_model_path(spec)) == path
    assert weights.stat().st_mtime_ns == stamp  # second call reuses, does not unpack again
    _no_leftovers(path.parent)


@pytest.mark.slow
def test_smollm2_is_dequantized_once_to_a_plain_folder(peftlab_cache):
    spec = ModelSpec.from_config("smollm2-135m", {})
    path = Path(resolve_model_path(spec))
    assert path == peftlab_cache / "models" / "smollm2-135m"
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config
    assert config.get("pad_token_id") is not None
    assert "GGUF" in (path / "PEFTLAB_SOURCE.txt").read_text()
    assert not list(path.glob("*.gguf"))
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert Path(resolve_model_path(spec)) == path
    assert weights.stat().st_mtime_ns == stamp
    _no_leftovers(path.parent)
    assert spec.notes and "GGUF" in spec.notes


@pytest.mark.slow
def test_smollm2_dequantized_weights_still_generate_text(peftlab_cache):
    """A wrong dequantization (or q/k permutation) would produce garbage, not 'Paris'."""
    from transformers import AutoModelForCausalLM

    spec = ModelSpec.from_config("smollm2-135m", {})
    tok = load_tokenizer(spec)
    lm = AutoModelForCausalLM.from_pretrained(resolve_model_path(spec), dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = lm.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_gemma3_is_joined_dequantized_and_trains_with_logits_on_the_target_only(peftlab_cache):
    """Gemma-3-270M: the four chunk files are joined (the package's SHA-256) and dequantized once to
    a plain folder, the weights still complete a fact, every role resolves per layer, and a
    training loss applies the 262k-token output layer only from the first target position on."""
    from transformers import AutoModelForCausalLM

    from peftlab.generation import CausalCollator, loss_of

    spec = ModelSpec.from_config("gemma3-270m", {})
    path = Path(resolve_model_path(spec))
    assert path == peftlab_cache / "models" / "gemma3-270m"
    # the joined GGUF file (about 250 MB) is gone once dequantized: only the fp32 folder stays
    assert sorted(p.name for p in (peftlab_cache / "models").iterdir() if "gemma" in p.name) == ["gemma3-270m"]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and "quantization_config" not in config
    assert "Q4_K_M" in (path / "PEFTLAB_SOURCE.txt").read_text() and "Gemma" in spec.notes
    tok = load_tokenizer(spec)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert lm.config.vocab_size == 262_144 and lm.config.num_hidden_layers == 18
    assert sum(p.numel() for p in lm.parameters()) == 268_098_176
    # a wrong dequantization gives noise (ln 262144 = 12.5 nats a token), not fluent English and facts
    text = tok("The capital of France is Paris. The capital of Germany is Berlin.", return_tensors="pt")
    with torch.no_grad():
        assert lm(**text, labels=text["input_ids"]).loss.item() < 3.5
        logits = lm(**tok("The capital of France is", return_tensors="pt")).logits[0, -1]
    assert " Paris" in [tok.decode(i) for i in logits.topk(5).indices]
    for role in ("query", "value", "ffn_in", "ffn_out"):
        assert len(resolve_targets(lm, [role])) == 18 * (2 if role == "ffn_in" else 1)
    prompt = tok("Calculate 12 + 30.\nAnswer:")["input_ids"]
    target = tok(" 42", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rows = [{"input_ids": prompt + target, "prompt_length": len(prompt)}] * 2
    batch = CausalCollator(tok.pad_token_id)(rows)
    seen = []
    lm.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        ours = loss_of(lm, batch)
        theirs = lm(**{k: v for k, v in batch.items() if k != "prompt_length"}).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-4)
    assert seen[0] == len(target) + 1 < seen[1] == len(prompt) + len(target)


# ---------------------------------------------------------------------------------------
# Seeds, local folders, errors (fast: MiniLM only)
# ---------------------------------------------------------------------------------------


def test_head_initialisation_follows_the_seed(minilm):
    again = load_model(minilm.spec, 2, "single_label_classification", seed=0)
    other = load_model(minilm.spec, 2, "single_label_classification", seed=1)
    head = minilm.model.classifier.weight
    assert torch.equal(again.classifier.weight, head)
    assert not torch.equal(other.classifier.weight, head)
    # the pretrained backbone does not depend on the seed
    assert torch.equal(
        other.bert.embeddings.word_embeddings.weight,
        minilm.model.bert.embeddings.word_embeddings.weight,
    )


def test_regression_head_has_one_output(minilm):
    model = load_model(minilm.spec, num_labels=1, problem_type="regression", seed=0)
    assert model.config.problem_type == "regression"
    assert model.classifier.out_features == 1


def test_local_folder_loads_like_the_builtin(minilm, tmp_path):
    copy = tmp_path / "my-minilm"
    shutil.copytree(resolve_model_path(minilm.spec), copy)
    spec = ModelSpec.from_config("mine", {"pretrained": str(copy)})
    assert spec.pretrained == str(copy)
    assert spec.notes == ""
    assert resolve_model_path(spec) == str(copy)
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, 2, "single_label_classification", seed=0).eval()
    assert model.config.model_type == "bert"
    assert len(resolve_targets(model, ["query", "value"])) == 12
    mine = Loaded("mine", spec, tokenizer, model)
    assert torch.allclose(_logits(mine, SENTENCES)[0], _logits(minilm, SENTENCES)[0], atol=1e-6)


def test_a_new_head_is_said_once_and_other_load_news_keeps_transformers_report(minilm, tmp_path, caplog):
    """Only the new task head missing: peftlab's one line instead of transformers' table. A
    checkpoint with something else (here an extra tensor) keeps transformers' report."""
    import logging

    from safetensors.torch import load_file, save_file

    reports = []  # what transformers' loader logs, as its own handlers receive it
    seen = logging.Handler()
    seen.emit = lambda record: reports.append(record.getMessage())
    logging.getLogger("transformers.modeling_utils").addHandler(seen)
    caplog.set_level("INFO", logger="peftlab.models")
    try:
        load_model(minilm.spec, 2, "single_label_classification", seed=0)
        ours = [r.getMessage() for r in caplog.records if "new task head" in r.getMessage()]
        assert ours == ["minilm-l6: new task head (classifier.bias, classifier.weight), not in the checkpoint: "
                        "as expected, fine-tuning trains it"]
        assert not [m for m in reports if "LOAD REPORT" in m]

        copy = tmp_path / "extra"
        shutil.copytree(resolve_model_path(minilm.spec), copy)
        weights = load_file(copy / "model.safetensors")
        save_file(weights | {"extra.weight": torch.zeros(2)}, copy / "model.safetensors", metadata={"format": "pt"})
        caplog.clear()
        load_model(ModelSpec.from_config("extra", {"pretrained": str(copy)}), 2, "single_label_classification", seed=0)
    finally:
        logging.getLogger("transformers.modeling_utils").removeHandler(seen)
    shown = [m for m in reports if "LOAD REPORT" in m]
    assert len(shown) == 1 and "extra.weight" in shown[0] and "classifier.weight" in shown[0]
    assert not [r for r in caplog.records if "new task head" in r.getMessage()]


def test_builtin_spec_from_config_keeps_entry_fields():
    spec = ModelSpec.from_config("minilm-l6", {"targets": {"query": r"self\.query$"}})
    assert spec.pretrained is None
    assert spec.targets == {"query": r"self\.query$"}
    # Gemma-3-270M is built in for generative tasks only (its own test below), DINOv2-S for
    # image tasks (tests/test_dinov2.py, tests/test_images.py)
    assert set(BUILTIN_MODELS) == set(EXPECTED) | {"gemma3-270m", "dinov2-s"}


@pytest.mark.parametrize("entry", [{}, None, {"revision": "main"}])
def test_unknown_name_without_pretrained_is_an_error(entry):
    with pytest.raises(ModelError, match="'no-such-model' is not built in.*pretrained"):
        ModelSpec.from_config("no-such-model", entry)


def test_missing_local_folder_is_an_error(tmp_path):
    spec = ModelSpec.from_config("mine", {"pretrained": str(tmp_path / "absent")})
    with pytest.raises(ModelError, match="does not exist"):
        load_tokenizer(spec)
    with pytest.raises(ModelError, match="does not exist"):
        load_model(spec, 2, "single_label_classification")


def test_folder_without_config_is_an_error(tmp_path):
    spec = ModelSpec.from_config("mine", {"pretrained": str(tmp_path)})
    with pytest.raises(ModelError, match="no config.json"):
        load_model(spec, 2, "single_label_classification")


def test_folder_without_weights_is_an_error(minilm, tmp_path):
    shutil.copy(Path(resolve_model_path(minilm.spec)) / "config.json", tmp_path)
    spec = ModelSpec.from_config("mine", {"pretrained": str(tmp_path)})
    with pytest.raises(ModelError, match=r"model 'mine': folder .* has no weights \(model.safetensors\): save"):
        load_model(spec, 2, "single_label_classification")


# ---------------------------------------------------------------------------------------
# Target resolution errors and overrides
# ---------------------------------------------------------------------------------------


def test_unknown_role_is_an_error(minilm):
    with pytest.raises(ModelError, match="unknown target role 'qkv'"):
        resolve_targets(minilm.model, ["qkv"])


def test_override_pattern_replaces_the_table(minilm):
    only_two = {"query": r"layer\.[01]\.attention\.self\.query$"}
    names = resolve_targets(minilm.model, ["query"], only_two)
    assert names == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.1.attention.self.query",
    ]
    with pytest.raises(ModelError, match="matches no linear module"):
        resolve_targets(minilm.model, ["value"], {"value": r"no_such_module$"})


class _Toy(nn.Module):
    class config:  # noqa: N801 - mimics a transformers config
        model_type = "toy"

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"wq": nn.Linear(4, 4)}) for _ in range(3))


def test_unknown_architecture_needs_a_targets_override():
    toy = _Toy()
    with pytest.raises(ModelError, match=r"model 'toy' \(type 'toy'\) has no known module for role 'query'"):
        resolve_targets(toy, ["query"])
    assert resolve_targets(toy, ["query"], {"query": r"\.wq$"}) == [
        "blocks.0.wq",
        "blocks.1.wq",
        "blocks.2.wq",
    ]


# ---------------------------------------------------------------------------------------
# Bad and untrusted models: clear errors naming the model and what to do
# ---------------------------------------------------------------------------------------


def _minilm_folder(dest: Path, weights: str = "safetensors") -> Path:
    """A copy of MiniLM-L6's folder whose weights are safetensors, a pickle, or absent."""
    src = Path(resolve_model_path(ModelSpec.from_config("minilm-l6", {})))
    dest.mkdir(parents=True)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / f, dest / f)
    if weights == "safetensors":
        shutil.copy(src / "model.safetensors", dest / "model.safetensors")
    elif weights in ("pytorch_model.bin", "model.pt"):
        from safetensors.torch import load_file

        torch.save(load_file(str(src / "model.safetensors")), dest / weights)  # a PyTorch pickle
    return dest


class _Payload:
    """Unpickling this runs code: it creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle code ran"))


def test_pickle_weights_are_refused_unless_allowed(minilm, tmp_path):
    folder = _minilm_folder(tmp_path / "pickled", weights="pytorch_model.bin")
    spec = ModelSpec.from_config("pickled", {"pretrained": str(folder)})
    with pytest.raises(ModelError) as info:
        load_model(spec, 2, "single_label_classification", seed=0)
    message = str(info.value)
    assert "model 'pickled'" in message and "only pickle-based weights (pytorch_model.bin)" in message
    assert "arbitrary code" in message and "allow_pickle: true" in message and "\n" not in message
    allowed = ModelSpec.from_config("pickled", {"pretrained": str(folder), "allow_pickle": True})
    model = load_model(allowed, 2, "single_label_classification", seed=0).eval()
    mine = Loaded("pickled", allowed, load_tokenizer(allowed), model)
    assert torch.allclose(_logits(mine, SENTENCES)[0], _logits(minilm, SENTENCES)[0], atol=1e-6)
    # a .pt file is refused too, and even when allowed it is not a file transformers loads
    pt = _minilm_folder(tmp_path / "pt", weights="model.pt")
    with pytest.raises(ModelError, match=r"only pickle-based weights \(model.pt\)"):
        load_tokenizer(ModelSpec.from_config("pt", {"pretrained": str(pt)}))
    with pytest.raises(ModelError, match="has model.pt but no weight file transformers loads"):
        load_model(ModelSpec.from_config("pt", {"pretrained": str(pt), "allow_pickle": True}), 2,
                   "single_label_classification")


def test_a_malicious_pickle_is_never_opened(tmp_path):
    import pickle

    folder = _minilm_folder(tmp_path / "evil", weights=None)
    marker = tmp_path / "marker.txt"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    spec = ModelSpec.from_config("evil", {"pretrained": str(folder)})
    for load in (load_tokenizer, lambda s: load_model(s, 2, "single_label_classification")):
        with pytest.raises(ModelError, match="pickle-based weights"):
            load(spec)
    assert not marker.exists()


def _custom_code_folder(dest: Path, marker: Path) -> Path:
    """MiniLM-L6 behind an ``auto_map``: loading it imports modeling_custom.py, which writes
    ``marker`` (code shipped with a model runs on load)."""
    folder = _minilm_folder(dest)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-bert", architectures=["CustomBertForSequenceClassification"],
                  auto_map={"AutoConfig": "configuration_custom.CustomBertConfig",
                            "AutoModelForSequenceClassification": "modeling_custom.CustomBertForSequenceClassification"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_custom.py").write_text(
        "from transformers import BertConfig\n\n\nclass CustomBertConfig(BertConfig):\n    model_type = 'custom-bert'\n")
    (folder / "modeling_custom.py").write_text(
        f"from pathlib import Path\n\nPath({str(marker)!r}).write_text('model code ran')\n\n"
        "from transformers import BertForSequenceClassification\n\n"
        "from .configuration_custom import CustomBertConfig\n\n\n"
        "class CustomBertForSequenceClassification(BertForSequenceClassification):\n"
        "    config_class = CustomBertConfig\n")
    return folder


def test_remote_code_is_refused_unless_trusted(tmp_path):
    marker = tmp_path / "marker.txt"
    folder = _custom_code_folder(tmp_path / "custom", marker)
    spec = ModelSpec.from_config("custom", {"pretrained": str(folder)})
    for load in (load_tokenizer, lambda s: load_model(s, 2, "single_label_classification")):
        with pytest.raises(ModelError) as info:
            load(spec)
        assert "model 'custom'" in str(info.value) and "configuration_custom.py, modeling_custom.py" in str(info.value)
        assert "trust_remote_code: true" in str(info.value)
    assert not marker.exists()


def _cache_repo(hf_home: Path, repo: str, folder: Path) -> None:
    """Put ``folder``'s files into a Hugging Face cache as the snapshot of hub repo ``repo``."""
    base = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(folder, base / "snapshots" / commit)


@pytest.mark.slow
def test_hub_ids_offline_unknown_pickled_or_with_code(tmp_path):
    """Hub ids resolved from a local cache (as on a cluster node without hub access)."""
    import os
    import subprocess
    import sys

    hf_home = tmp_path / "hf"
    _cache_repo(hf_home, "someone/pickled-minilm", _minilm_folder(tmp_path / "p", weights="pytorch_model.bin"))
    marker = tmp_path / "marker.txt"
    _cache_repo(hf_home, "someone/custom-minilm", _custom_code_folder(tmp_path / "c", marker))
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    res = subprocess.run([sys.executable, str(Path(__file__).parent / "_hub_cache_models.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = {r["case"]: r for r in map(json.loads, res.stdout.splitlines())}
    unknown = out["unknown-id"]["error"]
    assert "model 'unknown-id': hub id 'nobody/no-such-model' is not in the local Hugging Face cache" in unknown
    assert "HF_HUB_OFFLINE=1" in unknown and "local model folder" in unknown
    assert "only pickle-based weights" in out["pickle-only"]["error"] and "allow_pickle: true" in out["pickle-only"]["error"]
    assert out["pickle-only-allowed"]["loaded"] == "BertForSequenceClassification"
    assert "trust_remote_code: true" in out["remote-code"]["error"]
    assert out["remote-code-trusted"]["loaded"] == "CustomBertForSequenceClassification"
    assert marker.read_text() == "model code ran"  # it ran only in the trusted case, the last one


def test_method_targets_missing_on_the_architecture(tmp_path, minilm_spec, tiny_task_dir):
    """A real GPT-2 architecture (its attention is Conv1D, not nn.Linear): LoRA's query/value
    targets do not exist there; the run stops before training, naming the model and the fix."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from peftlab.config import Experiment, RunKey, TrainConfig
    from peftlab.train import finetune

    folder = tmp_path / "gpt2-tiny"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=30522, n_positions=64, n_embd=32, n_layer=2, n_head=2, pad_token_id=0)
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    load_tokenizer(minilm_spec).save_pretrained(folder)  # same vocabulary size as the prepared data
    spec = ModelSpec.from_config("gpt2-tiny", {"pretrained": str(folder)})
    experiment = Experiment("lora", "default", TrainConfig(max_steps=2, batch_size=16), {"targets": ["query"]}, ())
    key = RunKey("gpt2-tiny", "rotten_tomatoes", "lora", "default", 0)
    with pytest.raises(ModelError) as info:
        finetune(key, spec, experiment, tiny_task_dir, tmp_path / "w.safetensors", tmp_path / "r.json", threads=1)
    message = str(info.value)
    assert "model 'gpt2-tiny' (type 'gpt2') has no known module for role 'query'" in message
    assert "add 'targets: {query: <regex over module names>}'" in message and "its linear modules: score" in message
    # a pattern over the Conv1D modules still matches no nn.Linear: said so, with the fix
    spec = ModelSpec.from_config("gpt2-tiny", {"pretrained": str(folder), "targets": {"query": r"c_attn$"}})
    with pytest.raises(ModelError, match=r"role 'query' \(pattern 'c_attn\$'\) matches no linear module of "
                                         r"model 'gpt2-tiny'.*choose other targets"):
        finetune(key, spec, experiment, tiny_task_dir, tmp_path / "w.safetensors", tmp_path / "r.json", threads=1)
    assert not (tmp_path / "r.json").exists()
