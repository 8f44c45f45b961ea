"""Statistics and figures of the comparison report."""

from __future__ import annotations

import math

import numpy as np
import pytest

from peftlab.report import mean_ci95, method_palette, pareto_front


def test_mean_ci95_matches_student_t():
    mean, half = mean_ci95([0.8, 0.82, 0.84])
    assert mean == pytest.approx(0.82)
    # t_{0.975, 2} = 4.302653; sd = 0.02
    assert half == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-5)
    assert mean_ci95([0.5]) == (0.5, None)


def test_pareto_front():
    points = [(100, 0.8), (10, 0.7), (1000, 0.79), (10, 0.75), (5000, 0.85)]
    assert pareto_front(points) == [3, 0, 4]


def test_palette_is_stable():
    a = method_palette(["lora", "full", "bitfit"])
    b = method_palette(["bitfit", "lora", "full"])
    assert a == b and len(set(map(tuple, a.values()))) == 3
    assert np.allclose(a["bitfit"], method_palette(["bitfit", "full"])["bitfit"])


def test_atomic_write_leaves_no_temp_and_normal_permissions(tmp_path):
    import os

    from peftlab.io import atomic_path, write_json

    write_json(tmp_path / "a.json", {"x": float("nan"), "y": 1})
    assert (tmp_path / "a.json").read_text().count("null") == 1
    assert oct((tmp_path / "a.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "b.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert sorted(os.listdir(tmp_path)) == ["a.json"]  # nothing half-written left behind


def _umask():
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
