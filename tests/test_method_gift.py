"""GIFT: W' = W (I + phi psi), one (phi, psi) per target role shared by all layers."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftlab.data import load_split
from peftlab.errors import ConfigError
from peftlab.methods import build_method
from peftlab.methods.gift import GiftLinear, GiftPair, gift_modules, gift_token_projection
from peftlab.models import count_parameters, load_model, resolve_targets
from peftlab.train import Collator, make_loader

HEAD = 384 * 2 + 2  # MiniLM classifier: Linear(384, 2)


def _fresh(spec):
    return load_model(spec, 2, "single_label_classification", seed=0)


def _batch(task_dir, tokenizer, n=8):
    df = load_split(task_dir, "train").iloc[:n]
    return next(iter(make_loader(df, n, Collator(tokenizer.pad_token_id, False), shuffle=False)))


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def _train(model, batch, steps=2, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": 2.5}, "r must be a positive integer"),
        ({"targets": []}, "targets"),
        ({"targets": ["query", "qkv"]}, "qkv"),
        ({"targets": ["query", "query"]}, "twice"),
        ({"init_scale": 0}, "init_scale must be a positive number"),
        ({"phi_init": "zeros"}, "phi_init must be 'linear'"),
        ({"share_across_targets": "yes"}, "share_across_targets must be true or false"),
        ({"rank": 4}, "unknown parameter"),
    ],
)
def test_config_validation(params, message):
    with pytest.raises(ConfigError, match=message):
        build_method("gift", params)


def test_closed_form_count_minilm(minilm_spec):
    base = _fresh(minilm_spec)
    # one pair per role: phi 384 x 4 + psi 4 x 384 = 3072, two roles -> 6144 (not per layer)
    m = build_method("gift", {"r": 4, "targets": ["query", "value"]})
    assert m.expected_trainable_parameters(base) == 2 * (384 * 4 + 4 * 384) + HEAD == 6914
    shared = build_method("gift", {"r": 4, "targets": ["query", "value"], "share_across_targets": True})
    assert shared.expected_trainable_parameters(base) == 384 * 4 + 4 * 384 + HEAD
    # ffn_out reads the 1536-wide intermediate: its pair is 2 * r * 1536
    mixed = build_method("gift", {"r": 4, "targets": ["query", "ffn_out"]})
    assert mixed.expected_trainable_parameters(base) == 2 * 4 * 384 + 2 * 4 * 1536 + HEAD

    model = m.apply(base)
    assert count_parameters(model, trainable_only=True) == m.expected_trainable_parameters(_fresh(minilm_spec))
    wrapped = gift_modules(model)
    assert len(wrapped) == 12 and all(isinstance(mod, GiftLinear) for _, mod in wrapped)
    pairs = {role: {id(mod.gift) for _, mod in gift_modules(model, role)} for role in ("query", "value")}
    assert all(len(ids) == 1 for ids in pairs.values())  # shared by the 6 layers
    assert pairs["query"] != pairs["value"]  # one pair per role
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "bert.encoder.layer.0.attention.self.query.gift.phi", "bert.encoder.layer.0.attention.self.query.gift.psi",
        "bert.encoder.layer.0.attention.self.value.gift.phi", "bert.encoder.layer.0.attention.self.value.gift.psi",
        "classifier.weight", "classifier.bias",
    }


def test_share_across_targets_needs_one_input_size(minilm_spec):
    base = _fresh(minilm_spec)
    m = build_method("gift", {"r": 4, "targets": ["query", "ffn_out"], "share_across_targets": True})
    with pytest.raises(ConfigError, match=r"share_across_targets needs one input size.*ffn_out: 1536.*query: 384"):
        m.expected_trainable_parameters(base)
    shared = build_method("gift", {"r": 4, "targets": ["query", "value"], "share_across_targets": True})
    model = shared.apply(base)
    assert len({id(mod.gift) for _, mod in gift_modules(model)}) == 1


def test_step_zero_is_the_pretrained_model(minilm_spec, minilm_tokenizer, tiny_task_dir):
    batch = _inputs(_batch(tiny_task_dir, minilm_tokenizer, n=8))
    base = _fresh(minilm_spec).eval()
    with torch.no_grad():
        ref = base(**batch).logits
        model = build_method("gift", {}).apply(base).eval()  # r = 32 on query/value
        out = model(**batch).logits
    assert torch.equal(ref, out)
    for _, mod in gift_modules(model):
        assert not mod.gift.psi.any() and mod.gift.phi.abs().sum() > 0


def test_forward_is_w_times_identity_plus_phi_psi():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    pair = GiftPair(6, 3, init_scale=1.0)
    with torch.no_grad():
        pair.psi.normal_()
    x = torch.randn(2, 4, 6)
    w_prime = lin.weight @ (torch.eye(6) + pair.phi @ pair.psi)
    expected = x @ w_prime.T + lin.bias
    got = GiftLinear(lin, pair, "query")(x)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(GiftLinear(lin, pair, "query").merged_weight(), w_prime, atol=1e-6)
    # phi_init normal: columns of norm ~ init_scale
    big = GiftPair(4096, 8, init_scale=2.0, phi_init="normal")
    assert big.phi.norm(dim=0).mean().item() == pytest.approx(2.0, rel=0.05)


def test_phi_init_is_the_reference_in_projection():
    """The default draw is nn.Linear(d_in, r)'s weight (the reference's in_projection),
    transposed: the same numbers under the same seed, inside +-1/sqrt(d_in)."""
    torch.manual_seed(3)
    reference = nn.Linear(768, 16, bias=False).weight.detach().T
    torch.manual_seed(3)
    pair = GiftPair(768, 16, init_scale=1.0)
    assert torch.equal(pair.phi.detach(), reference)
    assert pair.phi.abs().max() <= 1 / 768 ** 0.5 and not pair.psi.any()


def test_only_intended_tensors_change_and_merge(minilm_spec, minilm_tokenizer, tiny_task_dir):
    torch.manual_seed(0)
    batch = _batch(tiny_task_dir, minilm_tokenizer)
    base = _fresh(minilm_spec)
    before = {n: t.detach().clone() for n, t in base.state_dict().items()}
    m = build_method("gift", {"r": 4, "targets": ["query", "value"]})
    model = _train(m.apply(base), batch)

    # unmerged: the pretrained tensors are untouched, only the pairs and the head moved
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {"classifier.weight", "classifier.bias"}
    for _, mod in gift_modules(model):
        assert mod.gift.psi.abs().sum() > 0

    # merged: exactly W_query and W_value of every layer (not their biases) and the head
    with torch.no_grad():
        ref = model(**_inputs(batch)).logits
    plain = m.merge(copy.deepcopy(model))
    merged = plain.state_dict()
    assert set(merged) == set(before)
    changed = {n for n in before if not torch.equal(before[n], merged[n])}
    intended = {f"bert.encoder.layer.{i}.attention.self.{r}.weight" for i in range(6) for r in ("query", "value")}
    assert changed == intended | {"classifier.weight", "classifier.bias"}

    # the merged model is the plain base architecture with the same outputs
    fresh = _fresh(minilm_spec)
    assert type(plain) is type(fresh)
    assert {n: type(mod) for n, mod in plain.named_modules()} == {n: type(mod) for n, mod in fresh.named_modules()}
    assert count_parameters(plain) == count_parameters(fresh)
    with torch.no_grad():
        out = plain(**_inputs(batch)).logits
    diff = (out - ref).abs().max().item()
    print(f"gift merge max|diff| = {diff:.3g}")
    assert diff <= 1e-5, diff
    assert (ref - fresh.eval()(**_inputs(batch)).logits).abs().max().item() > 1e-3  # training did something


def test_save_load_roundtrip(minilm_spec, minilm_tokenizer, tiny_task_dir, tmp_path):
    torch.manual_seed(1)
    batch = _batch(tiny_task_dir, minilm_tokenizer)
    params = {"r": 4, "targets": ["query", "value"]}
    m = build_method("gift", params)
    model = _train(m.apply(_fresh(minilm_spec)), batch)
    with torch.no_grad():
        ref = model(**_inputs(batch)).logits
    m.save(model, tmp_path / "w.safetensors")
    stored = load_file(str(tmp_path / "w.safetensors"))
    # phi and psi of the two roles, once each (not per layer), plus the head
    assert sorted(stored) == sorted([
        "bert.encoder.layer.0.attention.self.query.gift.phi", "bert.encoder.layer.0.attention.self.query.gift.psi",
        "bert.encoder.layer.0.attention.self.value.gift.phi", "bert.encoder.layer.0.attention.self.value.gift.psi",
        "classifier.weight", "classifier.bias",
    ])
    assert sum(t.numel() for t in stored.values()) == m.expected_trainable_parameters(_fresh(minilm_spec))
    torch.manual_seed(99)  # a different phi init must not matter: phi is stored
    loaded = build_method("gift", params).load(_fresh(minilm_spec), tmp_path / "w.safetensors").eval()
    with torch.no_grad():
        out = loaded(**_inputs(batch)).logits
    assert torch.equal(ref, out)
    # every layer of a role uses the loaded pair (sharing survives load)
    assert len({id(mod.gift) for _, mod in gift_modules(loaded, "query")}) == 1


def test_token_projection(minilm_spec, minilm_tokenizer, tiny_task_dir):
    torch.manual_seed(0)
    batch = _inputs(_batch(tiny_task_dir, minilm_tokenizer, n=4))
    model = build_method("gift", {"r": 4}).apply(_fresh(minilm_spec)).eval()
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
        scores = gift_token_projection(model, hidden[2], role="value", layer=2)
    assert scores.shape == (*batch["input_ids"].shape, 4)
    name, mod = gift_modules(model, "value")[2]
    assert name == "bert.encoder.layer.2.attention.self.value"
    expected = hidden[2] @ mod.weight @ mod.gift.phi
    assert torch.allclose(scores, expected, atol=1e-5)
    # layer order is numeric, not by string (layer.10 after layer.2 on deeper models)
    assert [n.split(".")[3] for n, _ in gift_modules(model, "query")] == [str(i) for i in range(6)]
    with pytest.raises(ConfigError, match="layer 6 out of range"):
        gift_token_projection(model, hidden[0], role="value", layer=6)
    with pytest.raises(ConfigError, match="no GIFT module of role 'key'"):
        gift_token_projection(model, hidden[0], role="key", layer=0)
    with pytest.raises(ConfigError, match="needs size d_out = 384"):
        gift_token_projection(model, torch.zeros(1, 3, 1536), role="value", layer=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "targets", "d_in", "n_pairs"),
    [
        ("mpnet-base", ["query", "value"], 768, 2),
        # Llama: ffn_in = gate_proj + up_proj (one pair for both, in all 30 layers); v_proj is 192 x 576
        ("smollm2-135m", ["query", "value", "ffn_in"], 576, 3),
    ],
)
def test_other_architectures(name, targets, d_in, n_pairs, builtin_model_factory):
    r = 8
    _, tokenizer, base = builtin_model_factory(name)
    m = build_method("gift", {"r": r, "targets": targets})
    head = m.head_parameters(base)
    expected = m.expected_trainable_parameters(base)
    assert expected == n_pairs * 2 * r * d_in + head
    n_targets = len(resolve_targets(base, targets))
    model = m.apply(base)
    assert count_parameters(model, trainable_only=True) == expected
    assert len(gift_modules(model)) == n_targets
    assert len({id(mod.gift) for _, mod in gift_modules(model)}) == n_pairs

    enc = tokenizer(["a gripping, well acted film", "dull"], padding=True, return_tensors="pt")
    batch = {**enc, "labels": torch.tensor([1, 0])}
    model.train()
    model(**batch).loss.backward()
    for _, mod in gift_modules(model):
        assert mod.gift.psi.grad is not None and mod.gift.psi.grad.abs().sum() > 0
    with torch.no_grad():
        for _, mod in gift_modules(model):
            mod.gift.psi.normal_(std=0.01)
    model.eval()
    with torch.no_grad():
        ref = model(**enc).logits
        plain = m.merge(model)
        out = plain(**enc).logits
    assert not any(isinstance(mod, GiftLinear) for mod in plain.modules())
    _, _, fresh = builtin_model_factory(name)
    assert type(plain) is type(fresh) and count_parameters(plain) == count_parameters(fresh)
    diff = (out - ref).abs().max().item()
    print(f"gift merge max|diff| = {diff:.3g}")
    assert diff <= 1e-5, diff
