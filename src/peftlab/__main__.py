"""Command line: ``python -m peftlab <command>`` from the repository root.

- ``report``: write the comparison report of whatever results exist (jobs failed or the
  pipeline was stopped) to ``<report>.partial.html``, naming the missing runs and why.
- ``sync-mlflow``: log the records queued while the MLflow store was unreachable.

Both read the same configuration as the pipeline: ``config/config.yaml``, then each
``--configfile`` merged over it (``--replace`` uses the last one alone, as Snakemake's
``--replace-workflow-config``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import PeftlabError


def _config(args) -> dict:
    from .config import deep_merge, load_yaml, validate_config

    files = list(args.configfile or [])
    base = [] if args.replace and files else [Path("config/config.yaml")]
    paths = base + [Path(f) for f in (files[-1:] if args.replace else files)]
    config: dict = {}
    for p in paths:
        if not p.exists():
            raise PeftlabError(f"config file {p} not found: run from the repository root or pass --configfile")
        config = deep_merge(config, load_yaml(p) or {})
    return validate_config(config)


def _mlflow(config: dict) -> dict:
    from .tracking import default_store

    return dict(config["mlflow"], default_store=default_store(config["results_dir"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftlab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("report", "report of whatever results exist (partial report)"),
                       ("sync-mlflow", "log records queued while the MLflow store was unreachable")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--configfile", action="append", help="config file merged over config/config.yaml")
        p.add_argument("--replace", action="store_true", help="use the last --configfile alone")
        if name == "report":
            p.add_argument("--logs", default="logs", help="the jobs' log folder (default: logs)")
        else:
            p.add_argument("--tracking-uri", help="send the queued records to this store instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = _config(args)
        if args.command == "report":
            from .report import write_partial_report

            print(write_partial_report(config, args.logs, _mlflow(config)))
            return 0
        from .tracking import sync_pending

        counts = sync_pending(_mlflow(config), tracking_uri_override=args.tracking_uri)
        print(f"synced {counts['synced']}, waiting for their job {counts['waiting']}, "
              f"store unreachable {counts['failed']}, still queued {counts['left']}")
        return 0 if counts["left"] == 0 else 1
    except PeftlabError as exc:
        print(f"peftlab: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
