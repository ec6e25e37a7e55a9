"""Analysis on the runs of the paper's smoke sweeps: the tables' numbers against values recomputed
straight from MLflow, store and export giving identical files, the notebooks executing."""

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from analysis.paper import SPECS

from .conftest import ROOT
from .sweep_helpers import run_sweep, sweep_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tracking store holding the three paper sweeps at smoke size."""
    tmp = tmp_path_factory.mktemp("paper")
    env = sweep_env(tmp)
    for spec in ("t1_main", "t2_grid", "t3_ablations"):
        run_sweep(ROOT / "sweeps" / "specs" / f"{spec}.yaml", env, "--smoke")
    return tmp, env


def analysis(env, *args):
    proc = subprocess.run([sys.executable, "-m", "analysis", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def cell(table: Path, row: dict[str, str], column: str) -> str:
    lines = [line for line in table.read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        values = dict(zip(header, [c.strip() for c in line.strip("|").split("|")], strict=True))
        if all(values[k] == v for k, v in row.items()):
            return values[column]
    raise AssertionError(f"no row {row} in {table}")


def mlflow_values(env, experiment, tags, params, metric):
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(experiment)
    query = " and ".join([f"tags.`{k}` = '{v}'" for k, v in tags.items()]
                         + [f"params.`{k}` = '{v}'" for k, v in params.items()])
    return [r.data.metrics[metric] for r in client.search_runs([exp.experiment_id], query)]


def test_tables_match_mlflow_and_store_and_export_agree(store):
    tmp, env = store
    out = analysis(env, "tables", "--smoke", "--out", str(tmp / "a"))
    assert "tables and 6 figures" in out
    t1 = tmp / "a" / "tables" / "t1_main.md"
    for variant in ("sigmoid", "p0.5", "ste"):
        expected = np.mean(mlflow_values(env, f"{SPECS['t1']}-smoke",
                                         {"trial.variant": variant}, {"model.arch": "mlp"},
                                         "test/accuracy_binary"))
        got = cell(t1, {"architecture": "mlp", "variant": variant}, "binary eval")
        assert float(got.split()[0]) == pytest.approx(expected, abs=5e-4)
    soft = mlflow_values(env, f"{SPECS['t3']}-smoke", {"trial.variant": "granularity=unit"}, {},
                         "test/accuracy_soft")
    got = cell(tmp / "a" / "tables" / "t3_ablations.md", {"variant": "granularity=unit"},
               "soft eval")
    assert float(got) == pytest.approx(np.mean(soft), abs=5e-4)
    grid = mlflow_values(env, f"{SPECS['t2']}-smoke", {}, {"activation.p": "1.0",
                                                           "activation.slope": "2.0"},
                         "test/accuracy_binary")
    got = cell(tmp / "a" / "tables" / "t2_binary_mlp_c1.2.md", {"p \\ slope": "1"}, "s = 2")
    assert float(got) == pytest.approx(grid[0], abs=5e-4)
    assert "runs ended" in t1.read_text() and "% MLflow experiment" in t1.with_suffix(".tex").read_text()

    # the figures are attached to the sweeps' parent runs
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(f"{SPECS['t2']}-smoke")
    [parent] = client.search_runs([exp.experiment_id], "tags.`sweep.role` = 'parent'")
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert "figures/t2_heatmap.png" in logged

    # the same again, then from an export: identical files
    analysis(env, "tables", "--smoke", "--out", str(tmp / "b"))
    analysis(env, "export", "--smoke", "--out", str(tmp / "export"))
    analysis(env, "tables", "--smoke", "--source", str(tmp / "export"), "--out", str(tmp / "c"))
    for other in ("b", "c"):
        compare = filecmp.dircmp(tmp / "a", tmp / other)
        assert _identical(compare), other


def _identical(compare: filecmp.dircmp) -> bool:
    _, mismatch, errors = filecmp.cmpfiles(compare.left, compare.right, compare.common_files,
                                           shallow=False)
    return (not mismatch and not errors and not compare.left_only and not compare.right_only
            and all(_identical(sub) for sub in compare.subdirs.values()))


def test_notebooks_execute(store, tmp_path):
    tmp, env = store
    env = {**env, "ANALYSIS_SOURCE": env["MLFLOW_TRACKING_URI"], "ANALYSIS_SMOKE": "1",
           "ANALYSIS_OUT": str(tmp_path / "out"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "jrt")}
    for notebook in sorted((ROOT / "analysis" / "notebooks").glob("*.py")):
        ipynb = tmp_path / f"{notebook.stem}.ipynb"
        subprocess.run([Path(sys.executable).parent / "jupytext", "--quiet", "--to", "ipynb",
                        "--output", str(ipynb), str(notebook)], check=True, env=env)
        proc = subprocess.run([Path(sys.executable).parent / "jupyter", "nbconvert", "--to",
                               "html", "--execute", str(ipynb), "--output-dir", str(tmp_path)],
                              env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (tmp_path / f"{notebook.stem}.html").stat().st_size > 10_000
    assert os.path.exists(tmp_path / "out" / "tables" / "t1_main.md")


def test_committed_paper_files_regenerate_byte_for_byte_from_the_export(tmp_path):
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    analysis(env, "tables", "--source", str(ROOT / "paper" / "runs"), "--out", str(tmp_path))
    for part in ("tables", "figures"):
        assert _identical(filecmp.dircmp(ROOT / "paper" / part, tmp_path / part)), part
    assert (ROOT / "paper" / "checks.md").read_bytes() == (tmp_path / "checks.md").read_bytes()
