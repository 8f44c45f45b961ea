"""Malformed configurations fail when the DAG is built, before any job, with one line that
names the key, the bad value and what is allowed (issue 9, item 1).

Every case of ``_malformed.CASES`` (over 100 mistakes a user could make) is turned into a
config file and the workflow's DAG is built for it through Snakemake's API, in one process
(``_dag_build.py``): the same Snakefile parse and validation as ``snakemake -n``, without a
process start per file. One case per kind of mistake also runs as a real ``snakemake -n`` on
the command line, where the console must show that one line and nothing like a traceback.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from _malformed import CASES, base_config, experiments_copy
from _workflow_copy import workflow_copy

REPO = Path(__file__).resolve().parents[1]
# Snakemake's own info line when --configfile replaces config/config.yaml
SNAKEMAKE_INFO = re.compile(r"^Config file \S+ is (replaced|extended) by additional config")


@pytest.fixture(scope="module")
def case_files(tmp_path_factory) -> dict[str, Path]:
    """One config file per case (plus the valid base), each with its own experiments copy."""
    root = tmp_path_factory.mktemp("malformed")
    files = {}
    for case in [None, *CASES]:
        name = case.id if case else "valid-base"
        folder = root / name
        folder.mkdir()
        exp = experiments_copy(folder / "experiments")
        cfg = base_config(exp)
        if case:
            case.mutate(cfg, exp)
        (folder / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
        files[name] = folder / "config.yaml"
    return files


def _problems(case, result: dict) -> list[str]:
    """What is wrong with a case's outcome (empty: rejected cleanly)."""
    message = result["message"]
    if result["outcome"] != "exit":  # a crash (a traceback on the console) or no error at all
        return [f"{result['outcome']}: {message}"]
    problems = [] if message.startswith("peftlab: ") else ["not a peftlab line"]
    if "\n" in message or "Traceback" in message:
        problems.append("more than one line")
    problems += [f"does not name {part!r}" for part in case.expect if part not in message]
    return [f"{p} in {message!r}" for p in problems]


def test_every_malformed_config_fails_when_the_dag_is_built(case_files):
    assert len(CASES) >= 100 and len({c.id for c in CASES}) == len(CASES)
    names = ["valid-base", *(c.id for c in CASES)]
    res = subprocess.run([sys.executable, str(REPO / "tests" / "_dag_build.py"), str(REPO),
                          *(str(case_files[n]) for n in names)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    results = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [r["file"] for r in results] == [str(case_files[n]) for n in names]
    by_name = dict(zip(names, results, strict=True))
    assert by_name["valid-base"]["outcome"] == "ok", by_name["valid-base"]  # the mutations break it
    failures = {case.id: p for case in CASES if (p := _problems(case, by_name[case.id]))}
    assert not failures, "\n".join(f"{k}: {v}" for k, v in failures.items())


# one case per kind of mistake, through the real command line
CLI_CASES = ["unknown-top-level-key", "seeds-comma-text", "model-folder-pickle-only", "task-file-missing",
             "task-fractions-leave-no-train", "variant-duplicate", "variant-missing-file", "variant-yaml-tab",
             "variant-duplicate-key", "variant-lr-without-dot", "lora-unknown-param", "id-training-typo"]


def _console(*args, cwd=REPO):
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n", *args], cwd=cwd, capture_output=True,
                         text=True, timeout=600)
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    return res.returncode, lines


def _assert_one_line(rc: int, lines: list[str], expect) -> None:
    """Failed, and the console shows the one peftlab line and at most Snakemake's info line."""
    assert rc == 1, lines
    ours = [line for line in lines if line.startswith("peftlab: ")]
    others = [line for line in lines if not line.startswith("peftlab: ") and not SNAKEMAKE_INFO.match(line)]
    assert len(ours) == 1 and not others, lines  # no traceback, no job listing, nothing else
    for part in expect:
        assert part in ours[0], (part, ours[0])


def test_malformed_configs_on_the_command_line(case_files):
    cases = {c.id: c for c in CASES}
    with ThreadPoolExecutor(max_workers=2) as pool:
        outputs = list(pool.map(lambda name: _console("--configfile", str(case_files[name]),
                                                      "--replace-workflow-config"), CLI_CASES))
    for name, (rc, lines) in zip(CLI_CASES, outputs, strict=True):
        _assert_one_line(rc, lines, cases[name].expect)


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        # a tab where YAML wants spaces, in the shipped config file itself
        (lambda text: text.replace("  minilm-l6: {}", "\tminilm-l6: {}"),
         ["config/config.yaml line", "not valid YAML", "spaces, not tabs"]),
        # a method given twice: YAML (and Snakemake's reader) would silently keep the last
        (lambda text: text.replace("  pafi: [default]", "  pafi: [default]\n  lora: [default]"),
         ["config/config.yaml line", "key 'lora' is given twice", "first on line"]),
    ],
    ids=["tab", "duplicate-key"],
)
def test_default_config_file_errors_name_file_and_line(tmp_path, edit, expect):
    work = workflow_copy(tmp_path)
    path = work / "config" / "config.yaml"
    path.write_text(edit(path.read_text()))
    rc, lines = _console(cwd=work)
    _assert_one_line(rc, lines, expect)


def test_command_line_override_names_the_key():
    # Snakemake reads the items of a --config list as text: they are typed as YAML would
    rc, lines = _console("--config", "seeds=[0, -3]")
    _assert_one_line(rc, lines, ["peftlab: config: 'seeds.1' = -3", "minimum of 0"])
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--config", "seeds=[3,4,5]"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-2000:]
