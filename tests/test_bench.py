"""Every benchmark runs end to end at its smoke size and gives the figures its targets judge, so
that none of them rots between two `make bench` (the figures themselves mean nothing here)."""

import glob
import json
import os
import subprocess
import sys

import pytest

from bench.decide import median_interval, verdict
from bench.run import SMOKE, TARGETS

from .conftest import ROOT

# Figures a smoke size does not give: the tracking server's (PostgreSQL is the integration tests'),
# and those of the architectures it leaves out.
NOT_AT_SMOKE_SIZE = {("scale", "server load per trial, largest / smallest size"),
                     ("scale", "server load of 1000 runs s"),
                     *((name, key) for name, keys in TARGETS.items() for key, _, _ in keys
                       if "archs" in SMOKE[name] and key.split(":")[0] not in SMOKE[name]["archs"])}


def test_the_median_interval_is_the_sign_tests():
    assert median_interval([1.0] * 5) is None  # P(all 5 on one side) = 1/16 > 5%
    assert median_interval(list(range(6))) == (0, 5)  # 1 - 2/64 = 96.9%
    assert median_interval(list(range(9))) == (1, 7)  # 1 - 2 * 10/512 = 96.1%
    assert median_interval(list(range(20))[::-1]) == (5, 14)  # order does not matter


def test_a_target_is_decided_only_when_the_whole_interval_is_on_one_side():
    def at_most(value):
        return value <= 1.05

    assert verdict(1.0, [0.98, 0.99, 1.0, 1.0, 1.01, 1.02], at_most).startswith("met, decided over 6")
    assert verdict(1.0, [0.9, 0.95, 1.0, 1.0, 1.1, 1.2], at_most).startswith("met, undecided")
    assert verdict(1.2, [1.1, 1.15, 1.2, 1.2, 1.25, 1.3], at_most).startswith("MISSED, decided")
    assert "no 95% interval" in verdict(1.0, [1.0, 1.0, 1.0], at_most)
    assert verdict(1.0, None, at_most) == "met (one measurement)"


def test_every_benchmark_has_a_smoke_size():
    assert set(SMOKE) == set(TARGETS)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TARGETS))
def test_the_benchmark_runs_at_its_smoke_size(name, tmp_path):
    if name == "cluster" and not glob.glob("/usr/lib/postgresql/*/bin"):
        pytest.skip("the cluster benchmark records on PostgreSQL: `make system-deps`")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "bench/run.py", "--smoke", "--only", name, "--out",
                          str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads((tmp_path / "out" / "results.json").read_text())["benchmarks"][name]
    for key, _, _ in TARGETS[name]:
        if (name, key) not in NOT_AT_SMOKE_SIZE:
            assert isinstance(figures.get(key), float), f"{name}: no figure {key!r}"
            assert f"target {name}: {key} = " in out.stdout, f"no verdict on {key!r}"
    assert (tmp_path / "out" / "results.md").read_text().startswith("Measured on")


def test_bench_smoke_writes_nothing_into_the_repository():
    out = subprocess.run([sys.executable, "bench/run.py", "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "give --out" in out.stderr
