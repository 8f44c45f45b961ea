"""Every registered method through the same checks (peft's test-matrix idea):
trainable count = closed-form formula, only the intended tensors change, save/load is exact."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from peftlab.config import load_experiment
from peftlab.data import load_split
from peftlab.methods import METHODS, build_method
from peftlab.models import count_parameters, load_model
from peftlab.train import Collator, make_loader

# (method, method params, names of tensors that must change, which must not)
CASES = [
    ("full", {}, lambda n: True),
    ("bitfit", {}, lambda n: n.endswith("bias") or n.startswith("classifier.")),
    ("lora", {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["query", "value"]},
     lambda n: n.startswith("classifier.") or n.endswith(("query.weight", "value.weight"))),
    ("gift", {"r": 4, "targets": ["query", "value"]},
     lambda n: n.startswith("classifier.") or n.endswith(("query.weight", "value.weight"))),
    ("hiwi", {"r": 4, "adapt": "weights"},
     lambda n: n.startswith("classifier.")
     or re.search(r"(intermediate|layer\.\d+\.output)\.dense\.weight$", n) is not None),
    # non-mergeable methods add modules: the base model's own tensors that change are the head's
    # (not the last block: its last-token edits cannot reach BERT's [CLS] pooling)
    ("loreft", {"r": 2, "layers": [0, 3], "first_n": 2, "last_n": 2, "tied_positions": False, "dropout": 0.0},
     lambda n: n.startswith("classifier.") or ".loreft." in n),
    ("adapter", {"placement": "houlsby", "bottleneck": 8},
     lambda n: n.startswith("classifier.") or ".adapter." in n),
    ("sift", {"rate": 0.01, "targets": ["query", "value"], "calibration_batches": 1},
     lambda n: n.startswith("classifier.") or n.endswith(("query.weight", "value.weight"))),
    ("pafi", {"rate": 0.01, "targets": ["query", "value"]},
     lambda n: n.startswith("classifier.") or n.endswith(("query.weight", "value.weight"))),
    ("dora", {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["query", "value"]},
     lambda n: n.startswith("classifier.") or n.endswith(("query.weight", "value.weight"))),
    ("ia3", {"targets": ["key", "value", "ffn_out"], "feedforward": ["ffn_out"]},
     lambda n: n.startswith("classifier.") or n.endswith(("key.weight", "key.bias", "value.weight", "value.bias"))
     or re.search(r"layer\.\d+\.output\.dense\.weight$", n) is not None),
    # value, not query: lambda_d's gradient is proportional to lambda_b (0 at init), and through
    # the query's softmax it is too small for 2 SGD steps to move lambda_d in float32
    ("vera", {"r": 16, "targets": ["value"]},
     lambda n: n.startswith("classifier.") or n.endswith("value.weight")),
    # a peft model that does not merge is read through its base model (head copy as the head)
    ("prompt_tuning", {"num_virtual_tokens": 8}, lambda n: n.startswith("classifier.")),
]


def test_every_registered_method_has_a_case():
    assert sorted(m for m, *_ in CASES) == sorted(METHODS)


def _fresh(minilm_spec):
    return load_model(minilm_spec, 2, "single_label_classification", seed=0)


def _batch(tiny_task_dir, tokenizer, n=16):
    df = load_split(tiny_task_dir, "train").iloc[:n]
    return next(iter(make_loader(df, n, Collator(tokenizer.pad_token_id, False), shuffle=False)))


def _base_view(model) -> dict[str, torch.Tensor]:
    """State under base-architecture names; a peft model's trained head copy stands for the head."""
    if not hasattr(model, "get_base_model"):
        return model.state_dict()
    return {
        n.replace(".modules_to_save.default.", ".").replace(".base_layer.", "."): t
        for n, t in model.get_base_model().state_dict().items()
        if ".original_module." not in n
    }


def test_trainable_formulas_closed_form(minilm_spec):
    base = _fresh(minilm_spec)
    head = 384 * 2 + 2
    assert build_method("full", {}).expected_trainable_parameters(base) == count_parameters(base)
    biases = sum(p.numel() for n, p in base.named_parameters() if n.endswith("bias") and not n.startswith("classifier"))
    assert build_method("bitfit", {}).expected_trainable_parameters(base) == biases + head
    # LoRA on query+value of 6 layers, d = 384: r * (384 + 384) per matrix, 12 matrices
    lora = build_method("lora", {"r": 4, "targets": ["query", "value"]})
    assert lora.expected_trainable_parameters(base) == 12 * 4 * (384 + 384) + head


@pytest.mark.parametrize(("method", "params", "should_change"), CASES, ids=[c[0] for c in CASES])
def test_count_changes_and_roundtrip(method, params, should_change, minilm_spec, minilm_tokenizer, tiny_task_dir, tmp_path):
    torch.manual_seed(0)
    base = _fresh(minilm_spec)
    before = {n: p.detach().clone() for n, p in base.state_dict().items()}
    m = build_method(method, params)
    if m.needs_calibration:  # e.g. sift: the mask comes from gradients on real batches
        m.calibrate(base, [_batch(tiny_task_dir, minilm_tokenizer)])
    expected = m.expected_trainable_parameters(base)
    model = m.apply(base)
    assert count_parameters(model, trainable_only=True) == expected
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    batch = _batch(tiny_task_dir, minilm_tokenizer)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()

    # compare base-architecture weights: mergeable methods fold their update in (on a copy)
    merged = m.merge(copy.deepcopy(model)) if m.mergeable else model
    after = _base_view(merged)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    intended = {n for n in before if should_change(n)}
    assert changed <= intended, f"unintended tensors changed: {sorted(changed - intended)[:5]}"
    if method == "full":
        assert len(changed) > 0.9 * len(before)
    else:
        assert changed == intended - {"bert.embeddings.position_ids"}

    # every trainable tensor (base or added by the method) moved
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, initial[n])]
    assert not unchanged, f"trainable tensors that never changed: {unchanged[:5]}"

    # save / load reproduces outputs exactly
    model.eval()
    with torch.no_grad():
        ref = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    m.save(model, tmp_path / "w.safetensors")
    loaded = build_method(method, params).load(_fresh(minilm_spec), tmp_path / "w.safetensors").eval()
    with torch.no_grad():
        out = loaded(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.equal(ref, out)
    stored = (tmp_path / "w.safetensors").stat().st_size
    assert stored >= 4 * expected  # fp32 tensors of every trainable parameter

    # mergeable methods give a plain base-architecture model with the same outputs
    if m.mergeable:
        plain = m.merge(loaded)
        assert type(plain).__name__ == "BertForSequenceClassification"
        assert not [n for n, _ in plain.named_modules() if "lora" in n or "modules_to_save" in n]
        with torch.no_grad():
            merged_out = plain(**{k: v for k, v in batch.items() if k != "labels"}).logits
        assert (merged_out - ref).abs().max().item() <= 1e-5


def test_method_registry_lookup_error():
    from peftlab.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        build_method("lorra", {})
    assert str(info.value) == f"unknown method 'lorra': use one of {', '.join(sorted(METHODS))}"


def test_variant_files_build(repo):
    for method in METHODS:
        exp = load_experiment(repo / "config" / "experiments", method, "default")
        build_method(method, exp.method_params)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["mpnet-base", "smollm2-135m"])
@pytest.mark.parametrize("method", ["full", "bitfit", "lora"])
def test_spine_methods_on_other_architectures(method, model_name, builtin_model_factory):
    """full / BitFit / LoRA on MPNet (q, v) and the Llama decoder (q_proj, v_proj): count =
    formula, a training step runs, and the merged model equals the unmerged one."""
    _, tokenizer, base = builtin_model_factory(model_name)
    m = build_method(method, {"r": 4} if method == "lora" else {})
    expected = m.expected_trainable_parameters(base)
    model = m.apply(base)
    assert count_parameters(model, trainable_only=True) == expected
    batch = tokenizer(["a fine film", "a dull and far too long film"], padding=True, return_tensors="pt")
    out = model(**batch, labels=torch.tensor([1, 0]))
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        ref = model(**batch).logits
        plain = m.merge(model)
        assert type(plain).__name__.endswith("ForSequenceClassification")
        assert (plain(**batch).logits - ref).abs().max().item() <= 1e-5
