"""PaFi: sparse update of the smallest-|W0| entries, chosen once and task-agnostic."""

from __future__ import annotations

import json

import pytest
import torch

from _sparse_checks import (
    MINILM_HEAD,
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
from peftlab.methods._sparse import select_indices, sparse_masks
from peftlab.models import count_parameters


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on the shared 2-core machine two OpenMP threads run ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch(tiny_task_dir, minilm_tokenizer):
    return batches(tiny_task_dir, minilm_tokenizer, n=8, size=8)[0]


def _prepare(params=None):
    return lambda model: build_method("pafi", params or {})


def test_config_validation():
    for bad in ({"rate": -0.1}, {"rate": "0.01"}, {"ranking": "per_layer"}, {"targets": "query"},
                {"targets": ["ffn"]}, {"calibration_batches": 8}):
        with pytest.raises(ConfigError):
            build_method("pafi", bad)
    m = build_method("pafi", {"ranking": "global"})
    # the ranking choice goes into the result record through the config
    assert m.config.to_dict() == {"rate": 0.008, "targets": ["query", "key", "value", "attn_output"],
                                  "ranking": "global"}
    assert m.family == "sparse" and m.mergeable and not m.needs_calibration


def test_closed_form_count(minilm_spec):
    base = fresh(minilm_spec)
    # per matrix: round(0.008 * 384 * 384) = round(1179.648) = 1180, 24 matrices, + head 770
    per_matrix = build_method("pafi", {})
    assert per_matrix.expected_trainable_parameters(base) == 24 * 1180 + MINILM_HEAD == 29090
    # global: round(0.008 * 24 * 147456) = round(28311.552) = 28312, + head
    glob = build_method("pafi", {"ranking": "global"})
    assert glob.expected_trainable_parameters(base) == 28312 + 770
    # ffn_in (1536 x 384) at 0.5%: round(2949.12) = 2949 per matrix, 6 matrices
    ffn = build_method("pafi", {"rate": 0.005, "targets": ["ffn_in"]})
    assert ffn.expected_trainable_parameters(base) == 6 * 2949 + 770
    for m in (per_matrix, glob, ffn):
        model = fresh(minilm_spec)
        expected = m.expected_trainable_parameters(model)
        assert count_parameters(m.apply(model), trainable_only=True) == expected


def test_mask_is_bruteforce_smallest_magnitude(minilm_spec):
    base = fresh(minilm_spec)
    weights = {n: base.get_submodule(n).weight.detach().clone() for n in target_names(base)}
    model = build_method("pafi", {}).apply(base)
    masks = sparse_masks(model)
    for name, w in weights.items():
        # brute force: sort |W| ascending (stable: ties to the lower flat index), keep 1180
        smallest = torch.argsort(w.abs().reshape(-1), stable=True)[:1180].sort().values
        assert torch.equal(masks[name], smallest), name
        chosen = torch.zeros(w.numel(), dtype=torch.bool)
        chosen[masks[name]] = True
        assert w.abs().reshape(-1)[chosen].max() <= w.abs().reshape(-1)[~chosen].min()


def test_global_ranking_counts_differ_and_match_bruteforce(minilm_spec, tmp_path):
    base = fresh(minilm_spec)
    names = target_names(base)  # sorted, the order the global ranking concatenates
    flat = torch.cat([base.get_submodule(n).weight.detach().abs().reshape(-1) for n in names])
    smallest = torch.argsort(flat, stable=True)[:28312]
    owner = smallest // (384 * 384)  # all target matrices are 384 x 384 in MiniLM
    want = {n: (smallest[owner == i] % (384 * 384)).sort().values for i, n in enumerate(names)}

    m = build_method("pafi", {"ranking": "global"})
    model = m.apply(base)
    masks = sparse_masks(model)
    assert {n: v.tolist() for n, v in masks.items()} == {n: v.tolist() for n, v in want.items() if v.numel()}
    counts = m.selection
    assert sum(counts.values()) == 28312
    assert len(set(counts.values())) > 1  # per-matrix counts differ under global ranking
    assert max(counts.values()) > 1180 > min(counts.values())
    per_matrix = build_method("pafi", {})
    per_matrix.apply(fresh(minilm_spec))
    assert set(per_matrix.selection.values()) == {1180}
    # the counts travel with the stored weights
    m.save(model, tmp_path / "g.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "g.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["counts"]) == counts
    assert json.loads(meta["config"])["ranking"] == "global"


def test_select_indices_breaks_ties_by_lower_index():
    scores = torch.tensor([3.0, 1.0, 2.0, 1.0, 1.0, 0.5])
    assert select_indices(scores, 3, largest=False).tolist() == [1, 3, 5]
    assert select_indices(scores, 2, largest=True).tolist() == [0, 2]
    assert select_indices(scores, 0, largest=True).numel() == 0
    assert select_indices(scores, 9, largest=True).tolist() == list(range(6))
    with pytest.raises(ValueError, match="NaN"):
        select_indices(torch.tensor([1.0, float("nan")]), 1, largest=True)


def test_load_rejects_a_mismatching_config(minilm_spec, tmp_path):
    m = build_method("pafi", {})
    model = m.apply(fresh(minilm_spec))
    m.save(model, tmp_path / "w.safetensors")
    with pytest.raises(ConfigError, match="rate 0.01 gives 1475"):
        build_method("pafi", {"rate": 0.01}).load(fresh(minilm_spec), tmp_path / "w.safetensors")
    with pytest.raises(ConfigError, match="already carries sparse updates"):
        m.apply(model)


@pytest.mark.parametrize("ranking", ["per_matrix", "global"])
def test_only_masked_entries_change(minilm_spec, batch, ranking):
    check_only_masked_entries_change(minilm_spec, _prepare({"ranking": ranking}), batch)


def test_optimizer_state_is_sparse(minilm_spec, batch):
    check_optimizer_state_is_sparse(minilm_spec, _prepare(), batch)


def test_update_lands_in_same_step(minilm_spec, batch):
    check_update_lands_in_same_step(minilm_spec, _prepare(), batch)


@pytest.mark.parametrize("ranking", ["per_matrix", "global"])
def test_save_load_merge(minilm_spec, batch, tmp_path, ranking):
    params = {"ranking": ranking}
    diff = check_save_load_merge(minilm_spec, _prepare(params), lambda: build_method("pafi", params),
                                 batch, tmp_path)
    print(f"pafi/{ranking} minilm merge max abs logit diff {diff:.2e}")


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["mpnet-base", "smollm2-135m"])
def test_builtin_models(builtin_model_factory, model_name):
    diff = check_builtin(builtin_model_factory, model_name, lambda model, batch: build_method("pafi", {}))
    print(f"pafi {model_name} merge max abs logit diff {diff:.2e}")


def test_mask_is_the_smallest_pretrained_entries_whatever_the_task(minilm_spec):
    """PaFi's mask against its definition, computed here from the pretrained weights alone (a
    stable sort of |W0|, not the method's selection code): the round(rate x numel) smallest
    entries of every target matrix, lower index first on ties, the same for a 2-label and a
    5-label task (their heads, the task-dependent part, differ)."""
    from peftlab.models import load_model

    two = load_model(minilm_spec, 2, "single_label_classification", seed=0)
    five = load_model(minilm_spec, 5, "single_label_classification", seed=1)
    pretrained = {n: p.detach().clone() for n, p in two.named_parameters()}
    method = build_method("pafi", {})
    a = sparse_masks(method.apply(two))
    b = sparse_masks(build_method("pafi", {}).apply(five))
    assert a.keys() == b.keys() and len(a) == 24
    for name, index in a.items():
        w = pretrained[f"{name}.weight"].abs().flatten()
        k = round(method.config.rate * w.numel())
        expected = torch.argsort(w, stable=True)[:k].sort().values
        assert torch.equal(index.sort().values, expected), name
        assert torch.equal(b[name].sort().values, expected), name

