"""Malformed configurations a user could write, each with what its error must name.

Every case starts from a valid tiny configuration (``base_config``) and a private copy of
the tiny experiment files; ``mutate`` breaks one thing (a key, a value, a file). ``expect``
lists what the one-line error must contain: the key, the bad value, what is allowed.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    id: str
    mutate: Callable[[dict, Path], None]  # (config, experiments dir) -> None, in place
    expect: tuple[str, ...]


def base_config(exp_dir: Path) -> dict:
    return {
        "models": {"minilm-l6": {}},
        "tasks": {"rotten_tomatoes": {"max_train_examples": 96, "max_eval_examples": 64, "max_length": 48}},
        "methods": {"full": ["default"], "lora": ["default"]},
        "seeds": [0, 1],
        "experiments_dir": str(exp_dir),
        "threads": 1,
        "analyses": {
            "intrinsic_dimension": {"dims": [150, 600], "training": {"max_steps": 3, "learning_rate": 1.0e-3}},
            "gradient_sparsity": {"enabled": True, "batches": 2},
        },
    }


def experiments_copy(dest: Path) -> Path:
    shutil.copytree(REPO / "tests" / "configs" / "experiments", dest)
    return dest


def _set(path: str, value) -> Callable[[dict, Path], None]:
    """Set a dotted key of the config (creating mappings on the way)."""
    def mutate(cfg: dict, exp: Path) -> None:
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return mutate


def _drop(key: str) -> Callable[[dict, Path], None]:
    return lambda cfg, exp: cfg.pop(key)


def _write(rel: str, text: str) -> Callable[[dict, Path], None]:
    """Write an experiment file (relative to the experiments dir)."""
    def mutate(cfg: dict, exp: Path) -> None:
        (exp / rel).parent.mkdir(parents=True, exist_ok=True)
        (exp / rel).write_text(text, encoding="utf-8")
    return mutate


def _variant(method: str, text: str, variant: str = "bad") -> Callable[[dict, Path], None]:
    """A new variant file of ``method`` used by the config."""
    def mutate(cfg: dict, exp: Path) -> None:
        _write(f"{method}/{variant}.yaml", text)(cfg, exp)
        cfg["methods"] = {method: [variant]}
    return mutate


def _both(*fns) -> Callable[[dict, Path], None]:
    def mutate(cfg: dict, exp: Path) -> None:
        for fn in fns:
            fn(cfg, exp)
    return mutate


def _local_file(name: str, text: str, entry: dict) -> Callable[[dict, Path], None]:
    """A file task whose data file sits next to the experiments dir."""
    def mutate(cfg: dict, exp: Path) -> None:
        path = exp.parent / name
        path.write_text(text, encoding="utf-8")
        cfg["tasks"] = {"mine": {"source": "file", "path": str(path), **entry}}
    return mutate


def _model_folder(files: dict[str, str], entry: dict | None = None) -> Callable[[dict, Path], None]:
    def mutate(cfg: dict, exp: Path) -> None:
        folder = exp.parent / "my-model"
        folder.mkdir(exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text)
        cfg["models"] = {"mine": {"pretrained": str(folder), **(entry or {})}}
    return mutate


CSV = "text,label\ngood film,pos\nbad film,neg\n"
BERT_CONFIG = '{"model_type": "bert"}'

CASES: list[Case] = [
    # --- top level: typos, missing keys, wrong types -------------------------------------------
    Case("unknown-top-level-key", _set("seed", [0]), ("unknown key 'seed'", "did you mean 'seeds'", "allowed keys")),
    Case("missing-methods", _drop("methods"), ("missing required key 'methods'", "variants")),
    Case("missing-models", _drop("models"), ("missing required key 'models'",)),
    Case("models-empty", _set("models", {}), ("'models'", "is empty", "at least 1")),
    Case("models-a-list", _set("models", ["minilm-l6"]), ("'models'", "['minilm-l6']", "expected a mapping")),
    Case("tasks-a-string", _set("tasks", "rotten_tomatoes"), ("'tasks'", "'rotten_tomatoes'", "expected a mapping")),
    Case("results-dir-null", _set("results_dir", None), ("'results_dir' = None", "expected a string")),
    Case("task-entry-a-list", _set("tasks", {"rotten_tomatoes": [{"max_length": 64}]}),
         ("'tasks.rotten_tomatoes' = [{'max_length': 64}]", "expected a mapping or null")),
    Case("threads-zero", _set("threads", 0), ("'threads' = 0", "minimum of 1")),
    Case("threads-text", _set("threads", "two"), ("'threads' = 'two'", "expected an integer")),
    Case("threads-float", _set("threads", 1.5), ("'threads' = 1.5", "expected an integer")),
    # --- seeds ---------------------------------------------------------------------------------
    Case("seeds-empty", _set("seeds", []), ("'seeds' = []", "at least 1")),
    Case("seeds-negative", _set("seeds", [0, -1]), ("'seeds.1' = -1", "minimum of 0")),
    Case("seeds-duplicate", _set("seeds", [0, 0]), ("'seeds' = [0, 0]", "lists 0 more than once")),
    Case("seeds-a-number", _set("seeds", 0), ("'seeds' = 0", "expected a list")),
    Case("seeds-comma-text", _set("seeds", "0, 1"), ("'seeds' = '0, 1'", "expected a list", "[0, 1]")),
    Case("seeds-float", _set("seeds", [0.5]), ("'seeds.0' = 0.5", "expected an integer")),
    # --- models --------------------------------------------------------------------------------
    Case("model-unknown-name", _set("models", {"minilm": {}}),
         ("'models.minilm'", "not a built-in model", "did you mean 'minilm-l6'", "pretrained")),
    Case("model-name-with-space", _set("models", {"mini lm": {}}),
         ("key 'mini lm' under 'models'", "letters, digits")),
    Case("model-unknown-key", _set("models.minilm-l6", {"pretrain": "x"}),
         ("unknown key 'pretrain'", "'models.minilm-l6'", "did you mean 'pretrained'")),
    Case("model-pretrained-number", _set("models", {"mine": {"pretrained": 123}}),
         ("'models.mine.pretrained' = 123", "expected a string")),
    Case("model-folder-missing", _set("models", {"mine": {"pretrained": "./no/such/folder"}}),
         ("'models.mine.pretrained' = './no/such/folder'", "does not exist")),
    Case("model-folder-without-config", _model_folder({"README.md": "x"}),
         ("'models.mine.pretrained'", "no config.json", "save_pretrained")),
    Case("model-folder-without-weights", _model_folder({"config.json": BERT_CONFIG}),
         ("'models.mine.pretrained'", "has no weights", "model.safetensors")),
    Case("model-folder-pickle-only", _model_folder({"config.json": BERT_CONFIG, "pytorch_model.bin": "x"}),
         ("'models.mine.pretrained'", "pytorch_model.bin", "arbitrary code", "allow_pickle: true")),
    Case("model-folder-remote-code", _model_folder(
        {"config.json": '{"model_type": "x", "auto_map": {"AutoModel": "modeling_x.XModel"}}',
         "model.safetensors": "x"}),
         ("'models.mine.pretrained'", "modeling_x.py", "trust_remote_code: true")),
    Case("model-allow-pickle-text", _set("models.minilm-l6", {"allow_pickle": "yes"}),
         ("'models.minilm-l6.allow_pickle' = 'yes'", "expected true or false")),
    Case("model-target-unknown-role", _set("models.minilm-l6", {"targets": {"qkv": "attention"}}),
         ("key 'qkv' under 'models.minilm-l6.targets'", "query")),
    Case("model-target-a-list", _set("models.minilm-l6", {"targets": {"query": ["a", "b"]}}),
         ("'models.minilm-l6.targets.query' = ['a', 'b']", "expected a string")),
    Case("model-target-bad-regex", _set("models.minilm-l6", {"targets": {"query": "self.(query"}}),
         ("'models.minilm-l6.targets.query' = 'self.(query'", "not a valid regular expression")),
    Case("model-revision-on-folder", _both(_model_folder({"config.json": BERT_CONFIG, "model.safetensors": "x"},
                                                         {"revision": "main"})),
         ("'models.mine.revision' = 'main'", "only applies to hub ids")),
    # --- tasks ---------------------------------------------------------------------------------
    Case("task-unknown-name", _set("tasks", {"rotten_tomato": {}}),
         ("'tasks.rotten_tomato'", "not a built-in task", "did you mean 'rotten_tomatoes'", "source: file")),
    Case("task-bad-source", _set("tasks.rotten_tomatoes.source", "s3"),
         ("'tasks.rotten_tomatoes.source' = 's3'", "builtin", "glue", "file")),
    Case("task-max-length-zero", _set("tasks.rotten_tomatoes.max_length", 0),
         ("'tasks.rotten_tomatoes.max_length' = 0", "minimum of 8")),
    Case("task-max-length-text", _set("tasks.rotten_tomatoes.max_length", "128"),
         ("'tasks.rotten_tomatoes.max_length' = '128'", "expected an integer", "remove the quotes")),
    Case("task-negative-cap", _set("tasks.rotten_tomatoes.max_train_examples", -5),
         ("'tasks.rotten_tomatoes.max_train_examples' = -5", "minimum of 1")),
    Case("task-fraction-above-one", _set("tasks.rotten_tomatoes.validation_fraction", 1.5),
         ("'tasks.rotten_tomatoes.validation_fraction' = 1.5", "1")),
    Case("task-fractions-leave-no-train", _set("tasks.rotten_tomatoes.test_fraction", 0.95),
         ("'tasks.rotten_tomatoes'", "0.1 + 0.95", "less than 1")),
    Case("task-file-path-on-builtin", _set("tasks.rotten_tomatoes.path", "data.csv"),
         ("'tasks.rotten_tomatoes.path' = 'data.csv'", "source: file", "builtin")),
    Case("task-file-without-path", _set("tasks", {"mine": {"source": "file"}}), ("'tasks.mine'", "path")),
    Case("task-file-missing", _set("tasks", {"mine": {"source": "file", "path": "no/such/file.csv"}}),
         ("'tasks.mine.path' = 'no/such/file.csv'", "no such file", "CSV")),
    Case("task-file-unknown-suffix", _local_file("data.dat", CSV, {}),
         ("'tasks.mine.path'", "data.dat", "'format:'", "csv")),
    Case("task-file-bad-format", _local_file("data.csv", CSV, {"format": "xlsx"}),
         ("'tasks.mine.format' = 'xlsx'", "csv", "parquet")),
    Case("task-unknown-encoding", _local_file("data.csv", CSV, {"encoding": "utf-9"}),
         ("'tasks.mine.encoding' = 'utf-9'", "not a known text encoding", "latin-1")),
    Case("task-label-is-text-column", _local_file("data.csv", CSV, {"label_column": "text"}),
         ("'tasks.mine.label_column' = 'text'", "also in text_columns")),
    Case("task-same-text-column-twice", _local_file("data.csv", CSV, {"text_columns": ["text", "text"]}),
         ("'tasks.mine.text_columns'", "more than once")),
    Case("task-three-text-columns", _local_file("data.csv", CSV, {"text_columns": ["a", "b", "c"]}),
         ("'tasks.mine.text_columns'", "at most 2")),
    Case("task-text-columns-a-string", _local_file("data.csv", CSV, {"text_columns": "text"}),
         ("'tasks.mine.text_columns' = 'text'", "expected a list", "[text]")),
    Case("task-regression-with-accuracy", _local_file("data.csv", CSV, {"problem_type": "regression",
                                                                        "main_metric": "accuracy"}),
         ("'tasks.mine'", "main_metric 'accuracy'", "pearson")),
    Case("task-unknown-glue", _set("tasks", {"sst": {"source": "glue"}}),
         ("'tasks.sst'", "'sst' is not a GLUE task", "sst2")),
    Case("task-glue-missing-local-copy", _set("tasks", {"sst2": {"source": "glue", "hub_path": "./no/glue"}}),
         ("'tasks.sst2.hub_path' = './no/glue'", "no such folder")),
    Case("task-glue-with-file-key", _set("tasks", {"sst2": {"source": "glue", "label_column": "y"}}),
         ("'tasks.sst2.label_column' = 'y'", "source: file")),
    Case("task-bad-metric", _set("tasks.rotten_tomatoes.main_metric", "acc"),
         ("'tasks.rotten_tomatoes.main_metric' = 'acc'", "accuracy")),
    # --- methods and variants ------------------------------------------------------------------
    Case("method-unknown", _set("methods", {"lorra": ["default"]}),
         ("key 'lorra' under 'methods'", "did you mean 'lora'", "bitfit")),
    Case("method-capitalised", _set("methods", {"LoRA": ["default"]}),
         ("key 'LoRA' under 'methods'", "did you mean 'lora'")),
    Case("method-variants-not-a-list", _set("methods", {"lora": "default"}),
         ("'methods.lora' = 'default'", "expected a list", "[default]")),
    Case("method-no-variants", _set("methods", {"lora": []}), ("'methods.lora' = []", "at least 1")),
    Case("variant-duplicate", _set("methods", {"lora": ["default", "default"]}),
         ("'methods.lora'", "lists 'default' more than once")),
    Case("variant-missing-file", _set("methods", {"lora": ["r16"]}),
         ("'methods.lora'", "'r16'", "r16.yaml", "default")),
    Case("variant-name-with-slash", _set("methods", {"lora": ["a/b"]}),
         ("'methods.lora.0' = 'a/b'", "letters, digits")),
    Case("experiments-dir-missing", _set("experiments_dir", "/no/such/experiments"),
         ("'experiments_dir' = '/no/such/experiments'", "no such folder", "defaults.yaml")),
    Case("experiments-dir-without-defaults", lambda cfg, exp: (exp / "defaults.yaml").unlink(),
         ("'experiments_dir'", "has no defaults.yaml")),
    # --- experiment files ----------------------------------------------------------------------
    Case("variant-yaml-syntax", _variant("lora", "training:\n  learning_rate: [1.0e-3\n"),
         ("bad.yaml line", "not valid YAML")),
    Case("variant-yaml-tab", _variant("lora", "training:\n\tlearning_rate: 1.0e-3\n"),
         ("bad.yaml line 2", "not valid YAML", "spaces, not tabs")),
    Case("variant-duplicate-key", _variant("lora", "method:\n  r: 8\n  r: 16\n"),
         ("bad.yaml line 3", "'r' is given twice", "first on line 2")),
    Case("defaults-yaml-syntax", _write("defaults.yaml", "training: {max_steps: 6\n"),
         ("defaults.yaml line", "not valid YAML")),
    Case("variant-a-list", _variant("lora", "- r: 8\n"), ("bad.yaml", "expected a mapping", "training:")),
    Case("variant-lr-without-dot", _variant("lora", "training:\n  learning_rate: 1e-3\n"),
         ("bad.yaml", "'training.learning_rate' = '1e-3'", "expected a number", "1.0e-3")),
    Case("variant-lr-unsigned-exponent", _variant("lora", "training:\n  learning_rate: 1.0e4\n"),
         ("bad.yaml", "'training.learning_rate' = '1.0e4'", "write 1.0e+4")),
    Case("variant-lr-negative", _variant("full", "training:\n  learning_rate: -0.001\n"),
         ("bad.yaml", "'training.learning_rate' = -0.001", "minimum of 0")),
    Case("variant-batch-size-zero", _variant("full", "training:\n  batch_size: 0\n"),
         ("bad.yaml", "'training.batch_size' = 0", "minimum of 1")),
    Case("variant-epochs-zero", _variant("full", "training:\n  epochs: 0\n"),
         ("bad.yaml", "'training.epochs' = 0", "minimum of 0")),
    Case("variant-max-steps-zero", _variant("full", "training:\n  max_steps: 0\n"),
         ("bad.yaml", "'training.max_steps' = 0", "minimum of 1")),
    Case("variant-eval-batch-quoted", _variant("full", "training:\n  eval_batch_size: '64'\n"),
         ("bad.yaml", "'training.eval_batch_size' = '64'", "remove the quotes")),
    Case("variant-grad-norm-zero", _variant("full", "training:\n  max_grad_norm: 0\n"),
         ("bad.yaml", "'training.max_grad_norm' = 0", "minimum of 0")),
    Case("variant-evals-per-epoch-zero", _variant("full", "training:\n  evals_per_epoch: 0\n"),
         ("bad.yaml", "'training.evals_per_epoch' = 0", "minimum of 1")),
    Case("variant-bad-scheduler", _variant("full", "training:\n  lr_scheduler: step\n"),
         ("bad.yaml", "'training.lr_scheduler' = 'step'", "cosine")),
    Case("variant-training-typo", _variant("full", "training:\n  batchsize: 8\n"),
         ("bad.yaml", "unknown key 'batchsize'", "did you mean 'batch_size'")),
    Case("variant-top-level-typo", _variant("full", "trainig:\n  batch_size: 8\n"),
         ("bad.yaml", "unknown key 'trainig'", "did you mean 'training'")),
    Case("variant-bad-precision", _variant("full", "training:\n  precision: fp16\n"),
         ("bad.yaml", "'training.precision' = 'fp16'", "bf16")),
    Case("variant-bad-nonfinite-policy", _variant("full", "training:\n  on_nonfinite_loss: ignore\n"),
         ("bad.yaml", "'training.on_nonfinite_loss' = 'ignore'", "skip")),
    Case("defaults-bad-value", _write("defaults.yaml", "training:\n  warmup_ratio: 2\n"),
         ("defaults.yaml", "'training.warmup_ratio' = 2", "maximum of 1")),
    Case("lora-rank-zero", _variant("lora", "method:\n  r: 0\n"), ("bad.yaml", "r must be a positive integer", "0")),
    Case("lora-unknown-param", _variant("lora", "method:\n  rank: 4\n"),
         ("bad.yaml", "unknown parameter(s) ['rank']", "allowed")),
    Case("lora-unknown-target", _variant("lora", "method:\n  targets: [qkv]\n"),
         ("bad.yaml", "['qkv']", "query")),
    Case("lora-target-twice", _variant("lora", "method:\n  targets: [query, query]\n"),
         ("bad.yaml", "['query'] twice")),
    Case("lora-rank-quoted", _variant("lora", "method:\n  r: '8'\n"), ("bad.yaml", "r must be a positive integer", "'8'")),
    Case("lora-dropout-text", _variant("lora", "method:\n  dropout: high\n"), ("bad.yaml", "dropout", "'high'")),
    Case("gift-scale-text", _variant("gift", "method:\n  init_scale: big\n"), ("bad.yaml", "init_scale", "'big'")),
    Case("hiwi-activation", _variant("hiwi", "method:\n  activation: softplus\n"),
         ("bad.yaml", "activation", "'softplus'", "relu")),
    Case("loreft-layers-text", _variant("loreft", "method:\n  layers: some\n"), ("bad.yaml", "layers", "'some'", "all")),
    Case("ia3-feedforward-outside-targets", _variant("ia3", "method:\n  targets: [key, value]\n  feedforward: [ffn_out]\n"),
         ("bad.yaml", "feedforward", "ffn_out", "targets")),
    Case("method-params-a-list", _variant("lora", "method: [8, 16]\n"),
         ("bad.yaml", "'method' = [8, 16]", "expected a mapping")),
    Case("adapter-contradictory-sizes", _variant("adapter", "method:\n  bottleneck: 16\n  reduction_factor: 8\n"),
         ("bad.yaml", "bottleneck", "reduction_factor")),
    Case("prompt-text-init-without-text", _variant("prompt_tuning", "method:\n  init: text\n"),
         ("bad.yaml", "init_text")),
    Case("sift-mask-file-missing", _variant("sift", "method:\n  mask_source: file\n  mask_path: no/mask.safetensors\n"),
         ("bad.yaml", "'method.mask_path' = 'no/mask.safetensors'", "no such file")),
    Case("sift-rate-above-one", _variant("sift", "method:\n  rate: 1.5\n"), ("bad.yaml", "rate", "1.5")),
    # --- data, mlflow, report ------------------------------------------------------------------
    Case("data-unknown-key", _set("data.max_len", 64), ("unknown key 'max_len'", "did you mean 'max_length'")),
    Case("data-cap-float", _set("data.max_train_examples", 1000.5),
         ("'data.max_train_examples' = 1000.5", "expected an integer or null")),
    Case("data-split-seed-text", _set("data.split_seed", "abc"), ("'data.split_seed' = 'abc'", "expected an integer")),
    Case("data-test-fraction-zero", _set("data.test_fraction", 0), ("'data.test_fraction' = 0", "0")),
    Case("mlflow-uri-number", _set("mlflow.tracking_uri", 5000), ("'mlflow.tracking_uri' = 5000", "a string")),
    Case("mlflow-empty-experiment", _set("mlflow.experiment", ""), ("'mlflow.experiment' = ''", "empty")),
    Case("report-path-not-html", _set("report_path", "reports/comparison.pdf"),
         ("'report_path' = 'reports/comparison.pdf'", ".html")),
    # --- analyses ------------------------------------------------------------------------------
    Case("analyses-typo", _set("analyses.intrinsic_dim", {}), ("unknown key 'intrinsic_dim'", "intrinsic_dimension")),
    Case("id-dims-zero", _set("analyses.intrinsic_dimension.dims", [0]),
         ("'analyses.intrinsic_dimension.dims.0' = 0", "minimum of 1")),
    Case("id-dims-text", _set("analyses.intrinsic_dimension.dims", "1000"),
         ("'analyses.intrinsic_dimension.dims' = '1000'", "expected a list")),
    Case("id-kind", _set("analyses.intrinsic_dimension.kind", "lora"),
         ("'analyses.intrinsic_dimension.kind' = 'lora'", "said", "did")),
    Case("id-seeds-empty", _set("analyses.intrinsic_dimension.seeds", []),
         ("'analyses.intrinsic_dimension.seeds' = []", "at least 1")),
    Case("id-lr-reference-zero", _set("analyses.intrinsic_dimension.lr_reference_d", 0),
         ("'analyses.intrinsic_dimension.lr_reference_d' = 0", "minimum of 1")),
    Case("id-projection", _set("analyses.intrinsic_dimension.projection", "gaussian"),
         ("'analyses.intrinsic_dimension.projection' = 'gaussian'", "fastfood")),
    Case("id-fraction", _set("analyses.intrinsic_dimension.fraction", 1.5),
         ("'analyses.intrinsic_dimension.fraction' = 1.5", "maximum of 1")),
    Case("id-refine-negative", _set("analyses.intrinsic_dimension.refine", -1),
         ("'analyses.intrinsic_dimension.refine' = -1", "minimum of 0")),
    Case("id-reference-missing", _set("analyses.intrinsic_dimension.reference", "best"),
         ("'analyses.intrinsic_dimension.reference' = 'best'", "full/best.yaml")),
    Case("id-training-typo", _set("analyses.intrinsic_dimension.training", {"lr": 0.01}),
         ("analyses.intrinsic_dimension", "unknown key 'lr'", "learning_rate")),
    Case("id-training-lr-text", _set("analyses.intrinsic_dimension.training", {"learning_rate": "3e-2"}),
         ("analyses.intrinsic_dimension", "'training.learning_rate' = '3e-2'", "3.0e-2")),
    Case("sparsity-enabled-text", _set("analyses.gradient_sparsity.enabled", "yes"),
         ("'analyses.gradient_sparsity.enabled' = 'yes'", "true or false")),
    Case("sparsity-jaccard-zero", _set("analyses.gradient_sparsity.jaccard_percent", 0),
         ("'analyses.gradient_sparsity.jaccard_percent' = 0", "minimum of 0")),
    Case("sparsity-batches-zero", _set("analyses.gradient_sparsity.batches", 0),
         ("'analyses.gradient_sparsity.batches' = 0", "minimum of 1")),
    Case("sparsity-percent-above-100", _set("analyses.gradient_sparsity.percents", [1, 150]),
         ("'analyses.gradient_sparsity.percents.1' = 150", "maximum of 100")),
]
