"""Generative tasks: model side. Causal-LM batches with the loss on the target tokens, greedy
batched generation (left padding, KV cache), and scoring as the papers do.

Scoring (``TaskSpec.scoring``):

* ``exact_match``: the output equals the target after normalisation (lower case, no
  punctuation, no articles, single spaces);
* ``numeric``: the last number in the output equals the gold answer's number within 0.001; a
  gold answer that is an option letter (AQuA's A-E) is matched by the first option letter in the
  output (the LLM-Adapters / pyreft arithmetic evaluation);
* ``rouge``: ROUGE-1/2/L F-measure (``rouge-score``, Porter stemming), ``bleu``: corpus BLEU
  (``sacrebleu``), both as fractions of 1;
* multiple choice ``generate``: the first option label (``A``, ``B`` ... or the answer words)
  found as a word in the output; ``loglik``: the option whose label tokens the model finds
  most likely after the prompt; ``cloze``: the option whose own text the model finds most
  likely per byte (the options are the answer texts, trained on as the target, and the prompt
  need not list them: lm-evaluation-harness's ``acc_norm``, how small models' commonsense
  scores are usually reported). Accuracy each way.
"""

from __future__ import annotations

import functools
import re
import string
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .gendata import LIKELIHOOD_SCORINGS, MULTIPLE_CHOICE, OPTION_LETTERS, last_number, number_in, target_ids

IGNORE = -100  # label of positions without loss


class CausalCollator:
    """Right-padded prompt + target rows; labels are the input ids with ``IGNORE`` on pads and,
    unless ``train_on_prompt``, on the prompt (the model shifts them itself)."""

    def __init__(self, pad_token_id: int, train_on_prompt: bool = False):
        self.pad = pad_token_id
        self.train_on_prompt = train_on_prompt

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(np.asarray(r["input_ids"]), dtype=torch.long)
            mask[i, :k] = 1
            start = 0 if self.train_on_prompt else int(r["prompt_length"])
            labels[i, start:k] = ids[i, start:k]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "prompt_length": torch.tensor([int(r["prompt_length"]) for r in rows])}


def model_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch as the model takes it: ``prompt_length`` only for a model whose method reads
    it (LoReFT's prompt positions)."""
    if "prompt_length" in batch and not getattr(model, "peftlab_reads_prompt_length", False):
        return {k: v for k, v in batch.items() if k != "prompt_length"}
    return batch


def loss_of(model: nn.Module, batch: dict[str, torch.Tensor], forward: nn.Module | None = None,
            host_labels: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's training loss. A classifier's comes from its head; a causal LM's is the
    mean cross-entropy over the labelled tokens, as the model computes it, with the output
    layer applied only from the batch's first labelled position on (``target_logits``).
    ``forward``: what to call instead of ``model`` (its DDP wrapper); ``host_labels``: the
    labels still on the host, read instead of the device's (on a GPU, no synchronisation)."""
    call = forward or model
    labels = batch["labels"] if host_labels is None else host_labels
    if "prompt_length" not in batch or (labels[:, 0] != IGNORE).any():  # a classifier, or the
        return call(**model_inputs(model, batch)).loss  # loss on the prompt too: every position needed
    logits, labels = target_logits(model, batch, call, first_labelled(labels))
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE)


def first_labelled(labels: torch.Tensor) -> int:
    """The first position (at least 1) where any row of a causal batch has a label."""
    labelled = (labels != IGNORE).any(dim=0).nonzero()
    return max(int(labelled[0]) if len(labelled) else 1, 1)


def target_logits(model: nn.Module, batch: dict[str, torch.Tensor], forward: nn.Module | None = None,
                  first: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a causal batch, aligned: ``logits[:, t]`` (fp32) predicts
    ``labels[:, t]``, from the batch's first labelled position on. With the loss on the target
    only, most positions are prompt, and a large vocabulary makes the output layer a large share
    of a step (SmolLM2's 49k tokens: a fifth of the forward; Gemma-3's 262k: more than the whole
    transformer), so the model computes logits there only (``logits_to_keep``) where it can.
    ``first``: ``first_labelled`` of the labels, when the caller has it from the host."""
    call = forward or model
    labels = batch["labels"]
    first = first_labelled(labels) if first is None else first
    inputs = model_inputs(model, {k: v for k, v in batch.items() if k != "labels"})
    if first > 1 and _keeps_logits(model):  # positions first-1 .. end: position t predicts token t+1
        logits = call(**inputs, logits_to_keep=labels.shape[1] - first + 1).logits[:, :-1]
    else:  # every position (a prompt-tuning model's virtual tokens come first: the last n are the text's)
        logits = call(**inputs).logits[:, -labels.shape[1]:][:, first - 1:-1]
    return logits.float(), labels[:, first:]


def _keeps_logits(model: nn.Module) -> bool:
    """Whether the causal LM under ``model`` (a peft wrapper or not) takes ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forward_keeps_logits(type(base))


@functools.cache
def _forward_keeps_logits(cls: type) -> bool:
    """Once per model class (a signature is read on every training batch otherwise)."""
    import inspect

    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def left_padded(prompts: list[np.ndarray], pad: int) -> dict[str, torch.Tensor]:
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = torch.tensor(np.asarray(p), dtype=torch.long)
        mask[i, n - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def prompts_of(frame: pd.DataFrame) -> list[np.ndarray]:
    return [np.asarray(ids[:int(k)]) for ids, k in zip(frame["input_ids"], frame["prompt_length"], strict=True)]


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[np.ndarray], max_new_tokens: int, batch_size: int,
             dev: torch.device, autocast=None, desc: str = "generate",
             synced: bool = False) -> tuple[list[str], dict[str, Any]]:
    """Greedy continuations of ``prompts`` (token ids), batched by similar length with left
    padding and the KV cache; texts in the prompts' order (up to EOS) and the speed.
    ``synced``: every process of a sharded model steps until all are done (``synced_gpus``)."""
    import contextlib

    model.eval()
    order = np.argsort([len(p) for p in prompts], kind="stable")
    texts: list[str | None] = [None] * len(prompts)
    new_tokens, t0 = 0, time.perf_counter()
    eos = tokenizer.eos_token_id
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, mininterval=5):
        idx = order[start:start + batch_size]
        batch = {k: v.to(dev) for k, v in left_padded([prompts[i] for i in idx], tokenizer.pad_token_id).items()}
        with autocast or contextlib.nullcontext():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, use_cache=True,
                                 synced_gpus=synced)
        for j, i in enumerate(idx):
            toks = out[j, batch["input_ids"].shape[1]:].tolist()
            toks = toks[:toks.index(eos)] if eos in toks else toks
            new_tokens += len(toks)
            texts[i] = tokenizer.decode(toks, skip_special_tokens=True)
    seconds = time.perf_counter() - t0
    return texts, {"examples": len(prompts), "new_tokens": new_tokens, "seconds": seconds,
                   "new_tokens_per_s": new_tokens / seconds if seconds > 0 else None}


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def choice_in(text: str, labels: list[str]) -> int:
    """The option whose label appears first in ``text`` as a word (-1: none). Letters match in
    upper case only ("A", not the article "a"); answer words match in any case."""
    best, where = -1, len(text) + 1
    for k, label in enumerate(labels):
        flags = 0 if len(label) == 1 else re.IGNORECASE
        m = re.search(rf"(?<![A-Za-z0-9]){re.escape(label)}(?![A-Za-z0-9])", text, flags)
        if m and m.start() < where:
            best, where = k, m.start()
    return best


def rouge_scores(outputs: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, out) for out, ref in zip(outputs, references, strict=True)]
    return {k: float(np.mean([s[k].fmeasure for s in scores])) for k in ("rouge1", "rouge2", "rougeL")}


def bleu_score(outputs: list[str], references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(outputs, [references]).score) / 100


def score(task: dict, outputs: list[str], frame: pd.DataFrame) -> tuple[dict[str, float], list[bool | None]]:
    """The task's metrics over generated ``outputs`` and each example's correctness (None for
    ROUGE / BLEU, which have no per-example verdict)."""
    scoring = task["scoring"]
    answers = frame["answer"].tolist()
    if task["kind"] == MULTIPLE_CHOICE:
        right = [choice_in(out, list(opts)) == int(k)
                 for out, opts, k in zip(outputs, frame["options"], frame["label"], strict=True)]
        return {"accuracy": float(np.mean(right))}, right
    if scoring == "numeric":
        right = [numeric_right(out, ans) for out, ans in zip(outputs, answers, strict=True)]
        exact = [normalize_answer(o) == normalize_answer(a) for o, a in zip(outputs, answers, strict=True)]
        return {"accuracy": float(np.mean(right)), "exact_match": float(np.mean(exact))}, right
    if scoring == "rouge":
        return rouge_scores(outputs, answers), [None] * len(outputs)
    if scoring == "bleu":
        return {"bleu": bleu_score(outputs, answers)}, [None] * len(outputs)
    right = [normalize_answer(o) == normalize_answer(a) for o, a in zip(outputs, answers, strict=True)]
    return {"exact_match": float(np.mean(right))}, right


def numeric_right(output: str, answer: str) -> bool:
    """An arithmetic answer as LLM-Adapters and pyreft score it: the output's last number within
    0.001 of the gold number, or, for an option-letter answer (AQuA), the output's first option letter."""
    gold = str(answer).strip()
    if gold in OPTION_LETTERS:
        return choice_in(output, list(OPTION_LETTERS)) == OPTION_LETTERS.index(gold)
    pred, value = last_number(output), number_in(gold)
    return pred is not None and value is not None and abs(pred - value) <= 1e-3


@torch.no_grad()
def option_logliks(model: nn.Module, tokenizer, frame: pd.DataFrame, batch_size: int,
                   dev: torch.device, autocast=None, cloze: bool = False) -> np.ndarray:
    """log p(option | prompt) summed over the option's tokens, for every option of every row:
    (rows, options). ``loglik``: the option's label + EOS (so a label that is a prefix of
    another is not favoured); ``cloze``: the option's text without EOS, divided by its length
    in bytes (lm-evaluation-harness's ``acc_norm``, so longer options are not penalised)."""
    import contextlib

    model.eval()
    seqs, owners, sizes = [], [], []
    for r, (prompt, opts, text) in enumerate(zip(prompts_of(frame), frame["options"], frame["text"], strict=True)):
        for k, label in enumerate(opts):
            tokens = target_ids(tokenizer, text, str(label))
            seqs.append((prompt, tokens[:-1] if cloze else tokens))
            owners.append((r, k))
            sizes.append(len(str(label).encode()) if cloze else 1)
    n_opts = max(len(o) for o in frame["options"])
    out = np.full((len(frame), n_opts), -np.inf)
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        rows = [{"input_ids": np.concatenate([p, t]), "prompt_length": len(p)} for p, t in chunk]
        batch = {k: v.to(dev) for k, v in CausalCollator(tokenizer.pad_token_id)(rows).items()}
        with autocast or contextlib.nullcontext():
            logits, labels = target_logits(model, batch)
        logp = torch.log_softmax(logits, dim=-1)
        keep = labels != IGNORE
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        totals = (picked * keep).sum(dim=1).cpu().numpy()
        for (r, k), v, size in zip(owners[start:start + batch_size], totals, sizes[start:start + batch_size],
                                   strict=True):
            out[r, k] = v / size
    return out


def rescore(task: dict, frame: pd.DataFrame, rows: list[dict]) -> dict[str, float]:
    """The task's metrics over some of a split's scored ``rows`` (``evaluate_generative``'s) and
    their ``frame`` rows: a test set of several, scored on its own."""
    if task["kind"] == MULTIPLE_CHOICE and task["scoring"] in LIKELIHOOD_SCORINGS:
        return {"accuracy": float(np.mean([r["correct"] for r in rows]))}
    return score(task, [r["output"] for r in rows], frame)[0]


def evaluate_generative(model: nn.Module, tokenizer, frame: pd.DataFrame, task: dict, batch_size: int,
                        dev: torch.device, autocast=None, desc: str = "generate", synced: bool = False
                        ) -> tuple[dict[str, float], list[dict], dict[str, Any]]:
    """Score a split: metrics, one row per example (prompt, output, answer, correct) and the
    generation speed (None for log-likelihood scoring, which generates nothing)."""
    if task["kind"] == MULTIPLE_CHOICE and task["scoring"] in LIKELIHOOD_SCORINGS:
        ll = option_logliks(model, tokenizer, frame, batch_size, dev, autocast, cloze=task["scoring"] == "cloze")
        picks = ll.argmax(axis=1)
        outputs = [str(opts[k]) for opts, k in zip(frame["options"], picks, strict=True)]
        right = [bool(k == int(gold)) for k, gold in zip(picks, frame["label"], strict=True)]
        metrics, speed = {"accuracy": float(np.mean(right))}, None
    else:
        outputs, speed = generate(model, tokenizer, prompts_of(frame), task["max_new_tokens"], batch_size, dev,
                                  autocast, desc, synced)
        metrics, right = score(task, outputs, frame)
    rows = [{"example_id": int(e), "prompt": p, "output": o, "answer": a, "correct": c}
            for e, p, o, a, c in zip(frame["example_id"], frame["text"], outputs, frame["answer"], right, strict=True)]
    return metrics, rows, speed
