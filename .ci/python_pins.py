"""Helpers of .ci/check-python.

``python_pins.py REPORT``: the pinned requirements pip resolved (``pip install --dry-run
--report``), one ``name==version`` per line, without the project itself and without torch and
the CUDA libraries only torch needs (torch resolves beyond 3.11, but only to a multi-GB CUDA build).

``python_pins.py --import-all``: imports every module of peftlab; a module may fail only
because torch is not installed. Prints what imported and what needs torch.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

TORCH_ONLY = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")


def pins(report_path: str) -> list[str]:
    with open(report_path) as f:
        report = json.load(f)
    out = []
    for item in report["install"]:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        canonical = re.sub(r"[-_.]+", "-", name).lower()
        if canonical != "peftlab" and not TORCH_ONLY.match(canonical):
            out.append(f"{name}=={version}")
    if not any(item["metadata"]["name"].lower() == "torch" for item in report["install"]):
        sys.exit("python_pins: torch is not among the resolved packages: is its pin still in pyproject.toml?")
    return sorted(out, key=str.lower)


def import_all() -> None:
    import peftlab

    root = Path(peftlab.__file__).parent  # every file: a package that needs torch hides its modules from pkgutil
    names = sorted(".".join(("peftlab", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
                   for p in root.rglob("*.py") if p != root / "__init__.py")
    imported, need_torch = ["peftlab"], []
    for name in names:
        try:
            importlib.import_module(name)
            imported.append(name)
        except ModuleNotFoundError as exc:
            if exc.name != "torch":
                raise
            need_torch.append(name)
    print(f"Python {sys.version.split()[0]}: {len(imported)} modules import; "
          f"{len(need_torch)} need torch, not installed here: {', '.join(need_torch)}")
    missing = {"peftlab.config", "peftlab.codegraph", "peftlab.report", "peftlab.tuning"} - set(imported)
    if missing:
        sys.exit(f"python_pins: these torch-free modules did not import: {sorted(missing)}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--import-all"]:
        import_all()
    else:
        print("\n".join(pins(sys.argv[1])))
