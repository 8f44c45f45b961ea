"""Configuration: validation of config.yaml, layered experiments, the typed TrainConfig.

``validate_config`` checks the workflow config against ``workflow/schemas/config.schema.yaml``
(filling defaults), then what a schema cannot say (files that must exist, options that
contradict each other, every experiment file it names), and raises ``ConfigError`` with one
line naming the key, the bad value and what is allowed. YAML files are read strictly
(``load_yaml``): a syntax error or a key given twice names the file and the line. An
experiment is ``config/experiments/defaults.yaml`` overridden by
``config/experiments/<method>/<variant>.yaml`` (peft ``method_comparison``'s layering); the
experiment's identity comes from its path.
"""

from __future__ import annotations

import codecs
import copy
import dataclasses
import difflib
import functools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = REPO_ROOT / "workflow" / "schemas"
# files this module reads: the code of every rule that imports it includes them (codegraph.py)
DATA_FILES = ("workflow/schemas/config.schema.yaml", "workflow/schemas/experiment.schema.yaml")


# ---------------------------------------------------------------------------------------
# Strict YAML
# ---------------------------------------------------------------------------------------


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, mark, first_mark):
        super().__init__(key)
        self.key, self.mark, self.first_mark = key, mark, first_mark


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """SafeLoader that refuses a mapping key given twice (PyYAML keeps the last silently).
    Parses with libyaml where PyYAML has it (the DAG build reads every variant file)."""


class _StrictPyLoader(yaml.SafeLoader):
    """The same in pure Python, whose syntax errors name the offending character."""


def _construct_mapping(loader: _StrictLoader, node, deep: bool = False):
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' may be overridden on purpose
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark, seen[key])
            seen[key] = key_node.start_mark
        except TypeError:  # unhashable key: SafeLoader reports it
            pass
    return yaml.constructor.SafeConstructor.construct_mapping(loader, node, deep)


for _loader in (_StrictLoader, _StrictPyLoader):
    _loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file; ``ConfigError`` naming the file and line on any problem."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a YAML file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path} line {line}: byte {raw[exc.start]:#04x} is not UTF-8; save the file as UTF-8"
        ) from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:  # again in pure Python, for its precise message
        return _load_strict_py(path, text)


def _load_strict_py(path: Path, text: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictPyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError(
            f"{path} line {exc.mark.line + 1}: key {exc.key!r} is given twice (first on line "
            f"{exc.first_mark.line + 1}) and YAML would keep only the last; give each key once"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        hint = "indent with spaces, not tabs" if "\\t" in problem else "fix the syntax there"
        raise ConfigError(f"{path}{where}: not valid YAML ({problem}); {hint}") from None


def check_config_files(paths) -> None:
    """Read each config file strictly: Snakemake's own reader accepts a key given twice
    (keeping the last) and reports syntax errors without a file or line."""
    for p in paths:
        if Path(p).exists():
            load_yaml(p)


def retype_overrides(config: dict, overrides: Any) -> None:
    """Give values set with ``snakemake --config key=value`` the types YAML would.

    Snakemake parses a structured value (``seeds=[0,1]``, ``data={max_length: 64}``) with
    YAML's BaseLoader, so every item is a string ('0'); each string at an overridden place
    is read again as YAML (``0`` -> 0), in ``config`` (where the overrides are merged)."""
    def retype(value: Any) -> Any:
        if isinstance(value, str):
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                return value
            return parsed if isinstance(parsed, (int, float, bool)) or parsed is None else value
        if isinstance(value, list):
            return [retype(v) for v in value]
        if isinstance(value, dict):
            return {k: retype(v) for k, v in value.items()}
        return value

    def walk(node: dict, over: dict) -> None:
        for k, v in over.items():
            if k not in node:
                continue
            if isinstance(v, dict) and isinstance(node[k], dict):
                walk(node[k], v)
            elif isinstance(v, (list, dict)):
                node[k] = retype(node[k])

    if isinstance(config, dict) and isinstance(overrides, dict):
        walk(config, dict(overrides))


def load_schema(name: str) -> dict:
    return load_yaml(SCHEMA_DIR / f"{name}.schema.yaml")


@functools.cache
def _schema_validator(name: str):
    """The validator of a schema, built once per process (the DAG build checks every variant)."""
    return _validator_with_defaults(load_schema(name))


# ---------------------------------------------------------------------------------------
# Schema validation with one-line messages
# ---------------------------------------------------------------------------------------


def _validator_with_defaults(schema: dict):
    from jsonschema import Draft7Validator, validators

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from Draft7Validator.VALIDATORS["properties"](validator, properties, instance, schema)

    cls = validators.extend(Draft7Validator, {"properties": set_defaults})
    return cls(schema)


def short(value: Any, limit: int = 80) -> str:
    """``repr`` of a value, cut to ``limit`` characters (one line)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def did_you_mean(word: Any, choices) -> str:
    """' (did you mean 'x'?)' for a close match among ``choices`` (any case), else ''."""
    if not isinstance(word, str):
        return ""
    by_lower = {str(c).lower(): str(c) for c in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean '{by_lower[close[0]]}'?)" if close else ""


_TYPE_NAMES = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
               "number": "a number", "boolean": "true or false", "null": "null"}


def _type_hint(instance: Any, types: list[str]) -> str:
    if isinstance(instance, str) and ({"number", "integer"} & set(types)):
        try:
            float(instance)
        except ValueError:
            return ""
        text = instance.strip()
        match = re.fullmatch(r"([+-]?\d*\.?\d*)[eE]([+-]?\d+)", text)
        if match:  # YAML 1.1 needs a dot and a signed exponent: 1e-3 and 1.0e4 are text
            mantissa, exponent = match.groups()
            mantissa = mantissa if "." in mantissa else mantissa + ".0"
            exponent = exponent if exponent[0] in "+-" else "+" + exponent
            return f" (YAML reads {text} as text: write {mantissa}e{exponent})"
        return " (a quoted number is text: remove the quotes)"
    if isinstance(instance, str) and "array" in types:
        return f" (write a list: [{instance}])"
    return ""


def _format_error(err, where: str) -> str:
    path = ".".join(str(p) for p in err.absolute_path)
    key = f"'{path}'" if path else "the top level"
    value = short(err.instance)
    v, desc = err.validator, err.schema.get("description")
    if "propertyNames" in err.absolute_schema_path:
        # the offending key itself is bad (e.g. an unknown method name)
        sub = err.context[0] if err.validator == "propertyNames" and err.context else err
        bad = sub.instance
        if sub.validator == "enum":
            allowed = f"use one of {sub.validator_value}{did_you_mean(bad, sub.validator_value)}"
        elif sub.validator == "pattern":
            allowed = "use a name of letters, digits, '_', '.' and '-' that starts with a letter or digit"
        else:
            allowed = sub.message
        return f"{where}: key {short(bad)} under {key} is not allowed; {allowed}"
    if v == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = [k for k in err.instance if k not in allowed] if isinstance(err.instance, dict) else []
        bad = extra[0] if extra else "?"
        return (f"{where}: unknown key {short(bad)} under {key}{did_you_mean(bad, allowed)}; "
                f"allowed keys: {allowed}")
    if v == "enum":
        return (f"{where}: {key} = {value} is not allowed; use one of {err.validator_value}"
                f"{did_you_mean(err.instance, err.validator_value)}")
    if v == "type":
        types = err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
        expected = " or ".join(_TYPE_NAMES.get(t, t) for t in types)
        about = f" ({desc})" if desc else ""
        return f"{where}: {key} = {value}: expected {expected}{about}{_type_hint(err.instance, types)}"
    if v == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        sub = err.schema.get("properties", {}).get(missing, {})
        about = f" ({sub['description']})" if sub.get("description") else ""
        return f"{where}: missing required key '{missing}' at {key}{about}"
    if v == "uniqueItems":
        seen, twice = set(), []
        for item in err.instance:
            marker = repr(item)
            if marker in seen and item not in twice:
                twice.append(item)
            seen.add(marker)
        return f"{where}: {key} = {value} lists {short(twice)[1:-1]} more than once; give each once"
    if v == "minItems":
        return f"{where}: {key} = {value} needs at least {err.validator_value} item(s)"
    if v == "maxItems":
        return f"{where}: {key} = {value} allows at most {err.validator_value} item(s)"
    if v == "minProperties":
        return f"{where}: {key} is empty; give at least {err.validator_value} entry ({desc or 'name: entry'})"
    if v == "minLength":
        return f"{where}: {key} = {value} must not be empty"
    if v == "pattern":
        return f"{where}: {key} = {value} does not fit: {desc or 'it must match ' + err.validator_value}"
    return f"{where}: {key} = {value}: {err.message}"


def validate(instance: Any, schema_name: str, where: str) -> Any:
    """Validate (and fill defaults into) ``instance``; one-line ``ConfigError`` on failure."""
    validator = _schema_validator(schema_name)
    error = _first_error(validator, instance)
    if error is not None:
        raise ConfigError(_format_error(error, where))
    return instance


def _first_error(validator, instance):
    from jsonschema.exceptions import best_match

    errors = list(validator.iter_errors(instance))
    return best_match(errors) if errors else None


# ---------------------------------------------------------------------------------------
# The workflow config
# ---------------------------------------------------------------------------------------

_FILE_KEYS = ("path", "format", "text_columns", "label_column", "encoding")  # (+ image_column: file and hub)
_GLUE_KEYS = ("glue_name", "hub_path")
_HUB_KEYS = ("hub_config", "test_split", "data_files", "test_source", "test_sets", "max_example_chars")
_BIGBENCH_KEYS = ("bigbench_task", "bigbench_root")


def validate_config(config: dict, where: str = "config") -> dict:
    """Check the whole workflow config, including every experiment file it names.

    ``where`` names the config in messages (the config file, when there is one)."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a mapping of models, tasks, methods, seeds")
    validate(config, "config", where)
    for name, entry in config["models"].items():
        _check_model(name, entry or {}, where)
    for name, entry in config["tasks"].items():
        _check_task(name, entry or {}, config["data"], where)
    _check_generative_models(config, where)
    _check_image_tasks(config, where)
    _check_paper_results(config, where)
    exp_dir = Path(config["experiments_dir"])
    if not exp_dir.is_dir():
        raise ConfigError(
            f"{where}: 'experiments_dir' = {config['experiments_dir']!r}: no such folder (from "
            f"{Path.cwd()}); give the folder holding defaults.yaml and <method>/<variant>.yaml"
        )
    if not (exp_dir / "defaults.yaml").is_file():
        raise ConfigError(
            f"{where}: 'experiments_dir' = {config['experiments_dir']!r} has no defaults.yaml "
            "(the training settings every variant starts from); create it or fix the folder"
        )
    for method, variants in config["methods"].items():
        for variant in variants:
            variant_path = experiment_files(exp_dir, method, variant)[1]
            if not variant_path.is_file():
                have = sorted(p.stem for p in variant_path.parent.glob("*.yaml"))
                raise ConfigError(
                    f"{where}: 'methods.{method}' lists variant '{variant}' but {variant_path} does not "
                    f"exist; create it or use one of the variants there: {have or 'none'}"
                    f"{did_you_mean(variant, have)}"
                )
            load_for_tasks(exp_dir, method, variant, config.get("training"), config["tasks"])
    intrinsic = config["analyses"]["intrinsic_dimension"]
    if intrinsic["dims"]:
        analysis_training(config, where)
        ref = exp_dir / "full" / f"{intrinsic['reference']}.yaml"
        if not ref.exists():
            raise ConfigError(
                f"{where}: 'analyses.intrinsic_dimension.reference' = '{intrinsic['reference']}': needs "
                f"{ref} (the full fine-tuning variant d90 is measured against); create it or name an "
                "existing variant of full"
            )
    return config


def _check_model(name: str, entry: dict, where: str) -> None:
    from .errors import PeftlabError
    from .models import BUILTIN_MODELS, ModelSpec, check_local_model

    key = f"models.{name}"
    if entry.get("pretrained") is None and name not in BUILTIN_MODELS:
        raise ConfigError(
            f"{where}: '{key}': '{name}' is not a built-in model ({', '.join(BUILTIN_MODELS)})"
            f"{did_you_mean(name, BUILTIN_MODELS)}; give it 'pretrained:' (a hub id or a local folder)"
        )
    for role, pattern in (entry.get("targets") or {}).items():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(
                f"{where}: '{key}.targets.{role}' = {short(pattern)} is not a valid regular expression "
                f"({exc}); give a Python regex over module names"
            ) from None
    spec = ModelSpec.from_config(name, entry)
    try:
        local = check_local_model(spec)
    except PeftlabError as exc:
        raise ConfigError(f"{where}: '{key}.pretrained' = {spec.pretrained!r}: {exc}") from None
    if local and spec.revision is not None:
        raise ConfigError(
            f"{where}: '{key}.revision' = {short(spec.revision)}: a revision only applies to hub ids, "
            f"and 'pretrained' is the local folder {spec.pretrained}; remove 'revision'"
        )


def _check_generative_models(config: dict, where: str) -> None:
    """A generation / multiple-choice task needs a model that can generate (a causal LM)."""
    from .data import TaskSpec
    from .gendata import GENERATIVE_KINDS
    from .models import ModelSpec, is_decoder_spec

    for task, t_entry in config["tasks"].items():
        kind = TaskSpec.from_config(task, t_entry or {}, config["data"]).kind
        if kind not in GENERATIVE_KINDS:
            continue
        for model, m_entry in config["models"].items():
            if is_decoder_spec(ModelSpec.from_config(model, m_entry or {})) is False:
                raise ConfigError(
                    f"{where}: task '{task}' is a {kind} task, but model '{model}' is an encoder without a "
                    "causal-LM head, so it cannot generate; use a decoder (e.g. smollm2-135m) or move the "
                    "task to a config of its own"
                )


def _check_image_tasks(config: dict, where: str) -> None:
    """An image task needs an image model and methods defined on images; a text task a text model."""
    from .data import TaskSpec
    from .method_configs import TEXT_ONLY_METHODS
    from .models import ModelSpec, is_image_spec

    kinds = {task: TaskSpec.from_config(task, entry or {}, config["data"]).kind
             for task, entry in config["tasks"].items()}
    for task, kind in kinds.items():
        image = kind == "image_classification"
        for model, m_entry in config["models"].items():
            if is_image_spec(ModelSpec.from_config(model, m_entry or {})) is (not image):
                raise ConfigError(
                    f"{where}: task '{task}' is {'an image' if image else 'a text'} task, but model '{model}' "
                    f"reads {'text' if image else 'images'}; use {'an image model (e.g. dinov2-s)' if image else 'a text model'}"
                    " or move the task to a config of its own")
        for method in config["methods"]:
            if image and method in TEXT_ONLY_METHODS:
                raise ConfigError(f"{where}: method '{method}' does not apply to the image task '{task}': "
                                  f"{TEXT_ONLY_METHODS[method]}; remove it from 'methods' or move the task to a "
                                  "config of its own")


# the keys only one source reads (hub_path is also glue's); any of them on a task of another source is an error
_SOURCE_KEYS = {"file": _FILE_KEYS, "glue": _GLUE_KEYS, "hub": _HUB_KEYS, "bigbench": _BIGBENCH_KEYS}
_SHARED_KEYS = {"hub": ("hub_path",)}


def _check_foreign_keys(entry: dict, source: str, key: str, where: str) -> None:
    """Keys of another source's tasks: one line naming the key and the source it needs."""
    own = set(_SOURCE_KEYS.get(source, ())) | set(_SHARED_KEYS.get(source, ()))
    if entry.get("kind") == "image_classification":
        own.add("label_column")  # an image table, folder or hub dataset names its label column
    for other, keys in _SOURCE_KEYS.items():
        for k in keys:
            if k in entry and k not in own:
                raise ConfigError(
                    f"{where}: '{key}.{k}' = {short(entry[k])}: only applies to tasks with 'source: {other}' and "
                    f"this task's source is {source}; set the source or remove '{k}'"
                )


def _check_task(name: str, entry: dict, data: dict, where: str) -> None:
    from .data import BUILTIN_TASKS, TaskSpec
    from .errors import PeftlabError

    key = f"tasks.{name}"
    source = entry.get("source") or ("builtin" if name in BUILTIN_TASKS else None)
    if source is None:
        raise ConfigError(
            f"{where}: '{key}': '{name}' is not a built-in task ({', '.join(BUILTIN_TASKS)})"
            f"{did_you_mean(name, BUILTIN_TASKS)}; give it 'source: glue' or 'source: file' with a path"
        )
    _check_foreign_keys(entry, source, key, where)
    try:
        spec = TaskSpec.from_config(name, entry, data)
    except PeftlabError as exc:
        raise ConfigError(f"{where}: '{key}': {exc}") from None
    if source != "glue" and spec.validation_fraction + spec.test_fraction >= 1:
        raise ConfigError(
            f"{where}: '{key}': validation_fraction + test_fraction = {spec.validation_fraction} + "
            f"{spec.test_fraction} leaves no training examples; the two must sum to less than 1"
        )
    if source == "file":
        _check_file_task(spec, key, where)
    elif spec.generative and "prompt_template" in entry:
        _check_generative_columns(spec, where, key)
    if source == "bigbench":
        from .gendata import bigbench_file

        try:
            bigbench_file(spec)  # an optional package: its absence stops the DAG, not the job
        except PeftlabError as exc:
            raise ConfigError(f"{where}: '{key}': {exc}") from None
    if source in ("glue", "hub"):
        from .data import test_set_specs

        _check_hub_files(spec, key, where)
        if (spec.test_source or {}).get("hub_path"):
            _check_hub_path(spec.test_source["hub_path"], f"{key}.test_source.hub_path", where)
        for set_name, other in test_set_specs(spec).items():
            _check_hub_files(other, f"{key}.test_sets.{set_name}", where)


def _check_file_task(spec, key: str, where: str) -> None:
    """A ``source: file`` task's file, format, encoding and columns."""
    from .data import FILE_FORMATS, file_format

    path = Path(spec.path).expanduser()
    if spec.image and path.is_dir():
        return  # an image folder: <path>/<label>/<image>
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else f"no such file (from {Path.cwd()})"
        raise ConfigError(
            f"{where}: '{key}.path' = {spec.path!r}: {what}; give an existing CSV, TSV, "
            "JSONL or parquet file"
        )
    if file_format(spec) is None:
        raise ConfigError(
            f"{where}: '{key}.path' = {spec.path!r}: cannot tell the format from the suffix; "
            f"set 'format:' to one of {list(FILE_FORMATS)}"
        )
    try:
        codecs.lookup(spec.encoding)
    except LookupError:
        raise ConfigError(
            f"{where}: '{key}.encoding' = {spec.encoding!r} is not a known text encoding; use e.g. "
            "utf-8 or latin-1"
        ) from None
    if spec.generative:
        _check_generative_columns(spec, where, key)
    elif len(set(spec.text_columns)) < len(spec.text_columns):
        raise ConfigError(
            f"{where}: '{key}.text_columns' = {list(spec.text_columns)} names the same column twice; "
            "give one column, or two different ones for sentence pairs"
        )
    elif spec.label_column in spec.text_columns:
        raise ConfigError(
            f"{where}: '{key}.label_column' = {short(spec.label_column)} is also in text_columns, "
            "so the model would read the answer; use a label column that is not a text column"
        )


def _check_hub_files(spec, key: str, where: str) -> None:
    """A hub task's dataset id or local copy, and, in a local copy, its data files."""
    _check_hub_path(spec.hub_path, f"{key}.hub_path", where)
    hub = os.path.expanduser(spec.hub_path)
    missing = [f for f in spec.data_files.values() if os.path.isdir(hub) and not os.path.isfile(Path(hub) / f)]
    if missing:
        raise ConfigError(f"{where}: '{key}.data_files': {missing[0]!r} is not a file under {spec.hub_path}; "
                          "fix hub_path (the folder the data_files paths start from) or data_files")


def _check_hub_path(hub_path: str, key: str, where: str) -> None:
    hub = os.path.expanduser(hub_path)
    if hub.startswith((".", "/", "~")) and not os.path.isdir(hub):
        raise ConfigError(
            f"{where}: '{key}' = {hub_path!r}: no such folder; give a local copy laid out like the hub "
            "repository, or a dataset id such as nyu-mll/glue or openai/gsm8k"
        )


def _check_paper_results(config: dict, where: str) -> None:
    """Every published number names a task and model of this config, a metric that task reports,
    and a value on the report's scale (fractions of 1)."""
    from .data import TaskSpec, task_metrics, test_set_specs

    specs = {name: TaskSpec.from_config(name, entry or {}, config["data"]) for name, entry in config["tasks"].items()}
    specs |= {name: s for spec in list(specs.values()) for name, s in test_set_specs(spec).items()}
    for task, methods in (config.get("paper_results") or {}).items():
        if task not in specs:
            raise ConfigError(f"{where}: 'paper_results.{task}': '{task}' is not a task or test set of this config"
                              f"{did_you_mean(task, specs)}; use one of {list(specs)}")
        spec = specs[task]
        allowed = task_metrics(spec.kind, spec.scoring)
        for method, entries in methods.items():
            key, models = f"paper_results.{task}.{method}", [e.get("model") for e in paper_entries(entries)]
            if len(set(models)) < len(models):
                raise ConfigError(f"{where}: '{key}' gives two numbers for model "
                                  f"{next(m for m in models if models.count(m) > 1)!r}; keep one per model")
            for i, entry in enumerate(paper_entries(entries)):
                _check_paper_entry(entry, f"{key}[{i}]" if isinstance(entries, list) else key, spec, allowed,
                                   config, where)


def paper_entries(entries: dict | list) -> list[dict]:
    """A method's published numbers for a task: one entry, or a list of them (one per model)."""
    return list(entries) if isinstance(entries, list) else [entries]


def _check_paper_entry(entry: dict, key: str, spec, allowed, config: dict, where: str) -> None:
    task, value = spec.name, entry["value"]
    if entry.get("metric", spec.main_metric) not in allowed:
        raise ConfigError(f"{where}: '{key}.metric' = {entry['metric']!r}: task '{task}' reports "
                          f"{', '.join(allowed)}; name one of them")
    if entry.get("model") is not None and entry["model"] not in config["models"]:
        raise ConfigError(f"{where}: '{key}.model' = {entry['model']!r} is not a model of this config; "
                          f"use one of {list(config['models'])} or remove 'model'")
    if not -1 <= value <= 1:
        raise ConfigError(f"{where}: '{key}.value' = {value}: the report's metrics are fractions of 1; "
                          f"write {value}% as {value / 100:g}")


def _check_generative_columns(spec, where: str, key: str) -> None:
    """The prompt template's fields and the target / answer / options columns exist in the
    data (read from its first row only)."""
    from .errors import PeftlabError
    from .gendata import data_columns, template_fields

    try:
        fields = template_fields(spec.prompt_template)
        columns, origin = data_columns(spec)
    except PeftlabError as exc:
        raise ConfigError(f"{where}: '{key}': {exc}") from None
    if columns is None:
        return
    extra = {"options"} if spec.kind == "multiple_choice" else set()
    for what, names in (("prompt_template field", fields), ("target_column", [spec.target_column]),
                        ("answer_column", [spec.answer_column]), ("options_column", [spec.options_column])):
        missing = [n for n in names if n and n not in columns | (extra if what.startswith("prompt") else set())]
        if missing:
            raise ConfigError(f"{where}: '{key}': {what} {missing[0]!r} is not a column of {origin} (columns: "
                              f"{sorted(columns)}); fix it or the data")


def analysis_training(config: dict, where: str = "config") -> TrainConfig:
    """Training settings of the intrinsic-dimension runs: experiments_dir/defaults.yaml's
    ``training``, the config's ``training`` over it, ``analyses.intrinsic_dimension.training``
    over both."""
    defaults = load_yaml(Path(config["experiments_dir"]) / "defaults.yaml") or {}
    override = config["analyses"]["intrinsic_dimension"].get("training") or {}
    merged = deep_merge(deep_merge(defaults.get("training") or {}, config.get("training") or {}), override)
    validate({"training": merged}, "experiment", f"{where}: analyses.intrinsic_dimension")
    try:
        return TrainConfig(**merged)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: 'analyses.intrinsic_dimension.training': {exc}") from None


def sift_analysis_variants(config: dict) -> dict[str, dict]:
    """SIFT variants in the config whose mask comes from the gradient-sparsity stage
    (``mask_source: analysis``): variant -> its method params."""
    out = {}
    for variant in config["methods"].get("sift", []):
        exp = load_experiment(config["experiments_dir"], "sift", variant, config.get("training"))
        if exp.method_params.get("mask_source") == "analysis":
            out[variant] = dict(exp.method_params)
    return out


# ---------------------------------------------------------------------------------------
# Experiments
# ---------------------------------------------------------------------------------------

NONFINITE_POLICIES = ("stop", "skip")
PRECISIONS = ("auto", "fp32", "bf16")
BASE_DTYPES = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters of one experiment (defaults.yaml + variant overrides)."""

    epochs: float = 2.0
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 64
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    lr_scheduler: str = "linear"
    max_grad_norm: float | None = 1.0
    evals_per_epoch: int = 2
    log_every_steps: int = 10
    # training batches of rows of similar length (less padding), in random order
    group_by_length: bool = True
    # a NaN/inf loss: stop (the run is recorded as failed) or skip that batch (counted)
    on_nonfinite_loss: str = "stop"
    # forward-pass precision: auto (bf16 autocast on a CUDA GPU, fp32 elsewhere), fp32, bf16
    precision: str = "auto"
    # dtype of the frozen base weights: auto (bf16 on a CUDA GPU for every method but full
    # fine-tuning, fp32 elsewhere), fp32, bf16; trainable tensors and optimizer state stay fp32
    base_dtype: str = "auto"
    # micro-batches of batch_size summed into one optimizer step (the same update as one batch
    # of batch_size x gradient_accumulation_steps rows)
    gradient_accumulation_steps: int = 1
    # recompute each layer's activations in the backward pass instead of keeping them
    gradient_checkpointing: bool = False
    # deterministic kernels (torch.use_deterministic_algorithms): bitwise repeatable runs
    deterministic: bool = True

    def __post_init__(self):
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.lr_scheduler not in ("linear", "constant", "cosine"):
            raise ValueError(f"lr_scheduler must be linear, constant or cosine, got {self.lr_scheduler!r}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"base_dtype must be auto, fp32 or bf16, got {self.base_dtype!r}")
        if self.base_dtype == "bf16" and self.precision == "fp32":
            raise ValueError("base_dtype bf16 needs bf16 compute: set precision to auto or bf16, "
                             "or base_dtype to fp32")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        if self.on_nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite_loss must be stop or skip, got {self.on_nonfinite_loss!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@dataclass(frozen=True)
class Experiment:
    method: str
    variant: str
    training: TrainConfig
    method_params: dict
    files: tuple[str, ...]
    # the tuning stage's settings over the files' (``tuning.tuned_settings``): a trial's grid
    # point and budget, or the point a final run uses with where it was selected
    tuned: dict | None = None
    # the tasks the files give settings of their own (``tasks:``)
    task_settings: tuple[str, ...] = ()

    def resolved(self) -> dict:
        out = {"method": self.method, "variant": self.variant,
               "training": self.training.to_dict(), "method_params": self.method_params}
        return out | ({"tuned": self.tuned} if self.tuned else {})


def experiment_files(experiments_dir: str | Path, method: str, variant: str) -> list[Path]:
    d = Path(experiments_dir)
    return [d / "defaults.yaml", d / method / f"{variant}.yaml"]


def _has_path(tree: Any, path: list) -> bool:
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def _experiment_part(path: Path, data: Any) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping with 'training:' and/or 'method:', got {type(data).__name__} "
            f"{short(data)}"
        )
    return data


def _check_task_overrides(per_task: Any, path: Path) -> None:
    if not isinstance(per_task, dict) or not all(isinstance(v, dict) or v is None for v in per_task.values()):
        raise ConfigError(f"{path}: 'tasks' must map task names to {{training: ..., method: ...}}, got "
                          f"{short(per_task)}")
    for name, entry in per_task.items():
        extra = sorted(set(entry or {}) - {"training", "method"})
        if extra:
            raise ConfigError(f"{path}: 'tasks.{name}.{extra[0]}' is not allowed: a task's entry holds "
                              "'training' and 'method' keys only")


def load_experiment(experiments_dir: str | Path, method: str, variant: str,
                    training: dict | None = None, tuned: dict | None = None, task: str | None = None) -> Experiment:
    """Merge defaults.yaml with ``<method>/<variant>.yaml`` and the config's ``training``
    (settings over every variant's) and type-check the result; an error names the file (or
    the config key) that sets the bad value. ``tuned``: the tuning stage's settings, over
    all of these (``tuning.tuned_settings``: ``{"training": ..., "method": ..., ...}``).
    ``task``: the run's task, whose entry under the files' ``tasks:`` (its own ``training``
    and ``method`` keys) applies over the variant's, under the config's and tuning's."""
    from .method_configs import config_class  # torch-free: the DAG build validates every variant

    defaults_path, variant_path = experiment_files(experiments_dir, method, variant)
    config_cls = config_class(method)
    if not variant_path.exists():
        have = sorted(p.stem for p in variant_path.parent.glob("*.yaml"))
        raise ConfigError(
            f"method '{method}' has no variant '{variant}': create {variant_path} "
            f"(existing variants: {have or 'none'})"
        )
    defaults = _experiment_part(defaults_path, load_yaml(defaults_path))
    override = _experiment_part(variant_path, load_yaml(variant_path))
    overall = {"training": training} if training else {}
    merged = deep_merge(defaults, override)
    per_task = merged.get("tasks")  # kept in place: the schema checks every task's entry
    if per_task is not None:  # a paper's settings task by task: the run's task over the variant's
        _check_task_overrides(per_task, variant_path if "tasks" in override else defaults_path)
        if task in per_task:
            merged = deep_merge(merged, per_task[task] or {})
            override = deep_merge(override, per_task[task] or {})
    merged = deep_merge(merged, overall)
    tuned_part = {k: (tuned or {}).get(k) for k in ("training", "method") if (tuned or {}).get(k)}
    if tuned_part:
        merged = deep_merge(merged, tuned_part)
        overall = deep_merge(overall, tuned_part)
    validator = _schema_validator("experiment")
    error = _first_error(validator, merged)
    if error is not None:
        path = list(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = error.schema.get("properties", {})
            path += [k for k in error.instance if k not in allowed][:1]
        culprit = ("config" if _has_path(overall, path) else variant_path if _has_path(override, path) or not path
                   else defaults_path)
        raise ConfigError(_format_error(error, str(culprit)))
    try:
        train_config = TrainConfig(**(merged.get("training") or {}))
    except (TypeError, ValueError) as exc:
        where = "config: training" if training else f"{variant_path}: training"
        raise ConfigError(f"{where}: {exc}") from None
    params = merged.get("method") or {}
    culprit = variant_path if "method" in override else defaults_path
    try:
        config_cls.from_dict(method, params)
    except ConfigError as exc:
        raise ConfigError(f"{culprit}: {exc}") from None
    for k, v in params.items():
        if k.endswith("_path") and isinstance(v, str) and not Path(v).expanduser().is_file():
            raise ConfigError(
                f"{culprit}: 'method.{k}' = {v!r}: no such file (from {Path.cwd()}); give an "
                "existing file"
            )
    return Experiment(method, variant, train_config, params, tuple(str(p) for p in (defaults_path, variant_path)),
                      tuned or None, tuple(per_task or ()))


def load_for_tasks(experiments_dir: str | Path, method: str, variant: str, training: dict | None, tasks,
                   tuned: dict | None = None) -> Experiment:
    """``load_experiment`` as a run of any of ``tasks`` would: once without a task, then once
    for each of those tasks the files give settings of their own (the others merge the same)."""
    exp = load_experiment(experiments_dir, method, variant, training, tuned)
    for task in set(tasks) & set(exp.task_settings):
        load_experiment(experiments_dir, method, variant, training, tuned, task=task)
    return exp


@dataclass(frozen=True)
class RunKey:
    model: str
    task: str
    method: str
    variant: str
    seed: int

    def path(self) -> str:
        return f"{self.model}/{self.task}/{self.method}/{self.variant}/seed{self.seed}"

    def tags(self) -> dict[str, str]:
        return {k: str(v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class TrialKey(RunKey):
    """One trial of the tuning stage: a grid point (by its index) on one tuning seed."""

    trial: int = 0

    def path(self) -> str:
        return f"{self.model}/{self.task}/{self.method}/{self.variant}/trial{self.trial}/seed{self.seed}"


def iter_runs(config: dict) -> Iterator[RunKey]:
    """Every (model, task, method, variant, seed) the config asks for."""
    for model in config["models"]:
        for task in config["tasks"]:
            for method, variants in config["methods"].items():
                for variant in variants:
                    for seed in config["seeds"]:
                        yield RunKey(model, task, method, variant, int(seed))
