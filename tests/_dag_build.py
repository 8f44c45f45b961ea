"""Build the workflow's DAG for many config files in one process, through Snakemake's API
(what ``snakemake -n --configfile F --replace-workflow-config`` does, minus a process start
and the imports per file). Prints one JSON line per file:
``{"file": ..., "outcome": "ok" | "exit" | "exception", "message": ...}``.

Usage: python tests/_dag_build.py <workflow dir> <config file>...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def build_dag(workdir: Path, configfile: Path) -> dict:
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    try:
        with SnakemakeApi(OutputSettings()) as api:
            workflow = api.workflow(
                resource_settings=ResourceSettings(cores=1),
                config_settings=ConfigSettings(configfiles=[configfile], replace_workflow_config=True),
                snakefile=workdir / "Snakefile",
                workdir=workdir,
            )
            workflow.dag()
    except SystemExit as exc:  # the workflow stopped itself: what the user reads
        return {"outcome": "exit", "message": str(exc.code)}
    except BaseException as exc:  # noqa: BLE001 - anything else would be a traceback
        return {"outcome": "exception", "message": f"{type(exc).__name__}: {exc}"}
    return {"outcome": "ok", "message": ""}


def main() -> None:
    workdir = Path(sys.argv[1]).resolve()
    for name in sys.argv[2:]:
        result = build_dag(workdir, Path(name).resolve())
        print(json.dumps({"file": name, **result}), flush=True)


if __name__ == "__main__":
    main()
