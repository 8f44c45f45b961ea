"""SIFT: gradient-selected sparse update (mask = top-k of accumulated |grad| per target matrix)."""

from __future__ import annotations

import pytest
import torch

from _sparse_checks import (
    MINILM_HEAD,
    MINILM_TARGET_NUMEL,
    batches,
    check_builtin,
    check_only_masked_entries_change,
    check_optimizer_state_is_sparse,
    check_save_load_merge,
    check_update_lands_in_same_step,
    fresh,
    target_names,
)
from peftlab.errors import ConfigError
from peftlab.methods import build_method
from peftlab.methods._sparse import sparse_masks
from peftlab.models import count_parameters

PARAMS = {"calibration_batches": 2}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on the shared 2-core machine two OpenMP threads run ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def calib(tiny_task_dir, minilm_tokenizer):
    """Three real batches of 8 rotten_tomatoes examples."""
    return batches(tiny_task_dir, minilm_tokenizer, n=24, size=8)


@pytest.fixture(scope="module")
def calibrated(minilm_spec, calib):
    """Masks from one real calibration (2 batches), reused by the mechanism tests."""
    m = build_method("sift", PARAMS)
    m.calibrate(fresh(minilm_spec), iter(calib))
    return m.masks


def _prepare(masks):
    def prepare(model):
        m = build_method("sift", PARAMS)
        m.masks = {n: v.clone() for n, v in masks.items()}
        return m
    return prepare


def test_config_validation():
    for bad in ({"rate": 0}, {"rate": 1.5}, {"rate": True}, {"calibration_batches": 0},
                {"accumulate": "mean"}, {"mask_source": "shuffled"}, {"mask_source": "file"},
                {"ranking": "layer"}, {"targets": ["qkv"]}, {"targets": []}, {"lr": 1}):
        with pytest.raises(ConfigError):
            build_method("sift", bad)
    m = build_method("sift", {})
    assert m.config.to_dict() == {"rate": 0.008, "targets": ["query", "key", "value", "attn_output"],
                                  "ranking": "per_matrix", "calibration_batches": 8, "accumulate": "abs",
                                  "mask_source": "gradient", "mask_path": None, "mask_seed": 0}
    assert m.family == "sparse" and m.mergeable and m.needs_calibration


def test_closed_form_count(minilm_spec, calibrated):
    base = fresh(minilm_spec)
    # by hand: round(0.008 * 147456) = round(1179.648) = 1180 per matrix, 24 matrices + head 770
    assert MINILM_TARGET_NUMEL == 147456
    assert build_method("sift", {}).expected_trainable_parameters(base) == 24 * 1180 + MINILM_HEAD == 29090
    # global: round(0.008 * 24 * 147456) = round(28311.552) = 28312
    assert build_method("sift", {"ranking": "global"}).expected_trainable_parameters(base) == 28312 + 770
    # query + value only at 1%: round(1474.56) = 1475 per matrix, 12 matrices
    small = build_method("sift", {"rate": 0.01, "targets": ["query", "value"]})
    assert small.expected_trainable_parameters(base) == 12 * 1475 + 770
    m = _prepare(calibrated)(base)
    expected = m.expected_trainable_parameters(base)
    model = m.apply(base)
    assert count_parameters(model, trainable_only=True) == expected == 29090
    assert set(m.selection.values()) == {1180}


def test_mask_is_bruteforce_topk_of_accumulated_gradient(minilm_spec, calib):
    # brute force: per-batch dense gradients with plain loss.backward() on an untouched model
    ref = fresh(minilm_spec).eval()
    names = target_names(ref)
    grads = []
    for batch in calib[:2]:
        ref.zero_grad()
        ref(**batch).loss.backward()
        grads.append({n: ref.get_submodule(n).weight.grad.clone() for n in names})
    k = 1180

    def topk(score):
        order = torch.argsort(score.reshape(-1), descending=True, stable=True)
        ranked = score.reshape(-1)[order]
        assert ranked[k - 1] > ranked[k]  # no tie at the boundary: the top-k set is unique
        return order[:k].sort().values

    model = fresh(minilm_spec).train()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for accumulate, score in [("abs", lambda n: grads[0][n].abs() + grads[1][n].abs()),
                              ("signed", lambda n: (grads[0][n] + grads[1][n]).abs())]:
        m = build_method("sift", {"calibration_batches": 2, "accumulate": accumulate})
        m.calibrate(model, iter(calib))  # 3 batches offered, 2 used
        assert m.calibration_batches_used == 2
        for name in names:
            assert torch.equal(m.masks[name], topk(score(name))), (accumulate, name)
    # calibration does not touch the model: weights, .grad, requires_grad flags, train mode
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and model.training
    # the second batch matters: the mask is not the first batch's top-k
    assert any(not torch.equal(m.masks[n], topk(grads[0][n].abs())) for n in names)


def test_apply_without_calibration_is_an_error(minilm_spec):
    with pytest.raises(ConfigError, match="calibrate"):
        build_method("sift", {}).apply(fresh(minilm_spec))


def test_only_masked_entries_change(minilm_spec, calib, calibrated):
    check_only_masked_entries_change(minilm_spec, _prepare(calibrated), calib[0])


def test_optimizer_state_is_sparse(minilm_spec, calib, calibrated):
    check_optimizer_state_is_sparse(minilm_spec, _prepare(calibrated), calib[0])


def test_update_lands_in_same_step(minilm_spec, calib, calibrated):
    check_update_lands_in_same_step(minilm_spec, _prepare(calibrated), calib[0])


def test_save_load_merge(minilm_spec, calib, calibrated, tmp_path):
    # the loading method is never calibrated: the index sets come from the file
    diff = check_save_load_merge(minilm_spec, _prepare(calibrated), lambda: build_method("sift", PARAMS),
                                 calib[0], tmp_path)
    print(f"sift minilm merge max abs logit diff {diff:.2e}")


def test_mask_file_source(minilm_spec, calib, calibrated, tmp_path):
    model = fresh(minilm_spec)
    m = _prepare(calibrated)(model)
    model = m.apply(model)
    m.save(model, tmp_path / "masks.safetensors")  # a run's stored weights double as a mask file
    from_file = build_method("sift", {"mask_source": "file", "mask_path": str(tmp_path / "masks.safetensors")})
    applied = from_file.apply(fresh(minilm_spec))  # no calibration needed
    assert {n: v.tolist() for n, v in sparse_masks(applied).items()} == \
           {n: v.tolist() for n, v in sparse_masks(model).items()}
    wrong_rate = build_method("sift", {"rate": 0.01, "mask_source": "file",
                                       "mask_path": str(tmp_path / "masks.safetensors")})
    with pytest.raises(ConfigError, match="1180 entries but rate 0.01 gives 1475"):
        wrong_rate.calibrate(fresh(minilm_spec), iter(calib))
    with pytest.raises(ConfigError, match="does not exist"):
        build_method("sift", {"mask_source": "file", "mask_path": str(tmp_path / "nope")}).apply(fresh(minilm_spec))


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["mpnet-base", "smollm2-135m"])
def test_builtin_models(builtin_model_factory, model_name):
    def prepare(model, batch):
        m = build_method("sift", {"calibration_batches": 1})
        m.calibrate(model, [batch])
        return m

    diff = check_builtin(builtin_model_factory, model_name, prepare)
    print(f"sift {model_name} merge max abs logit diff {diff:.2e}")


def test_random_mask_control(minilm_spec, calib, calibrated):
    """mask_source: random gives the same counts as the gradient mask, seeded, barely overlapping it."""
    def random_masks(seed):
        m = build_method("sift", PARAMS | {"mask_source": "random", "mask_seed": seed})
        m.calibrate(fresh(minilm_spec), iter(calib))
        return m.masks

    a, b, c = random_masks(3), random_masks(3), random_masks(4)
    assert {n: v.numel() for n, v in a.items()} == {n: v.numel() for n, v in calibrated.items()}
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)
    shared = sum(len(set(a[n].tolist()) & set(calibrated[n].tolist())) for n in a)
    total = sum(v.numel() for v in a.values())
    assert shared / total < 0.05  # chance overlap is about the rate (0.8%)
