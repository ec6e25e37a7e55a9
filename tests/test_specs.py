"""Sweep specs: validation (one test per kind of bad input), smoke overrides, spaces and grids."""

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from sweeps.space import DefineByRun
from sweeps.spec import SpecError, load_spec

from .conftest import ROOT
from .sweep_helpers import edit_spec

SPECS = sorted((ROOT / "sweeps" / "specs").glob("*.yaml"))
GOOD = """
name: t
fixed: {data.name: synthetic, budget.epochs: 3}
space:
  activation.p: {uniform: [0.0, 1.0]}
  model.arch: {choice: [mlp, bottleneck]}
  model.code_bits: {choice: [8, 16], when: {model.arch: [bottleneck]}}
search: {algorithm: tpe, samples: 4}
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def edited(**changes) -> str:
    return edit_spec(GOOD, **changes)


BAD = {
    "malformed yaml": ("name: t\nspace: {activation.p: [0, 1\n", "not valid YAML at line"),
    "not a mapping": ("- a\n- b\n", "a spec is a mapping"),
    "unknown top-level key": (edited(searh={"algorithm": "tpe"}),
                              "searh: unknown key (did you mean search?)"),
    "unknown section key": (edited(**{"search/sampels": 3}), "search.sampels: unknown key"),
    "bad name": (edited(name="My Sweep"), "name: expected a lower-case name"),
    "wrong type": (edited(**{"search/samples": "8"}), "search.samples: expected an integer >= 1"),
    "fixed value out of range": (edited(**{"fixed/activation.slope": -1.0}),
                                 "fixed: activation.slope = -1.0: must be > 0"),
    "unknown trial key": (edited(**{"fixed/model.depth": 3}), "fixed: model.depth: unknown key"),
    "range out of bounds": (edited(**{"space/activation.p": {"uniform": [0.0, 1.5]}}),
                            "space.activation.p: activation.p = 1.5: must be in [0, 1]"),
    "negative slope": (edited(**{"space/activation.slope": {"uniform": [-1.0, 2.0]}}),
                       "space.activation.slope: activation.slope = -1.0: must be > 0"),
    "inverted range": (edited(**{"space/activation.p": {"uniform": [0.9, 0.1]}}),
                       "space.activation.p.uniform: expected [low, high]"),
    "loguniform from 0": (edited(**{"space/activation.slope": {"loguniform": [0.0, 2.0]}}),
                          "space.activation.slope.loguniform: the low end must be > 0"),
    "unknown architecture": (edited(**{"space/model.arch": {"choice": ["mlp", "resnet"]}}),
                             'model.arch = "resnet": expected one of'),
    "unknown distribution": (edited(**{"space/activation.p": {"normal": [0, 1]}}),
                             "space.activation.p.normal: unknown distribution"),
    "empty space": (edited(space={}), "space: empty"),
    "metric not produced": (edited(metric="val/accuracy"),
                            "metric: 'val/accuracy' is not a metric the trials report"),
    "test-set metric": (edited(metric="test/accuracy_binary"), "metric: test/accuracy_binary is "
                                                               "measured on the test set"),
    "bad mode": (edited(mode="maximize"), "mode: expected max or min"),
    "grid values with a bayesian searcher": (
        edited(**{"space/activation.p": {"grid": [0.0, 1.0]}}),
        "space.activation.p.grid: grid values need search.algorithm: grid, not tpe"),
    "range with grid": (edited(**{"search/algorithm": "grid"}),
                        "space.activation.p.uniform: a grid sweep takes grid values"),
    "several seeds with tpe": (edited(seeds=[0, 1]), "seeds: several seeds need search.algorithm"),
    "variants with tpe": (edited(variants={"a": {"activation.p": 0.0}}),
                          "variants: variants need search.algorithm: grid"),
    "key for another architecture": (
        edited(**{"space/model.code_bits": {"choice": [8, 16]}}),
        "model.code_bits does not apply when model.arch = mlp"),
    "condition on a later key": (
        edited(**{"space/model.code_bits": {"choice": [8], "when": {"optim.name": ["sgd"]}}}),
        "space.model.code_bits.when.optim.name: must be fixed or an earlier space entry"),
    "searched and fixed": (edited(**{"fixed/activation.p": 0.5}),
                           "space.activation.p: also set in fixed"),
    "fractional gpus above one": (edited(resources={"gpus": 1.5}),
                                  "resources.gpus: expected 0, a fraction below 1"),
    "grace period beyond budget": (edited(scheduler={"name": "asha", "grace_period": 5}),
                                   "scheduler.grace_period: expected an integer in [1, "),
    "unknown scheduler": (edited(scheduler={"name": "pbt"}), "scheduler.name: expected one of"),
    "unknown smoke key": (edited(smoke={"epochs": 1}), "smoke.epochs: unknown key"),
}


@pytest.mark.parametrize("kind", BAD)
def test_bad_spec_is_refused_with_one_line_naming_the_field(kind, tmp_path):
    text, message = BAD[kind]
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert message in str(err.value)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read the spec"):
        load_spec(tmp_path / "nope.yaml")


def test_the_command_exits_2_before_importing_ray_or_mlflow(tmp_path):
    path = write(tmp_path, BAD["range out of bounds"][0])
    script = ("import sys; from sweeps.__main__ import main; code = main(sys.argv[1:]); "
              "print('imported:', 'ray' in sys.modules, 'mlflow' in sys.modules, file=sys.stderr); "
              "sys.exit(code)")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "STORAGE": str(tmp_path / "r"),
           "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", script, "run", str(path)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2
    assert lines[0].startswith(f"error: {path}: space.activation.p: activation.p = 1.5")
    assert lines[1:] == ["imported: False False"]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
@pytest.mark.parametrize("smoke", [False, True])
def test_shipped_specs_are_valid_and_say_how_to_launch_them(path, smoke):
    spec = load_spec(path, smoke=smoke)
    assert spec.num_trials >= 1 and spec.smoke == smoke
    header = path.read_text().split("\n\n")[0]
    assert header.startswith("#") and "make sweep" in header


def test_smoke_overrides_merge_into_the_sections(tmp_path):
    text = edited(smoke={"fixed": {"budget.epochs": 1}, "search": {"samples": 2}})
    full, smoke = load_spec(write(tmp_path, text)), load_spec(write(tmp_path, text), smoke=True)
    assert (full.epochs, full.search.samples) == (3, 4)
    assert (smoke.epochs, smoke.search.samples, smoke.fixed["data.name"]) == (1, 2, "synthetic")
    assert smoke.sweep_id != full.sweep_id and smoke.experiment == "t-smoke"


def test_sweep_id_follows_the_file_content(tmp_path):
    a = load_spec(write(tmp_path, GOOD, "a.yaml"))
    assert load_spec(write(tmp_path, GOOD, "a.yaml")).sweep_id == a.sweep_id
    assert load_spec(write(tmp_path, GOOD + "\n# changed\n", "a.yaml")).sweep_id != a.sweep_id


def test_define_by_run_samples_conditional_keys_only_for_their_architecture(tmp_path):
    spec = load_spec(write(tmp_path, edited(**{
        "space/model.widths": {"choice": [[32], [16, 8]], "when": {"model.arch": ["mlp"]}}})))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        constants = DefineByRun(spec)(trial)
        config = spec.trial_config({**trial.params, **constants})  # what the trainable builds
        arch = trial.params["model.arch"]
        seen.add(arch)
        assert ("model.code_bits" in trial.params) == (arch == "bottleneck")
        assert ("model.widths" in trial.params) == (arch == "mlp")
        if arch == "mlp":
            assert config.model.widths in ((32,), (16, 8))
        study.tell(trial, 0.5)
    assert seen == {"mlp", "bottleneck"}


def test_grid_is_variants_times_points_times_seeds(tmp_path):
    spec = load_spec(write(tmp_path, """
name: g
fixed: {data.name: synthetic}
variants:
  sigmoid: {activation.kind: sigmoid}
  coin: {activation.p: 0.5}
space:
  model.arch: {grid: [mlp, bottleneck]}
  model.code_bits: {grid: [8, 16], when: {model.arch: [bottleneck]}}
search: {algorithm: grid}
seeds: [0, 1]
"""))
    grid = spec.grid()
    assert len(grid) == spec.num_trials == 2 * (1 + 2) * 2
    assert {"variant": "sigmoid", "activation.kind": "sigmoid", "model.arch": "bottleneck",
            "model.code_bits": 16, "seed": 1} in grid
    assert all(spec.trial_config(t).seed == t["seed"] for t in grid)


def test_only_an_unreachable_store_is_retried_later():
    import requests
    from mlflow.exceptions import MlflowException

    from sweeps.tracking import unreachable

    assert unreachable(requests.ConnectionError("refused"))
    assert unreachable(MlflowException("API request failed: Max retries exceeded with url"))
    assert not unreachable(MlflowException("Run 'abc' not found"))
    assert not unreachable(NameError("run"))  # a bug must surface, not wait in the queue
