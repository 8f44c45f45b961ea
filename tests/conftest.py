"""Shared fixtures: offline hub, the real MiniLM-L6 model, a small real rotten_tomatoes task."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def peftlab_cache(tmp_path_factory):
    """One model cache for the whole session: MPNet/SmolLM2 are converted once, off $HOME."""
    cache = tmp_path_factory.mktemp("peftlab-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEFTLAB_CACHE", str(cache))
        yield cache
    shutil.rmtree(cache, ignore_errors=True)  # ~1 GB of converted weights: pytest keeps 3 runs


@pytest.fixture(scope="session")
def builtin_model_factory(peftlab_cache):
    """``factory(name, num_labels=2)`` -> (spec, tokenizer, fresh model seeded 0) for a built-in."""
    from peftlab.models import ModelSpec, load_model, load_tokenizer

    tokenizers = {}

    def factory(name: str, num_labels: int = 2, seed: int = 0):
        spec = ModelSpec.from_config(name, {})
        if name not in tokenizers:
            tokenizers[name] = load_tokenizer(spec)
        model = load_model(spec, num_labels, "single_label_classification", seed=seed)
        return spec, tokenizers[name], model

    return factory


@pytest.fixture(scope="session")
def smollm(peftlab_cache):
    """(spec, tokenizer) of SmolLM2-135M-Instruct, the built-in decoder of the generative tests."""
    from peftlab.models import ModelSpec, load_tokenizer

    spec = ModelSpec.from_config("smollm2-135m", {})
    return spec, load_tokenizer(spec)


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


@pytest.fixture(scope="session")
def minilm_task(tiny_task_dir, tmp_path_factory):
    """The tiny rotten_tomatoes task under a folder named after the task (runs are keyed by it)."""
    out = tmp_path_factory.mktemp("data") / "rotten_tomatoes"
    shutil.copytree(tiny_task_dir, out)
    return out
