"""Shared fixtures: offline hub, the real MiniLM-L6 model, a small real rotten_tomatoes task."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def minilm_spec():
    from peftlab.models import ModelSpec

    return ModelSpec.from_config("minilm-l6", {})


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_spec):
    from peftlab.models import load_tokenizer

    return load_tokenizer(minilm_spec)


@pytest.fixture(scope="session")
def tiny_task_dir(tmp_path_factory, minilm_tokenizer) -> Path:
    """rotten_tomatoes, capped to a few dozen examples, tokenized for MiniLM-L6."""
    from peftlab.data import TaskSpec, prepare_task

    spec = TaskSpec.from_config(
        "rotten_tomatoes", {"max_train_examples": 64, "max_eval_examples": 48, "max_length": 40}
    )
    out = tmp_path_factory.mktemp("tiny_task")
    prepare_task(spec, minilm_tokenizer, out, model_name="minilm-l6")
    return out
