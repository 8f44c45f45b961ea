"""Bottleneck adapters: closed-form count, step 0 = pretrained model, placement on the sublayer
projection before the residual add, only adapters + head train, exact save/load;
MPNet and SmolLM2 (slow): apply + step-0 equality + forward/backward + count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftlab.data import load_split
from peftlab.errors import ConfigError
from peftlab.methods import build_method
from peftlab.methods.adapter import BottleneckAdapter
from peftlab.models import count_parameters, load_model, resolve_targets
from peftlab.train import Collator, make_loader

HEAD = 384 * 2 + 2  # MiniLM classifier


def _fresh(minilm_spec):
    return load_model(minilm_spec, 2, "single_label_classification", seed=0)


def _batch(tiny_task_dir, tokenizer, n=8):
    df = load_split(tiny_task_dir, "train").iloc[:n]
    return next(iter(make_loader(df, n, Collator(tokenizer.pad_token_id, False), shuffle=False)))


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def _adapters(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)}


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"placement": "parallel"}, "placement must be one of"),
        ({"bottleneck": 0}, "bottleneck must be a positive integer"),
        ({"reduction_factor": 2.5}, "reduction_factor must be a positive integer"),
        ({"bottleneck": 8, "reduction_factor": 4}, "not both"),
        ({"nonlinearity": "softmax"}, "nonlinearity must be one of"),
        ({"size": 8}, "unknown parameter"),
    ],
)
def test_config_rejects_bad_values(params, match):
    with pytest.raises(ConfigError, match=match):
        build_method("adapter", params)


def test_trainable_count_closed_form(minilm_spec):
    # Houlsby, default reduction 16: m = 384 // 16 = 24; 2 adapters x 6 blocks of 2 d m + m + d
    m = build_method("adapter", {})
    base = _fresh(minilm_spec)
    assert m.expected_trainable_parameters(base) == 12 * (2 * 384 * 24 + 24 + 384) + HEAD == 226850
    model = m.apply(base)
    assert count_parameters(model, trainable_only=True) == 226850
    assert len(_adapters(model)) == 12
    # Pfeiffer, m = 8: one adapter per block, after the FFN output
    m = build_method("adapter", {"placement": "pfeiffer", "bottleneck": 8, "nonlinearity": "gelu"})
    base = _fresh(minilm_spec)
    assert m.expected_trainable_parameters(base) == 6 * (2 * 384 * 8 + 8 + 384) + HEAD == 39986
    model = m.apply(base)
    assert count_parameters(model, trainable_only=True) == 39986
    assert sorted(n.removesuffix(".adapter") for n in _adapters(model)) == resolve_targets(base, ["ffn_out"])
    assert all(n.endswith("output.dense.adapter") and "attention" not in n for n in _adapters(model))
    assert build_method("adapter", {"reduction_factor": 8}).expected_trainable_parameters(
        _fresh(minilm_spec)
    ) == (12 * (2 * 384 * 48 + 48 + 384) + HEAD)
    assert not m.mergeable
    with pytest.raises(TypeError):
        m.merge(model)


def test_step0_equals_pretrained_and_adapter_sits_before_the_residual(
    minilm_spec, minilm_tokenizer, tiny_task_dir
):
    batch = _inputs(_batch(tiny_task_dir, minilm_tokenizer))
    with torch.no_grad():
        ref = _fresh(minilm_spec).eval()(**batch).logits
    model = build_method("adapter", {"bottleneck": 16}).apply(_fresh(minilm_spec)).eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)  # W_up = 0, b_up = 0: exact identity

    # make the adapters non-trivial and check where they act: on the projection output,
    # which BertSelfOutput / BertOutput then add to the residual and normalise
    torch.manual_seed(1)
    with torch.no_grad():
        for a in _adapters(model).values():
            a.up.weight.normal_(0, 0.05)
            a.up.bias.normal_(0, 0.05)
    layer = model.bert.encoder.layer[3]
    got = {}
    layer.attention.output.register_forward_hook(lambda m, a, o: got.update(args=a, out=o))
    with torch.no_grad():
        logits = model(**batch).logits
    assert (logits - ref).abs().max() > 1e-3
    x, residual = got["args"]
    dense = layer.attention.output.dense
    projected = F.linear(x, dense.weight, dense.bias)
    adapted = projected + dense.adapter.up(torch.relu(dense.adapter.down(projected)))
    expected = layer.attention.output.LayerNorm(adapted + residual)
    assert torch.allclose(got["out"], expected, atol=1e-5)


def test_only_adapters_and_head_train_and_save_load_is_exact(
    minilm_spec, minilm_tokenizer, tiny_task_dir, tmp_path
):
    torch.manual_seed(0)
    params = {"placement": "houlsby", "bottleneck": 8, "nonlinearity": "silu"}
    base = _fresh(minilm_spec)
    before = {n: t.detach().clone() for n, t in base.state_dict().items()}
    m = build_method("adapter", params)
    model = m.apply(base)
    init = {n: t.detach().clone() for n, t in model.state_dict().items()}
    batch = _batch(tiny_task_dir, minilm_tokenizer)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    model.train()
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before if not n.startswith("classifier."))
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    added = set(after) - set(before)
    assert added == {n for n, p in model.named_parameters() if ".adapter." in n and p.requires_grad}
    assert len(added) == 12 * 4
    assert all(not torch.equal(init[n], after[n]) for n in added)

    model.eval()
    with torch.no_grad():
        ref = model(**_inputs(batch)).logits
    m.save(model, tmp_path / "w.safetensors")
    assert (tmp_path / "w.safetensors").stat().st_size >= 4 * m.expected_trainable_parameters(
        _fresh(minilm_spec)
    )
    loaded = build_method("adapter", params).load(_fresh(minilm_spec), tmp_path / "w.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**_inputs(batch)).logits, ref)


def test_apply_twice_is_refused(minilm_spec):
    m = build_method("adapter", {})
    model = m.apply(_fresh(minilm_spec))
    with pytest.raises(ConfigError, match="applied twice"):
        m.apply(model)


# -- larger models (slow) ------------------------------------------------------------------------------


def _check_large(factory, name, roles, d, head):
    _, tok, base = factory(name)
    enc = tok(["a gripping, well acted film", "dull"], padding=True, return_tensors="pt")
    base.eval()
    with torch.no_grad():
        ref = base(**enc).logits
    m = build_method("adapter", {"placement": "houlsby", "bottleneck": 16})
    targets = resolve_targets(base, roles)
    expected = m.expected_trainable_parameters(base)
    assert expected == len(targets) * (2 * d * 16 + 16 + d) + head
    model = m.apply(base)
    assert count_parameters(model, trainable_only=True) == expected
    assert sorted(n.removesuffix(".adapter") for n in _adapters(model)) == targets
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, ref)
    model.train()
    model(**enc, labels=torch.tensor([1, 0])).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".adapter.up." in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    return targets


@pytest.mark.slow
def test_mpnet_houlsby(builtin_model_factory):
    head = 768 * 768 + 768 + 768 * 2 + 2  # MPNet classifier: dense + out_proj
    targets = _check_large(builtin_model_factory, "mpnet-base", ["attn_output", "ffn_out"], 768, head)
    assert len(targets) == 24 and any(t.endswith("attention.attn.o") for t in targets)


@pytest.mark.slow
def test_smollm2_houlsby_on_o_proj_and_down_proj(builtin_model_factory):
    targets = _check_large(builtin_model_factory, "smollm2-135m", ["attn_output", "ffn_out"], 576, 576 * 2)
    assert len(targets) == 60
    assert {t.rsplit(".", 1)[1] for t in targets} == {"o_proj", "down_proj"}
