"""Intrinsic dimension: the Fastfood projection against explicit matrices, the subspace
reparametrisation on MiniLM-L6, d90 and its bisection."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from peftlab.errors import ConfigError
from peftlab.intrinsic import (
    DenseProjection,
    Fastfood,
    bisection_point,
    d90,
    d90_stage,
    fwht,
    hadamard,
    subspace_method,
)


def test_hadamard_is_orthogonal_up_to_n():
    for n in (1, 2, 8, 64):
        h = hadamard(n)
        assert torch.equal(h @ h.T, n * torch.eye(n))


@pytest.mark.parametrize("n", [1, 2, 4, 32, 64, 1024, 4096])
def test_fwht_equals_explicit_hadamard(n):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ hadamard(n).double(), atol=1e-9)


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(12))


@pytest.mark.parametrize("d,D,block", [(5, 12, 1024), (5, 16, 4), (3, 40, 8), (7, 64, 8), (100, 1000, 64),
                                       (300, 50, 1024)])
def test_fastfood_matches_explicit_H_G_Pi_H_B(d, D, block):
    f = Fastfood(d, D, torch.Generator().manual_seed(d * D), block=block)
    m = f.matrix()
    assert m.shape == (D, d)
    x = torch.randn(d, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(f(x), m @ x, atol=1e-5, rtol=1e-4)


def test_fastfood_columns_are_unit_norm_without_truncation():
    # D a multiple of the block length: no row is dropped, every column has norm exactly 1
    f = Fastfood(16, 4 * 256, torch.Generator().manual_seed(0), block=256)
    assert f.L == 256
    assert torch.allclose(f.matrix().norm(dim=0), torch.ones(16), atol=1e-5)


def test_fastfood_columns_are_unit_norm_in_expectation_with_truncation():
    f = Fastfood(64, 3000, torch.Generator().manual_seed(0), block=1024)  # 3 blocks, 72 rows dropped
    sq = f.matrix().pow(2).sum(dim=0)
    assert abs(float(sq.mean()) - 1.0) < 0.05
    assert float(sq.min()) > 0.8 and float(sq.max()) < 1.2


def test_fastfood_behaves_like_a_dense_gaussian_projection():
    """Columns of both are nearly orthogonal unit vectors: the Gram matrices agree to within
    the sampling noise of a dense Gaussian projection of the same shape."""
    d, D = 32, 4096
    gens = torch.Generator().manual_seed(0)
    ff, dense = Fastfood(d, D, gens), DenseProjection(d, D, gens)
    off = ~torch.eye(d, dtype=torch.bool)
    g_ff, g_dense = ff.matrix().T @ ff.matrix(), dense.matrix().T @ dense.matrix()
    assert torch.allclose(torch.diagonal(g_dense), torch.ones(d), atol=1e-5)
    # a random pair of unit vectors in R^D has |cos| ~ 1/sqrt(D) = 0.016
    assert float(g_ff[off].abs().max()) < 5 / D**0.5
    assert float(g_ff[off].abs().mean()) < 2 * float(g_dense[off].abs().mean())


_PEAK = """
import resource, sys, torch
from peftlab.intrinsic import Fastfood
torch.set_num_threads(1)
d = int(sys.argv[1])
f = Fastfood(d, 1 << 22, torch.Generator().manual_seed(0))
theta = torch.zeros(d, requires_grad=True)
f(theta).square().sum().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_d():
    """A 4M-entry tensor projected from d = 16 and from d = 65,536: a D x d matrix would be
    1 TB at the larger d; the measured peak resident memory stays the same."""
    peaks = {d: int(subprocess.run([sys.executable, "-c", _PEAK, str(d)], capture_output=True, text=True,
                                   check=True).stdout.split()[-1]) for d in (16, 65536)}
    assert peaks[65536] < 1.15 * peaks[16], peaks


@pytest.fixture(scope="module")
def minilm(builtin_model_factory):
    _, _, model = builtin_model_factory("minilm-l6")
    return model


@pytest.fixture(scope="module")
def batch(minilm_tokenizer):
    enc = minilm_tokenizer(["a gripping, funny film", "dull and far too long"], padding=True, return_tensors="pt")
    return dict(enc) | {"labels": torch.tensor([1, 0])}


def _fresh(builtin_model_factory):
    return builtin_model_factory("minilm-l6")[2]


def test_config_validation():
    for bad in ({"d": 0}, {"d": 1.5}, {"said": "yes"}, {"projection": "srht"}, {"projection_seed": True}):
        with pytest.raises(ConfigError):
            subspace_method(bad)


def test_said_counts_d_and_starts_at_the_pretrained_model(builtin_model_factory, minilm, batch):
    torch.manual_seed(0)
    model = _fresh(builtin_model_factory)
    n_tensors = len(list(model.parameters()))
    method = subspace_method({"d": 500, "said": True})
    assert method.expected_trainable_parameters(model) == 500
    wrapped = method.apply(model)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 500
    assert wrapped.lambdas.numel() == n_tensors and wrapped.n_directions == 500 - n_tensors
    minilm.eval(), wrapped.eval()
    with torch.no_grad():
        assert torch.equal(wrapped(**batch).logits, minilm(**batch).logits)


def test_said_needs_d_above_the_number_of_tensors(builtin_model_factory):
    with pytest.raises(ConfigError, match="use d >"):
        subspace_method({"d": 50}).apply(_fresh(builtin_model_factory))
    did = subspace_method({"d": 50, "said": False}).apply(_fresh(builtin_model_factory))
    assert did.n_directions == 50 and did.lambdas is None


def _reference_fastfood(x: torch.Tensor, D: int, B, Pi, G) -> torch.Tensor:
    """The reference's per-tensor Fastfood (Aghajanyan et al.'s code, as in t-few's
    intrinsic.py), written out with an explicit Hadamard matrix: H G Pi H B pad(x) over
    LL = 2^ceil(log2 D), truncated to D rows, divided by sqrt(LL sum G^2) sqrt(D / LL)."""
    from scipy.linalg import hadamard as scipy_hadamard

    LL = 1 << (D - 1).bit_length()
    H = torch.tensor(scipy_hadamard(LL), dtype=torch.float64)
    x = torch.nn.functional.pad(x.double(), (0, LL - x.numel()))
    out = (H @ (G.double() * (H @ (B.double() * x))[Pi]))[:D]
    return out / (torch.sqrt(LL * G.double().pow(2).sum()) * (D / LL) ** 0.5)


@pytest.mark.parametrize("normalisation", ["per_tensor", "global"])
def test_training_moves_the_model_only_through_the_projection(builtin_model_factory, batch, normalisation):
    """A few AdamW steps on theta_d and lambda: the frozen theta0 is untouched, and every
    effective tensor equals theta0 + lambda_i * P_i theta_d, P_i the reference's per-tensor
    Fastfood (per_tensor), or that times sqrt(D_i / D) (global)."""
    model = _fresh(builtin_model_factory)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    total = sum(p.numel() for p in theta0.values())
    wrapped = subspace_method({"d": 200, "said": True, "normalisation": normalisation}).apply(model)
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    wrapped.train()
    for _ in range(3):
        wrapped(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(wrapped.theta_d.detach().abs().sum()) > 0 and not torch.equal(wrapped.lambdas.detach(), torch.ones(wrapped.lambdas.shape))
    for n, p in wrapped.base.named_parameters():
        assert torch.equal(p, theta0[n]), n  # theta0 never written
    theta = wrapped.theta_d.detach()
    deltas = wrapped.deltas()
    checked = 0
    for i, name in enumerate(wrapped.names):
        D = theta0[name].numel()
        if not theta.numel() <= D <= 1024:  # one block over 2^ceil(log2 D) rows: the reference's own shape
            continue
        proj = wrapped.projections[i]
        ref = _reference_fastfood(theta, D, proj.B, proj.Pi, proj.G[0])
        scale = 1.0 if normalisation == "per_tensor" else (D / total) ** 0.5
        explicit = wrapped.lambdas[i].detach().double() * scale * ref
        assert torch.allclose(deltas[name].detach().reshape(-1).double(), explicit, atol=1e-6, rtol=1e-4), name
        checked += 1
    assert checked >= 40  # biases, norms, the head


def test_per_tensor_normalisation_moves_small_tensors_as_far_as_large_ones(builtin_model_factory):
    """The same theta_d: under the reference's normalisation a LayerNorm's update is as long
    as the word embeddings' (unit-norm columns each); under global it is sqrt(D_i / D) of it."""
    theta = torch.randn(300, generator=torch.Generator().manual_seed(0))
    norms = {}
    for normalisation in ("per_tensor", "global"):
        wrapped = subspace_method({"d": 300, "said": False, "normalisation": normalisation}).apply(
            _fresh(builtin_model_factory))
        with torch.no_grad():
            wrapped.theta_d.copy_(theta)
            norms[normalisation] = {n: float(v.norm()) for n, v in wrapped.deltas().items()}
    small, large = "bert.embeddings.LayerNorm.weight", "bert.embeddings.word_embeddings.weight"
    ratio = norms["per_tensor"][small] / norms["per_tensor"][large]
    assert 0.8 < ratio < 1.25 and 0.8 < norms["per_tensor"][small] / float(theta.norm()) < 1.25
    model = _fresh(builtin_model_factory)
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    assert norms["global"][small] / norms["global"][large] == pytest.approx(
        ratio * (sizes[small] / sizes[large]) ** 0.5, rel=1e-4)


def test_save_load_and_merge_reproduce_outputs(builtin_model_factory, batch, tmp_path):
    method = subspace_method({"d": 300})
    wrapped = method.apply(_fresh(builtin_model_factory))
    with torch.no_grad():
        wrapped.theta_d.normal_(0, 0.05)
        wrapped.lambdas.uniform_(0.5, 1.5)
    wrapped.eval()
    with torch.no_grad():
        expected = wrapped(**batch).logits
    method.save(wrapped, tmp_path / "w.safetensors")
    loaded = subspace_method({"d": 300}).load(_fresh(builtin_model_factory), tmp_path / "w.safetensors").eval()
    merged = method.merge(loaded)
    with torch.no_grad():
        assert torch.equal(loaded.base(**batch).logits, merged(**batch).logits)  # merge writes in place
    fresh = subspace_method({"d": 300}).load(_fresh(builtin_model_factory), tmp_path / "w.safetensors").eval()
    with torch.no_grad():
        assert torch.allclose(fresh(**batch).logits, expected, atol=1e-6)
        assert torch.allclose(merged(**batch).logits, expected, atol=1e-5)
    assert type(merged).__name__ == "BertForSequenceClassification"


def test_evaluation_reuses_the_merged_parameters_until_an_update(builtin_model_factory, batch):
    wrapped = subspace_method({"d": 300}).apply(_fresh(builtin_model_factory)).eval()
    with torch.no_grad():
        first = wrapped.merged_parameters()
        assert wrapped.merged_parameters() is first
        wrapped.theta_d.add_(0.01)  # an optimizer step bumps the version
        assert wrapped.merged_parameters() is not first


def test_d90_and_bisection():
    points = [{"d": 10, "score": 0.5}, {"d": 100, "score": 0.7}, {"d": 100, "score": 0.74},
              {"d": 1000, "score": 0.85}, {"d": 10000, "score": 0.9}]
    out = d90(points, reference=0.9, fraction=0.9)
    assert out["threshold"] == pytest.approx(0.81)
    assert out["scores"]["100"] == pytest.approx(0.72)
    assert out["d90"] == 1000 and out["reached"]
    assert d90(points, reference=1.2)["d90"] is None
    assert bisection_point({10: 0.5, 100: 0.72, 1000: 0.85}, 0.81) == 316
    assert bisection_point({10: 0.9, 100: 0.95}, 0.81) is None  # nothing below the threshold
    assert bisection_point({10: 0.5}, 0.81) is None  # nothing reaches it


def test_d90_stage_bisects_with_extra_runs():
    """Scores rise with log d; the stage trains the bracketing midpoints it asks for."""
    import math

    def score(d):
        return min(0.9, 0.3 + 0.15 * math.log10(d))

    def rec(d):
        return {"d": d, "test_main": score(d), "main_metric": "accuracy", "total_params": 10**6, "kind": "said"}

    asked = []

    def run_more(d):
        asked.append(d)
        return [rec(d)]

    reference = [{"main_metric": "accuracy", "metrics": {"accuracy": 0.8}}]
    out = d90_stage([rec(10), rec(100), rec(1000), rec(10000)], reference, 0.9, refine=3, run_more=run_more)
    # threshold 0.72 is crossed between 100 (0.6) and 1000 (0.75): bisection narrows it
    assert asked[0] == 316 and len(asked) == 3
    assert out["d90"] == min(d for d in [1000, *asked] if score(d) >= 0.72)
    assert out["refined"] == asked and out["grid"] == sorted({10, 100, 1000, 10000, *asked})
    assert json.loads(json.dumps(out)) == out  # written by the stage as JSON, it reads back the same


def test_subspace_run_through_the_trainer(minilm_spec, tiny_task_dir, tmp_path):
    """One SAID run end to end: formula check in the trainer, best-validation selection,
    test metrics, and the record the d90 stage reads."""
    from peftlab.config import TrainConfig
    from peftlab.intrinsic import run_subspace

    tc = TrainConfig(epochs=1, max_steps=3, batch_size=16, learning_rate=1e-3, weight_decay=0.0, evals_per_epoch=1)
    rec = run_subspace(minilm_spec, tiny_task_dir, tmp_path, d=256, seed=0, training=tc, threads=1,
                       lr_reference_d=1024)
    assert rec["config"]["training"]["learning_rate"] == pytest.approx(2e-3)  # 1e-3 * sqrt(1024 / 256)
    assert rec["trainable_params"] == 256 and rec["steps"] == 3 and rec["kind"] == "said"
    for name in ("result.json", "finetune.json", "metrics.json", "subspace.safetensors"):
        assert (tmp_path / name).is_file()
    # the record's score is the evaluation's, as written
    evaluated = json.loads((tmp_path / "metrics.json").read_text())
    assert rec["test"]["accuracy"] == rec["test_main"] == evaluated["metrics"]["accuracy"]


def test_subspace_learning_rate_keeps_the_full_space_step():
    from peftlab.intrinsic import subspace_learning_rate

    assert subspace_learning_rate(1e-2, 4000, None) == 1e-2
    assert subspace_learning_rate(1e-2, 4000, 4000) == pytest.approx(1e-2)
    assert subspace_learning_rate(1e-2, 16000, 4000) == pytest.approx(5e-3)
    # lr * sqrt(d) (Adam's step length in theta) is the same at every d
    steps = [subspace_learning_rate(1e-2, d, 4000) * d ** 0.5 for d in (1000, 4000, 16000, 64000)]
    assert max(steps) == pytest.approx(min(steps))


def test_d90_ignores_failed_runs_and_fails_clearly_when_none_remain():
    from peftlab.errors import TrainingError

    def rec(d, score, seed=0, status="completed"):
        out = {"d": d, "test_main": score, "main_metric": "accuracy", "total_params": 10**6, "kind": "said",
               "status": status, "run": {"seed": seed}}
        if status == "failed":
            out.update(test_main=None, failure={"reason": "loss became NaN at step 3; lower learning_rate", "step": 3})
        return out

    def ref(acc, seed, status="completed"):
        out = {"main_metric": "accuracy", "metrics": {"accuracy": acc} if acc is not None else {},
               "status": status, "run": {"method": "full", "seed": seed}}
        if status == "failed":
            out["failure"] = {"reason": "loss became NaN at step 2; lower learning_rate", "step": 2}
        return out

    grid = [rec(10, 0.5), rec(100, 0.75), rec(1000, None, status="failed"), rec(100, None, 1, "failed")]
    reference = [ref(0.8, 0), ref(None, 1, "failed")]
    out = d90_stage(grid, reference, 0.9)
    # only the completed reference counts (0.8, not a mean with a missing score); d=1000 has no score
    assert out["reference"] == 0.8 and out["reference_runs"] == 1 and out["d90"] == 100
    assert out["scores"] == {"10": 0.5, "100": 0.75} and out["grid"] == [10, 100]
    assert out["failed_runs"] == ["d1000 seed0: loss became NaN at step 3; lower learning_rate",
                                  "d100 seed1: loss became NaN at step 3; lower learning_rate"]
    assert out["failed_reference_runs"] == ["full seed1: loss became NaN at step 2; lower learning_rate"]
    with pytest.raises(TrainingError, match=r"every full fine-tuning reference run failed \(full seed1: loss"):
        d90_stage(grid, [ref(None, 1, "failed")], 0.9)
    with pytest.raises(TrainingError, match="every intrinsic-dimension run of the grid failed"):
        d90_stage([rec(1000, None, status="failed")], reference, 0.9)


def test_diverged_subspace_run_is_recorded_as_failed(minilm_spec, tiny_task_dir, tmp_path):
    from peftlab.config import TrainConfig
    from peftlab.intrinsic import run_subspace

    tc = TrainConfig(epochs=1, max_steps=4, batch_size=16, learning_rate=1.0e12, weight_decay=0.0, evals_per_epoch=1,
                     warmup_ratio=0.0)
    rec = run_subspace(minilm_spec, tiny_task_dir, tmp_path, d=256, seed=0, training=tc, threads=1)
    assert rec["status"] == "failed" and rec["test"] == {} and rec["test_main"] is None
    assert rec["failure"]["reason"].startswith(f"loss became NaN at step {rec['failure']['step']}; lower learning_rate")
    assert "analyses.intrinsic_dimension.training" in rec["failure"]["reason"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["metrics"] == {}


def test_d90_states_both_budgets_and_warns_when_the_reference_trained_less():
    """The d90 record carries the subspace runs' and the reference's budgets, as their records
    state them; the report puts both beside d90 and says which way an unequal one biases it."""
    from peftlab.intrinsic import training_budget
    from peftlab.report import _budget_note

    def rec(steps, epochs, status="completed"):
        return {"status": status, "steps": steps, "config": {"training": {"epochs": epochs, "batch_size": 16}}}

    subspace = training_budget([rec(189, 3.0), rec(189, 3.0), rec(12, 3.0, "failed")])
    reference = training_budget([rec(63, 1.0), rec(63, 1.0)])
    assert subspace == {"steps": 189, "epochs": [3.0], "batch_size": [16], "runs": 2}
    assert reference == {"steps": 63, "epochs": [1.0], "batch_size": [16], "runs": 2}
    note = _budget_note({"budgets": {"subspace": subspace, "reference": reference}})
    assert "up to 189 steps (3 epochs), the full fine-tuning reference 63 steps (1 epoch)" in note
    assert "reference trained less than the subspace runs" in note
    equal = _budget_note({"budgets": {"subspace": reference, "reference": reference}})
    assert "63 steps" in equal and "trained less" not in equal
    assert _budget_note({}) == ""  # a record from before budgets were kept
    capped = training_budget([rec(63, 3.0) | {"epochs": 63 / 62.5}])  # max_steps stopped it in epoch 2
    assert capped["epochs"] == [1.01]  # what ran, not the configured 3


@pytest.mark.slow
def test_d90_stage_trains_its_bisection_point_for_real(minilm_spec, tiny_task_dir, tmp_path):
    """The d90 job's refinement with real training: the grid's records bracket the threshold
    (d = 150 below it, 600 above), so the stage trains d = 300 through the fine-tuning loop
    and the evaluator, writes that run beside d90.json, and places d90 by its real score."""
    from peftlab.config import TrainConfig
    from peftlab.intrinsic import d90_record
    from peftlab.io import write_json

    def grid_record(d, score):
        return {"status": "completed", "d": d, "test_main": score, "main_metric": "accuracy", "steps": 3,
                "total_params": 22_713_216, "kind": "said", "config": {"training": {"epochs": 1.0}}}

    paths = []
    for d, score in ((150, 0.0), (600, 1.0)):
        paths.append(tmp_path / f"d{d}.json")
        write_json(paths[-1], grid_record(d, score))
    reference = tmp_path / "reference.json"
    write_json(reference, {"status": "completed", "main_metric": "accuracy", "metrics": {"accuracy": 0.5}})
    settings = {"fraction": 0.9, "refine": 1, "seeds": [0], "kind": "said", "projection": "fastfood",
                "projection_seed": 0, "reference": "default", "normalisation": "per_tensor"}
    tc = TrainConfig(epochs=1, max_steps=3, batch_size=16, learning_rate=1e-3, weight_decay=0.0, evals_per_epoch=1)
    out = tmp_path / "d90" / "d90.json"
    rec = d90_record(minilm_spec, tiny_task_dir, paths, [reference], out, settings, tc, threads=1)
    run = json.loads((tmp_path / "d90" / "refine" / "d300" / "seed0" / "result.json").read_text())
    assert run["status"] == "completed" and run["trainable_params"] == 300 and run["steps"] == 3
    assert rec["refined"] == [300] and rec["grid"] == [150, 300, 600]
    assert rec["scores"]["300"] == run["test_main"]  # the real run's own test score
    assert rec["d90"] == (300 if run["test_main"] >= rec["threshold"] else 600)
    assert json.loads(out.read_text()) == rec
