"""LoReFT: closed-form count, the edit's formula, orthonormal R under AdamW with weight decay,
which positions are edited (left/right padding), only the edits + head train, exact save/load;
MPNet and SmolLM2 (slow): apply + forward/backward, and padding invariance on the decoder."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from peftlab.data import load_split
from peftlab.errors import ConfigError
from peftlab.methods import build_method
from peftlab.methods.loreft import FIRST, LAST, NONE, LoreftEdit, intervention_positions
from peftlab.models import count_parameters, load_model, transformer_blocks
from peftlab.train import Collator, _optimizer, make_loader

HEAD = 384 * 2 + 2  # MiniLM classifier: d x 2 + 2


def _fresh(minilm_spec):
    return load_model(minilm_spec, 2, "single_label_classification", seed=0)


def _batch(tiny_task_dir, tokenizer, n=8):
    df = load_split(tiny_task_dir, "train").iloc[:n]
    return next(iter(make_loader(df, n, Collator(tokenizer.pad_token_id, False), shuffle=False)))


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def _edits(model):
    return [m for m in model.modules() if isinstance(m, LoreftEdit)]


def _left_padded(batch):
    """The same sentences with their padding moved to the left."""
    out = {}
    lengths = batch["attention_mask"].sum(1)
    for k, v in batch.items():
        if k == "labels":
            out[k] = v
            continue
        rows = [torch.roll(row, int(row.shape[0] - n)) for row, n in zip(v, lengths, strict=True)]
        out[k] = torch.stack(rows)
    return out


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"first_n": -1}, "first_n must be an integer >= 0"),
        ({"first_n": 0, "last_n": 0}, "both 0"),
        ({"layers": "some"}, "layers must be 'all'"),
        ({"layers": [1, 1]}, "distinct"),
        ({"layers": []}, "non-empty"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"tied_positions": "yes"}, "tied_positions must be"),
        ({"dropout_on": "state"}, "dropout_on must be 'output'"),
        ({"rank": 2}, "unknown parameter"),
    ],
)
def test_config_rejects_bad_values(params, match):
    with pytest.raises(ConfigError, match=match):
        build_method("loreft", params)


def test_layer_index_and_rank_checked_against_model(minilm_spec):
    base = _fresh(minilm_spec)
    with pytest.raises(ConfigError, match=r"layers \[6\] do not exist"):
        build_method("loreft", {"layers": [0, 6]}).expected_trainable_parameters(base)
    with pytest.raises(ConfigError, match="exceeds the hidden size 384"):
        build_method("loreft", {"r": 385}).apply(base)


# -- positions --------------------------------------------------------------------------------


def test_intervention_positions_right_left_and_short():
    F, L, N = FIRST, LAST, NONE
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 0, 0],  # right padded, n = 5
            [0, 0, 1, 1, 1, 1, 1],  # left padded, n = 5
            [1, 1, 1, 0, 0, 0, 0],  # n = 3 < p + s: split, no token edited twice
            [0, 0, 0, 0, 0, 0, 1],  # n = 1: the last group only
            [0, 0, 0, 0, 0, 0, 0],  # empty row
        ]
    )
    pos = intervention_positions(mask, first_n=2, last_n=2)
    assert pos.tolist() == [
        [F, F, N, L, L, N, N],
        [N, N, F, F, N, L, L],
        [F, L, L, N, N, N, N],
        [N, N, N, N, N, N, L],
        [N, N, N, N, N, N, N],
    ]
    assert intervention_positions(mask[:3], first_n=0, last_n=1).tolist() == [
        [N, N, N, N, L, N, N],
        [N, N, N, N, N, N, L],
        [N, N, L, N, N, N, N],
    ]
    assert intervention_positions(mask[:3], first_n=3, last_n=0).tolist() == [
        [F, F, F, N, N, N, N],
        [N, N, F, F, F, N, N],
        [F, F, F, N, N, N, N],
    ]


# -- counts ---------------------------------------------------------------------------------------


def test_trainable_count_closed_form(minilm_spec):
    # default: r = 1, all 6 blocks, first 1 + last 1 tied: one edit per block of 2 r d + r
    m = build_method("loreft", {})
    base = _fresh(minilm_spec)
    assert m.expected_trainable_parameters(base) == 6 * (2 * 384 + 1) + HEAD == 5384
    model = m.apply(base)
    assert count_parameters(model, trainable_only=True) == 5384
    # untied, r = 2, two blocks: 2 blocks x 2 edits x (2 * 2 * 384 + 2)
    m = build_method("loreft", {"r": 2, "layers": [0, 3], "first_n": 2, "last_n": 3, "tied_positions": False})
    base = _fresh(minilm_spec)
    assert m.expected_trainable_parameters(base) == 2 * 2 * (2 * 2 * 384 + 2) + HEAD == 6922
    model = m.apply(base)
    assert count_parameters(model, trainable_only=True) == 6922
    assert len(_edits(model)) == 4
    # only one side edited: a single edit per block even when untied
    m = build_method("loreft", {"r": 4, "first_n": 0, "last_n": 2, "tied_positions": False})
    assert m.expected_trainable_parameters(_fresh(minilm_spec)) == 6 * (2 * 4 * 384 + 4) + HEAD
    assert not m.mergeable
    with pytest.raises(TypeError):
        m.merge(base)


# -- the edit's math --------------------------------------------------------------------------------


def test_edit_formula_and_identity_when_w_equals_r():
    torch.manual_seed(0)
    edit = LoreftEdit(16, 3).eval()
    h = torch.randn(4, 5, 16)
    R, W, b = edit.R, edit.source.weight, edit.source.bias
    assert torch.allclose(R @ R.T, torch.eye(3), atol=1e-6)
    expected = h + (h @ W.T + b - h @ R.T) @ R  # Phi(h) = h + R^T (W h + b - R h)
    out = edit(h)
    assert torch.allclose(out, expected, atol=1e-6)
    assert (out - h).abs().max() > 1e-3  # a random init edits
    # the edit lies in the row space of R: R^T R (Phi(h) - h) = Phi(h) - h
    delta = out - h
    assert torch.allclose(delta @ R.T @ R, delta, atol=1e-5)
    with torch.no_grad():  # W = R, b = 0: W h + b = R h, so Phi is the identity
        edit.source.weight.copy_(R)
        edit.source.bias.zero_()
    assert torch.allclose(edit(h), h, atol=1e-6)


@pytest.mark.parametrize("dropout_on", ["output", "edit"])
def test_training_dropout_falls_where_dropout_on_says(dropout_on):
    """Training mode against the formula with the same dropout draw: pyreft's default drops
    units of the whole edited state h + R^T(Wh + b - Rh) (h included); "edit" drops units of the
    added term only, so every unit keeps at least h."""
    torch.manual_seed(0)
    edit = LoreftEdit(16, 3, dropout=0.5, dropout_on=dropout_on).train()
    h = torch.randn(4, 5, 16)
    R, W, b = edit.R.detach(), edit.source.weight.detach(), edit.source.bias.detach()
    added = (h @ W.T + b - h @ R.T) @ R
    torch.manual_seed(1)
    out = edit(h).detach()
    torch.manual_seed(1)
    mask = torch.nn.functional.dropout(torch.ones_like(h), 0.5, training=True)  # the same draw: 0 or 2
    expected = mask * (h + added) if dropout_on == "output" else h + mask * added
    assert torch.allclose(out, expected, atol=1e-5)
    dropped = mask == 0
    assert dropped.any()
    if dropout_on == "output":
        assert (out[dropped] == 0).all()
    else:
        assert torch.allclose(out[dropped], h[dropped])


def test_identity_edits_reproduce_the_pretrained_model(minilm_spec, minilm_tokenizer, tiny_task_dir):
    batch = _inputs(_batch(tiny_task_dir, minilm_tokenizer))
    base = _fresh(minilm_spec).eval()
    with torch.no_grad():
        ref = base(**batch).logits
    model = (
        build_method("loreft", {"first_n": 3, "last_n": 2, "tied_positions": False})
        .apply(_fresh(minilm_spec))
        .eval()
    )
    with torch.no_grad():
        assert (model(**batch).logits - ref).abs().max() > 1e-4  # random edits change the outputs
        for edit in _edits(model):
            edit.source.weight.copy_(edit.R)
            edit.source.bias.zero_()
        assert (model(**batch).logits - ref).abs().max() <= 1e-5


def test_r_stays_orthonormal_under_adamw_with_weight_decay(minilm_spec, minilm_tokenizer, tiny_task_dir):
    # torch's Householder map reads R's signs from a +-1 diagonal; decay must not zero R
    torch.manual_seed(0)
    model = build_method("loreft", {"r": 4, "layers": [4, 5], "tied_positions": False}).apply(
        _fresh(minilm_spec)
    )
    edits = _edits(model)
    R0 = [e.R.detach().clone() for e in edits]
    opt = _optimizer(model, SimpleNamespace(learning_rate=1e-2, weight_decay=0.1))  # the trainer's groups
    batch = _batch(tiny_task_dir, minilm_tokenizer, n=4)
    model.train()
    for _ in range(3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    for e, r0 in zip(edits, R0, strict=True):
        R = e.R.detach()
        assert torch.allclose(R @ R.T, torch.eye(4), atol=1e-5)
        assert (R - r0).abs().max() > 1e-4  # it did train
        diag = e.rotate.parametrizations.weight.original.detach().diagonal()
        assert diag.abs().max() < 1  # weight decay did shrink the stored signs


# -- what changes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_only_first_and_last_tokens_of_block_output_change(
    side, minilm_spec, minilm_tokenizer, tiny_task_dir
):
    batch = _inputs(_batch(tiny_task_dir, minilm_tokenizer))
    if side == "left":
        batch = _left_padded(batch)
    mask = batch["attention_mask"]
    assert (mask == 0).any()  # the batch is padded

    def block_outputs(model):
        got = {}
        blocks = transformer_blocks(model)
        for i in (1, 2):
            blocks[i].register_forward_hook(lambda m, a, o, i=i: got.__setitem__(i, o.detach().clone()))
        with torch.no_grad():
            model(**batch)
        return got

    ref = block_outputs(_fresh(minilm_spec).eval())
    m = build_method(
        "loreft", {"layers": [2], "first_n": 2, "last_n": 1, "tied_positions": False, "dropout": 0.0}
    )
    edited = block_outputs(m.apply(_fresh(minilm_spec)).eval())  # hooks added after the edit's hook

    assert torch.equal(edited[1], ref[1])  # blocks before the edited one are untouched
    changed = (edited[2] - ref[2]).abs().amax(-1) > 0
    expected = torch.zeros_like(changed)
    for row, (mrow, chrow) in enumerate(zip(mask, changed, strict=True)):
        idx = mrow.nonzero().flatten().tolist()
        assert len(idx) >= 3
        expected[row, idx[:2] + idx[-1:]] = True
        assert chrow.sum() == 3
    assert torch.equal(changed, expected)


def test_only_edits_and_head_train_and_save_load_is_exact(
    minilm_spec, minilm_tokenizer, tiny_task_dir, tmp_path
):
    torch.manual_seed(0)
    params = {"r": 2, "first_n": 2, "last_n": 2, "tied_positions": False, "dropout": 0.1}
    base = _fresh(minilm_spec)
    before = {n: t.detach().clone() for n, t in base.state_dict().items()}
    m = build_method("loreft", params)
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
    assert added == {n for n, p in model.named_parameters() if ".loreft." in n and p.requires_grad}
    assert all(not torch.equal(init[n], after[n]) for n in added)

    model.eval()
    with torch.no_grad():
        ref = model(**_inputs(batch)).logits
    m.save(model, tmp_path / "w.safetensors")
    assert (tmp_path / "w.safetensors").stat().st_size >= 4 * m.expected_trainable_parameters(
        _fresh(minilm_spec)
    )
    loaded = build_method("loreft", params).load(_fresh(minilm_spec), tmp_path / "w.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**_inputs(batch)).logits, ref)


def test_right_padded_batch_matches_single_sentences(minilm_spec, minilm_tokenizer, tiny_task_dir):
    # BERT's absolute positions make left padding change the model itself: right only here
    batch = _inputs(_batch(tiny_task_dir, minilm_tokenizer, n=4))
    model = build_method("loreft", {"first_n": 2, "last_n": 2, "r": 2}).apply(_fresh(minilm_spec)).eval()
    with torch.no_grad():
        padded = model(**batch).logits
        for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
            single = model(**{k: v[i : i + 1, :n] for k, v in batch.items()}).logits
            assert (single - padded[i]).abs().max() <= 1e-4


def test_apply_twice_is_refused(minilm_spec):
    m = build_method("loreft", {})
    model = m.apply(_fresh(minilm_spec))
    with pytest.raises(ConfigError, match="applied twice"):
        m.apply(model)


# -- larger models (slow) ------------------------------------------------------------------------------


def _forward_backward(model, tokenizer):
    enc = tokenizer(["a gripping, well acted film", "dull"], padding=True, return_tensors="pt")
    model.train()
    loss = model(**enc, labels=torch.tensor([1, 0])).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".loreft." in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.slow
def test_mpnet_apply_count_forward_backward(builtin_model_factory):
    _, tok, base = builtin_model_factory("mpnet-base")
    m = build_method("loreft", {"first_n": 2, "last_n": 2, "tied_positions": False})
    expected = m.expected_trainable_parameters(base)
    head = sum(p.numel() for p in base.classifier.parameters())
    assert expected == 12 * 2 * (2 * 768 + 1) + head
    model = m.apply(base)
    assert count_parameters(model, trainable_only=True) == expected
    _forward_backward(model, tok)


def _pad(ids: list[list[int]], pad_id: int, side: str) -> dict[str, torch.Tensor]:
    T = max(map(len, ids))
    input_ids = torch.full((len(ids), T), pad_id)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, x in enumerate(ids):
        sl = slice(0, len(x)) if side == "right" else slice(T - len(x), T)
        input_ids[i, sl] = torch.tensor(x)
        mask[i, sl] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


@pytest.mark.slow
def test_smollm2_padding_sides_match_single_sentences(builtin_model_factory):
    _, tok, base = builtin_model_factory("smollm2-135m")
    m = build_method("loreft", {"first_n": 2, "last_n": 2, "tied_positions": False, "r": 2})
    expected = m.expected_trainable_parameters(base)
    assert expected == 30 * 2 * (2 * 2 * 576 + 2) + 576 * 2  # Llama score head has no bias
    model = m.apply(base)
    assert count_parameters(model, trainable_only=True) == expected
    model.eval()

    sents = ["a fine movie", "terrible, awful film with bad acting and even worse music", "ok then"]
    ids = [tok(s)["input_ids"] for s in sents]
    assert all(tok.pad_token_id not in x for x in ids)
    seen = {}
    blocks = transformer_blocks(model)
    blocks[0].register_forward_pre_hook(
        lambda mod, a: seen.__setitem__("pos", blocks[0].loreft._tracker.positions)
    )
    with torch.no_grad():
        single, single_pos = [], []
        for x in ids:
            single.append(
                model(
                    input_ids=torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long)
                ).logits
            )
            single_pos.append(seen["pos"][0])
        single = torch.cat(single)
        for side in ("right", "left"):
            batch = _pad(ids, tok.pad_token_id, side)
            logits = model(**batch).logits
            assert (logits - single).abs().max() <= 1e-4, side
            for row, sp, mrow in zip(seen["pos"], single_pos, batch["attention_mask"], strict=True):
                assert torch.equal(row[mrow.bool()], sp)  # the same tokens are edited
                assert (row[~mrow.bool()] == NONE).all()
    _forward_backward(model, tok)
