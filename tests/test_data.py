"""Tasks: built-in corpora, GLUE through datasets.load_dataset on a local copy, local files;
fixed seeded splits, tokenization cache and statistics."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from peftlab.data import (
    SPLITS,
    TaskSpec,
    load_raw,
    load_split,
    make_splits,
    prepare_task,
)
from peftlab.errors import DataError


@pytest.mark.parametrize(
    ("name", "rows", "labels"),
    [("rotten_tomatoes", 8530, 2), ("imdb", 25000, 2), ("bbc_news", 2225, 5)],
)
def test_builtin_tasks_load(name, rows, labels):
    raw = load_raw(TaskSpec.from_config(name, {}))
    assert len(raw.frame) == rows
    assert len(raw.label_names) == labels
    assert raw.frame["label"].nunique() == labels
    assert raw.frame["text_a"].str.len().min() > 0


def test_bbc_labels_are_topics():
    raw = load_raw(TaskSpec.from_config("bbc_news", {}))
    assert raw.label_names == ["business", "entertainment", "politics", "sports", "tech"]


def test_splits_are_fixed_disjoint_and_stratified():
    spec = TaskSpec.from_config("rotten_tomatoes", {})
    raw = load_raw(spec)
    a, b = make_splits(raw, spec), make_splits(raw, spec)
    ids = {k: set(v["example_id"]) for k, v in a.items()}
    for k in SPLITS:
        assert list(a[k]["example_id"]) == list(b[k]["example_id"])  # same seed, same split
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    n = sum(len(v) for v in ids.values())
    assert abs(len(ids["test"]) / n - 0.2) < 0.01 and abs(len(ids["validation"]) / n - 0.1) < 0.01
    for part in a.values():  # stratified: balance within 1 point of the corpus' 50/50
        assert abs(part["label"].mean() - raw.frame["label"].mean()) < 0.01
    other = make_splits(raw, TaskSpec.from_config("rotten_tomatoes", {}, {"split_seed": 7}))
    assert set(other["test"]["example_id"]) != ids["test"]


def test_duplicates_never_cross_splits():
    spec = TaskSpec.from_config("imdb", {})
    splits = make_splits(load_raw(spec), spec)
    texts = [set(p["text_a"]) for p in splits.values()]
    assert not texts[0] & texts[1] and not texts[0] & texts[2] and not texts[1] & texts[2]


def test_caps_apply(minilm_tokenizer, tmp_path):
    spec = TaskSpec.from_config("bbc_news", {"max_train_examples": 50, "max_eval_examples": 20, "max_length": 32})
    stats = prepare_task(spec, minilm_tokenizer, tmp_path)
    assert [stats["splits"][s]["size"] for s in SPLITS] == [50, 20, 20]
    train = load_split(tmp_path, "train")
    assert max(len(x) for x in train["input_ids"]) <= 32
    assert stats["splits"]["train"]["truncated_share"] > 0.9  # news articles are long


def test_prepare_writes_tokenized_splits_and_stats(tiny_task_dir, minilm_tokenizer):
    stats = json.loads((tiny_task_dir / "stats.json").read_text())
    assert stats["num_labels"] == 2 and stats["main_metric"] == "accuracy"
    assert stats["label_names"] == ["negative", "positive"]
    assert len(stats["fingerprint"]) == 16
    for split in SPLITS:
        df = load_split(tiny_task_dir, split)
        s = stats["splits"][split]
        assert len(df) == s["size"] == sum(s["label_balance"].values())
        assert s["length_tokens"]["p50"] <= s["length_tokens"]["p95"] <= s["length_tokens"]["max"]
        first = df.iloc[0]
        assert first["input_ids"][0] == minilm_tokenizer.cls_token_id
        assert minilm_tokenizer.decode(first["input_ids"], skip_special_tokens=True).split()[0] in first["text"]


def _frame(n=120, pair=False, seed=0):
    rng = np.random.default_rng(seed)
    words = ["good", "bad", "fine", "awful", "great", "poor"]
    df = pd.DataFrame({
        "review": [" ".join(rng.choice(words, 5)) + f" {i}" for i in range(n)],
        "stars": rng.choice(["pos", "neg", "mixed"], n),
    })
    if pair:
        df["context"] = [f"context {i}" for i in range(n)]
    return df


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_local_file_task(tmp_path, minilm_tokenizer, fmt):
    df = _frame(pair=True)
    path = tmp_path / f"reviews.{fmt}"
    {"csv": lambda: df.to_csv(path, index=False),
     "jsonl": lambda: df.to_json(path, orient="records", lines=True),
     "parquet": lambda: df.to_parquet(path)}[fmt]()
    spec = TaskSpec.from_config("my_reviews", {"source": "file", "path": str(path),
                                               "text_columns": ["review", "context"], "label_column": "stars"})
    stats = prepare_task(spec, minilm_tokenizer, tmp_path / "out")
    assert stats["label_names"] == ["mixed", "neg", "pos"]
    assert sum(s["size"] for s in stats["splits"].values()) == 120
    train = load_split(tmp_path / "out", "train")
    assert set(train["token_type_ids"].iloc[0]) == {0, 1}  # sentence pair


def test_local_file_regression(tmp_path, minilm_tokenizer):
    df = pd.DataFrame({"text": [f"sentence number {i}" for i in range(60)], "score": np.linspace(0, 5, 60)})
    df.to_csv(tmp_path / "sts.csv", index=False)
    spec = TaskSpec.from_config("sts", {"source": "file", "path": str(tmp_path / "sts.csv"),
                                        "label_column": "score", "problem_type": "regression"})
    stats = prepare_task(spec, minilm_tokenizer, tmp_path / "out")
    assert stats["problem_type"] == "regression" and stats["num_labels"] == 1
    assert stats["main_metric"] == "pearson"


def test_local_file_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_raw(TaskSpec.from_config("t", {"source": "file", "path": str(tmp_path / "missing.csv")}))
    _frame().to_csv(tmp_path / "x.csv", index=False)
    with pytest.raises(DataError, match=r"column\(s\) \['text', 'label'\] not in \S*x.csv"):
        load_raw(TaskSpec.from_config("t", {"source": "file", "path": str(tmp_path / "x.csv")}))
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match="cannot read"):
        load_raw(TaskSpec.from_config("t", {"source": "file", "path": str(tmp_path / "bad.parquet")}))
    (tmp_path / "x.dat").write_text("a")
    with pytest.raises(DataError, match="set 'format:'"):
        load_raw(TaskSpec.from_config("t", {"source": "file", "path": str(tmp_path / "x.dat")}))


def test_corrupt_split_file_is_reported(tmp_path):
    (tmp_path / "train.parquet").write_bytes(b"garbage")
    with pytest.raises(DataError, match="delete it and rerun prepare_data"):
        load_split(tmp_path, "train")
    with pytest.raises(DataError, match="rerun prepare_data"):
        load_split(tmp_path, "test")


def _glue_copy(root, rt):
    """A local folder laid out like the hub's GLUE repo (parquet per config + README configs)."""
    rt = rt.sample(frac=1.0, random_state=0).reset_index(drop=True)  # both labels in every split
    (root / "sst2").mkdir(parents=True)
    (root / "stsb").mkdir()
    rt.iloc[:200].rename(columns={"text_a": "sentence"})[["sentence", "label"]].to_parquet(
        root / "sst2" / "train-00000-of-00001.parquet")
    rt.iloc[200:260].rename(columns={"text_a": "sentence"})[["sentence", "label"]].to_parquet(
        root / "sst2" / "validation-00000-of-00001.parquet")
    sts = pd.DataFrame({"sentence1": rt["text_a"].iloc[:80].values, "sentence2": rt["text_a"].iloc[80:160].values,
                        "label": np.linspace(0, 5, 80)})
    sts.iloc[:60].to_parquet(root / "stsb" / "train-00000-of-00001.parquet")
    sts.iloc[60:].to_parquet(root / "stsb" / "validation-00000-of-00001.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: sst2\n  data_files:\n  - split: train\n    path: sst2/train-*\n"
        "  - split: validation\n    path: sst2/validation-*\n"
        "- config_name: stsb\n  data_files:\n  - split: train\n    path: stsb/train-*\n"
        "  - split: validation\n    path: stsb/validation-*\n---\n"
    )


def test_glue_through_load_dataset_on_local_copy(tmp_path, minilm_tokenizer):
    rt = load_raw(TaskSpec.from_config("rotten_tomatoes", {})).frame
    _glue_copy(tmp_path / "glue", rt)
    spec = TaskSpec.from_config("sst2", {"source": "glue", "hub_path": str(tmp_path / "glue")})
    assert spec.text_columns == ("sentence",)
    stats = prepare_task(spec, minilm_tokenizer, tmp_path / "sst2")
    assert stats["splits"]["test"]["size"] == 60  # GLUE's validation split is the held-out test
    assert stats["splits"]["train"]["size"] + stats["splits"]["validation"]["size"] == 200
    assert stats["source"]["test_split"] == "validation"

    spec = TaskSpec.from_config("stsb", {"source": "glue", "hub_path": str(tmp_path / "glue")})
    stats = prepare_task(spec, minilm_tokenizer, tmp_path / "stsb")
    assert stats["problem_type"] == "regression" and stats["main_metric"] == "pearson"
    assert stats["splits"]["test"]["size"] == 20


def test_glue_model_selection_on_half_the_held_out_split(tmp_path, minilm_tokenizer):
    """ReFT's protocol: a seeded half of GLUE's validation split selects the model, the other
    half is the test split, and all of GLUE's train is training data."""
    rt = load_raw(TaskSpec.from_config("rotten_tomatoes", {})).frame
    _glue_copy(tmp_path / "glue", rt)
    entry = {"source": "glue", "hub_path": str(tmp_path / "glue"), "heldout_validation": "half"}
    splits = make_splits(load_raw(TaskSpec.from_config("sst2", entry)), TaskSpec.from_config("sst2", entry))
    heldout = set(pd.read_parquet(tmp_path / "glue" / "sst2" / "validation-00000-of-00001.parquet")["sentence"])
    assert (len(splits["validation"]), len(splits["test"]), len(splits["train"])) == (30, 30, 200)
    assert set(splits["validation"]["text_a"]) | set(splits["test"]["text_a"]) == heldout
    assert not set(splits["validation"]["text_a"]) & set(splits["test"]["text_a"])
    again = make_splits(load_raw(TaskSpec.from_config("sst2", entry)), TaskSpec.from_config("sst2", entry))
    assert list(again["validation"]["text_a"]) == list(splits["validation"]["text_a"])  # seeded by split_seed
    rows = make_splits(load_raw(TaskSpec.from_config("sst2", entry | {"heldout_validation": 12})),
                       TaskSpec.from_config("sst2", entry | {"heldout_validation": 12}))
    assert (len(rows["validation"]), len(rows["test"])) == (12, 48)
    with pytest.raises(DataError, match="leaves no test rows"):
        load_raw(TaskSpec.from_config("sst2", entry | {"heldout_validation": 60}))
    with pytest.raises(DataError, match="use 'half' or a number of rows"):
        TaskSpec.from_config("sst2", entry | {"heldout_validation": "third"})


def test_glue_unreachable_gives_one_line_error(tmp_path):
    spec = TaskSpec.from_config("rte", {"source": "glue", "hub_path": str(tmp_path / "nowhere")})
    with pytest.raises(DataError) as info:
        load_raw(spec)
    assert "set 'hub_path:' to a local copy" in str(info.value)


def test_unknown_glue_task():
    with pytest.raises(DataError, match="not a GLUE task"):
        TaskSpec.from_config("x", {"source": "glue", "glue_name": "squad"})


# ---------------------------------------------------------------------------------------
# Bad data: every problem is a one-line DataError at data preparation naming the file
# ---------------------------------------------------------------------------------------

_ROWS = [("a fine film", "pos"), ("a dull film", "neg"), ("great acting", "pos"), ("awful plot", "neg")]


def _csv(rows, header="text,label") -> str:
    return header + "\n" + "".join(f"{t},{lab}\n" for t, lab in rows)


def _many(n=60, labels=("pos", "neg")):
    return [(f"review number {i} {labels[i % len(labels)]}", labels[i % len(labels)]) for i in range(n)]


BAD_FILES = [
    # (id, file name, content (str or bytes), task entry, what the message must say)
    ("empty-file", "empty.csv", b"", {}, "is empty"),
    ("blank-lines-only", "blank.csv", "\n\n  \n", {}, "is empty"),
    ("header-only", "header.csv", "text,label\n", {}, "has no rows"),
    ("no-text-column", "notext.csv", _csv(_many(), "review,label"), {}, "column(s) ['text'] not in"),
    ("no-label-column", "nolabel.csv", _csv(_many(), "text,stars"), {}, "column(s) ['label'] not in"),
    ("single-class", "oneclass.csv", _csv(_many(labels=("pos",))), {},
     "label column 'label' has a single value ('pos') in all 60 rows"),
    ("unparseable-csv-row", "ragged.csv", _csv(_many(10)) + "a,b,c\n" + _csv(_many(10), "").lstrip("\n"), {},
     "Expected 2 fields in line 12, saw 3"),
    ("unparseable-jsonl-line", "broken.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": \n', {},
     "line 2 is not valid JSON"),
    ("jsonl-line-not-an-object", "list.jsonl", '{"text": "a", "label": 1}\n["b", 0]\n', {},
     "line 2 is a JSON list, not an object"),
    ("non-utf8-bytes", "latin1.csv", _csv(_many(8)).encode() + "café crème,pos\n".encode("latin-1"), {},
     "line 10: byte 0xe9 is not valid utf-8"),
    ("no-complete-row", "holes.csv", "text,label\na,\n,pos\n", {}, "none of the 2 rows"),
    ("regression-label-not-a-number", "scores.csv", _csv([(f"s {i}", i) for i in range(30)] + [("t", "high")]),
     {"problem_type": "regression"}, "not finite numbers (first: 'high', row 31)"),
    ("labels-look-like-text", "swapped.csv", _csv([(f"l{i}", f"free text {i}") for i in range(40)]), {},
     "40 distinct values in 40 rows"),
    ("too-few-rows", "tiny.csv", _csv(_ROWS), {}, "split is empty (4 examples)"),
    ("label-only-in-test", "rare.csv", _csv(_many(200) + [(f"odd one {i}", "rare") for i in range(3)]),
     {"max_train_examples": 20}, "label(s) ['rare'] occur in the test split but never in the training split"),
    ("unknown-encoding", "enc.csv", _csv(_many()), {"encoding": "utf-9"}, "is not a known text encoding"),
]


@pytest.mark.parametrize(("name", "content", "entry", "expected"), [c[1:] for c in BAD_FILES],
                         ids=[c[0] for c in BAD_FILES])
def test_bad_data_file_is_a_one_line_error_naming_the_file(tmp_path, minilm_tokenizer, name, content, entry,
                                                           expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    spec = TaskSpec.from_config("mine", {"source": "file", "path": str(path), **entry})
    with pytest.raises(DataError) as info:
        prepare_task(spec, minilm_tokenizer, tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message and message.startswith("task 'mine': ")
    assert str(path) in message, message  # names the file
    assert expected in message, message
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # nothing half-written


def test_encoding_key_reads_latin1(tmp_path, minilm_tokenizer):
    path = tmp_path / "latin1.csv"
    path.write_bytes(_csv(_many(40)).encode() + "café crème,pos\n".encode("latin-1"))
    spec = TaskSpec.from_config("mine", {"source": "file", "path": str(path), "encoding": "latin-1"})
    assert "café crème" in set(load_raw(spec).frame["text_a"])


def test_glue_test_label_never_seen_in_training(tmp_path):
    """A local GLUE copy whose held-out split carries a label the training split lacks (GLUE's
    unlabelled test split uses -1)."""
    rt = load_raw(TaskSpec.from_config("rotten_tomatoes", {})).frame
    _glue_copy(tmp_path / "glue", rt)
    held = tmp_path / "glue" / "sst2" / "validation-00000-of-00001.parquet"
    frame = pd.read_parquet(held)
    frame.loc[frame.index[:5], "label"] = -1
    frame.to_parquet(held)
    spec = TaskSpec.from_config("sst2", {"source": "glue", "hub_path": str(tmp_path / "glue")})
    with pytest.raises(DataError) as info:
        make_splits(load_raw(spec), spec)
    assert f"GLUE sst2 at {tmp_path / 'glue'}" in str(info.value)
    assert "label(s) [-1] occur in the test split but never in the training split" in str(info.value)
