"""Config validation (one-line errors), experiment layering, schema enum = method registry."""

from __future__ import annotations

import copy

import pytest
import yaml

from peftlab.config import (
    TrainConfig,
    iter_runs,
    load_experiment,
    load_schema,
    load_yaml,
    validate_config,
)
from peftlab.errors import ConfigError
from peftlab.methods import METHODS


@pytest.fixture()
def config(repo, monkeypatch):
    monkeypatch.chdir(repo)
    return load_yaml(repo / "config" / "config.yaml")


def test_default_config_is_valid_and_gets_defaults(config):
    cfg = validate_config(config)
    assert cfg["experiments_dir"] == "config/experiments"
    assert cfg["results_dir"] == "results"
    assert cfg["mlflow"]["experiment"] == "peftlab"
    runs = list(iter_runs(cfg))
    # the default runs every registered method's default variant, and both analyses
    from peftlab.methods import METHODS

    assert {r.method for r in runs} == set(METHODS) and {r.variant for r in runs} == {"default"}
    assert len(runs) == len(cfg["models"]) * len(cfg["tasks"]) * len(METHODS) * len(cfg["seeds"])
    assert cfg["analyses"]["intrinsic_dimension"]["dims"] and cfg["analyses"]["gradient_sparsity"]["enabled"]


def test_schema_method_enum_equals_registry():
    schema = load_schema("config")
    assert sorted(schema["properties"]["methods"]["propertyNames"]["enum"]) == sorted(METHODS)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c["methods"].update(lorra=["default"]), ["methods", "'lorra'", "bitfit"]),
        (lambda c: c.update(seeds=[-1]), ["seeds.0", "-1", "minimum"]),
        (lambda c: c.update(seeds="zero"), ["seeds", "'zero'", "expected a list"]),
        (lambda c: c.update(modles={}), ["modles", "allowed keys"]),
        (lambda c: c["tasks"].update(rotten_tomatoes={"max_length": 2}), ["tasks.rotten_tomatoes.max_length", "2"]),
        (lambda c: c["tasks"].update(bbc_news={"source": "s3"}), ["tasks.bbc_news.source", "'s3'", "glue"]),
        (lambda c: c["methods"].update(lora=["nope"]), ["lora", "nope", "config/experiments/lora/nope.yaml"]),
        (lambda c: c["tasks"].update(mystery={}), ["mystery", "source: glue"]),
        (lambda c: c["models"].update(mystery={}), ["mystery", "pretrained"]),
        (lambda c: c["tasks"].update(t={"source": "file"}), ["t", "path"]),
        (lambda c: c["analyses"]["intrinsic_dimension"].update(dims=[0]), ["dims", "0", "minimum"]),
        (lambda c: c["analyses"]["intrinsic_dimension"].update(kind="lora"), ["kind", "'lora'", "said"]),
        (lambda c: c["analyses"]["intrinsic_dimension"].update(training={"lr": 1.0}),
         ["analyses.intrinsic_dimension", "training", "unknown key 'lr'"]),
        (lambda c: c["analyses"]["intrinsic_dimension"].update(reference="nope"),
         ["'analyses.intrinsic_dimension.reference' = 'nope'", "config/experiments/full/nope.yaml"]),
        (lambda c: c["analyses"]["gradient_sparsity"].update(batches=0), ["batches", "0", "minimum"]),
        (lambda c: c["analyses"].update(id={}), ["'id'", "allowed keys"]),
        # published numbers for the report's paper column: a task, model and metric of this config, a fraction
        (lambda c: c.update(paper_results={"rotten_tomato": {"lora": {"value": 0.8, "source": "T1"}}}),
         ["'paper_results.rotten_tomato'", "did you mean 'rotten_tomatoes'"]),
        (lambda c: c.update(paper_results={"rotten_tomatoes": {"lora": {"value": 68.9, "source": "T1"}}}),
         ["'paper_results.rotten_tomatoes.lora.value' = 68.9", "write 68.9% as 0.689"]),
        (lambda c: c.update(paper_results={"rotten_tomatoes": {"lora": {"value": 0.8, "source": "T1",
                                                                        "metric": "bleu"}}}),
         ["'paper_results.rotten_tomatoes.lora.metric' = 'bleu'", "accuracy, macro_f1"]),
        (lambda c: c.update(paper_results={"rotten_tomatoes": {"lora": {"value": 0.8}}}),
         ["'paper_results.rotten_tomatoes.lora'", "source"]),
        (lambda c: c.update(paper_results={"rotten_tomatoes": {"lora": {"value": 0.8, "source": "T1",
                                                                        "model": "llama"}}}),
         ["'paper_results.rotten_tomatoes.lora.model' = 'llama'", "minilm-l6"]),
        (lambda c: c.update(paper_results={"rotten_tomatoes": {"lora": [{"value": 0.8, "source": "T1"},
                                                                         {"value": 0.7, "source": "T2"}]}}),
         ["'paper_results.rotten_tomatoes.lora' gives two numbers for model None", "one per model"]),
        (lambda c: c.update(paper_results={"rotten_tomatoes": {"lora": [{"value": 80, "source": "T1"}]}}),
         ["'paper_results.rotten_tomatoes.lora[0].value' = 80"]),
    ],
)
def test_bad_config_gives_one_line_error(config, mutate, expected):
    bad = copy.deepcopy(config)
    mutate(bad)
    with pytest.raises(ConfigError) as info:
        validate_config(bad)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, (part, message)


def test_experiment_layering_overrides_defaults(repo):
    exp = load_experiment(repo / "config" / "experiments", "lora", "default")
    defaults = load_yaml(repo / "config" / "experiments" / "defaults.yaml")["training"]
    variant = load_yaml(repo / "config" / "experiments" / "lora" / "default.yaml")
    assert exp.training.learning_rate == variant["training"]["learning_rate"]
    assert exp.training.batch_size == defaults["batch_size"]  # inherited
    assert exp.method_params == variant["method"]
    assert exp.resolved()["training"] == exp.training.to_dict()


def test_config_training_wins_over_every_variant(config):
    """The config's ``training`` (a preset's budget) sits over defaults.yaml and each variant,
    the intrinsic-dimension runs start from it, and a bad value names the config key."""
    from peftlab.config import analysis_training

    budget = {"max_steps": 5, "evals_per_epoch": 1}
    exp = load_experiment("config/experiments", "lora", "default", budget)
    plain = load_experiment("config/experiments", "lora", "default")
    assert (exp.training.max_steps, exp.training.evals_per_epoch) == (5, 1)
    assert exp.training.learning_rate == plain.training.learning_rate  # the variant's, untouched
    cfg = validate_config({**config, "training": budget})
    id_cfg = {**cfg, "analyses": {**cfg["analyses"], "intrinsic_dimension": {
        **cfg["analyses"]["intrinsic_dimension"], "training": {"evals_per_epoch": 3}}}}
    assert (analysis_training(id_cfg).max_steps, analysis_training(id_cfg).evals_per_epoch) == (5, 3)
    with pytest.raises(ConfigError, match=r"^config: .*batch_size") as info:
        validate_config({**config, "training": {"batch_size": 0}})
    assert "\n" not in str(info.value)


def test_a_task_of_its_own_settings_sits_between_the_variant_and_the_config(tmp_path, repo):
    """A paper's per-task settings (``tasks:`` in a variant file): the run's task entry wins
    over the variant's keys, the config's ``training`` and tuning's point win over it, and
    other tasks keep the variant's."""
    _write_variant(tmp_path, repo, "lora", "paper", {
        "training": {"epochs": 30, "learning_rate": 4e-4}, "method": {"r": 8},
        "tasks": {"rte": {"training": {"epochs": 80, "learning_rate": 5e-4}}, "cola": {"method": {"r": 4}}}})
    rte = load_experiment(tmp_path, "lora", "paper", task="rte")
    assert (rte.training.epochs, rte.training.learning_rate, rte.method_params["r"]) == (80, 5e-4, 8)
    assert load_experiment(tmp_path, "lora", "paper", task="cola").method_params["r"] == 4
    sst2 = load_experiment(tmp_path, "lora", "paper", task="sst2")
    assert (sst2.training.epochs, sst2.training.learning_rate) == (30, 4e-4)
    assert set(rte.task_settings) == {"rte", "cola"}
    budget = load_experiment(tmp_path, "lora", "paper", {"epochs": 2}, task="rte")
    assert (budget.training.epochs, budget.training.learning_rate) == (2, 5e-4)
    tuned = load_experiment(tmp_path, "lora", "paper", None, {"training": {"learning_rate": 1e-3}}, task="rte")
    assert (tuned.training.epochs, tuned.training.learning_rate) == (80, 1e-3)


def _write_variant(tmp_path, repo, method, variant, body):
    (tmp_path / method).mkdir(parents=True, exist_ok=True)
    (tmp_path / "defaults.yaml").write_text((repo / "config/experiments/defaults.yaml").read_text())
    (tmp_path / method / f"{variant}.yaml").write_text(yaml.safe_dump(body))


@pytest.mark.parametrize(
    ("method", "body", "expected"),
    [
        ("lora", {"method": {"r": 0}}, "r must be a positive integer"),
        ("lora", {"method": {"rank": 4}}, "unknown parameter(s) ['rank']"),
        ("lora", {"method": {"targets": ["qkv"]}}, "targets ['qkv'] invalid"),
        ("full", {"training": {"learning_rate": -1}}, "learning_rate"),
        ("full", {"training": {"lr_scheduler": "step"}}, "'step' is not allowed"),
        ("full", {"training": {"epochs": 2, "batchsize": 3}}, "batchsize"),
        ("lora", {"tasks": {"rte": {"training": {"epochz": 80}}}}, "'epochz' under 'tasks.rte.training'"),
        ("lora", {"tasks": {"rte": {"seeds": [1]}}}, "'tasks.rte.seeds' is not allowed"),
        ("lora", {"tasks": ["rte"]}, "'tasks' must map task names"),
    ],
)
def test_bad_experiment_gives_one_line_error(tmp_path, repo, method, body, expected):
    _write_variant(tmp_path, repo, method, "bad", body)
    with pytest.raises(ConfigError) as info:
        load_experiment(tmp_path, method, "bad")
    assert expected in str(info.value)
    assert "bad.yaml" in str(info.value)
    assert "\n" not in str(info.value)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("models:\n  a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml line \d+: not valid YAML"):
        load_yaml(path)


def test_train_config_validates():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    assert TrainConfig().lr_scheduler == "linear"


def test_method_settings_are_the_registrys_and_validation_imports_no_torch(repo):
    """The DAG build checks every variant's method settings through ``method_configs`` (one
    torch-free module per method): the same classes the methods train with, and validating a
    config of every method (default config, SIFT's analysis variants) never imports torch."""
    import subprocess
    import sys

    from peftlab.method_configs import config_class, method_names

    assert method_names() == sorted(METHODS)
    assert {m: config_class(m) for m in METHODS} == {m: cls.config_cls for m, cls in METHODS.items()}
    with pytest.raises(ConfigError, match="unknown method 'loraa'"):
        config_class("loraa")
    code = ("import sys; from peftlab.config import load_yaml, validate_config, sift_analysis_variants; "
            "cfg = validate_config(load_yaml('config/config.yaml')); sift_analysis_variants(cfg); "
            "print(sorted(cfg['methods']), 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    assert out.stdout.split("]")[-1].split() == ["False", "False"], out.stdout
    assert out.stdout.startswith(str(sorted(METHODS)))
