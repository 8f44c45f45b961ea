"""The conda environment of the rules pins the same versions as pyproject.toml."""

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
