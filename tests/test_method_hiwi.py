"""HiWi: an adapter applied to the pretrained FFN weights (or biases), merged after training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from peftlab.data import load_split
from peftlab.errors import ConfigError
from peftlab.methods import build_method
from peftlab.methods.hiwi import HiwiAdapter, HiwiLinear
from peftlab.models import count_parameters, load_model, resolve_targets
from peftlab.train import Collator, make_loader

HEAD = 384 * 2 + 2  # MiniLM classifier: Linear(384, 2)
FFN_IN = [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(6)]  # 1536 x 384
FFN_OUT = [f"bert.encoder.layer.{i}.output.dense" for i in range(6)]  # 384 x 1536


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


def _hiwi_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, HiwiLinear)]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"targets": []}, "targets"),
        ({"targets": ["ffn_in", "mlp"]}, "mlp"),
        ({"adapt": "inputs"}, "adapt must be 'weights' or 'biases'"),
        ({"activation": "swish"}, "activation must be one of"),
        ({"share_across_layers": 1}, "share_across_layers must be true or false"),
        ({"adapter_bias": "no"}, "adapter_bias must be true or false"),
    ],
)
def test_config_validation(params, message):
    with pytest.raises(ConfigError, match=message):
        build_method("hiwi", params)


def test_closed_form_count_minilm(minilm_spec):
    base = _fresh(minilm_spec)
    r = 4
    # on weights, row-wise: d = d_in -> 384 for ffn_in (1536 x 384), 1536 for ffn_out (384 x 1536)
    per_layer = (2 * r * 384 + r + 384) + (2 * r * 1536 + r + 1536)
    assert per_layer == 17288
    cases = [
        ({"r": r, "adapt": "weights"}, 6 * per_layer),
        ({"r": r, "adapt": "weights", "share_across_layers": True}, per_layer),
        ({"r": r, "adapt": "weights", "adapter_bias": False}, 6 * (2 * r * 384 + 2 * r * 1536)),
        # on biases: d = d_out -> 1536 for ffn_in's bias, 384 for ffn_out's
        ({"r": r, "adapt": "biases", "targets": ["ffn_in"]}, 6 * (2 * r * 1536 + r + 1536)),
        ({"r": r, "adapt": "weights", "targets": ["ffn_out"], "share_across_layers": True}, 2 * r * 1536 + r + 1536),
        # the default is the paper's bias adaptation
        ({"r": r}, 6 * ((2 * r * 1536 + r + 1536) + (2 * r * 384 + r + 384))),
    ]
    for params, adapters in cases:
        m = build_method("hiwi", params)
        assert m.expected_trainable_parameters(base) == adapters + HEAD, params
    m = build_method("hiwi", {"r": r, "adapt": "weights"})
    model = m.apply(base)
    assert count_parameters(model, trainable_only=True) == 6 * per_layer + HEAD
    wrapped = dict(_hiwi_modules(model))
    assert sorted(wrapped) == sorted(FFN_IN + FFN_OUT)
    assert len({id(mod.hiwi) for mod in wrapped.values()}) == 12  # per layer and role

    shared = build_method("hiwi", {"r": r, "adapt": "weights", "share_across_layers": True}).apply(_fresh(minilm_spec))
    by_role = {}
    for _, mod in _hiwi_modules(shared):
        by_role.setdefault(mod.role, set()).add(id(mod.hiwi))
    assert {k: len(v) for k, v in by_role.items()} == {"ffn_in": 1, "ffn_out": 1}


def test_step_zero_is_the_pretrained_model(minilm_spec, minilm_tokenizer, tiny_task_dir):
    batch = _inputs(_batch(tiny_task_dir, minilm_tokenizer, n=8))
    for params in ({"adapt": "weights"}, {}):
        base = _fresh(minilm_spec).eval()
        with torch.no_grad():
            ref = base(**batch).logits
            model = build_method("hiwi", params).apply(base).eval()
            out = model(**batch).logits
        assert torch.equal(ref, out), params


def test_adapter_math():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    ad = HiwiAdapter(6, 3, "relu", bias=True)
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_()
    w, b = lin.weight.detach(), lin.bias.detach()
    expected_w = w + F.relu(w @ ad.down + ad.down_bias) @ ad.up + ad.up_bias  # row-wise on W
    layer = HiwiLinear(lin, ad, "weights", "ffn_in")
    got_w, got_b = layer.effective()
    assert torch.allclose(got_w, expected_w, atol=1e-6) and torch.equal(got_b, b)
    x = torch.randn(2, 3, 6)
    assert torch.allclose(layer(x), x @ expected_w.T + b, atol=1e-5)

    ad_b = HiwiAdapter(5, 3, "tanh", bias=False)  # on biases: input size d_out
    with torch.no_grad():
        ad_b.up.normal_()
    layer = HiwiLinear(lin, ad_b, "biases", "ffn_in")
    got_w, got_b = layer.effective()
    assert ad_b.down_bias is None and ad_b.up_bias is None
    assert torch.equal(got_w, w)
    assert torch.allclose(got_b, b + torch.tanh(b @ ad_b.down) @ ad_b.up, atol=1e-6)


@pytest.mark.parametrize(
    ("params", "suffix"),
    [({"r": 4, "adapt": "weights"}, "weight"), ({"r": 4}, "bias")],
    ids=["weights", "biases"],
)
def test_only_intended_tensors_change_and_merge(params, suffix, minilm_spec, minilm_tokenizer, tiny_task_dir):
    torch.manual_seed(0)
    batch = _batch(tiny_task_dir, minilm_tokenizer)
    base = _fresh(minilm_spec)
    before = {n: t.detach().clone() for n, t in base.state_dict().items()}
    m = build_method("hiwi", params)
    model = m.apply(base)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if ".hiwi." in n}
    assert len(init) == 12 * 4 and not any(init[n].any() for n in init if n.endswith(("up", "up_bias")))
    model = _train(model, batch)

    # unmerged: pretrained tensors untouched; every adapter tensor moved (U from step 2 on)
    after = model.state_dict()
    assert {n for n in before if not torch.equal(before[n], after[n])} == {"classifier.weight", "classifier.bias"}
    moved = {n for n, p in model.named_parameters() if n in init and not torch.equal(p, init[n])}
    assert moved == set(init)

    with torch.no_grad():
        ref = model(**_inputs(batch)).logits
    plain = m.merge(copy.deepcopy(model))
    merged = plain.state_dict()
    assert set(merged) == set(before)
    changed = {n for n in before if not torch.equal(before[n], merged[n])}
    intended = {f"{name}.{suffix}" for name in FFN_IN + FFN_OUT}  # not attention.output.dense
    assert changed == intended | {"classifier.weight", "classifier.bias"}

    # zero added latency by construction: exactly the base modules, no adapter left
    fresh = _fresh(minilm_spec)
    assert type(plain) is type(fresh)
    assert {n: type(mod) for n, mod in plain.named_modules()} == {n: type(mod) for n, mod in fresh.named_modules()}
    assert count_parameters(plain) == count_parameters(fresh)
    with torch.no_grad():
        out = plain(**_inputs(batch)).logits
    diff = (out - ref).abs().max().item()
    print(f"hiwi merge max|diff| = {diff:.3g}")
    assert diff <= 1e-5, diff
    with torch.no_grad():
        assert (ref - fresh.eval()(**_inputs(batch)).logits).abs().max().item() > 1e-3


def test_save_load_roundtrip(minilm_spec, minilm_tokenizer, tiny_task_dir, tmp_path):
    torch.manual_seed(1)
    batch = _batch(tiny_task_dir, minilm_tokenizer)
    params = {"r": 4, "adapt": "weights"}
    m = build_method("hiwi", params)
    model = _train(m.apply(_fresh(minilm_spec)), batch)
    with torch.no_grad():
        ref = model(**_inputs(batch)).logits
    m.save(model, tmp_path / "w.safetensors")
    stored = load_file(str(tmp_path / "w.safetensors"))
    # the adapters (+ head) only: the modified FFN weights are recomputed from the base
    adapter_keys = {f"{name}.hiwi.{p}" for name in FFN_IN + FFN_OUT for p in ("down", "up", "down_bias", "up_bias")}
    assert set(stored) == adapter_keys | {"classifier.weight", "classifier.bias"}
    assert sum(t.numel() for t in stored.values()) == m.expected_trainable_parameters(_fresh(minilm_spec))
    torch.manual_seed(99)  # a different adapter init must not matter
    loaded = build_method("hiwi", params).load(_fresh(minilm_spec), tmp_path / "w.safetensors").eval()
    with torch.no_grad():
        out = loaded(**_inputs(batch)).logits
    assert torch.equal(ref, out)


@pytest.mark.parametrize("merged", [True, False])
def test_bias_adaptation_stores_what_the_paper_counts(merged, minilm_spec, minilm_tokenizer, tiny_task_dir, tmp_path):
    """adapt: biases stores the trained FFN biases b' = b + A(b) and the head (the paper's
    storage figure), each equal to the trained layer's own bias, and loading them gives the
    plain base architecture computing what the trained model computes; store_merged_biases:
    false stores the adapter instead."""
    torch.manual_seed(1)
    batch = _batch(tiny_task_dir, minilm_tokenizer)
    params = {"r": 4, "adapt": "biases", "store_merged_biases": merged}
    m = build_method("hiwi", params)
    model = _train(m.apply(_fresh(minilm_spec)), batch)
    with torch.no_grad():
        ref = model(**_inputs(batch)).logits
        trained = {f"{n}.bias": mod.bias + mod.hiwi(mod.bias.unsqueeze(0)).squeeze(0) for n, mod in _hiwi_modules(model)}
    m.save(model, tmp_path / "w.safetensors")
    stored = load_file(str(tmp_path / "w.safetensors"))
    loaded = build_method("hiwi", params).load(_fresh(minilm_spec), tmp_path / "w.safetensors").eval()
    with torch.no_grad():
        out = loaded(**_inputs(batch)).logits
    assert torch.allclose(ref, out, atol=1e-6)
    if not merged:
        assert all(".hiwi." in k for k in stored if not k.startswith("classifier."))
        return
    assert set(stored) == {f"{n}.bias" for n in FFN_IN + FFN_OUT} | {"classifier.weight", "classifier.bias"}
    for name, bias in trained.items():
        assert torch.allclose(stored[name], bias, atol=1e-7), name
    n_stored = sum(t.numel() for t in stored.values())
    assert n_stored == 6 * (1536 + 384) + HEAD  # every FFN bias and the head: 0.05% of MiniLM's 22.7M
    assert n_stored < m.expected_trainable_parameters(_fresh(minilm_spec))  # fewer than the adapter trains
    assert not any(isinstance(mod, HiwiLinear) for mod in loaded.modules())  # already the merged model
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}


def test_shared_adapter_sizes_must_agree(minilm_spec):
    # ffn_out of MiniLM has d_in 1536 in every layer: sharing is fine; a mixed override is not
    base = _fresh(minilm_spec)
    m = build_method("hiwi", {"adapt": "weights", "targets": ["ffn_in"], "share_across_layers": True},
                     {"ffn_in": r"(intermediate\.dense|layer\.\d+\.output\.dense)$"})
    with pytest.raises(ConfigError, match=r"role 'ffn_in' across layers has weights of different sizes \[384, 1536\]"):
        m.expected_trainable_parameters(base)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "params", "n_layers", "ffn_in_d", "ffn_out_d", "matrices"),
    [
        ("mpnet-base", {"r": 8, "adapt": "weights"}, 12, 768, 3072, 2),
        # Llama: ffn_in = gate_proj + up_proj (576 wide rows), ffn_out = down_proj (1536 wide rows)
        ("smollm2-135m", {"r": 8, "adapt": "weights"}, 30, 576, 1536, 3),
    ],
)
def test_other_architectures(name, params, n_layers, ffn_in_d, ffn_out_d, matrices, builtin_model_factory):
    r = params["r"]
    _, tokenizer, base = builtin_model_factory(name)
    m = build_method("hiwi", params)
    per_layer = (2 * r * ffn_in_d + r + ffn_in_d) + (2 * r * ffn_out_d + r + ffn_out_d)
    expected = m.expected_trainable_parameters(base)
    assert expected == n_layers * per_layer + m.head_parameters(base)
    assert len(resolve_targets(base, ["ffn_in", "ffn_out"])) == n_layers * matrices
    if name == "smollm2-135m":
        assert expected == 1078752  # 30 * (9800 + 26120) + score head 576 * 2
        with pytest.raises(ConfigError, match=r"adapt: biases needs biases, but model\.layers\.0\.mlp\.\w+_proj has none"
                                              r".*the hiwi variant 'weights'"):
            build_method("hiwi", {}).expected_trainable_parameters(base)  # the default: biases
    model = m.apply(base)
    assert count_parameters(model, trainable_only=True) == expected
    wrapped = _hiwi_modules(model)
    assert len(wrapped) == n_layers * matrices
    assert len({id(mod.hiwi) for _, mod in wrapped}) == 2 * n_layers  # one per (role, layer)
    if name == "smollm2-135m":  # gate_proj and up_proj of a layer share that layer's ffn_in adapter
        mods = dict(wrapped)
        assert mods["model.layers.3.mlp.gate_proj"].hiwi is mods["model.layers.3.mlp.up_proj"].hiwi
        assert mods["model.layers.3.mlp.gate_proj"].hiwi is not mods["model.layers.4.mlp.gate_proj"].hiwi

    enc = tokenizer(["a gripping, well acted film", "dull"], padding=True, return_tensors="pt")
    model.train()
    model(**enc, labels=torch.tensor([1, 0])).loss.backward()
    for _, mod in wrapped:
        assert mod.hiwi.up.grad is not None and mod.hiwi.up.grad.abs().sum() > 0
    with torch.no_grad():
        for _, mod in wrapped:
            mod.hiwi.up.normal_(std=0.01)
    model.eval()
    with torch.no_grad():
        ref = model(**enc).logits
        plain = m.merge(model)
        out = plain(**enc).logits
    assert not any(isinstance(mod, HiwiLinear | HiwiAdapter) for mod in plain.modules())
    _, _, fresh = builtin_model_factory(name)
    assert type(plain) is type(fresh) and count_parameters(plain) == count_parameters(fresh)
    assert {n: type(x) for n, x in plain.named_modules()} == {n: type(x) for n, x in fresh.named_modules()}
    diff = (out - ref).abs().max().item()
    print(f"hiwi merge max|diff| = {diff:.3g}")
    assert diff <= 1e-5, diff
