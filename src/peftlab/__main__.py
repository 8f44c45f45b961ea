"""Command line: ``python -m peftlab <command>`` from the repository root.

- ``report``: write the comparison report of whatever results exist (jobs failed or the
  pipeline was stopped) to ``<report>.partial.html``, naming the missing runs and why.
- ``sync-mlflow``: log the records queued while the MLflow store was unreachable.
- ``reruns``: which rules an edit of each file of the workflow's code reruns.
- ``export``: a completed run's standard artifacts (a peft adapter folder, a merged
  transformers model folder, or peftlab's own folder), each checked against the run.

``report``, ``sync-mlflow`` and ``export`` read the configuration the pipeline reads:
``config/config.yaml``, or, when ``--configfile`` is given, those files instead (merged in
order), as ``snakemake --configfile`` does.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import PeftlabError

DEFAULT_CONFIG = Path("config/config.yaml")


def _config(args) -> dict:
    from .config import deep_merge, load_yaml, validate_config

    if args.replace:
        print("peftlab: --replace is no longer needed and does nothing: --configfile replaces "
              "config/config.yaml, as in the pipeline", file=sys.stderr)
    paths = [Path(f) for f in args.configfile] if args.configfile else [DEFAULT_CONFIG]
    config: dict = {}
    for p in paths:
        if not p.exists():
            raise PeftlabError(f"config file {p} not found: run from the repository root or pass --configfile")
        config = deep_merge(config, load_yaml(p) or {})
    return validate_config(config, str(paths[0]) if len(paths) == 1 else "config")


def _mlflow(config: dict) -> dict:
    from .tracking import default_store

    return dict(config["mlflow"], default_store=default_store(config["results_dir"]))


def _report(args) -> int:
    from .report import write_partial_report

    config = _config(args)
    print(write_partial_report(config, args.logs, _mlflow(config)))
    return 0


def _sync_mlflow(args) -> int:
    from .tracking import sync_pending

    counts = sync_pending(_mlflow(_config(args)), tracking_uri_override=args.tracking_uri)
    print(f"synced {counts['synced']}, waiting for their job {counts['waiting']}, "
          f"store unreachable {counts['failed']}, still queued {counts['left']}")
    return 0 if counts["left"] == 0 else 1


def _reruns(args) -> int:
    from .codegraph import REPO_ROOT, CodeGraph, describe, rerun_table

    root = Path.cwd() if (Path.cwd() / "src" / "peftlab").is_dir() else REPO_ROOT
    graph = CodeGraph(root)
    if args.markdown:
        print(rerun_table(graph))
        return 0
    paths = [Path(p).resolve() for p in args.paths] or graph.files()
    methods = set(graph.method_modules)
    for path in paths:
        shown = path.relative_to(graph.root) if path.is_relative_to(graph.root) else path
        print(f"{shown}: {describe(graph.reruns(path), methods)}")
    return 0


def _export(args) -> int:
    from .artifacts import export_run
    from .config import RunKey
    from .models import ModelSpec

    config = _config(args)
    results = Path(config["results_dir"])
    run = Path(args.run)
    parts = run.parts[-5:]
    if len(parts) < 5 or not parts[4].startswith("seed") or not parts[4][4:].isdigit():
        raise PeftlabError(f"'{args.run}' is not a run: give its folder, "
                           "results/finetune/<model>/<task>/<method>/<variant>/seed<N>")
    key = RunKey(*parts[:4], int(parts[4][4:]))
    if key.model not in config["models"]:
        raise PeftlabError(f"model '{key.model}' of run {args.run} is not in the config: pass the --configfile "
                           "the run was made with")
    run_dir = run if run.is_dir() else results / "finetune" / key.path()
    out = Path(args.out) if args.out else results / "export" / key.path()
    manifest = export_run(run_dir, ModelSpec.from_config(key.model, config["models"][key.model]),
                          results / "data" / key.model / key.task, out)
    for form, entry in manifest["forms"].items():
        print(f"{out / entry['path']}: {form} form, max |logit difference| from the run "
              f"{entry['max_abs_logit_diff']:.2g} on {manifest['verified_on']}; load: {entry['load']}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m peftlab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("report", "report of whatever results exist (partial report)"),
                       ("sync-mlflow", "log records queued while the MLflow store was unreachable"),
                       ("export", "a completed run's standard artifacts, checked against the run")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--configfile", action="append",
                       help="config file used instead of config/config.yaml (given twice or more: merged in order)")
        p.add_argument("--replace", action="store_true", help=argparse.SUPPRESS)  # deprecated, does nothing
        if name == "report":
            p.add_argument("--logs", default="logs", help="the jobs' log folder (default: logs)")
        elif name == "export":
            p.add_argument("run", help="the run's folder: results/finetune/<model>/<task>/<method>/<variant>/seed<N>")
            p.add_argument("--out", help="where to write (default: results/export/<model>/<task>/<method>/<variant>/seed<N>)")
        else:
            p.add_argument("--tracking-uri", help="send the queued records to this store instead")
    text = "which rules an edit of each file reruns (their dependants follow)"
    p = sub.add_parser("reruns", help=text, description=text)
    p.add_argument("paths", nargs="*", help="files to ask about (default: every file of the rules' code)")
    p.add_argument("--markdown", action="store_true", help="one table, files grouped by what they rerun")
    return parser


COMMANDS = {"report": _report, "sync-mlflow": _sync_mlflow, "reruns": _reruns, "export": _export}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except PeftlabError as exc:
        print(f"peftlab: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
