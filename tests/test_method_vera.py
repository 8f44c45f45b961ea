"""VeRA through peft: h = W0 x + Lambda_b B Lambda_d A x, A and B frozen and shared."""

from __future__ import annotations

import copy
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
from peftlab.methods.vera import _fold

R = 16
PARAMS = {"r": R, "targets": ["query", "value"]}


def _should_change(name: str) -> bool:
    return name.startswith("classifier.") or name.endswith(("query.weight", "value.weight"))


@pytest.fixture(scope="module")
def trained(minilm_spec, minilm_tokenizer, tiny_task_dir):
    return train_once(minilm_spec, "vera", PARAMS, batch(tiny_task_dir, minilm_tokenizer))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": 8.0}, "r must be a positive integer"),
        ({"d_initial": 0}, "d_initial must be a positive number"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"projection_seed": -1}, "projection_seed must be a non-negative integer"),
        ({"targets": ["query", "q"]}, r"targets \['q'\] invalid"),
        ({"projection_prng_key": 0}, "unknown parameter"),
    ],
)
def test_config_validation(params, message):
    with pytest.raises(ConfigError, match=message):
        build_method("vera", params)


def test_count_matches_closed_form_and_hand(trained, minilm_spec):
    # per target: lambda_d (r) + lambda_b (d_out = 384); A (r x 384), B (384 x r) frozen
    by_hand = 2 * MINILM_LAYERS * (R + 384) + MINILM_HEAD
    assert by_hand == 5570
    check_count(trained, by_hand)
    # targets of another width: lambda_b follows d_out (ffn_in: 1536)
    ffn = build_method("vera", {"r": R, "targets": ["ffn_in"]})
    assert ffn.expected_trainable_parameters(fresh(minilm_spec)) == MINILM_LAYERS * (R + 1536) + MINILM_HEAD


def test_parametrization_shared_frozen_projections(minilm_spec, trained):
    base = fresh(minilm_spec)
    ref = logits(base, trained.batch)
    model = build_method("vera", {**PARAMS, "d_initial": 0.05}).apply(base)
    assert torch.equal(logits(model, trained.batch), ref)  # lambda_b = 0 at init
    layers = [m for m in model.modules() if hasattr(m, "vera_lambda_d")]
    assert len(layers) == 2 * MINILM_LAYERS
    first = layers[0]
    assert first.vera_lambda_d["default"].shape == (R,)
    assert torch.equal(first.vera_lambda_d["default"], torch.full((R,), 0.05))
    assert first.vera_lambda_b["default"].shape == (384,)
    assert torch.equal(first.vera_lambda_b["default"], torch.zeros(384))
    a, b = first.vera_A["default"], first.vera_B["default"]
    assert a.shape == (R, 384) and b.shape == (384, R) and not a.requires_grad and not b.requires_grad
    # one pair for every layer (the same tensors), drawn from projection_seed alone
    assert all(m.vera_A["default"] is a and m.vera_B["default"] is b for m in layers)
    torch.manual_seed(123)  # global RNG state must not matter
    again = build_method("vera", PARAMS).apply(fresh(minilm_spec))
    other = build_method("vera", {**PARAMS, "projection_seed": 1}).apply(fresh(minilm_spec))
    a2 = next(m for m in again.modules() if hasattr(m, "vera_A")).vera_A["default"]
    a3 = next(m for m in other.modules() if hasattr(m, "vera_A")).vera_A["default"]
    assert torch.equal(a, a2) and not torch.equal(a, a3)


def test_only_intended_tensors_change(trained):
    changed = check_only_intended_change(trained, _should_change)
    assert len(changed) == 2 * MINILM_LAYERS + 2


def test_save_load_exact_without_projections(trained, minilm_spec, tmp_path):
    stored = check_save_load(minilm_spec, trained, tmp_path)
    # only the vectors and the head are stored; load redraws A, B from projection_seed
    assert not [k for k in stored if "vera_A" in k or "vera_B" in k]
    assert sum("vera_lambda" in k for k in stored) == 2 * 2 * MINILM_LAYERS


def test_merge_plain_and_hand_fold(trained):
    plain, diff = check_merge(trained)
    print(f"vera minilm merge (peft) max|dlogit| = {diff:.2e}")
    assert peft_merge_supported(trained.model)
    by_hand = merge_by_hand(copy.deepcopy(trained.model), _fold)
    for name, value in plain.state_dict().items():
        assert torch.allclose(value, by_hand.state_dict()[name], atol=1e-6), name
    assert (logits(by_hand, trained.batch) - trained.ref).abs().max().item() <= 1e-5
    # eq. (2) folded: dW = Lambda_b B Lambda_d A, a rank <= r update of the query weight
    name = "bert.encoder.layer.3.attention.self.query.weight"
    delta = (by_hand.state_dict()[name] - trained.before[name]).detach()
    layer = trained.model.get_base_model().bert.encoder.layer[3].attention.self.query
    with torch.no_grad():
        expect = torch.diag(layer.vera_lambda_b["default"]) @ layer.vera_B["default"] @ torch.diag(
            layer.vera_lambda_d["default"]) @ layer.vera_A["default"]
    assert delta.abs().max() > 0
    assert torch.allclose(delta, expect, atol=1e-6)
    assert torch.linalg.matrix_rank(delta).item() <= R


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mpnet-base", "smollm2-135m"])
def test_bigger_models(builtin_model_factory, name):
    # MPNet's head is a composite module: peft's merge_and_unload raises there, the hand fold runs;
    # on Llama k_proj/v_proj are 576 -> 192 (grouped-query attention): B is sliced per layer
    t0 = time.perf_counter()
    diff, peft_merge = check_big_model(builtin_model_factory, name, "vera", {"r": 64, "targets": ["query", "key", "value"]})
    assert peft_merge == (name != "mpnet-base")
    print(f"vera {name}: merge max|dlogit| = {diff:.2e} ({time.perf_counter() - t0:.1f} s)")
