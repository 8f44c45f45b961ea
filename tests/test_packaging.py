"""The conda environment of the rules pins the same versions as pyproject.toml; the workflow
extra (snakemake and its SLURM executor) the same as the dev extra."""

from __future__ import annotations

import tomllib

import yaml


def _pins(lines):
    return {line.split("==")[0].lower(): line.split("==")[1] for line in lines if "==" in line}


def test_env_pins_equal_pyproject(repo):
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((repo / "envs" / "peftlab.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert _pins(pip) == _pins(project["dependencies"])
    assert "python=3.11" in env["dependencies"]
    assert _pins(project["dependencies"])["torch"] == "2.13.0"


def test_workflow_extra_pins_equal_dev(repo):
    extras = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    workflow, dev = _pins(extras["workflow"]), _pins(extras["dev"])
    assert {"snakemake", "snakemake-executor-plugin-slurm", "snakemake-executor-plugin-slurm-jobstep"} <= set(workflow)
    assert all(dev[name] == version for name, version in workflow.items())


def test_the_package_installs_on_the_pythons_users_run(repo):
    """3.11 (CI's full run), 3.12 and 3.13 (CI checks 3.12: .ci/check-python)."""
    from packaging.specifiers import SpecifierSet

    supported = SpecifierSet(tomllib.loads((repo / "pyproject.toml").read_text())["project"]["requires-python"])
    assert all(supported.contains(v) for v in ("3.11.7", "3.12.1", "3.13.0"))
    assert "bash .ci/check-python 3.12" in (repo / ".ci" / "run").read_text()
