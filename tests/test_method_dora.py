"""DoRA through peft: W' = m * (W0 + s B A) / ||W0 + s B A|| (row norms), m and A, B train."""

from __future__ import annotations

import time

import pytest
import torch

from _peft_checks import (
    MINILM_HEAD,
    MINILM_LAYERS,
    batch,
    check_big_model,
    check_count,
    check_merge,
    check_only_intended_change,
    check_save_load,
    fresh,
    logits,
    train_once,
)
from peftlab.errors import ConfigError
from peftlab.methods import build_method

PARAMS = {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["query", "value"]}


def _should_change(name: str) -> bool:
    return name.startswith("classifier.") or name.endswith(("query.weight", "value.weight"))


@pytest.fixture(scope="module")
def trained(minilm_spec, minilm_tokenizer, tiny_task_dir):
    return train_once(minilm_spec, "dora", PARAMS, batch(tiny_task_dir, minilm_tokenizer))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": True}, "r must be a positive integer"),
        ({"alpha": 0}, "alpha must be a positive number"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"targets": []}, "targets must be a list"),
        ({"targets": ["query", "qkv"]}, "qkv"),
        ({"targets": ["value", "value"]}, "twice"),
        ({"use_dora": True}, "unknown parameter"),
    ],
)
def test_config_validation(params, message):
    with pytest.raises(ConfigError, match=message):
        build_method("dora", params)


def test_count_matches_closed_form_and_hand(trained, minilm_spec):
    # per target: r (384 + 384) LoRA + 384 magnitude; 6 layers x (query, value)
    by_hand = 2 * MINILM_LAYERS * (4 * (384 + 384) + 384) + MINILM_HEAD
    assert by_hand == 42242
    check_count(trained, by_hand)
    # other roles resolve to other shapes and the formula follows (ffn_in is 384 -> 1536)
    ffn = build_method("dora", {**PARAMS, "targets": ["ffn_in"]})
    assert ffn.expected_trainable_parameters(fresh(minilm_spec)) == (
        MINILM_LAYERS * (4 * (384 + 1536) + 1536) + MINILM_HEAD
    )


def test_init_is_pretrained_and_magnitude_is_row_norm(minilm_spec, trained):
    base = fresh(minilm_spec)
    ref = logits(base, trained.batch)
    model = build_method("dora", PARAMS).apply(base)
    assert torch.allclose(logits(model, trained.batch), ref, atol=1e-5)  # B = 0, m = ||W0||: W' = W0
    layer = model.get_base_model().bert.encoder.layer[0].attention.self.query
    m = layer.lora_magnitude_vector["default"].weight
    assert m.shape == (384,)
    assert torch.allclose(m, trained.before["bert.encoder.layer.0.attention.self.query.weight"].norm(dim=1))


def test_only_intended_tensors_change(trained):
    changed = check_only_intended_change(trained, _should_change)
    assert len(changed) == 2 * MINILM_LAYERS + 2


def test_save_load_exact(trained, minilm_spec, tmp_path):
    stored = check_save_load(minilm_spec, trained, tmp_path)
    assert sum("lora_magnitude_vector" in k for k in stored) == 2 * MINILM_LAYERS


def test_merge_plain_and_equal_to_paper_formula(trained):
    plain, diff = check_merge(trained)
    print(f"dora minilm merge max|dlogit| = {diff:.2e}")
    # the merged weight is eq. (5) computed by hand from the trained m, A, B
    layer = trained.model.get_base_model().bert.encoder.layer[2].attention.self.value
    w0 = layer.base_layer.weight
    assert torch.equal(w0, trained.before["bert.encoder.layer.2.attention.self.value.weight"])
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    assert b.abs().max() > 0  # the direction did move
    with torch.no_grad():
        v = w0 + (PARAMS["alpha"] / PARAMS["r"]) * b @ a
        by_hand = (m / v.norm(dim=1)).unsqueeze(1) * v
    assert torch.allclose(plain.bert.encoder.layer[2].attention.self.value.weight, by_hand, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mpnet-base", "smollm2-135m"])
def test_bigger_models(builtin_model_factory, name):
    t0 = time.perf_counter()
    diff, _ = check_big_model(builtin_model_factory, name, "dora", {"r": 4, "targets": ["query", "value"]})
    print(f"dora {name}: merge max|dlogit| = {diff:.2e} ({time.perf_counter() - t0:.1f} s)")
