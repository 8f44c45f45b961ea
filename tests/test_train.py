"""The training loop and evaluation on the real MiniLM-L6 and real rotten_tomatoes examples."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from peftlab.config import Experiment, RunKey, TrainConfig
from peftlab.evaluate import evaluate
from peftlab.metrics import classification_metrics, regression_metrics
from peftlab.train import Collator, finetune


def _experiment(method="lora", **training):
    params = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["query", "value"]}}.get(method, {})
    cfg = TrainConfig(**({"max_steps": 6, "batch_size": 16, "eval_batch_size": 32, "learning_rate": 1e-3,
                          "evals_per_epoch": 2, "log_every_steps": 2} | training))
    return Experiment(method, "default", cfg, params, ())


def _run(tmp_path, spec, data_dir, name, seed=0, method="lora", **training):
    key = RunKey("minilm-l6", "rotten_tomatoes", method, "default", seed)
    out = tmp_path / name
    rec = finetune(key, spec, _experiment(method, **training), data_dir, out / "w.safetensors",
                   out / "result.json", threads=1)
    return key, out, rec


def test_finetune_record_and_evaluate(tmp_path, minilm_spec, tiny_task_dir):
    key, out, rec = _run(tmp_path, minilm_spec, tiny_task_dir, "a")
    on_disk = json.loads((out / "result.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["steps"] == 6
    assert on_disk["trainable_params"] == 12 * 4 * 768 + 770
    assert 0 < on_disk["trainable_percent"] < 1
    assert [p["step"] for p in on_disk["curves"]["validation"]] == [2, 4, 6]
    assert on_disk["best_validation"]["step"] in (2, 4, 6)
    assert on_disk["best_validation"]["accuracy"] == max(p["accuracy"] for p in on_disk["curves"]["validation"])
    assert on_disk["peak_memory"]["host_rss_mb"] > 100
    assert on_disk["device"] == "cpu" and on_disk["precision"] == "fp32" and on_disk["device_name"] not in ("", "cpu")
    assert on_disk["versions"]["torch"].startswith("2.13")
    assert on_disk["stored_size_bytes"] == (out / "w.safetensors").stat().st_size
    assert on_disk["config"]["training"]["max_steps"] == 6
    ev = evaluate(key, minilm_spec, tiny_task_dir, out / "result.json", out / "w.safetensors", out / "metrics.json",
                  threads=1, predictions_path=out / "predictions.jsonl")
    assert ev["n_examples"] == 48
    assert set(ev["metrics"]) >= {"accuracy", "macro_f1", "mcc"}
    # the accuracy is that of the predictions written, one per test example
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 48 and ev["metrics"]["accuracy"] == pytest.approx(np.mean([r["correct"] for r in rows]))
    inf = ev["inference"]
    assert inf["mergeable"] and inf["merged_class"] == "BertForSequenceClassification"
    assert inf["merged_max_abs_diff"] <= 1e-5
    assert inf["added_latency_ratio"] == pytest.approx(inf["merged_ms_per_batch"] / inf["base_ms_per_batch"])


def test_same_seed_same_numbers_bitwise(tmp_path, minilm_spec, tiny_task_dir):
    _, _, a = _run(tmp_path, minilm_spec, tiny_task_dir, "a", method="bitfit", max_steps=4)
    _, _, b = _run(tmp_path, minilm_spec, tiny_task_dir, "b", method="bitfit", max_steps=4)
    _, _, c = _run(tmp_path, minilm_spec, tiny_task_dir, "c", seed=1, method="bitfit", max_steps=4)
    assert a["curves"]["train_loss"] == b["curves"]["train_loss"]
    assert a["curves"]["validation"] == b["curves"]["validation"]
    assert (tmp_path / "a" / "w.safetensors").read_bytes() == (tmp_path / "b" / "w.safetensors").read_bytes()
    assert a["curves"]["train_loss"] != c["curves"]["train_loss"]


def test_diverged_run_is_recorded_as_failed_not_crashed(tmp_path, minilm_spec, tiny_task_dir):
    """A learning rate far too high: the loss becomes NaN; the run stops there and is recorded
    as failed (status, reason, step) with a valid weights file; evaluation does not load it."""
    from safetensors.torch import load_file

    key, out, rec = _run(tmp_path, minilm_spec, tiny_task_dir, "nan", method="full", learning_rate=1.0e4)
    on_disk = json.loads((out / "result.json").read_text())
    assert on_disk == json.loads(json.dumps(rec, default=str))
    assert rec["status"] == "failed" and rec["failure"]["step"] == 2 == rec["steps"]
    assert rec["failure"]["reason"].startswith("loss became NaN at step 2; lower learning_rate (now 10000.0)")
    assert "on_nonfinite_loss: skip" in rec["failure"]["reason"] and "\n" not in rec["failure"]["reason"]
    assert all(np.isfinite(loss) for _, loss in rec["curves"]["train_loss"])  # no NaN in the curves
    stored = load_file(str(out / "w.safetensors"))  # a valid file of the method's tensors
    assert len(stored) == len([p for p in _fresh_full_model(minilm_spec).parameters()])
    (out / "w.safetensors").unlink()  # evaluation of a failed run must not need the weights
    ev = evaluate(key, minilm_spec, tiny_task_dir, out / "result.json", out / "w.safetensors",
                  out / "metrics.json", threads=1)
    assert ev["status"] == "failed" and ev["metrics"] == {} and ev["failure"] == rec["failure"]
    assert json.loads((out / "metrics.json").read_text())["status"] == "failed"


def _fresh_full_model(spec):
    from peftlab.models import load_model

    return load_model(spec, 2, "single_label_classification", seed=0)


def test_failed_runs_are_failed_in_mlflow(tmp_path, minilm_spec, tiny_task_dir, monkeypatch):
    from peftlab.tracking import log_record, runs_table

    # runs_table (mlflow.set_tracking_uri) exports MLFLOW_TRACKING_URI: undone after the test
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    key, out, rec = _run(tmp_path, minilm_spec, tiny_task_dir, "nan", method="full", learning_rate=1.0e4)
    ev = evaluate(key, minilm_spec, tiny_task_dir, out / "result.json", out / "w.safetensors",
                  out / "metrics.json", threads=1)
    mlflow_cfg = {"experiment": "failures", "default_store": str(tmp_path / "mlflow.db")}
    assert log_record(rec, out / "result.json", mlflow_cfg) is not None
    assert log_record(ev, out / "metrics.json", mlflow_cfg) is not None
    runs = runs_table(mlflow_cfg)
    assert sorted(runs["tags.rule"]) == ["evaluate", "finetune"]
    assert set(runs["status"]) == {"FAILED"} and set(runs["tags.status"]) == {"failed"}
    assert not [c for c in runs if c.startswith("metrics.test_")]  # no score from a failed run


def _outlier_task(tmp_path, tokenizer):
    """A real regression file whose one label is absurdly large (1e30, a valid number): the
    squared error of the batch holding it overflows float32 to inf."""
    import pandas as pd

    from peftlab.data import TaskSpec, prepare_task

    rng = np.random.default_rng(0)
    words = ["great", "fine", "dull", "awful", "superb", "bad"]
    df = pd.DataFrame({"text": [" ".join(rng.choice(words, 6)) + f" {i}" for i in range(80)]})
    df["score"] = (df["text"].str.count("great|superb") - df["text"].str.count("awful|bad")).astype(float)
    df.loc[7, "score"] = 1e30
    df.to_csv(tmp_path / "scores.csv", index=False)
    spec = TaskSpec.from_config("scores", {"source": "file", "path": str(tmp_path / "scores.csv"),
                                           "label_column": "score", "problem_type": "regression"})
    prepare_task(spec, tokenizer, tmp_path / "data")
    return tmp_path / "data"


def test_inf_loss_stops_or_skips_the_batch_as_configured(tmp_path, minilm_spec, minilm_tokenizer):
    data = _outlier_task(tmp_path, minilm_tokenizer)
    key = RunKey("minilm-l6", "scores", "bitfit", "default", 0)
    runs = {}
    for policy in ("stop", "skip"):
        runs[policy] = finetune(key, minilm_spec, _experiment("bitfit", max_steps=8, on_nonfinite_loss=policy),
                                data, tmp_path / policy / "w.safetensors", tmp_path / policy / "r.json", threads=1)
    stop, skip = runs["stop"], runs["skip"]
    assert stop["status"] == "failed" and stop["skipped_batches"] == 0
    k = stop["failure"]["step"]
    assert stop["failure"]["reason"].startswith(f"loss became inf at step {k}; ") and k < 8
    # skip: the same batch is dropped (no optimizer step), training goes on to max_steps
    assert skip["status"] == "completed" and skip["failure"] is None and skip["steps"] == 8
    assert skip["skipped_batches"] >= 1
    assert all(np.isfinite(loss) for _, loss in skip["curves"]["train_loss"])
    # the steps before the bad batch are the same in both runs
    assert [p for p in skip["curves"]["train_loss"] if p[0] <= k] == [p for p in stop["curves"]["train_loss"]]


def test_skip_gives_up_when_no_batch_is_finite(tmp_path, minilm_spec, tiny_task_dir):
    _, _, rec = _run(tmp_path, minilm_spec, tiny_task_dir, "skip", method="full", learning_rate=1.0e4,
                     on_nonfinite_loss="skip")
    assert rec["status"] == "failed"
    assert "batches in a row (a whole epoch skipped)" in rec["failure"]["reason"]
    assert rec["skipped_batches"] == 4  # the tiny task's 64 training examples at batch 16


def test_collator_pads_dynamically():
    col = Collator(pad_token_id=0, regression=False)
    batch = col([{"input_ids": np.array([5, 6, 7]), "label": 1}, {"input_ids": np.array([5]), "label": 0}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].dtype == torch.long


def test_metrics_known_values():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    m = classification_metrics(logits, np.array([0, 1, 1, 1]))
    assert m["accuracy"] == 0.75
    assert m["f1"] == pytest.approx(0.8)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["mcc"] == pytest.approx(1 / np.sqrt(3))
    r = regression_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 5.0]))
    assert r["spearman"] == pytest.approx(1.0) and 0.9 < r["pearson"] < 1.0


def test_train_config_is_a_frozen_dataclass():
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3


def test_regression_task_trains_and_scores(tmp_path, minilm_spec, minilm_tokenizer):
    import pandas as pd

    from peftlab.data import TaskSpec, prepare_task

    rng = np.random.default_rng(0)
    words = ["great", "fine", "dull", "awful", "superb", "bad"]
    df = pd.DataFrame({"text": [" ".join(rng.choice(words, 6)) for _ in range(80)]})
    df["score"] = df["text"].str.count("great|superb") - df["text"].str.count("awful|bad")
    df.to_csv(tmp_path / "scores.csv", index=False)
    spec = TaskSpec.from_config("scores", {"source": "file", "path": str(tmp_path / "scores.csv"),
                                           "label_column": "score", "problem_type": "regression"})
    prepare_task(spec, minilm_tokenizer, tmp_path / "data")
    key = RunKey("minilm-l6", "scores", "bitfit", "default", 0)
    rec = finetune(key, minilm_spec, _experiment("bitfit", max_steps=4), tmp_path / "data",
                   tmp_path / "w.safetensors", tmp_path / "r.json", threads=1)
    assert rec["main_metric"] == "pearson" and "pearson" in rec["best_validation"]
    assert rec["final_validation"]["step"] == 4
    ev = evaluate(key, minilm_spec, tmp_path / "data", tmp_path / "r.json", tmp_path / "w.safetensors",
                  tmp_path / "m.json", threads=1)
    assert set(ev["metrics"]) == {"pearson", "spearman", "mse"}


def test_eval_steps_evenly_spaced_never_a_step_apart():
    from peftlab.train import eval_steps

    assert eval_steps(63, 2, 63) == {32, 63}
    assert eval_steps(63, 2, 189) == {32, 63, 95, 126, 158, 189}
    assert eval_steps(4, 2, 6) == {2, 4, 6}
    assert eval_steps(3, 5, 3) == {1, 2, 3}
    assert eval_steps(10, 1, 7) == {7}


def test_length_sorted_eval_loader_keeps_row_order(minilm_spec, minilm_tokenizer, tiny_task_dir):
    from peftlab.data import load_split
    from peftlab.models import load_model
    from peftlab.train import make_eval_loader, make_loader, predict

    df = load_split(tiny_task_dir, "validation")
    collator = Collator(minilm_tokenizer.pad_token_id, False)
    sorted_loader = make_eval_loader(df, 16, collator)
    lengths = [int(b["attention_mask"].sum(1).max()) for b in sorted_loader]
    assert lengths == sorted(lengths)
    model = load_model(minilm_spec, 2, "single_label_classification", seed=0)
    plain_out, plain_labels = predict(model, make_loader(df, 16, collator, shuffle=False), torch.device("cpu"))
    out, labels = predict(model, sorted_loader, torch.device("cpu"))
    np.testing.assert_array_equal(labels, plain_labels)
    np.testing.assert_allclose(out, plain_out, atol=1e-5)


def test_every_training_step_runs_in_train_mode(tmp_path, minilm_spec, tiny_task_dir, monkeypatch):
    """Validation (eval mode) mid-epoch must not leave dropout off for the epoch's remaining steps."""
    import peftlab.train as train_mod

    real = train_mod.load_model
    modes: list[bool] = []

    def recording_model(*args, **kwargs):
        model = real(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, a, k: modes.append(m.training) if k.get("labels") is not None else None,
                                        with_kwargs=True)
        return model

    monkeypatch.setattr(train_mod, "load_model", recording_model)
    _run(tmp_path, minilm_spec, tiny_task_dir, "modes", max_steps=6)  # validation after steps 2 and 4
    assert len(modes) == 6 and all(modes), modes


def test_length_grouped_batches_cover_every_row_once_with_little_padding(tiny_task_dir):
    from peftlab.data import load_split
    from peftlab.train import LengthGroupedBatches

    lengths = load_split(tiny_task_dir, "train")["input_ids"].map(len).tolist()
    for group in (1, 2, 50):
        gen = torch.Generator().manual_seed(3)
        sampler = LengthGroupedBatches(lengths, 5, gen, group=group)
        epochs = [list(sampler) for _ in range(2)]
        for batches in epochs:
            assert len(batches) == len(sampler)
            assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
            assert all(len(b) <= 5 for b in batches)
        assert epochs[0] != epochs[1]  # a new shuffle each epoch
        again = LengthGroupedBatches(lengths, 5, torch.Generator().manual_seed(3), group=group)
        assert [list(again) for _ in range(2)] == epochs  # seeded: the same batches

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    grouped = list(LengthGroupedBatches(lengths, 8, torch.Generator().manual_seed(0)))
    perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    plain = [perm[k:k + 8] for k in range(0, len(perm), 8)]
    assert padded(grouped) < padded(plain)


def test_record_has_steady_state_throughput(tmp_path, minilm_spec, tiny_task_dir):
    _, _, rec = _run(tmp_path, minilm_spec, tiny_task_dir, "speed", max_steps=8)
    tp = rec["train_throughput"]
    assert tp["steps"] == 8 - tp["warmup_steps"] == 3
    # the rates are the counts over the timed seconds: 3 steps of 16 rows
    assert tp["examples_per_s"] == pytest.approx(3 * 16 / tp["seconds"])
    assert tp["steps_per_s"] == pytest.approx(3 / tp["seconds"]) and tp["seconds"] <= rec["train_time_s"]
    assert tp["tokens_per_s"] == pytest.approx((1 - tp["padding_share"]) * tp["padded_tokens_per_s"])
    assert tp["tokens_per_s"] <= tp["padded_tokens_per_s"]
    assert 0 <= tp["padding_share"] < 1
    assert rec["config"]["training"]["group_by_length"] is True


def test_deferred_loss_readback_gives_the_same_run(tmp_path, minilm_spec, tiny_task_dir, monkeypatch):
    """On a GPU the loop reads losses back only at logging / validation / checkpoint steps;
    forced on here, it gives the very same run (curves, weights), and a NaN is still caught
    and named at the step where it came, with no NaN in the curves."""
    import peftlab.train as train

    _, _, now = _run(tmp_path, minilm_spec, tiny_task_dir, "now", method="bitfit", max_steps=5, log_every_steps=3)
    _, _, nan_now = _run(tmp_path, minilm_spec, tiny_task_dir, "nan_now", method="full", learning_rate=1.0e4)
    monkeypatch.setattr(train, "defer_loss_readback", lambda dev: True)
    _, _, later = _run(tmp_path, minilm_spec, tiny_task_dir, "later", method="bitfit", max_steps=5, log_every_steps=3)
    _, _, nan_later = _run(tmp_path, minilm_spec, tiny_task_dir, "nan_later", method="full", learning_rate=1.0e4)
    assert later["curves"] == now["curves"] and later["best_validation"] == now["best_validation"]
    assert (tmp_path / "later" / "w.safetensors").read_bytes() == (tmp_path / "now" / "w.safetensors").read_bytes()
    assert nan_now["failure"]["step"] == 2 and nan_later["status"] == "failed"
    assert nan_later["failure"] == nan_now["failure"]  # found later (at a logging step), named at its own step
    assert nan_later["steps"] >= nan_now["steps"]
    assert all(np.isfinite(loss) for _, loss in nan_later["curves"]["train_loss"])


def test_precision_setting_and_record(tmp_path, minilm_spec, tiny_task_dir):
    """auto is fp32 on a CPU (the bitwise-reproducible default); bf16 asks for autocast on any
    device and the record says which ran; an unknown value is refused by name."""
    _, _, auto = _run(tmp_path, minilm_spec, tiny_task_dir, "auto", method="lora", max_steps=2)
    _, out, bf16 = _run(tmp_path, minilm_spec, tiny_task_dir, "bf16", method="lora", max_steps=2, precision="bf16")
    assert auto["precision"] == "fp32" and bf16["precision"] == "bf16 autocast"
    assert bf16["status"] == "completed" and np.isfinite(bf16["curves"]["train_loss"][-1][1])
    assert bf16["curves"]["train_loss"] != auto["curves"]["train_loss"]  # autocast really ran
    with pytest.raises(ValueError, match="precision must be auto, fp32 or bf16, got 'fp16'"):
        TrainConfig(precision="fp16")


def test_every_method_trains_under_bf16_autocast(tmp_path, minilm_spec, tiny_task_dir):
    """What a GPU run does by default (precision auto = bf16 autocast there), on the CPU: every
    method's default variant trains and validates, with a finite loss."""
    from peftlab.config import REPO_ROOT, load_experiment
    from peftlab.methods import METHODS

    for name in sorted(METHODS):
        exp = load_experiment(REPO_ROOT / "config" / "experiments", name, "default")
        exp = dataclasses.replace(exp, training=dataclasses.replace(exp.training, max_steps=2, precision="bf16"))
        key = RunKey("minilm-l6", "rotten_tomatoes", name, "default", 0)
        rec = finetune(key, minilm_spec, exp, tiny_task_dir, tmp_path / name / "w.safetensors",
                       tmp_path / name / "r.json", threads=1)
        assert rec["status"] == "completed" and rec["precision"] == "bf16 autocast", name
        assert np.isfinite(rec["curves"]["train_loss"][-1][1]) and rec["curves"]["validation"], name


def test_latency_probe_stops_repeating_a_slow_pass():
    """One warm-up pass, then ``repeats`` timed passes, fewer once they add up to the budget
    (a decoder's probe on a CPU takes seconds per pass): the passes made are counted."""
    import time

    from peftlab.evaluate import forward_latency_ms

    class Counting(torch.nn.Module):
        def __init__(self, seconds: float):
            super().__init__()
            self.seconds, self.calls = seconds, 0

        def forward(self, input_ids):
            self.calls += 1
            time.sleep(self.seconds)
            return input_ids

    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long)}
    fast, slow = Counting(0.001), Counting(0.02)
    assert forward_latency_ms(fast, batch) >= 1.0 and fast.calls == 4  # warm-up + 3
    assert forward_latency_ms(slow, batch, budget_s=0.03) >= 20.0 and slow.calls == 3  # warm-up + 2 (0.04 s)
    slow.calls = 0
    forward_latency_ms(slow, batch, budget_s=0.0)
    assert slow.calls == 2  # warm-up + 1: always one timed pass
