"""Gradient sparsity: every statistic against a brute-force computation on MiniLM-L6 and a
few real rotten_tomatoes batches; the SIFT masks it writes train through SIFT."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from peftlab.sparsity import analyse, collect_gradients, gini, jaccard, target_roles, top_share

PERCENTS = (0.1, 1.0, 10.0, 50.0)


def test_top_share_bruteforce():
    rng = np.random.default_rng(0)
    x = rng.standard_t(2, size=5000)
    sq = np.sort(x**2)[::-1]
    want = [sq[: max(1, math.ceil(p / 100 * x.size))].sum() / sq.sum() for p in PERCENTS]
    assert np.allclose(top_share(torch.tensor(x), PERCENTS), want, rtol=1e-6)
    assert top_share(torch.ones(100), [10.0]) == pytest.approx([0.1])  # uniform: share = p


def test_gini_against_mean_absolute_difference():
    rng = np.random.default_rng(1)
    x = np.abs(rng.standard_normal(300))
    mad = np.abs(x[:, None] - x[None, :]).sum() / (2 * x.size**2 * x.mean())
    assert gini(torch.tensor(x)) == pytest.approx(mad, rel=1e-6)
    assert gini(torch.ones(50)) == pytest.approx(0.0, abs=1e-12)
    one_hot = torch.zeros(50)
    one_hot[3] = 1.0
    assert gini(one_hot) == pytest.approx(49 / 50)


def test_jaccard():
    assert jaccard(torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4])) == pytest.approx(2 / 4)
    assert jaccard(torch.tensor([1]), torch.tensor([2])) == 0.0


@pytest.fixture(scope="module")
def measured(builtin_model_factory, tiny_task_dir, minilm_tokenizer):
    from peftlab.data import load_split
    from peftlab.train import Collator, make_loader

    torch.set_num_threads(1)
    model = builtin_model_factory("minilm-l6")[2]
    roles = target_roles(model)

    def loader():  # a fresh seeded loader: the same batches every time
        return make_loader(load_split(tiny_task_dir, "train"), 16, Collator(minilm_tokenizer.pad_token_id, False),
                           shuffle=True, seed=0)

    grads = collect_gradients(model, list(roles), iter(loader()), 3)
    return model, roles, grads, loader


def test_roles_cover_every_attention_and_ffn_matrix(measured):
    model, roles, _, _ = measured
    assert len(roles) == 6 * 6  # 6 layers x (query, key, value, attn_output, ffn_in, ffn_out)
    assert sorted(set(roles.values())) == sorted(["query", "key", "value", "attn_output", "ffn_in", "ffn_out"])


def test_gradients_equal_plain_backward(builtin_model_factory, measured):
    """collect_gradients = loss.backward() per batch in eval mode, leaving no .grad behind."""
    model, roles, grads, loader = measured
    assert all(p.grad is None for p in model.parameters())
    ref = builtin_model_factory("minilm-l6")[2].eval()
    for b, batch in enumerate(itertools.islice(iter(loader()), 3)):
        ref.zero_grad()
        ref(**batch).loss.backward()
        for i, name in enumerate(roles):
            assert torch.allclose(grads[b][i], ref.get_submodule(name).weight.grad, atol=1e-7), name


def test_statistics_against_bruteforce(measured):
    model, roles, grads, _ = measured
    out = analyse(model, roles, grads, PERCENTS, jaccard_percent=1.0, overlap_rate=0.008)
    table = out["modules"].set_index("module")
    names = list(roles)
    for i in (0, 7, len(names) - 1):  # an attention, an FFN and the last matrix
        name = names[i]
        gs = [g[i].numpy().ravel().astype(np.float64) for g in grads]
        n = gs[0].size
        # top-p% share per batch, averaged
        for p in PERCENTS:
            k = max(1, math.ceil(p / 100 * n))
            want = np.mean([np.sort(g**2)[::-1][:k].sum() / (g**2).sum() for g in gs])
            assert table.loc[name, f"top{p:g}%_share"] == pytest.approx(want, rel=1e-6)
        # Jaccard of per-batch top-1% sets (python sets)
        k = math.ceil(0.01 * n)
        sets = [set(np.argsort(-np.abs(g), kind="stable")[:k].tolist()) for g in gs]
        want = np.mean([len(a & b) / len(a | b) for a, b in itertools.combinations(sets, 2)])
        assert table.loc[name, "jaccard"] == pytest.approx(want, abs=2e-3)  # ties ordered differently at most
        # SIFT (top-k of sum |g|) vs PaFi (k smallest |W0|)
        k = int(round(0.008 * n))
        score = np.sum([np.abs(g) for g in gs], axis=0)
        sift = set(np.argsort(-score, kind="stable")[:k].tolist())
        w = model.get_submodule(name).weight.detach().numpy().ravel()
        pafi = set(np.argsort(np.abs(w), kind="stable")[:k].tolist())
        assert table.loc[name, "sift_pafi_overlap"] == pytest.approx(len(sift & pafi) / k, abs=2 / k)
        assert table.loc[name, "gini"] == pytest.approx(np.mean([gini(torch.tensor(g)) for g in gs]))
    # overall curve: all matrices concatenated, per batch, averaged
    for j, p in enumerate(PERCENTS):
        per_batch = []
        for g in grads:
            flat = np.concatenate([t.numpy().ravel() for t in g]).astype(np.float64) ** 2
            k = max(1, math.ceil(p / 100 * flat.size))
            per_batch.append(np.sort(flat)[::-1][:k].sum() / flat.sum())
        assert out["curves"]["all"]["per_batch"][j] == pytest.approx(np.mean(per_batch), rel=1e-6)
    s = out["summary"]
    assert s["batches"] == 3 and s["top1_share"] == out["curves"]["all"]["per_batch"][1]
    assert 0 < s["jaccard_chance"] < s["jaccard"] < 1
    # gradients are concentrated beyond chance: the top 1% of entries holds several times what
    # it holds of a Gaussian vector of the same size (about 8.5%, which a bare "> 1%" would pass)
    size = sum(t.numel() for t in grads[0])
    gauss = torch.randn(size, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 2
    gauss_share = float(gauss.sort(descending=True).values[:math.ceil(size / 100)].sum() / gauss.sum())
    assert 0.07 < gauss_share < 0.10 and s["top1_share"] > 2 * gauss_share


def test_stage_writes_tables_and_sift_masks_that_sift_trains_on(minilm_spec, tiny_task_dir, tmp_path):
    from peftlab.methods import build_method
    from peftlab.models import load_model
    from peftlab.sparsity import gradient_sparsity

    params = {"rate": 0.01, "targets": ["query", "value"], "mask_source": "analysis"}
    rec = gradient_sparsity(minilm_spec, tiny_task_dir, tmp_path, batches=2, batch_size=16, seed=0,
                            percents=PERCENTS, sift_variants={"from_analysis": params}, threads=1)
    assert (tmp_path / "sparsity.json").is_file() and (tmp_path / "modules.csv").is_file()
    assert rec["run"]["task"] == "rotten_tomatoes" and rec["summary"]["batches"] == 2
    mask_path = tmp_path / "sift_mask_from_analysis.safetensors"
    assert rec["sift_masks"] == {"from_analysis": str(mask_path)}
    sift = build_method("sift", params | {"mask_path": str(mask_path)})
    model = load_model(minilm_spec, 2, "single_label_classification", seed=0)
    sift.calibrate(model, iter(()))  # reads the file, no batches needed
    expected = sift.expected_trainable_parameters(model)
    applied = sift.apply(model)
    assert sum(p.numel() for p in applied.parameters() if p.requires_grad) == expected
    # without the pipeline's mask_path the variant says what to do
    from peftlab.errors import ConfigError

    with pytest.raises(ConfigError, match="gradient-sparsity stage"):
        build_method("sift", params).calibrate(load_model(minilm_spec, 2, "single_label_classification"), iter(()))



def test_null_baselines_match_independent_computations(minilm_spec, tiny_task_dir, tmp_path):
    """The Gaussian null against its closed form, 2 (q phi(q) + 1 - Phi(q)) with q the normal's
    99.5% quantile (8.45%); the random-init null against plain autograd on a MiniLM freshly
    initialised from the same seed, on the same two batches, and a sort."""
    from scipy.stats import norm

    from peftlab.data import load_split
    from peftlab.io import read_json
    from peftlab.models import load_model, load_tokenizer
    from peftlab.sparsity import gradient_sparsity, target_roles
    from peftlab.train import collator_for, make_loader

    rec = gradient_sparsity(minilm_spec, tiny_task_dir, tmp_path, batches=2, batch_size=16, seed=0,
                            percents=PERCENTS, threads=1)
    nulls = rec["summary"]["null_top1_share"]
    q = norm.ppf(0.995)
    assert nulls["gaussian"] == pytest.approx(2 * (q * norm.pdf(q) + norm.sf(q)), abs=0.002)
    assert rec["curves"]["null:gaussian"]["per_batch"][PERCENTS.index(1.0)] == nulls["gaussian"]

    stats = read_json(tiny_task_dir / "stats.json")
    model = load_model(minilm_spec, stats["num_labels"], stats["problem_type"], seed=0)
    names = list(target_roles(model))
    torch.manual_seed(0)
    fresh = type(model)(model.config).eval()
    weights = [fresh.get_submodule(n).weight for n in names]
    loader = make_loader(load_split(tiny_task_dir, "train"), 16, collator_for(stats, load_tokenizer(minilm_spec)),
                         shuffle=True, seed=0)
    shares = []
    for _, batch in zip(range(2), loader, strict=False):
        g = torch.cat([x.flatten() for x in torch.autograd.grad(fresh(**batch).loss, weights)]).double()
        sq = (g * g).sort(descending=True).values
        shares.append(float(sq[:math.ceil(len(sq) / 100)].sum() / sq.sum()))
    assert nulls["random_init"] == pytest.approx(np.mean(shares), abs=1e-4)
    assert nulls["random_init"] != pytest.approx(rec["summary"]["top1_share"], abs=1e-3)  # another model's
