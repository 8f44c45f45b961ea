"""Prompt tuning through peft: [P_e; X_e], a trained soft prompt before the frozen embeddings."""

from __future__ import annotations

import time

import pytest
import torch

from _peft_checks import (
    MINILM_HEAD,
    batch,
    check_big_model,
    check_count,
    check_only_intended_change,
    check_save_load,
    fresh,
    inputs,
    train_once,
)
from peftlab.errors import ConfigError
from peftlab.methods import build_method
from peftlab.methods.prompt_tuning import pools_last_token
from peftlab.train import Collator

N = 8
PARAMS = {"num_virtual_tokens": N}
TEXTS = [
    "a gripping, beautifully acted film that never lets go",
    "dull.",
    "the plot goes nowhere and the jokes never land",
]


def _is_vocab_row(rows: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """For each row: is it exactly the embedding of some vocabulary token?"""
    return torch.stack([(emb == r).all(dim=1).any() for r in rows])


def _prompt(model) -> torch.Tensor:
    return model.prompt_encoder["default"].embedding.weight


@pytest.fixture(scope="module")
def trained(minilm_spec, minilm_tokenizer, tiny_task_dir):
    return train_once(minilm_spec, "prompt_tuning", PARAMS, batch(tiny_task_dir, minilm_tokenizer))


def _padded_vs_alone(model, tokenizer) -> float:
    """max |logits of a right-padded batch - logits of each sentence alone|."""
    rows = [dict(tokenizer(t), label=0) for t in TEXTS]
    collate = Collator(tokenizer.pad_token_id, False)
    padded = collate(rows)
    assert (padded["attention_mask"] == 0).any()  # there is padding to get wrong
    model.eval()
    with torch.no_grad():
        together = model(**inputs(padded)).logits
        alone = torch.cat([model(**inputs(collate([r]))).logits for r in rows])
    return (together - alone).abs().max().item()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer"),
        ({"num_virtual_tokens": "20"}, "num_virtual_tokens must be a positive integer"),
        ({"init": "TEXT"}, "init must be one of"),
        ({"init": "text"}, "init 'text' needs a non-empty init_text"),
        ({"init": "text", "init_text": " "}, "init 'text' needs a non-empty init_text"),
        ({"init_text": "positive or negative"}, "init_text is only used with init 'text'"),
        ({"prompt_tuning_init": "RANDOM"}, "unknown parameter"),
    ],
)
def test_config_validation(params, message):
    with pytest.raises(ConfigError, match=message):
        build_method("prompt_tuning", params)


def test_count_matches_closed_form_and_hand(trained):
    by_hand = N * 384 + MINILM_HEAD  # num_virtual_tokens x hidden + head
    assert by_hand == 3842
    check_count(trained, by_hand)
    assert _prompt(trained.model).shape == (N, 384)


def test_only_prompt_and_head_change(trained):
    changed = check_only_intended_change(trained, lambda n: n.startswith("classifier."))
    assert changed == {"classifier.weight", "classifier.bias"}
    # the word embeddings the prompt lives beside stay frozen and untouched
    emb = trained.model.get_base_model().bert.embeddings.word_embeddings.weight
    assert not emb.requires_grad
    assert torch.equal(emb, trained.before["bert.embeddings.word_embeddings.weight"])


def test_prompt_trains_and_save_load_exact(trained, minilm_spec, tmp_path):
    stored = check_save_load(minilm_spec, trained, tmp_path)
    prompt = [k for k in stored if "prompt_encoder" in k]
    assert len(prompt) == 1 and stored[prompt[0]].shape == (N, 384)
    # the stored prompt is the trained one, not its (vocabulary-sampled) starting point
    emb = trained.before["bert.embeddings.word_embeddings.weight"]
    assert not _is_vocab_row(stored[prompt[0]], emb).any()


def test_not_mergeable(trained):
    assert not trained.method.mergeable
    with pytest.raises(TypeError, match="cannot be merged"):
        trained.method.merge(trained.model)


def test_inits(minilm_spec, minilm_tokenizer):
    base = fresh(minilm_spec)
    emb = base.bert.embeddings.word_embeddings.weight.detach().clone()
    # sample_vocab (default): each prompt row is the embedding of some vocabulary token
    sampled = _prompt(build_method("prompt_tuning", PARAMS).apply(base)).detach()
    assert _is_vocab_row(sampled, emb).all()
    # text: the embeddings of the tokenized text, cycled to num_virtual_tokens
    text = "positive or negative"
    ids = minilm_tokenizer(text)["input_ids"]
    model = build_method("prompt_tuning", {**PARAMS, "init": "text", "init_text": text}).apply(fresh(minilm_spec))
    assert torch.equal(_prompt(model).detach(), emb[(ids * N)[:N]])
    assert not pools_last_token(base)


def test_padding_does_not_change_logits_minilm(trained, minilm_tokenizer):
    # encoder: the prompt's all-ones mask is prepended and padding stays masked
    assert _padded_vs_alone(trained.model, minilm_tokenizer) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mpnet-base", "smollm2-135m"])
def test_bigger_models(builtin_model_factory, name):
    t0 = time.perf_counter()
    check_big_model(builtin_model_factory, name, "prompt_tuning", PARAMS)
    print(f"prompt_tuning {name}: apply + forward/backward ({time.perf_counter() - t0:.1f} s)")


@pytest.mark.slow
def test_right_padding_last_token_pooling_smollm2(builtin_model_factory):
    """Llama pools the last token; with a prepended prompt it must still skip right padding."""
    import peft

    _, tok, base = builtin_model_factory("smollm2-135m")
    assert pools_last_token(base)
    model = build_method("prompt_tuning", PARAMS).apply(base)
    diff = _padded_vs_alone(model, tok)
    print(f"prompt_tuning smollm2 padded vs alone: max|dlogit| = {diff:.2e}")
    assert diff <= 1e-4
    # without the pooling hook, peft + transformers pool a pad position for the shorter rows
    _, _, other = builtin_model_factory("smollm2-135m")
    raw = peft.get_peft_model(other, peft.PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=N, modules_to_save=["score"]))
    raw.load_state_dict(model.state_dict())
    assert _padded_vs_alone(raw, tok) > 1e-2
