"""The code each rule runs (``peftlab.codegraph``), checked against an independent reading
(``tests/_imports.py``: the rule files, ``modulefinder``, the method registry)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _imports import job_code, rule_scripts
from peftlab.codegraph import METHOD_RULES, CodeGraph, rerun_table

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def graph():
    return CodeGraph(REPO)


def test_method_modules_are_the_registry(graph):
    from peftlab.methods import METHODS

    assert graph.method_modules == {name: cls.__module__ for name, cls in METHODS.items()}


def test_every_rule_code_equals_its_import_closure(graph):
    """For every rule (and every method of finetune and evaluate): the files hashed are the
    script, what modulefinder finds it imports, and the method module's closure."""
    from peftlab.methods import METHODS

    scripts = rule_scripts(REPO)
    # a rule runs the script of its name, or another rule's (tune_trial runs finetune's)
    assert {p.stem for p in scripts.values()} == set(graph.rules())
    assert {r: p.stem for r, p in scripts.items() if p.stem != r} == {"tune_trial": "finetune"}
    cache: dict = {}
    for rule in scripts:
        for method in (sorted(METHODS) if scripts[rule].stem in METHOD_RULES else [None]):
            assert set(graph.rule_files(scripts[rule].stem, method)) == job_code(REPO, rule, method, scripts, cache), (
                rule, method)


def test_the_cases_that_were_stale(graph):
    def reruns(rel):
        return dict(graph.reruns(REPO / rel))

    peft_backed = ("dora", "ia3", "lora", "prompt_tuning", "vera")
    assert reruns("src/peftlab/methods/_peft_common.py") == {"finetune": peft_backed, "evaluate": peft_backed}
    assert set(reruns("src/peftlab/report.py")) == {"aggregate", "mlflow_models", "comparison_report"}
    models = reruns("src/peftlab/models.py")
    assert models["gradient_sparsity"] is None and models["intrinsic_dimension"] is None
    assert reruns("src/peftlab/methods/lora.py")["finetune"] == ("dora", "lora")
    # SIFT's mask selection runs in the gradient-sparsity stage too
    assert "gradient_sparsity" in reruns("src/peftlab/methods/sift.py")


def test_a_method_named_in_code_is_imported_there(graph):
    """``build_method("sift", ...)`` reaches SIFT through the registry, which the graph does not
    follow: a module naming a method must import that method's module."""
    for name, module in graph.modules.items():
        tree = ast.parse(module.path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("build_method", "get_method")
                    and node.args and isinstance(node.args[0], ast.Constant)):
                method_module = graph.method_modules[node.args[0].value]
                assert method_module in graph.closure([module]), f"{name} names {node.args[0].value}"


def _copy(tmp_path: Path) -> Path:
    for part in ("src", "workflow"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_fingerprints_follow_content_only(tmp_path):
    root = _copy(tmp_path)
    keys = [("finetune", "dora"), ("finetune", "lora"), ("evaluate", "ia3"), ("comparison_report", None),
            ("prepare_data", None)]
    before = {k: CodeGraph(root).fingerprint(*k) for k in keys}
    assert len(set(before.values())) == len(keys)
    helper = root / "src" / "peftlab" / "methods" / "_peft_common.py"
    helper.touch()
    assert {k: CodeGraph(root).fingerprint(*k) for k in keys} == before  # a time stamp is not content
    helper.write_text(helper.read_text() + "\n# an edit\n")
    after = {k: CodeGraph(root).fingerprint(*k) for k in keys}
    assert {k for k in keys if after[k] != before[k]} == {("finetune", "dora"), ("finetune", "lora"), ("evaluate", "ia3")}
    # a per-method rule ignores the method of a rule that runs none
    assert CodeGraph(root).fingerprint("aggregate", "lora") == CodeGraph(root).fingerprint("aggregate")


def test_a_broken_module_stops_the_dag_with_one_line(tmp_path):
    from peftlab.errors import PeftlabError

    root = _copy(tmp_path)
    (root / "src" / "peftlab" / "metrics.py").write_text("def broken(:\n")
    with pytest.raises(PeftlabError, match=r"src/peftlab/metrics.py line 1: .*fix it or undo the edit"):
        CodeGraph(root)


def test_readme_rerun_table_is_the_graphs(graph):
    readme = (REPO / "README.md").read_text()
    start = "<!-- rerun-table: python -m peftlab reruns --markdown -->\n"
    table = readme[readme.index(start) + len(start):readme.index("\n<!-- /rerun-table -->")]
    assert table == rerun_table(graph), "regenerate it: python -m peftlab reruns --markdown"


def test_reruns_command():
    res = subprocess.run([sys.executable, "-m", "peftlab", "reruns", "src/peftlab/methods/_peft_common.py",
                          "README.md"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["src/peftlab/methods/_peft_common.py: finetune and evaluate of dora, ia3, lora, prompt_tuning, vera",
                                       "README.md: nothing"]


def test_the_import_scan_finds_every_import_statement():
    """The graph looks for imports among statements only (the DAG build parses every module):
    it finds exactly what a walk over the whole syntax tree finds, nested ones included."""
    from peftlab.codegraph import _import_statements

    files = sorted((REPO / "src").rglob("*.py")) + sorted((REPO / "workflow" / "scripts").glob("*.py"))
    nested = 0
    for path in files:
        tree = ast.parse(path.read_bytes())
        every = {n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))}
        assert set(_import_statements(tree.body)) == every, path
        nested += len(every - set(tree.body))
    assert nested > 50  # function-level imports (torch-free modules import it where used)
