"""(IA)^3 through peft: l_k, l_v rescale key/value outputs, l_ff rescales the FFN-out input."""

from __future__ import annotations

import copy
import re
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
from peftlab.methods._peft_common import merge_by_hand, peft_merge_supported
from peftlab.methods.ia3 import _fold

PARAMS = {"targets": ["key", "value", "ffn_out"], "feedforward": ["ffn_out"]}
FFN_OUT = re.compile(r"layer\.\d+\.output\.dense\.weight$")


def _should_change(name: str) -> bool:
    # key/value: weight and bias rows scaled; ffn_out: weight columns scaled, bias untouched
    return (
        name.startswith("classifier.")
        or name.endswith(("key.weight", "key.bias", "value.weight", "value.bias"))
        or bool(FFN_OUT.search(name))
    )


@pytest.fixture(scope="module")
def trained(minilm_spec, minilm_tokenizer, tiny_task_dir):
    return train_once(minilm_spec, "ia3", PARAMS, batch(tiny_task_dir, minilm_tokenizer))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"targets": []}, "targets must be a list"),
        ({"targets": "key"}, "targets must be a list"),
        ({"targets": ["key", "k_proj"]}, "k_proj"),
        ({"feedforward": ["ffn_in"]}, r"feedforward roles \['ffn_in'\] must also be in targets"),
        ({"feedforward": ["ffn_out", "ffn_out"]}, "twice"),
        ({"init_ia3_weights": False}, "unknown parameter"),
    ],
)
def test_config_validation(params, message):
    with pytest.raises(ConfigError, match=message):
        build_method("ia3", params)


def test_count_matches_closed_form_and_hand(trained, minilm_spec):
    # per layer: key 384 + value 384 (output-scaled) + ffn_out d_in 1536 (input-scaled)
    by_hand = MINILM_LAYERS * (384 + 384 + 1536) + MINILM_HEAD
    assert by_hand == 14594
    check_count(trained, by_hand)
    # ffn_out as an ordinary (output-scaled) target counts its d_out = 384 instead
    plain = build_method("ia3", {"targets": ["key", "value", "ffn_out"], "feedforward": []})
    assert plain.expected_trainable_parameters(fresh(minilm_spec)) == MINILM_LAYERS * 3 * 384 + MINILM_HEAD


def test_vectors_start_at_one_and_model_at_pretrained(minilm_spec, trained):
    base = fresh(minilm_spec)
    ref = logits(base, trained.batch)
    model = build_method("ia3", PARAMS).apply(base)
    assert torch.equal(logits(model, trained.batch), ref)
    layer = model.get_base_model().bert.encoder.layer[0]
    key, ffn_out = layer.attention.self.key, layer.output.dense
    assert not key.is_feedforward and key.ia3_l["default"].shape == (384, 1)
    assert ffn_out.is_feedforward and ffn_out.ia3_l["default"].shape == (1, 1536)
    assert torch.equal(key.ia3_l["default"], torch.ones(384, 1))


def test_only_intended_tensors_change(trained):
    changed = check_only_intended_change(trained, _should_change)
    assert len(changed) == MINILM_LAYERS * 5 + 2


def test_save_load_exact(trained, minilm_spec, tmp_path):
    stored = check_save_load(minilm_spec, trained, tmp_path)
    assert sum("ia3_l" in k for k in stored) == 3 * MINILM_LAYERS


def test_merge_plain_and_hand_fold(trained):
    plain, diff = check_merge(trained)
    print(f"ia3 minilm merge (peft) max|dlogit| = {diff:.2e}")
    assert peft_merge_supported(trained.model)  # BERT's head is a Linear: peft's own merge
    # the by-hand fold (used where peft cannot unwrap the head) gives the same plain model
    by_hand = merge_by_hand(copy.deepcopy(trained.model), _fold)
    assert type(by_hand) is trained.base_type
    for name, value in plain.state_dict().items():
        assert torch.allclose(value, by_hand.state_dict()[name], atol=1e-6), name
    assert (logits(by_hand, trained.batch) - trained.ref).abs().max().item() <= 1e-5
    # and it is the paper's rescaling: rows (and bias) of key/value, columns of ffn_out
    layer = trained.model.get_base_model().bert.encoder.layer[1]
    l_v = layer.attention.self.value.ia3_l["default"].detach()
    l_ff = layer.output.dense.ia3_l["default"].detach()
    assert (l_v != 1).any() and (l_ff != 1).any()
    before = trained.before
    merged = by_hand.bert.encoder.layer[1]
    v0, vb0 = before["bert.encoder.layer.1.attention.self.value.weight"], before["bert.encoder.layer.1.attention.self.value.bias"]
    assert torch.allclose(merged.attention.self.value.weight, l_v * v0)
    assert torch.allclose(merged.attention.self.value.bias, l_v.flatten() * vb0)
    f0, fb0 = before["bert.encoder.layer.1.output.dense.weight"], before["bert.encoder.layer.1.output.dense.bias"]
    assert torch.allclose(merged.output.dense.weight, f0 * l_ff)
    assert torch.equal(merged.output.dense.bias, fb0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mpnet-base", "smollm2-135m"])
def test_bigger_models(builtin_model_factory, name):
    # MPNet's head is a composite module: peft's merge_and_unload raises there, the hand fold runs
    t0 = time.perf_counter()
    diff, peft_merge = check_big_model(builtin_model_factory, name, "ia3", PARAMS)
    assert peft_merge == (name != "mpnet-base")
    print(f"ia3 {name}: merge max|dlogit| = {diff:.2e} ({time.perf_counter() - t0:.1f} s)")
