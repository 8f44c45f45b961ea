"""What code each workflow rule runs, found independently of ``peftlab.codegraph``: the rule's
script is read from its ``.smk`` file, its imports are followed with the standard library's
``modulefinder`` (which reads bytecode, not the syntax tree), a per-method job adds its method
module as the registry reports it, and the schema files count as ``config.py``'s code (it reads
them from ``config.SCHEMA_DIR``). The tests check the workflow's fingerprints against this."""

from __future__ import annotations

import modulefinder
import re
from pathlib import Path

PACKAGE = "peftlab"


class _PackageFinder(modulefinder.ModuleFinder):
    """Follows imports inside the package only (the rest is neither code of ours nor cheap),
    plus the ``local`` modules a script imports from its own folder (Snakemake puts a script's
    folder on ``sys.path``)."""

    def __init__(self, path, local=()):
        super().__init__(path=path)
        self.local = set(local)

    def _ours(self, name):
        return name.split(".")[0] == PACKAGE or name in self.local

    def import_hook(self, name, caller=None, fromlist=None, level=-1):
        # an absolute import from outside the package is skipped without being recorded as
        # a bad module: modulefinder would then also skip a relative import of the same name
        # (`import io` and `from .io import ...` in one module)
        if level == 0 and not self._ours(name):
            return None
        return super().import_hook(name, caller, fromlist, level)

    def find_module(self, name, path, parent=None):
        fqname = f"{parent.__name__}.{name}" if parent else name
        if not self._ours(fqname) and name != "__init__":  # a package's own __init__
            raise ImportError(fqname)
        return super().find_module(name, path, parent)


def _files(finder: _PackageFinder) -> set[Path]:
    out = set()
    for name, module in finder.modules.items():
        if finder._ours(name) and module.__file__:
            path = Path(module.__file__).resolve()
            out.add(path)
    return out


def script_closure(script: Path, src: Path) -> set[Path]:
    """The files that running ``script`` may import (at import or call time): the package's,
    and the modules of the script's own folder."""
    local = {p.stem for p in script.parent.glob("*.py") if p != script}
    finder = _PackageFinder([str(src), str(script.parent)], local)
    finder.run_script(str(script))
    return _files(finder)


def module_closure(module: str, src: Path) -> set[Path]:
    finder = _PackageFinder([str(src)])
    finder.import_hook(module)
    return _files(finder)


def rule_scripts(workdir: Path) -> dict[str, Path]:
    """rule (or checkpoint) name -> its ``script:``, read from the workflow's rule files (a rule
    made by ``use rule A as B`` runs A's)."""
    out = {}
    for smk in sorted((workdir / "workflow" / "rules").glob("*.smk")):
        for name, body in re.findall(r"^(?:rule|checkpoint) (\w+):\n(.*?)(?=^(?:rule|checkpoint) |\Z)", smk.read_text(),
                                     flags=re.M | re.S):
            script = re.search(r'^\s+script:\s*\n\s+"([^"]+)"', body, flags=re.M)
            if script:
                out[name] = (smk.parent / script.group(1)).resolve()
    for smk in sorted((workdir / "workflow" / "rules").glob("*.smk")):  # use rule A as B: B runs A's script
        for base, name in re.findall(r"^use rule (\w+) as (\w+)", smk.read_text(), flags=re.M):
            out[name] = out[base]
    return out


def job_code(workdir: Path, rule: str, method: str | None, scripts: dict[str, Path], cache: dict) -> set[Path]:
    """Every file a job of ``rule`` (of ``method`` when the job has that wildcard) runs or reads."""
    key = (rule, method)
    if key not in cache:
        src = workdir / "src"
        files = {scripts[rule]} | script_closure(scripts[rule], src)
        if method is not None:
            from peftlab.methods import METHODS

            files |= module_closure(METHODS[method].__module__, src)
        config_py = (src / PACKAGE / "config.py").resolve()
        if config_py in files:  # config.py reads the schemas (config.SCHEMA_DIR)
            files |= {p.resolve() for p in (workdir / "workflow" / "schemas").glob("*.yaml")}
        cache[key] = files
    return cache[key]
