"""Checks shared by the tests of the peft-backed methods (DoRA, IA3, VeRA, prompt tuning).

All run on real models and real rotten_tomatoes batches; each takes the method name and its
params so every method goes through the same assertions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from peftlab.data import load_split
from peftlab.methods import build_method
from peftlab.models import count_parameters, load_model
from peftlab.train import Collator, make_loader

MINILM_HEAD = 384 * 2 + 2  # MiniLM classifier: Linear(384, 2)
MINILM_LAYERS = 6


def fresh(spec, seed: int = 0):
    return load_model(spec, 2, "single_label_classification", seed=seed)


def batch(task_dir, tokenizer, n: int = 8) -> dict:
    df = load_split(task_dir, "train").iloc[:n]
    return next(iter(make_loader(df, n, Collator(tokenizer.pad_token_id, False), shuffle=False)))


def inputs(b: dict) -> dict:
    return {k: v for k, v in b.items() if k != "labels"}


def train(model, b: dict, steps: int = 2, lr: float = 1e-2):
    """``steps`` AdamW steps on the trainable tensors (a real batch, dropout on)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(**b).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@torch.no_grad()
def logits(model, b: dict) -> torch.Tensor:
    return model.eval()(**inputs(b)).logits


def base_view(model) -> dict[str, torch.Tensor]:
    """State of a peft model under base-architecture names (the trained head copy as the head)."""
    inner = model.get_base_model()
    out = {}
    for name, t in inner.state_dict().items():
        if ".original_module." in name:
            continue
        name = name.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
        out[name] = t
    return out


@dataclass
class Trained:
    """One method applied to a fresh MiniLM and trained 2 AdamW steps on a real batch."""

    method: object
    params: dict
    model: torch.nn.Module  # the peft model after training (never merged in place)
    before: dict[str, torch.Tensor]  # pretrained state dict
    base_modules: list[str]  # module names of the plain base model
    base_type: type
    expected: int  # closed form, computed on the unmodified model
    batch: dict
    ref: torch.Tensor  # logits of the trained model


def train_once(spec, name: str, params: dict, b: dict) -> Trained:
    torch.manual_seed(0)
    base = fresh(spec)
    before = {n: t.detach().clone() for n, t in base.state_dict().items()}
    modules = [n for n, _ in base.named_modules()]
    m = build_method(name, params)
    expected = m.expected_trainable_parameters(base)
    base_type = type(base)
    model = m.apply(base)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model = train(model, b)
    # every trainable tensor (adapter vectors, prompt, head copy) moved in the 2 AdamW steps
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, initial[n])]
    assert not unchanged, unchanged[:3]
    return Trained(m, params, model, before, modules, base_type, expected, b, logits(model, b))


def check_count(t: Trained, by_hand: int) -> None:
    """Closed form (on the unmodified model) == hand computation == what actually trains."""
    assert t.expected == by_hand
    assert count_parameters(t.model, trainable_only=True) == t.expected
    # the pretrained backbone itself is frozen: only adapter tensors and the head copy train
    trainable = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert trainable and all(".base_layer." not in n and ".original_module." not in n for n in trainable)


def check_only_intended_change(t: Trained, should_change) -> set[str]:
    """After the 2 steps, compare the merged (or base-viewed) weights with the pretrained ones."""
    # the frozen pretrained tensors inside the peft wrappers never move
    for name, v in base_view(t.model).items():
        if name in t.before and not should_change(name):
            assert torch.equal(t.before[name], v), name
    after = t.method.merge(copy.deepcopy(t.model)).state_dict() if t.method.mergeable else base_view(t.model)
    assert set(after) >= set(t.before) - {"bert.embeddings.position_ids"}
    changed = {n for n in t.before if n in after and not torch.equal(t.before[n], after[n])}
    intended = {n for n in t.before if should_change(n)}
    assert changed == intended, (sorted(changed - intended)[:5], sorted(intended - changed)[:5])
    return changed


def check_save_load(spec, t: Trained, tmp_path) -> dict[str, torch.Tensor]:
    """save -> load into a fresh base model reproduces the logits exactly; returns the file."""
    from safetensors.torch import load_file

    path = tmp_path / f"{t.method.name}.safetensors"
    t.method.save(t.model, path)
    loaded = build_method(t.method.name, t.params).load(fresh(spec, seed=1), path)
    assert torch.equal(t.ref, logits(loaded, t.batch))
    stored = load_file(str(path))
    assert sum(v.numel() for v in stored.values()) == t.expected
    return stored


def check_merge(t: Trained, tol: float = 1e-5) -> tuple[torch.nn.Module, float]:
    """merge -> a plain model of the base class, same modules and tensors, same logits."""
    plain = t.method.merge(copy.deepcopy(t.model))
    assert type(plain) is t.base_type
    assert [n for n, _ in plain.named_modules()] == t.base_modules
    assert set(plain.state_dict()) == set(t.before)
    assert not hasattr(plain, "peft_config")
    diff = (logits(plain, t.batch) - t.ref).abs().max().item()
    assert diff <= tol, diff
    return plain, diff


def check_big_model(factory, name: str, method: str, params: dict, tol: float = 1e-5):
    """mpnet-base / smollm2-135m: apply, forward/backward, count = formula, merge diff.

    Returns (max |logit difference| merged vs unmerged, whether peft's own merge was usable),
    or None for a method that does not merge.
    """
    from peftlab.methods._peft_common import peft_merge_supported

    spec, tok, base = factory(name)
    m = build_method(method, params)
    expected = m.expected_trainable_parameters(base)
    model = m.apply(base)
    assert count_parameters(model, trainable_only=True) == expected
    texts = ["a gripping, beautifully acted film", "dull.", "the plot goes nowhere and never lands"]
    rows = [dict(tok(t), label=i % 2) for i, t in enumerate(texts)]
    b = Collator(tok.pad_token_id, False)(rows)
    b = {k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
    torch.manual_seed(0)
    model.train()
    loss = model(**b).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    opt.step()
    if not m.mergeable:
        return None
    ref = logits(model, b)
    supported = peft_merge_supported(model)
    plain = m.merge(model)
    assert type(plain).__name__ == type(base).__name__
    assert not [n for n, _ in plain.named_modules() if "modules_to_save" in n or "base_layer" in n]
    diff = (logits(plain, b) - ref).abs().max().item()
    assert diff <= tol, diff
    return diff, supported
