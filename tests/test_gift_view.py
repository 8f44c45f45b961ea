"""The GIFT token view on a real trained GIFT run (MiniLM-L6, a few steps on rotten_tomatoes)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from peftlab.config import RunKey, load_experiment
from peftlab.io import read_json, write_json

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gift_run(tmp_path_factory, tiny_task_dir, minilm_spec, repo):
    from peftlab.train import finetune

    out = tmp_path_factory.mktemp("gift_run")
    exp = load_experiment(repo / "config" / "experiments", "gift", "default")
    exp = type(exp)(exp.method, exp.variant, type(exp.training)(**(exp.training.to_dict() | {"max_steps": 4})),
                    exp.method_params, exp.files)
    key = RunKey("minilm-l6", "rotten_tomatoes", "gift", "default", 0)
    finetune(key, minilm_spec, exp, tiny_task_dir, out / "trainable.safetensors", out / "result.json", threads=1)
    return out


def test_tokens_are_clustered_by_gifts_first_projection(gift_run, tiny_task_dir, minilm_spec, tmp_path):
    from peftlab.data import load_split
    from peftlab.gift_view import frozen_output, gift_token_view
    from peftlab.methods import build_method
    from peftlab.methods.gift import gift_modules
    from peftlab.models import load_model

    rec = [str(gift_run / "result.json")]
    w = [str(gift_run / "trainable.safetensors")]
    view = gift_token_view(minilm_spec, tiny_task_dir, rec, w, tmp_path / "view.json")
    assert view["status"] == "completed" and view["role"] == "query" and view["r"] == 32
    assert (view["layer"], view["n_layers"]) == (5, 6)  # the last of MiniLM-L6's six layers
    assert 2 <= view["k"] <= 6 and view["silhouette"] == max(view["silhouette_by_k"].values())
    test = load_split(tiny_task_dir, "test")
    assert len(view["sentences"]) == 6
    assert {s["label"] for s in view["sentences"]} == {"negative", "positive"}
    n = 0
    for s in view["sentences"]:
        ids = test["input_ids"].iloc[s["row"]]
        assert len(s["tokens"]) == len(ids)  # every token, specials included
        n += len(ids)
        words = "".join((" " if t["space"] else "") + t["text"] for t in s["tokens"] if not t["special"])
        text = str(test["text"].iloc[s["row"]])
        if len(ids) < 40:  # not truncated: the tokens spell the sentence
            assert re.sub(r"\s+", " ", words).strip() == re.sub(r"\s+", " ", text).strip()
    assert view["n_tokens"] == n == sum(c["size"] for c in view["clusters"]) == len(view["pca"])
    # the clustered vectors are y W phi, y = h W^T + b the last query's frozen output (the
    # reference's pre-delta view), h the hidden state entering that layer: recompute one
    # sentence's from the pretrained query weights and the trained phi
    stats = read_json(tiny_task_dir / "stats.json")
    ft = read_json(gift_run / "result.json")
    model = load_model(minilm_spec, stats["num_labels"], stats["problem_type"], seed=0)
    query = model.base_model.encoder.layer[5].attention.self.query
    w_q, b_q = query.weight.detach().clone(), query.bias.detach().clone()
    model = build_method("gift", ft["config"]["method_params"], {}).load(model, w[0]).eval()
    phi = gift_modules(model, "query")[5][1].gift.phi.detach()
    s = view["sentences"][0]
    ids = torch.tensor([list(test["input_ids"].iloc[s["row"]])])
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states[5][0]
        z = ((h @ w_q.T + b_q) @ (w_q @ phi)).numpy()
        _, frozen = frozen_output(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "query", 5)
    assert torch.allclose(frozen[0], h @ w_q.T + b_q, atol=1e-5)  # what the view projects
    x = z / np.linalg.norm(z, axis=1, keepdims=True)
    labels = [t["cluster"] for t in s["tokens"]]
    # tokens of one cluster are closer to their own cluster's mean direction than to others'
    centers = {c: x[[i for i, lab in enumerate(labels) if lab == c]].mean(0) for c in set(labels)}
    if len(centers) > 1:
        own = np.mean([x[i] @ centers[lab] for i, lab in enumerate(labels)])
        other = np.mean([max(x[i] @ centers[c] for c in centers if c != lab) for i, lab in enumerate(labels)])
        assert own > other
    # deterministic: the same run gives the same view
    again = gift_token_view(minilm_spec, tiny_task_dir, rec, w, tmp_path / "again.json")
    strip = ("versions", "git_commit")
    assert {k: v for k, v in again.items() if k not in strip} == {k: v for k, v in view.items() if k not in strip}


def test_view_of_failed_gift_runs_says_so(gift_run, tiny_task_dir, minilm_spec, tmp_path):
    from peftlab.gift_view import gift_token_view

    failed = read_json(gift_run / "result.json") | {"status": "failed",
                                                     "failure": {"reason": "loss became nan at step 3", "step": 3}}
    write_json(tmp_path / "result.json", failed)
    view = gift_token_view(minilm_spec, tiny_task_dir, [str(tmp_path / "result.json")],
                           [str(gift_run / "trainable.safetensors")], tmp_path / "view.json")
    assert view["status"] == "failed" and "none of the 1 GIFT run(s)" in view["failure"]["reason"]
    assert json.loads((tmp_path / "view.json").read_text())["status"] == "failed"
