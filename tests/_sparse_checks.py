"""Checks shared by the sparse-update methods' tests (test_method_sift.py, test_method_pafi.py).

Each function takes a ``prepare(model) -> method`` callable that builds the method and, for
SIFT, calibrates it on real batches, so the same check runs for every way of choosing masks.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from peftlab.data import load_split
from peftlab.methods._sparse import SparseDeltaLinear, sparse_masks
from peftlab.models import count_parameters, load_model, resolve_targets
from peftlab.train import Collator, make_loader

# MiniLM-L6: 6 layers x (query, key, value, attention output), each 384 x 384
MINILM_TARGET_NUMEL = 384 * 384
MINILM_HEAD = 384 * 2 + 2


_PRISTINE: dict[tuple[str, int], nn.Module] = {}


def fresh(spec, seed: int = 0):
    """A fresh pretrained classifier (head seeded ``seed``): a copy of one cached load."""
    key = (spec.name, seed)
    if key not in _PRISTINE:
        _PRISTINE[key] = load_model(spec, 2, "single_label_classification", seed=seed)
    return copy.deepcopy(_PRISTINE[key])


def batches(task_dir, tokenizer, n: int = 16, size: int = 8) -> list[dict]:
    df = load_split(task_dir, "train").iloc[:n]
    return list(make_loader(df, size, Collator(tokenizer.pad_token_id, False), shuffle=False))


def inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def target_names(model, roles=("query", "key", "value", "attn_output")) -> list[str]:
    return resolve_targets(model, list(roles))


def check_only_masked_entries_change(spec, prepare, batch) -> None:
    """2 AdamW steps: W0 never moves; merged weights differ from W0 exactly on the mask."""
    torch.manual_seed(0)
    base = fresh(spec)
    before = {n: t.detach().clone() for n, t in base.state_dict().items()}
    names = target_names(base)
    m = prepare(base)
    model = m.apply(base)
    masks = sparse_masks(model)
    assert sorted(masks) == names
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()
    for _ in range(2):
        model(**batch).loss.backward()
        for name in names:  # the frozen W0 never receives a dense gradient
            assert model.get_submodule(name).weight.grad is None
        opt.step()
        opt.zero_grad()
    # W0 itself is untouched; only sparse_delta moved
    unmerged = model.state_dict()
    for name in names:
        assert torch.equal(unmerged[f"{name}.weight"], before[f"{name}.weight"])
        assert (unmerged[f"{name}.sparse_delta"] != 0).float().mean() > 0.99

    merged = m.merge(copy.deepcopy(model)).state_dict()
    assert set(merged) == set(before)
    for n in before:
        if n.startswith("classifier."):
            assert not torch.equal(before[n], merged[n]), n
        elif n.removesuffix(".weight") in masks:
            diff = (merged[n] != before[n]).reshape(-1).nonzero().flatten()
            mask = masks[n.removesuffix(".weight")]
            assert set(diff.tolist()) <= set(mask.tolist()), f"{n}: entries outside the mask moved"
            assert diff.numel() >= 0.99 * mask.numel(), f"{n}: only {diff.numel()} of {mask.numel()} moved"
        else:
            assert torch.equal(before[n], merged[n]), f"{n} changed"


def check_optimizer_state_is_sparse(spec, prepare, batch) -> None:
    """AdamW holds state for the k-entry deltas and the head only: O(k), nothing dense."""
    base = fresh(spec)
    m = prepare(base)
    expected = m.expected_trainable_parameters(base)
    model = m.apply(base)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    model(**batch).loss.backward()
    opt.step()
    ids = {id(p): n for n, p in model.named_parameters()}
    state_numel = 0
    for p, state in opt.state.items():
        name = ids[id(p)]
        assert name.endswith("sparse_delta") or name.startswith("classifier."), name
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
        state_numel += state["exp_avg"].numel() + state["exp_avg_sq"].numel()
    assert state_numel == 2 * expected
    for name, mod in model.named_modules():
        if isinstance(mod, SparseDeltaLinear):
            k = mod.sparse_index.numel()
            assert opt.state[mod.sparse_delta]["exp_avg"].numel() == k < mod.weight.numel() // 50
            assert mod.weight not in opt.state and not mod.weight.requires_grad, name


def check_update_lands_in_same_step(spec, prepare, batch, lr: float = 0.5) -> None:
    """Step t's optimizer update is in step t+1's forward (no one-step-late application).

    Reference: a plain model where, at every step, the dense autograd gradient is computed and
    the masked entries (and the head) are moved by plain SGD. The sparse model's loss at each
    step and its final logits must match it; a deferred update would repeat step 0's loss.
    """
    base = fresh(spec)
    m = prepare(base)
    model = m.apply(base).eval()  # no dropout: both models see the same function
    masks = sparse_masks(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    ref = fresh(spec).eval()
    ref_weights = {n: ref.get_submodule(n).weight for n in masks}
    ref_head = list(ref.classifier.parameters())
    losses, ref_losses = [], []
    for _ in range(2):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()

        ref.zero_grad()
        ref_loss = ref(**batch).loss
        ref_losses.append(ref_loss.item())
        ref_loss.backward()
        with torch.no_grad():
            for name, w in ref_weights.items():
                w.view(-1)[masks[name]] -= lr * w.grad.view(-1)[masks[name]]
            for p in ref_head:
                p -= lr * p.grad
    assert losses[1] != losses[0]  # step 0's update is already in step 1's forward
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs(batch)).logits, ref(**inputs(batch)).logits, rtol=0, atol=1e-5)


def check_save_load_merge(spec, prepare, rebuild, batch, tmp_path) -> float:
    """save -> load into a fresh base model (``rebuild()``: a new, uncalibrated method) is exact;
    merge gives a plain BertForSequenceClassification within 1e-5. Returns the merge diff."""
    from safetensors import safe_open

    torch.manual_seed(0)
    base = fresh(spec)
    m = prepare(base)
    expected = m.expected_trainable_parameters(base)
    model = m.apply(base)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(**batch).loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        ref = model(**inputs(batch)).logits
    path = tmp_path / "w.safetensors"
    m.save(model, path)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        stored_values = sum(f.get_tensor(k).numel() for k in keys if not k.endswith(".sparse_index"))
    names = sorted(sparse_masks(model))
    assert {f"{n}.sparse_index" for n in names} <= keys and {f"{n}.sparse_delta" for n in names} <= keys
    assert stored_values == expected  # deltas + head: the trainable parameters, nothing else

    fresh_method = rebuild()
    loaded = fresh_method.load(fresh(spec, seed=1), path).eval()  # other head init: must be overwritten
    assert count_parameters(loaded, trainable_only=True) == expected
    for n in names:
        assert torch.equal(loaded.get_submodule(n).sparse_index, model.get_submodule(n).sparse_index)
    with torch.no_grad():
        out = loaded(**inputs(batch)).logits
    assert torch.equal(ref, out)

    plain = fresh_method.merge(loaded)
    assert type(plain).__name__ == "BertForSequenceClassification"
    assert not any(isinstance(mod, SparseDeltaLinear) for mod in plain.modules())
    assert all(type(plain.get_submodule(n)) is nn.Linear for n in names)
    assert not [k for k in plain.state_dict() if "sparse" in k]
    assert set(plain.state_dict()) == set(fresh(spec).state_dict())
    with torch.no_grad():
        diff = (plain(**inputs(batch)).logits - ref).abs().max().item()
    assert diff <= 1e-5
    return diff


def builtin_batch(tokenizer, texts=("a gripping, beautifully acted film", "dull and far too long")) -> dict:
    enc = tokenizer(list(texts), padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([1, 0])}


def check_builtin(factory, model_name: str, prepare) -> float:
    """apply + forward/backward + count = formula + merge diff on a larger built-in model."""
    _, tokenizer, model = factory(model_name)
    batch = builtin_batch(tokenizer)
    m = prepare(model, batch)
    expected = m.expected_trainable_parameters(model)
    model = m.apply(model)
    assert count_parameters(model, trainable_only=True) == expected
    model.eval()
    model(**batch).loss.backward()
    deltas = {n: mod.sparse_delta for n, mod in model.named_modules() if isinstance(mod, SparseDeltaLinear)}
    assert deltas and all(d.grad is not None and torch.isfinite(d.grad).all() for d in deltas.values())
    assert all(mod.weight.grad is None for mod in model.modules() if isinstance(mod, SparseDeltaLinear))
    torch.manual_seed(0)
    with torch.no_grad():
        for d in deltas.values():
            d.copy_(0.01 * torch.randn_like(d))
        ref = model(**inputs(batch)).logits
        base_cls = type(model)
        plain = m.merge(model)
        assert type(plain) is base_cls and not any(isinstance(x, SparseDeltaLinear) for x in plain.modules())
        diff = (plain(**inputs(batch)).logits - ref).abs().max().item()
    assert diff <= 1e-5
    return diff
