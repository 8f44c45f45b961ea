"""The GIFT token view: GIFT's first projection applied to the tokens of a few test sentences
(on an image task, to the patch tokens of a few images: ``gift_images.py``).

GIFT generates a layer's weights as W' = W (I + phi psi) with one (phi, psi) per target role
shared by all layers (``methods/gift.py``). Its paper reads the first linear map, W phi, as a
token-clustering head: projecting the tokens of an input on it groups them into meaningful
parts. This module is the text counterpart: for a trained GIFT run it takes a few test
sentences and, in the last layer's target module, projects each token's frozen output
``x W^T + b`` (the layer's output before GIFT's residual, what the reference's visualiser
reads at ``pre_delta_identity``) on ``W phi`` (``gift_token_projection``: an r-dim vector
per token), clusters the
L2-normalised projections with k-means (k from 2..6 by silhouette) and writes
``gift_tokens.json``: every token with its text and cluster, per-cluster summaries and a
2-D PCA of the projections, which the report renders as coloured tokens and a scatter.

In: the (model, task)'s data folder, the GIFT runs' finetune records and stored weights.
Out: one JSON record (``status: failed`` with the reason when no GIFT run completed).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import load_split
from .errors import ConfigError
from .gift_images import image_views, labels_in_turn, module_output
from .io import read_json, write_json
from .methods import build_method
from .methods.gift import gift_modules, gift_token_projection
from .models import ModelSpec, load_model, load_tokenizer
from .provenance import git_commit, set_seed, versions

log = logging.getLogger(__name__)

# light backgrounds that keep black text readable (ColorBrewer Set3 / Pastel1)
CLUSTER_COLORS = ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5"]
K_RANGE = range(2, 7)


def pick_sentences(test, n: int, label_names: list[str], min_tokens: int = 8, max_tokens: int = 40) -> list[int]:
    """Row positions of ``n`` test sentences of moderate length, taking the labels in turn
    (file order within a label): deterministic and covering the classes."""
    lengths = test["input_ids"].map(len).to_numpy()
    ok = np.flatnonzero((lengths >= min_tokens) & (lengths <= max_tokens))
    if len(ok) < n:
        ok = np.arange(len(test))
    return labels_in_turn(test["label"].tolist(), ok, n)


def _display_tokens(tokenizer, text: str, ids: list[int]) -> list[dict]:
    """Token texts for display, with whether whitespace precedes each in the sentence: from
    the fast tokenizer's character offsets when re-encoding reproduces the stored ids, else
    from the token strings (WordPiece ``##``, byte-level ``Ġ``, SentencePiece ``▁``)."""
    specials = set(tokenizer.all_special_ids)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, truncation=True, max_length=len(ids), return_offsets_mapping=True)
        if list(enc["input_ids"]) == list(ids):
            out, prev_end = [], 0
            for tid, (a, b) in zip(ids, enc["offset_mapping"], strict=True):
                if tid in specials or a == b:
                    out.append({"text": tokenizer.convert_ids_to_tokens(tid), "space": bool(out), "special": True})
                    continue
                out.append({"text": text[a:b], "space": a > prev_end or (bool(out) and out[-1]["special"]),
                            "special": False})
                prev_end = b
            return out
    out = []
    for tid, tok in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True):
        special = tid in specials
        if tok.startswith("##"):
            out.append({"text": tok[2:], "space": False, "special": special})
        elif tok.startswith(("Ġ", "▁")):
            out.append({"text": tok[1:], "space": True, "special": special})
        else:
            out.append({"text": tok, "space": bool(out), "special": special})
    return out


def cluster_projections(z: np.ndarray, seed: int = 0) -> tuple[np.ndarray, int, float, dict[int, float]]:
    """k-means on L2-normalised rows; k in 2..6 (fewer for few tokens) by silhouette."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    best: tuple[float, int, np.ndarray] | None = None
    scores: dict[int, float] = {}
    for k in K_RANGE:
        if k >= len(x):
            break
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
        if len(set(labels)) < 2:
            continue
        scores[k] = float(silhouette_score(x, labels))
        if best is None or scores[k] > best[0]:
            best = (scores[k], k, labels)
    if best is None:
        return np.zeros(len(x), dtype=int), 1, float("nan"), scores
    return best[2], best[1], best[0], scores


def _pca2(z: np.ndarray) -> np.ndarray:
    x = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    x = x - x.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    out = u[:, :2] * s[:2]
    # fix the SVD's sign ambiguity so the figure is reproducible
    return out * np.where(out[np.argmax(np.abs(out), axis=0), range(out.shape[1])] < 0, -1, 1)


@torch.no_grad()
def frozen_output(model, batch: dict, role: str, layer: int):
    """The model's output on ``batch`` and, for the ``layer``-th GIFT module of ``role``, its
    frozen output x W^T + b (its input x as the forward saw it; GIFT's residual left out)."""
    return module_output(model, batch, gift_modules(model, role)[layer][1])


def _projection_role(model, roles: list[str]) -> tuple[str, int]:
    """The first target role of the variant and its last layer's index."""
    for role in roles:
        mods = gift_modules(model, role)
        if mods:
            return role, len(mods) - 1
    raise ConfigError(f"gift view: the model has no GIFT module of roles {roles}")


@torch.no_grad()
def gift_token_view(model_spec: ModelSpec, data_dir: str | Path, record_paths: list[str], weights_paths: list[str],
                    out_path: str | Path, n_sentences: int = 6, threads: int | None = None) -> dict[str, Any]:
    """Write the token view of the first completed GIFT run among ``record_paths``."""
    runs = [(read_json(r), w) for r, w in zip(record_paths, weights_paths, strict=True)]
    done = [(r, w) for r, w in runs if r.get("status") == "completed"]
    stats = read_json(Path(data_dir) / "stats.json")
    run_id = {"model": model_spec.name, "task": stats["task"]["name"], "method": "gift", "variant": "-", "seed": "-"}
    base = {"schema_version": 1, "rule": "gift_view", "versions": versions(), "git_commit": git_commit()}
    if not done:
        record = base | {"status": "failed", "run": run_id,
                         "failure": {"reason": f"none of the {len(runs)} GIFT run(s) of this task completed",
                                     "step": None}}
        write_json(out_path, record)
        return record
    ft, weights = done[0]
    set_seed(0, threads)
    run = {k: ft["run"][k] for k in ("model", "task", "method", "variant", "seed")}
    test = load_split(data_dir, "test")
    tokenizer = load_tokenizer(model_spec)
    model = load_model(model_spec, stats["num_labels"], stats["problem_type"], seed=int(run["seed"]))
    method = build_method("gift", ft["config"]["method_params"], model_spec.targets)
    model = method.load(model, weights).eval()
    role, layer = _projection_role(model, list(method.config.targets))
    head = base | {"status": "completed", "run": run, "role": role, "layer": layer,
                   "n_layers": len(gift_modules(model, role)), "r": int(method.config.r)}
    if stats.get("kind") == "image_classification":
        base_model = load_model(model_spec, stats["num_labels"], stats["problem_type"], seed=int(run["seed"])).eval()
        views = image_views(model, base_model, tokenizer, test, stats, role, layer, n_sentences)
        record = head | {"kind": "image", "images": views, "colors": CLUSTER_COLORS}
        write_json(out_path, record)
        log.info("gift patch view of %s: %d images", run, len(views))
        return record
    record = head | _token_clusters(model, tokenizer, test, stats, role, layer, n_sentences)
    write_json(out_path, record)
    log.info("gift view of %s: %d tokens in %d clusters (silhouette %.3f)", run, record["n_tokens"], record["k"],
             record["silhouette"])
    return record


def _token_clusters(model, tokenizer, test, stats: dict, role: str, layer: int, n_sentences: int) -> dict:
    """The text view: a few test sentences' tokens projected on W phi and clustered together."""
    rows = pick_sentences(test, n_sentences, stats.get("label_names") or [])
    sentences, vectors = [], []
    for i in rows:
        ids = [int(t) for t in test["input_ids"].iloc[i]]
        batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        if "token_type_ids" in test:
            batch["token_type_ids"] = torch.tensor([[int(t) for t in test["token_type_ids"].iloc[i]]])
        out, frozen = frozen_output(model, batch, role, layer)
        z = gift_token_projection(model, frozen[0], role, layer).float().numpy()
        vectors.append(z)
        label = test["label"].iloc[i]
        names = stats.get("label_names") or []
        pred = int(out.logits[0].argmax()) if stats["problem_type"] != "regression" else None
        sentences.append({"row": int(i), "label": names[int(label)] if names else label,
                          "predicted": names[pred] if names and pred is not None else pred,
                          "tokens": _display_tokens(tokenizer, str(test["text"].iloc[i]), ids)})
    z = np.concatenate(vectors)
    labels, k, silhouette, by_k = cluster_projections(z)
    pos = 0
    for s in sentences:
        for t in s["tokens"]:
            t["cluster"] = int(labels[pos])
            pos += 1
    clusters = []
    for c in range(k):
        words = Counter(t["text"].lower() for s in sentences for t in s["tokens"]
                        if t["cluster"] == c and not t["special"])
        specials = Counter(t["text"] for s in sentences for t in s["tokens"] if t["cluster"] == c and t["special"])
        clusters.append({"id": c, "size": int((labels == c).sum()), "color": CLUSTER_COLORS[c % len(CLUSTER_COLORS)],
                         "top_tokens": [w for w, _ in (specials + words).most_common(8)]})
    pca = _pca2(z)
    return {"k": int(k), "silhouette": silhouette, "silhouette_by_k": {str(kk): v for kk, v in by_k.items()},
            "n_tokens": int(len(z)), "sentences": sentences, "clusters": clusters,
            "pca": [[float(a), float(b), int(c)] for (a, b), c in zip(pca, labels, strict=True)]}
