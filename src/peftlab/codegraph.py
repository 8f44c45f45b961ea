"""What code each workflow rule runs, so that a job reruns when that code changes, and only then.

A rule's job runs its script, ``workflow/scripts/<rule>.py``, and through it modules of this
package. The rule's *code* is that script, the helpers it imports from ``workflow/scripts``
(files whose names start with ``_``), and the closure of its imports inside ``src/peftlab``:

- every ``import`` and ``from ... import`` of a module, at its top or inside a function (a
  lazy import runs when the function does; ``if TYPE_CHECKING:`` imports are counted too);
- the parent packages of every module reached (Python runs their ``__init__`` first);
- the data files a module reads, declared in a module-level ``DATA_FILES`` tuple of paths
  relative to the repository root (``config.py``: the config and experiment schemas).

Two rules run a method chosen by name at run time (``finetune`` and ``evaluate``, through the
method registry, which no import statement names). Their code is the script's closure plus the
closure of that method's module: the module whose ``@register`` class says
``name = "<method>"``. The registry's discovery of every method module
(``methods/__init__.py``, ``importlib``) is not followed: importing a method module only
registers its class, so one method's code never runs in another method's job. Code that needs
one particular method imports its module (``sparsity.py`` imports ``methods.sift``), which
makes the dependency visible here.

The workflow gives every rule ``fingerprint(rule, method)`` as a param: a hash of the content
of those files, so Snakemake reruns a job whose code changed ("Params have changed") and no
other. Each file is read and hashed once per DAG build. ``python -m peftlab reruns`` prints
which rules an edit of each file reruns; the README's table is that output.
"""

from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .errors import PeftlabError

PACKAGE = "peftlab"
REPO_ROOT = Path(__file__).resolve().parents[2]
# the rules whose jobs run the method named by their `method` wildcard
METHOD_RULES = ("finetune", "evaluate")
# pipeline order, for tables; rules not listed follow in alphabetical order
RULE_ORDER = ("prepare_data", "gradient_sparsity", "intrinsic_dimension", "tune_select", "finetune", "evaluate",
              "export", "d90", "gift_view", "aggregate", "mlflow_models", "comparison_report")


@dataclass(frozen=True)
class Module:
    """One Python file: a module of the package (dotted name) or a workflow script."""

    name: str
    path: Path
    imports: frozenset[str]  # dotted names it imports, unresolved (filtered against the package)
    data: tuple[Path, ...]  # files it declares in DATA_FILES
    methods: tuple[str, ...]  # method names its @register classes declare


def _package_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _absolute(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    """The module a ``from X import ...`` names, relative imports resolved against ``name``."""
    if not node.level:
        return node.module or ""
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _import_statements(body: list[ast.stmt]):
    """Every import statement in ``body``, at any depth (functions, classes, ``if``/``try``
    blocks): imports are statements, so expressions are never searched."""
    todo = list(body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            todo.extend(getattr(node, field, None) or ())


def _imported_names(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    out: set[str] = set()
    for node in _import_statements(tree.body):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        else:
            module = _absolute(node, name, is_package)
            out.add(module)
            # `from pkg import x` imports the submodule pkg.x when there is one
            out.update(f"{module}.{alias.name}" for alias in node.names if alias.name != "*")
    return out


def _declared_data(tree: ast.Module, root: Path) -> tuple[Path, ...]:
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "DATA_FILES"):
            return tuple(root / p for p in ast.literal_eval(node.value))
    return ()


def _registered_methods(tree: ast.Module) -> tuple[str, ...]:
    """``name = "<method>"`` of each class decorated with ``@register``."""
    out = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        if not any(getattr(d, "id", getattr(d, "attr", None)) == "register" for d in node.decorator_list):
            continue
        for stmt in node.body:
            if (isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == "name" for t in stmt.targets)
                    and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)):
                out.append(stmt.value.value)
    return tuple(out)


def parse_module(path: Path, name: str, root: Path) -> Module:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError) as exc:
        shown = path.relative_to(root) if path.is_relative_to(root) else path
        line = f" line {exc.lineno}" if getattr(exc, "lineno", None) else ""
        raise PeftlabError(f"{shown}{line}: {getattr(exc, 'msg', exc)}: fix it or undo the edit") from None
    is_package = path.name == "__init__.py"
    return Module(name, path, frozenset(_imported_names(tree, name, is_package)),
                  _declared_data(tree, root), _registered_methods(tree))


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


class CodeGraph:
    """The import graph of ``src/peftlab`` and the workflow scripts of one repository root."""

    def __init__(self, root: str | Path = REPO_ROOT, package_dir: str | Path | None = None):
        self.root = Path(root).resolve()
        src = Path(package_dir).resolve() if package_dir else self.root / "src" / PACKAGE
        self.modules = {}
        for path in sorted(src.rglob("*.py")):
            name = _package_name(path, src)
            self.modules[name] = parse_module(path, name, self.root)
        scripts = {p.stem: parse_module(p, f"<script {p.stem}>", self.root)
                   for p in sorted((self.root / "workflow" / "scripts").glob("*.py"))}
        # a script whose name starts with `_` is a helper the rules' scripts import, not a rule's
        self.helpers = {n: m for n, m in scripts.items() if n.startswith("_")}
        self.scripts = {n: m for n, m in scripts.items() if n not in self.helpers}
        self.method_modules = {m: mod.name for mod in self.modules.values() for m in mod.methods}
        self._hashes: dict[Path, bytes] = {}
        self._rule_files: dict[tuple[str, str | None], list[Path]] = {}
        self._fingerprints: dict[tuple[str, str | None], str] = {}

    # -- closures ---------------------------------------------------------------------------

    def _edges(self, module: Module) -> set[str]:
        """The package's modules ``module`` imports, with their parent packages."""
        out = set()
        for name in module.imports:
            if name in self.modules:
                out.add(name)
                out.update(p for p in _parents(name) if p in self.modules)
        return out

    def closure(self, roots: list[Module]) -> set[str]:
        """Every module of the package that importing ``roots`` runs (the roots included)."""
        seen = {r.name for r in roots if r.name in self.modules}
        todo = [n for r in roots for n in self._edges(r)]
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(self._edges(self.modules[name]) - seen)
        return seen

    def method_module(self, method: str) -> Module:
        try:
            return self.modules[self.method_modules[method]]
        except KeyError:
            raise KeyError(f"no module of {PACKAGE}.methods registers a method named '{method}'") from None

    @staticmethod
    def _key(rule: str, method: str | None) -> tuple[str, str | None]:
        """A job's code depends on its method only in a per-method rule."""
        return rule, method if rule in METHOD_RULES else None

    def rule_modules(self, rule: str, method: str | None = None) -> set[str]:
        """The package modules a job of ``rule`` (for ``method``, in a per-method rule) runs."""
        rule, method = self._key(rule, method)
        roots = [self.script(rule)] + ([self.method_module(method)] if method is not None else [])
        return self.closure(roots)

    def rule_files(self, rule: str, method: str | None = None) -> list[Path]:
        """The script, every module and every declared data file the job's result depends on."""
        key = self._key(rule, method)
        if key not in self._rule_files:
            modules = [self.modules[n] for n in sorted(self.rule_modules(*key))]
            data = {p for m in modules for p in m.data}
            script = self.script(rule)
            helpers = [h.path for n, h in sorted(self.helpers.items()) if n in script.imports]
            self._rule_files[key] = [script.path, *helpers, *(m.path for m in modules), *sorted(data)]
        return self._rule_files[key]

    def script(self, rule: str) -> Module:
        try:
            return self.scripts[rule]
        except KeyError:
            raise KeyError(f"rule '{rule}' has no script workflow/scripts/{rule}.py") from None

    # -- fingerprints -----------------------------------------------------------------------

    def _file_hash(self, path: Path) -> bytes:
        if path not in self._hashes:
            self._hashes[path] = hashlib.sha256(path.read_bytes() if path.exists() else b"<absent>").digest()
        return self._hashes[path]

    def files_fingerprint(self, paths: list[Path]) -> str:
        h = hashlib.sha256()
        for p in paths:
            rel = p.relative_to(self.root) if p.is_relative_to(self.root) else p
            h.update(str(rel).encode() + b"\0" + self._file_hash(p))
        return h.hexdigest()[:16]

    def fingerprint(self, rule: str, method: str | None = None) -> str:
        """Hash of the content of the code a job of ``rule`` runs (computed once per key)."""
        key = self._key(rule, method)
        if key not in self._fingerprints:
            self._fingerprints[key] = self.files_fingerprint(self.rule_files(*key))
        return self._fingerprints[key]

    def modules_fingerprint(self, names: list[str]) -> str:
        """Hash of the code importing the package modules ``names`` runs (outside a workflow)."""
        modules = sorted(self.closure([self.modules[n] for n in names]))
        return self.files_fingerprint([self.modules[n].path for n in modules])

    # -- what reruns ------------------------------------------------------------------------

    def rules(self) -> list[str]:
        order = {r: i for i, r in enumerate(RULE_ORDER)}
        return sorted(self.scripts, key=lambda r: (order.get(r, len(order)), r))

    def files(self) -> list[Path]:
        """Every file some rule's code may include: modules, scripts, declared data files."""
        data = {p for m in self.modules.values() for p in m.data}
        scripts = [*self.scripts.values(), *self.helpers.values()]
        return [m.path for m in self.modules.values()] + [s.path for s in scripts] + sorted(data)

    def reruns(self, path: str | Path) -> list[tuple[str, tuple[str, ...] | None]]:
        """The rules whose jobs an edit of ``path`` reruns directly (their dependants follow):
        ``(rule, None)`` for every job of the rule, ``(rule, methods)`` for those methods' jobs."""
        path = (self.root / path).resolve() if not Path(path).is_absolute() else Path(path)
        out = []
        for rule in self.rules():
            if path in self.rule_files(rule):
                out.append((rule, None))
            elif rule in METHOD_RULES:
                methods = tuple(sorted(m for m in self.method_modules if path in self.rule_files(rule, m)))
                if methods:
                    out.append((rule, methods))
        return out


@cache
def default_graph() -> CodeGraph:
    """The graph of the package as imported (for code fingerprints outside a workflow)."""
    return CodeGraph(REPO_ROOT, Path(__file__).resolve().parent)


def _split(reruns: list[tuple[str, tuple[str, ...] | None]], all_methods: set[str]) -> tuple[str, str]:
    """Rules all of whose jobs rerun; per-method rules with the methods whose jobs rerun."""
    every = [r for r, m in reruns if m is None or set(m) == all_methods]
    some: dict[tuple[str, ...], list[str]] = {}
    for rule, methods in reruns:
        if rule not in every:
            some.setdefault(methods, []).append(rule)
    per_method = "; ".join(f"{' and '.join(rules)} of {', '.join(m)}" for m, rules in some.items())
    return ", ".join(every), per_method


def describe(reruns: list[tuple[str, tuple[str, ...] | None]], all_methods: set[str]) -> str:
    """``gradient_sparsity; finetune and evaluate of sift``: ``CodeGraph.reruns`` in words."""
    return "; ".join(part for part in _split(reruns, all_methods) if part) or "nothing"


def rerun_table(graph: CodeGraph) -> str:
    """Markdown table: each file (grouped when they rerun the same jobs) and what it reruns."""
    groups: dict[tuple[str, str], list[str]] = {}
    methods = set(graph.method_modules)
    for path in graph.files():
        key = _split(graph.reruns(path), methods)
        groups.setdefault(key, []).append(str(path.relative_to(graph.root)))
    rows = ["| you edit | reruns every job of | reruns the jobs of these methods only |", "|---|---|---|"]
    for every, some in sorted(groups, key=lambda k: (bool(k[0] or k[1]), k[0].count(","), k)):
        files = ", ".join(f"`{f}`" for f in sorted(groups[every, some]))
        rows.append(f"| {files} | {every or ('nothing' if not some else '-')} | {some or '-'} |")
    return "\n".join(rows)
