"""Analysis on the runs of the paper's smoke sweeps: the tables' numbers against values recomputed
straight from MLflow, store and export giving identical files, the notebooks executing (slow); the
interval, the LaTeX, the default source and the sizes' experiments and folders on their own (fast)."""

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from scipy import stats

import analysis.__main__ as cli
from analysis import paper
from analysis.paper import PARTS
from analysis.tables import Table, summarize
from sweeps.spec import load_spec

from .conftest import ROOT
from .sweep_helpers import run_sweep, sweep_env


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tracking store holding paper sweeps at smoke size: one of each part (T1 on the MLP)."""
    tmp = tmp_path_factory.mktemp("paper")
    env = sweep_env(tmp)
    for spec in ("lr_select", "t1_mlp", "t2_grid", "t3_ablations"):
        run_sweep(ROOT / "sweeps" / "specs" / f"{spec}.yaml", env, "--size", "smoke")
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


@pytest.mark.slow
def test_tables_match_mlflow_and_store_and_export_agree(store):
    tmp, env = store
    out = analysis(env, "tables", "--smoke", "--out", str(tmp / "a"))
    assert "tables and 6 figures" in out
    t1 = tmp / "a" / "tables" / "t1_main.md"
    for variant in ("sigmoid", "p0.5", "ste"):
        expected = np.mean(mlflow_values(env, "t1-mlp-smoke",
                                         {"trial.variant": variant}, {"model.arch": "mlp"},
                                         "test/accuracy_binary"))
        got = cell(t1, {"architecture": "mlp", "variant": variant}, "binary eval")
        assert float(got.split()[0]) == pytest.approx(expected, abs=5e-4 + 1e-9)
    soft = mlflow_values(env, "t3-ablations-smoke", {"trial.variant": "granularity=unit"}, {},
                         "test/accuracy_soft")
    got = cell(tmp / "a" / "tables" / "t3_ablations.md", {"variant": "granularity=unit"},
               "soft eval")
    assert float(got) == pytest.approx(np.mean(soft), abs=5e-4 + 1e-9)
    grid = mlflow_values(env, "t2-grid-smoke", {}, {"activation.p": "0.5",
                                                    "activation.slope": "2.0"},
                         "test/accuracy_binary")
    got = cell(tmp / "a" / "tables" / "t2_binary_mlp_c1.2.md", {"p \\ slope": "0.5"}, "s = 2")
    assert float(got.split()[0]) == pytest.approx(np.mean(grid), abs=5e-4 + 1e-9)  # two seeds
    assert "runs ended" in t1.read_text() and "% MLflow experiment" in t1.with_suffix(".tex").read_text()

    # the figures are attached to the sweeps' parent runs
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("t2-grid-smoke")
    [parent] = client.search_runs([exp.experiment_id], "tags.`sweep.role` = 'parent'")
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert "figures/t2_heatmap.png" in logged

    # the same again (`--size smoke` is `--smoke`), then from an export: identical files
    analysis(env, "tables", "--size", "smoke", "--out", str(tmp / "b"))
    analysis(env, "export", "--size", "smoke", "--out", str(tmp / "export"))
    analysis(env, "tables", "--smoke", "--source", str(tmp / "export"), "--out", str(tmp / "c"))
    for other in ("b", "c"):
        compare = filecmp.dircmp(tmp / "a", tmp / other)
        assert _identical(compare), other


def _identical(compare: filecmp.dircmp) -> bool:
    _, mismatch, errors = filecmp.cmpfiles(compare.left, compare.right, compare.common_files,
                                           shallow=False)
    return (not mismatch and not errors and not compare.left_only and not compare.right_only
            and all(_identical(sub) for sub in compare.subdirs.values()))


@pytest.mark.slow
def test_notebooks_execute(store, tmp_path):
    tmp, env = store
    env = {**env, "ANALYSIS_SOURCE": env["MLFLOW_TRACKING_URI"], "ANALYSIS_SIZE": "smoke",
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


@pytest.mark.slow
def test_committed_paper_files_regenerate_byte_for_byte_from_the_export(tmp_path):
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    analysis(env, "tables", "--source", str(ROOT / "paper" / "runs"), "--out", str(tmp_path))
    for part in ("tables", "figures"):  # (no figures before a part that draws any)
        assert (ROOT / "paper" / part).exists() == (tmp_path / part).exists(), part
        if (tmp_path / part).exists():
            assert _identical(filecmp.dircmp(ROOT / "paper" / part, tmp_path / part)), part
    assert (ROOT / "paper" / "checks.md").read_bytes() == (tmp_path / "checks.md").read_bytes()


def test_a_build_removes_what_it_no_longer_makes_of_the_sweeps_it_read(tmp_path):
    """T3 alone: a T3 table an earlier build wrote and this one does not is removed; the tables
    of the parts not read (LR, T1, T2) and other files stay; the claims are T3's alone."""
    from analysis import runs

    loaded = runs.select(runs.from_export(ROOT / "paper" / "first-edition" / "runs",
                                          ["t3-ablations"]))
    stale = tmp_path / "tables" / "t3_ablations_c1.md"
    kept = [tmp_path / "tables" / name for name in ("t1_main.md", "t2_best.tex",
                                                    "lr_selection.md", "notes.txt")]
    kept.append(tmp_path / "figures" / "t2_heatmap.png")
    for path in [stale, *kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("from an earlier build")
    tables, _, _ = paper.build(loaded, tmp_path)
    assert [t.name for t in tables] == ["t3_ablations", "claims"]
    assert not stale.exists() and all(path.exists() for path in kept)
    assert (tmp_path / "tables" / "t3_ablations.md").exists()


@pytest.mark.parametrize("values", [[0.81, 0.83, 0.86], [0.5, 0.52], [0.1, 0.1, 0.1], [0.7, 0.7]])
def test_summarize_is_the_student_t_interval(values):
    x = np.array(values)
    got = summarize(pd.Series([*values, np.nan]))
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    assert got["n"] == len(x) and got["mean"] == pytest.approx(x.mean())
    assert got["std"] == pytest.approx(x.std(ddof=1))
    assert got["lo"] == pytest.approx(x.mean() - half, abs=1e-12)
    assert got["hi"] == pytest.approx(x.mean() + half, abs=1e-12)


def test_summarize_of_one_or_no_value_has_no_interval():
    one = summarize(pd.Series([0.5]))
    assert one["mean"] == 0.5 and one["n"] == 1
    assert all(np.isnan(one[k]) for k in ("std", "lo", "hi"))
    assert summarize(pd.Series([np.nan]))["n"] == 0


def test_latex_is_an_escaped_booktabs_table_with_its_provenance():
    frame = pd.DataFrame({"p \\ slope": ["0.5", "1"], "hard_sigmoid": ["0.8 ± 0.1", "—"],
                          "95% CI": ["[0.7, 0.9]", "a & b #1"], "seeds": [3, 1]})
    tex = Table("t9_x", "T9 mean ± std, p ≥ 0.5 & 10% of it", frame, "MLflow experiment e; 4 runs").latex()
    assert tex.splitlines() == [
        "% MLflow experiment e; 4 runs",
        r"\begin{table}[t]",
        r"\centering",
        r"\caption{T9 mean $\pm$ std, p $\geq$ 0.5 \& 10\% of it}",
        r"\label{tab:t9_x}",
        r"\begin{tabular}{llll}",
        r"\toprule",
        r"p \textbackslash \space slope & hard\_sigmoid & 95\% CI & seeds \\",
        r"\midrule",
        r"0.5 & 0.8 $\pm$ 0.1 & [0.7, 0.9] & 3 \\",
        r"1 & -- & a \& b \#1 & 1 \\",
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
    ]
    assert tex.endswith("\\end{table}\n")


def test_default_source_reads_the_local_store_through_mlflow_and_never_creates_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "runs" / "mlflow.db"
    monkeypatch.setattr(cli, "LOCAL_STORE", store)
    assert cli.default_source(["t1-mlp"]) == str(cli.EXPORT)
    assert not store.exists() and not store.parent.exists()

    store.parent.mkdir()
    MlflowClient(f"sqlite:///{store}").create_experiment("t1-mlp")
    assert cli.default_source(["t1-mlp", "t2-grid"]) == f"sqlite:///{store}"
    assert cli.default_source(["t2-grid"]) == str(cli.EXPORT)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert cli.default_source(["t2-grid"]) == "http://127.0.0.1:5001"


def test_each_size_reads_its_own_experiments_into_its_own_folder():
    assert paper.experiments() == paper.experiments("full") == PARTS
    assert paper.experiments("smoke") == {k: tuple(f"{v}-smoke" for v in names)
                                          for k, names in PARTS.items()}
    assert paper.experiments("quick")["t1"] == ("t1-mlp-quick", "t1-gated-quick",
                                                "t1-bottleneck-quick", "t1-cnn-quick")
    with pytest.raises(ValueError, match="unknown size 'big'"):
        paper.experiments("big")
    assert [paper.spec_name(e) for e in ("t1-cnn", "t1-mlp-smoke", "t2-grid-quick", "other-quick")] == [
        "t1-cnn", "t1-mlp", "t2-grid", "other-quick"]
    specs = {load_spec(path).name for path in (ROOT / "sweeps" / "specs").glob("*.yaml")}
    assert set(paper.all_experiments()) <= specs  # every part's experiment has its spec
    assert cli.default_out("tables", "full") == ROOT / "paper"
    assert cli.default_out("export", "full") == ROOT / "paper" / "runs"
    assert cli.default_out("tables", "quick") == ROOT / "runs" / "paper-quick"
    assert cli.default_out("export", "smoke") == ROOT / "runs" / "paper-smoke" / "runs"


def test_a_size_without_runs_is_one_line_naming_its_experiments(tmp_path, capsys):
    assert cli.main(["tables", "--size", "quick", "--source", str(ROOT / "paper" / "runs"),
                     "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"error: no runs of {', '.join(paper.all_experiments('quick'))}"
                                       f" in {ROOT / 'paper' / 'runs'}\n")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["tables", "--size", "big"])
    assert exit_.value.code == 2


def test_the_specs_train_every_variant_at_the_rate_the_committed_selection_chose():
    """T1 at each variant's selected rate on its architecture; T2 and T3 at the default unit's
    (p0.5) on theirs (docs/paper.md); read from the committed LR exports."""
    from analysis import runs
    from analysis.tables import selected_rates

    exports = [p.name for p in runs.exports(ROOT / "paper" / "runs") if p.name.startswith("lr-select")]
    chosen = selected_rates(runs.select(runs.from_export(ROOT / "paper" / "runs", exports)))
    specs = ROOT / "sweeps" / "specs"
    t1 = [load_spec(specs / f"{name.replace('-', '_')}.yaml") for name in PARTS["t1"]]
    assert t1
    for spec in t1:
        for variant, settings in spec.variants.items():
            arch = spec.fixed.get("model.arch", "mlp")
            assert settings["optim.lr"] == chosen[(arch, variant)], (spec.name, variant)
    for settings in load_spec(specs / "t2_grid.yaml").variants.values():
        assert settings["optim.lr"] == chosen[(settings["model.arch"], "p0.5")]
    assert load_spec(specs / "t3_ablations.yaml").fixed["optim.lr"] == chosen[("mlp", "p0.5")]
