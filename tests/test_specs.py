"""Sweep specs: validation (one test per kind of bad input), the sizes' overrides (smoke, quick) and
their names, spaces and grids."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from sweeps import __main__ as cli
from sweeps.space import DefineByRun
from sweeps.spec import SIZES, SpecError, SweepSpec, load_spec

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


def with_entry(line: str) -> str:
    """GOOD with a space entry before model.arch (line 5)."""
    return GOOD.replace("  model.arch:", f"  {line}\n  model.arch:")


def with_fixed(settings: str, text: str = GOOD) -> str:
    """`text` (GOOD) with more fixed settings, e.g. "data.train_size: 100"."""
    return text.replace("budget.epochs: 3}", f"budget.epochs: 3, {settings}}}")


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
    "several seeds with tpe and asha": (edited(seeds=[0, 1]),
                                        "seeds: repeated seeds under tpe need scheduler: none"),
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
    "unknown quick key": (edited(quick={"max_trials": 10}), "quick.max_trials: unknown key"),
    "a size section that is no mapping": (edited(quick=[1]), "quick: expected a mapping, got list"),
    # spec files of any content
    "python tag": ("name: !!python/object/apply:os.system [ls]\n",
                   "line 1: the tag !!python/object/apply:os.system is not allowed"),
    "set tag": (GOOD + "seeds: !!set {1, 2}\n", "the tag !!set is not allowed"),
    "binary tag": (GOOD + "description: !!binary aGVsbG8=\n", "the tag !!binary is not allowed"),
    "alias bomb": ("name: t\na: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(9)),
        "more than 100000 values once its aliases are expanded"),
    "recursive alias": (GOOD + "variants: &v {a: *v}\n", "variants.a: contains itself (a recursive alias)"),
    "recursive list": (GOOD + "seeds: &s [0, *s]\n", "seeds[1]: contains itself"),
    "absurd nesting": ("name: t\nfixed: " + "[" * 40 + "]" * 40 + "\n", "nested deeper than 32 levels"),
    "nesting beyond the parser": ("name: t\nfixed: " + "[" * 20000 + "]" * 20000 + "\n",
                                  "not valid YAML"),
    "a key that is not text": (GOOD.replace("budget.epochs: 3}", "budget.epochs: 3, 1: 2}"),
                               "fixed: keys are text, got 1"),
    "a line break in a key": (GOOD + '"a\\nb": 1\n', "a\\nb: unknown key"),
    "an integer of 5000 digits": (GOOD + "max_failures: 1" + "0" * 5000 + "\n", "not valid YAML"),
    # duplicated keys at any level
    "duplicated top-level key": (GOOD + "name: u\n", "duplicated key 'name' at line 9 (first at line 2)"),
    "duplicated key in a section": (GOOD.replace("samples: 4}", "samples: 4, samples: 5}"),
                                    "duplicated key 'samples' at line 8 (first at line 8, columns"),
    "duplicated space entry": (with_entry("activation.p: {uniform: [0, 1]}"),
                               "duplicated key 'activation.p' at line 6 (first at line 5)"),
    "duplicated condition key": (GOOD.replace("when: {model.arch: [bottleneck]}",
                                              "when: {model.arch: [bottleneck], model.arch: [mlp]}"),
                                 "duplicated key 'model.arch' at line 7"),
    # non-finite numbers anywhere
    "inf in fixed": (GOOD.replace("budget.epochs: 3", "budget.epochs: 3, activation.slope: .inf"),
                     "fixed.activation.slope: inf is not a finite number"),
    "nan in a range": (GOOD.replace("uniform: [0.0, 1.0]", "uniform: [0.0, .nan]"),
                       "space.activation.p.uniform[1]: nan is not a finite number"),
    "-inf in a choice": (GOOD.replace("choice: [8, 16]", "choice: [8, -.inf]"),
                         "space.model.code_bits.choice[1]: -inf is not a finite number"),
    "inf in a condition": (GOOD.replace("[bottleneck]}}", "[bottleneck, .inf]}}"),
                           "space.model.code_bits.when.model.arch[1]: inf is not a finite number"),
    "inf in resources": (GOOD + "resources: {cpus: .inf}\n", "resources.cpus: inf is not a finite number"),
    "nan in the scheduler": (GOOD + "scheduler: {reduction_factor: .nan}\n",
                             "scheduler.reduction_factor: nan is not a finite number"),
    "inf in the smoke section": (GOOD + "smoke: {fixed: {optim.lr: -.inf}}\n",
                                 "smoke.fixed.optim.lr: -inf is not a finite number"),
    "inf in a variant": (edited(**{"search/algorithm": "grid", "space/activation.p": {"grid": [0.5]},
                                   "space/model.arch": {"grid": ["mlp", "bottleneck"]},
                                   "space/model.code_bits": {"grid": [8],
                                                             "when": {"model.arch": ["bottleneck"]}},
                                   "variants": {"noisy": {"activation.noise_std": float("inf")}}}),
                         "variants.noisy.activation.noise_std: inf is not a finite number"),
    "a number beyond a float": (GOOD.replace("budget.epochs: 3", "budget.epochs: 3, optim.lr: 1" + "0" * 400),
                                "fixed: optim.lr: 1329-bit integer: expected a finite number"),
    "a seed beyond 32 bits": (GOOD.replace("samples: 4}", "samples: 4, seed: 4294967296}"),
                              "search.seed: seed = 4294967296: must be in [0, 2**32)"),
    # conditions that can never hold
    "condition value an earlier entry never takes": (
        GOOD.replace("when: {model.arch: [bottleneck]}", "when: {model.arch: [bottleneck, cnn]}"),
        "space.model.code_bits.when.model.arch: 'cnn' is never a value of model.arch (it takes 'mlp', "
        "'bottleneck')"),
    "condition value the fixed key never takes": (
        GOOD.replace("  model.arch: {choice: [mlp, bottleneck]}\n", "").replace(
            "budget.epochs: 3}", "budget.epochs: 3, model.arch: mlp}"),
        "space.model.code_bits.when.model.arch: 'bottleneck' is never a value of model.arch (it takes "
        "'mlp')"),
    "entry active in no combination": (GOOD.replace(
        "  model.code_bits: {choice: [8, 16], when: {model.arch: [bottleneck]}}",
        "  optim.name: {choice: [adam, sgd], when: {model.arch: [mlp]}}\n"
        "  model.code_bits: {choice: [8], when: {model.arch: [bottleneck], optim.name: [sgd]}}"),
        "space.model.code_bits.when: holds in no combination"),
    "condition on an entry that is never there": (GOOD.replace(
        "  model.code_bits: {choice: [8, 16], when: {model.arch: [bottleneck]}}",
        "  optim.name: {choice: [adam, sgd], when: {model.arch: [cnn, mlp]}}").replace(
        "choice: [mlp, bottleneck]", "choice: [mlp]"), "'cnn' is never a value of model.arch"),
    "searched and set by a variant": (
        edited(**{"search/algorithm": "grid", "space/activation.p": {"grid": [0.5]},
                  "space/model.arch": {"grid": ["mlp"]}, "space/model.code_bits": None,
                  "variants": {"p1": {"activation.p": 1.0}}}),
        "space.activation.p: also set in variants.p1"),
    # sizes and names
    "grid above max_trials": (edited(**{"search/algorithm": "grid", "seeds": list(range(11)),
                                        "space/activation.p": {"grid": [i / 100 for i in range(100)]},
                                        "space/model.arch": {"grid": ["mlp"]},
                                        "space/model.code_bits": None}),
                              "max_trials: the grid has 1100 trials (variants x grid points x seeds), above "
                              "the limit of 1000: shrink it, or raise the limit with a top-level "
                              "`max_trials: 1100`"),
    "samples above max_trials": (edited(max_trials=3), "search.samples: 4 trials, above the limit of 3: "
                                                       "lower it, or raise the limit with a top-level "
                                                       "`max_trials: 4`"),
    "max_trials not an integer": (edited(max_trials=1.5), "max_trials: expected an integer >= 1"),
    "name of 65 characters": (edited(name="n" * 65), "name: 65 characters, at most 64"),
    "variant name of 65 characters": (edited(**{"search/algorithm": "grid", "space": {
        "activation.p": {"grid": [0.5]}}, "variants": {"v" * 65: {}}}), "a variant's name has 1 to 64"),
    # a discrete entry's values are checked on their own, under their own entry
    "mixed types in a choice": (GOOD.replace("choice: [8, 16]", "choice: [8, sixteen]"),
                                'space.model.code_bits: model.code_bits = "sixteen": expected an integer'),
    "mixed types in the first entry": (
        GOOD.replace("choice: [mlp, bottleneck]", "choice: [mlp, bottleneck, 3]"),
        "space.model.arch: model.arch = 3: expected one of"),
    "a list among numbers": (GOOD.replace("choice: [8, 16]", "choice: [8, [16]]"),
                             "space.model.code_bits: model.code_bits = [16]: expected an integer"),
    "1 and 1.0 repeat": (with_entry("activation.cutoff: {choice: [1, 1.0]}"),
                         "space.activation.cutoff.choice: the values repeat"),
    # counts and sizes: a maximum each, or the data there is (synthetic: 2700 images after validation)
    "epochs without end": (edited(**{"fixed/budget.epochs": 1_000_000_000}),
                           "fixed: budget.epochs = 1000000000: must be <= 10000"),
    "a patience range above its maximum": (
        with_entry("budget.patience: {int: [0, 100000]}"),
        "space.budget.patience: budget.patience = 100000: must be <= 10000"),
    "a width too large": (with_entry("model.widths: {choice: [[64], [64, 1000000]]}"),
                          "space.model.widths: model.widths = [64, 1000000]: each must be <= 65536"),
    "a code too long": (GOOD.replace("choice: [8, 16]", "choice: [8, 100000]"),
                        "space.model.code_bits: model.code_bits = 100000: must be <= 65536"),
    "train_size beyond the data": (with_fixed("data.train_size: 10000"),
                                   "fixed: data.train_size: 10000 is more than the 2700 training images of "
                                   "synthetic left after the validation split (val_fraction 0.1)"),
    "train_size beyond the digits": (
        GOOD.replace("data.name: synthetic", "data.name: digits, data.train_size: 1797"),
        "fixed: data.train_size: 1797 is more than the 1294 training images of digits"),
    "a train_size range beyond the data": (
        with_entry("data.train_size: {int: [200, 5000]}"),
        "space.data.train_size: data.train_size: 5000 is more than the 2700"),
    "a validation split that leaves too few": (
        with_fixed("data.train_size: 2000", with_entry("data.val_fraction: {uniform: [0.1, 0.5]}")),
        "space.data.val_fraction: data.train_size: 2000 is more than the 1500 training images of synthetic "
        "left after the validation split (val_fraction 0.5)"),
    "a batch above a small train_size": (with_fixed("data.train_size: 100"),
                                         "fixed: budget.batch_size: 128 is more than the 100 training images "
                                         "a trial trains on (data.train_size 100)"),
    "a train_size range from 0 below the batch": (
        with_entry("data.train_size: {int: [0, 2000]}"),
        "space.data.train_size: budget.batch_size: 128 is more than the 1 training images a trial trains on"),
    "a batch choice above the data": (with_entry("budget.batch_size: {choice: [64, 4096]}"),
                                      "space.budget.batch_size: budget.batch_size: 4096 is more than the "
                                      "2700 training images of synthetic"),
    "a batch choice above a searched train_size": (
        with_entry("data.train_size: {choice: [500, 2000]}\n  budget.batch_size: {choice: [256, 1024]}"),
        "space.budget.batch_size: budget.batch_size: 1024 is more than the 500 training images a trial "
        "trains on (data.train_size 500)"),
    "a variant beyond the data": (
        edited(**{"search/algorithm": "grid", "space": {"activation.p": {"grid": [0.5]}},
                  "variants": {"digits": {"data.name": "digits", "data.train_size": 1500}}}),
        "variants.digits: data.train_size: 1500 is more than the 1294"),
    "max_concurrent": (edited(**{"search/max_concurrent": 100_000}),
                       "search.max_concurrent: 100000, at most 10000 (trials at once)"),
    "max_failures": (edited(max_failures=10**9), "max_failures: 1000000000, at most 100"),
    "reduction_factor": (edited(scheduler={"name": "asha", "reduction_factor": 1e6}),
                         "scheduler.reduction_factor: 1000000.0, at most 100"),
    "a trillion trials": (edited(max_trials=10**12, **{"search/samples": 10**12}),
                          "max_trials: 1000000000000, at most 10000000"),
    "cpus beyond a trial's threads": (edited(resources={"cpus": 5000}), "resources.cpus: 5000, at most 1024"),
}


@pytest.mark.parametrize("kind", BAD)
def test_bad_spec_is_refused_with_one_line_naming_the_field(kind, tmp_path):
    text, message = BAD[kind]
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert message in str(err.value)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


# (changes to GOOD exactly at a bound, the same one past it, the message then)
AT_THE_BOUND = {
    "epochs": ({"fixed/budget.epochs": 10_000}, {"fixed/budget.epochs": 10_001},
               "fixed: budget.epochs = 10001: must be <= 10000"),
    "an int range's high end": ({"space/activation.p_ramp_steps": {"int": [0, 10**9]}},
                                {"space/activation.p_ramp_steps": {"int": [0, 10**9 + 1]}},
                                "space.activation.p_ramp_steps: activation.p_ramp_steps = 1000000001: "
                                "must be <= 1000000000"),
    "the whole synthetic set": ({"fixed/data.train_size": 2700}, {"fixed/data.train_size": 2701},
                                "fixed: data.train_size: 2701 is more than the 2700 training images"),
    "a train_size range under a larger validation split": (
        {"fixed/data.val_fraction": 0.5, "space/data.train_size": {"int": [128, 1500]}},
        {"fixed/data.val_fraction": 0.5, "space/data.train_size": {"int": [128, 1501]}},
        "space.data.train_size: data.train_size: 1501 is more than the 1500 training images of synthetic "
        "left after the validation split (val_fraction 0.5)"),
    "a batch of the whole train_size": ({"fixed/data.train_size": 100, "fixed/budget.batch_size": 100},
                                        {"fixed/data.train_size": 100, "fixed/budget.batch_size": 101},
                                        "fixed: budget.batch_size: 101 is more than the 100 training images"),
    "a searched batch and train_size": (  # edit_spec sorts the keys: budget.batch_size comes first
        {"space/data.train_size": {"choice": [500, 2000]}, "space/budget.batch_size": {"choice": [64, 500]}},
        {"space/data.train_size": {"choice": [500, 2000]}, "space/budget.batch_size": {"choice": [64, 501]}},
        "space.data.train_size: budget.batch_size: 501 is more than the 500 training images a trial "
        "trains on"),
    "max_concurrent": ({"search/max_concurrent": 10_000}, {"search/max_concurrent": 10_001},
                       "search.max_concurrent: 10001, at most 10000"),
    "max_failures": ({"max_failures": 100}, {"max_failures": 101}, "max_failures: 101, at most 100"),
    "reduction_factor": ({"scheduler/reduction_factor": 100}, {"scheduler/reduction_factor": 100.5},
                         "scheduler.reduction_factor: 100.5, at most 100"),
    "max_trials": ({"max_trials": 10**7}, {"max_trials": 10**7 + 1},
                   "max_trials: 10000001, at most 10000000"),
    "cpus": ({"resources/cpus": 1024}, {"resources/cpus": 1024.5}, "resources.cpus: 1024.5, at most 1024"),
}


@pytest.mark.parametrize("kind", AT_THE_BOUND)
def test_a_count_or_size_at_its_bound_is_valid_and_one_past_it_refused(kind, tmp_path):
    at, past, message = AT_THE_BOUND[kind]
    spec = load_spec(write(tmp_path, edited(**at), "at.yaml"))
    assert spec.trial_config({}).runtime.threads == max(1, int(spec.resources.cpus))  # the trials build
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, edited(**past), "past.yaml"))
    assert message in str(err.value) and "\n" not in str(err.value)


# search.max_concurrent: a positive integer up to MAX_CONCURRENT or the word auto, nothing else
@pytest.mark.parametrize("value", [0, -1, 2.5, 2.0, True, "2", "Auto", "AUTO", "all", "", None,
                                   ["auto"], {"auto": 1}])
def test_max_concurrent_other_than_an_integer_or_auto_is_refused_in_one_line(value, tmp_path):
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, edited(**{"search/max_concurrent": value}) if value is not None
                        else GOOD.replace("samples: 4}", "samples: 4, max_concurrent: null}")))
    assert "search.max_concurrent: expected an integer >= 1 or auto" in str(err.value)
    assert str(err.value).startswith(str(tmp_path)) and "\n" not in str(err.value)


@pytest.mark.parametrize("algorithm", ["tpe", "qmc", "grid"])
def test_max_concurrent_auto_has_no_fixed_cap_and_a_sweep_id_of_its_own(algorithm, tmp_path):
    grid = {"search/algorithm": "grid", "space": {"activation.p": {"grid": [0.0, 1.0]}}}
    changes = grid if algorithm == "grid" else {"search/algorithm": algorithm}
    auto = load_spec(write(tmp_path, edited(**changes, **{"search/max_concurrent": "auto"})))
    assert auto.search.max_concurrent == "auto" and auto.search.concurrency is None
    fixed = [load_spec(write(tmp_path, edited(**changes, **{"search/max_concurrent": n})))
             for n in (1, 2, 10_000)]
    assert [spec.search.concurrency for spec in fixed] == [1, 2, 10_000]
    assert len({spec.sweep_id for spec in [auto, *fixed]}) == 4
    assert load_spec(write(tmp_path, edited(**changes))).search.concurrency == 2  # the default


def test_a_size_is_held_to_the_data_of_its_own_settings(tmp_path):
    path = write(tmp_path, GOOD + "quick: {fixed: {data.name: digits, data.train_size: 2000}}\n")
    assert load_spec(path).fixed == {"data.name": "synthetic", "budget.epochs": 3}
    with pytest.raises(SpecError, match="fixed: data.train_size: 2000 is more than the 1294 training "
                                        "images of digits"):
        load_spec(path, size="quick")


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
@pytest.mark.parametrize("size", ["", "smoke"])
def test_shipped_specs_are_valid_and_say_how_to_launch_them(path, size):
    spec = load_spec(path, size=size)
    assert spec.num_trials >= 1 and spec.size == size and spec.smoke == (size == "smoke")
    header = path.read_text().split("\n\n")[0]
    assert header.startswith("#") and "make sweep" in header


# The sweep ids of the shipped specs, as written and at smoke size: recorded sweeps resume and are
# read under these ids. An edit of a spec's meaning changes them (update this table with it); a change
# of the code must not (a trial-config key added with a default leaves them alone).
SHIPPED_IDS = {
    "sweeps/specs/quick.yaml": ("quick-e140ea5a", "quick-smoke-3136a1c3"),  # max_concurrent: auto
    "sweeps/specs/quick_gpu.yaml": ("quick-gpu-b9e6607c", "quick-gpu-smoke-ec48255f"),
    "sweeps/specs/lr_select.yaml": ("lr-select-e6c38e80", "lr-select-smoke-703be78c"),
    "sweeps/specs/lr_select_wide.yaml": ("lr-select-wide-289c40a4", "lr-select-wide-smoke-cc21ad45"),
    "sweeps/specs/lr_select_cnn.yaml": ("lr-select-cnn-659c377c", "lr-select-cnn-smoke-a47fbd32"),
    "sweeps/specs/t1_mlp.yaml": ("t1-mlp-89ca2a57", "t1-mlp-smoke-c9fdbb85"),
    "sweeps/specs/t1_gated.yaml": ("t1-gated-4a6e9c97", "t1-gated-smoke-04c8494e"),
    "sweeps/specs/t1_bottleneck.yaml": ("t1-bottleneck-4303e7ec", "t1-bottleneck-smoke-ac9e0c77"),
    "sweeps/specs/t1_cnn.yaml": ("t1-cnn-10e9f8a6", "t1-cnn-smoke-d8b951ea"),
    "sweeps/specs/t2_grid.yaml": ("t2-grid-5e11eb5a", "t2-grid-smoke-561ddc3c"),
    "sweeps/specs/t3_ablations.yaml": ("t3-ablations-d176afc1", "t3-ablations-smoke-8c3a744f"),
    "tests/specs/cluster_16.yaml": ("cluster-16-76c75f2f", None),
    "tests/specs/cluster_faults.yaml": ("cluster-faults-18597329", None),
    "tests/specs/cluster_smoke.yaml": ("cluster-smoke-aaae22c4", None),
    "tests/specs/cluster_worker_loss.yaml": ("cluster-worker-loss-9afcd673", None),
}


@pytest.mark.parametrize("name", SHIPPED_IDS)
def test_shipped_specs_keep_their_sweep_ids(name):
    full, smoke = SHIPPED_IDS[name]
    assert load_spec(ROOT / name).sweep_id == full
    if smoke:
        assert load_spec(ROOT / name, size="smoke").sweep_id == smoke
    else:
        with pytest.raises(SpecError, match="has no `smoke:` section"):
            load_spec(ROOT / name, size="smoke")


# SIZE=quick: each paper spec's laptop check (the CNN's at 3 epochs, the others at 6, on 20,000
# images); its settings and sweep ids stay these.
PAPER_QUICK = {"lr_select": (14, [100], "lr-select-quick-2cd27f94"),
               "lr_select_wide": (7, [100], "lr-select-wide-quick-38568f81"),
               "lr_select_cnn": (4, [100], "lr-select-cnn-quick-5a0baf98"),
               "t1_mlp": (21, [0, 1, 2], "t1-mlp-quick-d98e5577"),
               "t1_gated": (21, [0, 1, 2], "t1-gated-quick-37764c5b"),
               "t1_bottleneck": (21, [0, 1, 2], "t1-bottleneck-quick-5adfc7c2"),
               "t1_cnn": (10, [0, 1], "t1-cnn-quick-096b6b19"),
               "t2_grid": (48, [20], "t2-grid-quick-5e634a0c"),
               "t3_ablations": (18, [30, 31, 32], "t3-ablations-quick-91cb9348")}


@pytest.mark.parametrize("name", PAPER_QUICK)
def test_the_paper_specs_quick_size_is_a_short_study_on_20000_images(name):
    trials, seeds, sweep_id = PAPER_QUICK[name]
    spec = load_spec(ROOT / "sweeps" / "specs" / f"{name}.yaml", size="quick")
    assert (spec.experiment, spec.sweep_id) == (f"{spec.name}-quick", sweep_id)
    config = spec.trial_config({})
    assert (config.data.name, config.data.train_size, config.budget.epochs,
            config.budget.batch_size) == ("fashion_mnist", 20000, 3 if "cnn" in name else 6, 128)
    assert (spec.num_trials, list(spec.seeds)) == (trials, seeds)
    header = (ROOT / "sweeps" / "specs" / f"{name}.yaml").read_text().split("\n\n")[0]
    assert "SIZE=quick" in header


@pytest.mark.parametrize("size", SIZES)
def test_a_sizes_overrides_merge_into_the_sections(size, tmp_path):
    text = edited(**{size: {"fixed": {"budget.epochs": 1}, "search": {"samples": 2}}})
    full, sized = load_spec(write(tmp_path, text)), load_spec(write(tmp_path, text), size=size)
    assert (full.epochs, full.search.samples, full.size) == (3, 4, "")
    assert (sized.epochs, sized.search.samples, sized.fixed["data.name"]) == (1, 2, "synthetic")
    assert sized.size == size and sized.smoke == (size == "smoke")
    assert sized.sweep_id != full.sweep_id and sized.experiment == f"t-{size}"


def test_the_sizes_are_separate_sweeps_named_after_them(tmp_path):
    path = write(tmp_path, GOOD + "smoke: {fixed: {budget.epochs: 1}}\nquick: {fixed: {budget.epochs: 2}}\n")
    full, smoke, quick = (load_spec(path, size=size) for size in ("", "smoke", "quick"))
    assert (full.experiment, smoke.experiment, quick.experiment) == ("t", "t-smoke", "t-quick")
    assert full.sweep_id == f"t-{full.digest[:8]}" and smoke.sweep_id == f"t-smoke-{smoke.digest[:8]}"
    assert quick.sweep_id == f"t-quick-{quick.digest[:8]}"
    assert (full.epochs, smoke.epochs, quick.epochs) == (3, 1, 2)
    # the spec as written and its smoke size mean what they meant before sizes had names
    assert "size" not in full.meaning() and "size" not in smoke.meaning()
    assert (full.meaning()["smoke"], smoke.meaning()["smoke"]) == (False, True)
    assert quick.meaning()["size"] == "quick" and quick.meaning()["smoke"] is False


def test_a_quick_section_equal_to_the_body_is_still_its_own_sweep(tmp_path):
    path = write(tmp_path, GOOD + "quick: {fixed: {budget.epochs: 3}}\n")
    full, quick = load_spec(path), load_spec(path, size="quick")
    assert {k: v for k, v in quick.meaning().items() if k != "size"} == full.meaning()
    assert quick.digest != full.digest and quick.sweep_id.startswith("t-quick-")


@pytest.mark.parametrize("size", SIZES)
def test_a_size_the_spec_does_not_define_is_one_line(size, tmp_path):
    other = next(s for s in SIZES if s != size)
    path = write(tmp_path, GOOD + f"{other}: {{fixed: {{budget.epochs: 1}}}}\n")
    with pytest.raises(SpecError) as err:
        load_spec(path, size=size)
    assert str(err.value) == (f"{path} has no `{size}:` section, so no {size} size (sizes it "
                              f"defines: {other})")
    with pytest.raises(SpecError, match=r"unknown size 'big' \(one of smoke, quick"):
        load_spec(path, size="big")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeps", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_check_takes_a_size():
    proc = run_cli("check", "--size", "quick", "sweeps/specs/t1_mlp.yaml", "sweeps/specs/t2_grid.yaml")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["sweeps/specs/t1_mlp.yaml: ok (21 trials, grid)",
                                        "sweeps/specs/t2_grid.yaml: ok (48 trials, grid)"]
    for args in (["--smoke"], ["--size", "smoke"]):
        proc = run_cli("check", *args, "sweeps/specs/t1_mlp.yaml")
        assert proc.stdout == "sweeps/specs/t1_mlp.yaml: ok (8 trials, grid)\n", proc.stderr


def test_a_size_the_spec_lacks_or_no_size_at_all_exits_2():
    proc = run_cli("run", "--size", "quick", "sweeps/specs/quick.yaml")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == ("error: sweeps/specs/quick.yaml has no `quick:` section, so no quick size "
                           "(sizes it defines: smoke)\n")
    proc = run_cli("check", "--size", "big", "sweeps/specs/quick.yaml")
    assert proc.returncode == 2 and "invalid choice: 'big'" in proc.stderr
    proc = run_cli("check", "--smoke", "--size", "quick", "sweeps/specs/t1_mlp.yaml")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr


@pytest.mark.parametrize(("args", "hint"), [
    ([], "make sweep SPEC=s.yaml"), (["--size", "full"], "make sweep SPEC=s.yaml"),
    (["--smoke"], "make sweep SPEC=s.yaml SIZE=smoke"),
    (["--size", "quick"], "make sweep SPEC=s.yaml SIZE=quick")])
def test_the_resume_hint_names_the_size(args, hint):
    parser = cli.argparse.ArgumentParser()
    parser.add_argument("spec")
    cli.add_size(parser)
    assert cli.resume_command(parser.parse_args(["s.yaml", *args])) == hint


def make_dry_run(*args: str, **extra: str) -> subprocess.CompletedProcess:
    """What `make -n ARGS` would run (nothing is run), with no size, cluster or S3 setting from the
    environment but those in `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SIZE", "SMOKE", "SPEC", "RAY_ADDRESS") and not k.startswith("AWS_")}
    env.update(extra)
    return subprocess.run(["make", "-n", "--no-print-directory", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=60)


@pytest.mark.parametrize(("make_args", "expected"), [
    (["sweep", "SPEC=sweeps/specs/t1_mlp.yaml", "SIZE=quick"],
     ["-m sweeps check --reachable --size quick sweeps/specs/t1_mlp.yaml",
      "-m sweeps run --size quick sweeps/specs/t1_mlp.yaml"]),
    (["sweep", "SMOKE=1"], ["-m sweeps run --size smoke sweeps/specs/quick.yaml"]),
    (["sweep"], ["-m sweeps run sweeps/specs/quick.yaml"]),
    (["paper", "SIZE=quick"], ["-m sweeps run --size quick $spec", "-m analysis tables --size quick"]),
    (["paper"], ["-m sweeps run $spec", "-m analysis export", "-m analysis tables"]),
    (["tables", "SIZE=smoke"], ["-m analysis tables --size smoke"]),
])
def test_make_passes_the_size_on(make_args, expected):
    proc = make_dry_run(*make_args)
    assert proc.returncode == 0, proc.stderr
    lines = [" ".join(line.split()) for line in proc.stdout.splitlines()]
    for want in expected:
        assert any(want in line for line in lines), (want, lines)


@pytest.mark.parametrize("aws", [{}, {"AWS_ENDPOINT_URL": "http://10.0.0.5:9000",
                                  "AWS_DEFAULT_REGION": "eu-west-1"},
                                 {"AWS_ENDPOINT_URL_S3": "https://minio.lab:9000", "AWS_REGION": "x"}])
def test_a_cluster_sweep_passes_the_s3_settings_that_are_set_and_never_the_credentials(aws):
    secrets = {"AWS_ACCESS_KEY_ID": "AKIA0000", "AWS_SECRET_ACCESS_KEY": "s3cret"}
    proc = make_dry_run("sweep", "RAY_ADDRESS=http://head:8265", "MLFLOW_TRACKING_URI=http://m:5000",
                        "STORAGE=s3://bucket/ray", **aws, **secrets)
    assert proc.returncode == 0, proc.stderr
    [line] = [line for line in proc.stdout.splitlines() if "--runtime-env-json" in line]
    runtime_env = json.loads(line.split("--runtime-env-json '", 1)[1].split("' --", 1)[0])
    passed = runtime_env["env_vars"]
    assert {k: v for k, v in passed.items() if k.startswith("AWS_")} == aws
    assert passed["STORAGE"] == "s3://bucket/ray" and "s3cret" not in proc.stdout


@pytest.mark.parametrize(("make_args", "message"), [
    (["sweep", "SIZE=huge"], "SIZE=huge: expected full, quick or smoke"),
    (["sweep", "SIZE=quick", "SMOKE=1"], "SMOKE=1 means SIZE=smoke, not SIZE=quick")])
def test_make_refuses_a_size_it_does_not_know(make_args, message):
    proc = make_dry_run(*make_args)
    assert proc.returncode == 2 and message in proc.stderr


SAME_MEANING = {
    "a comment": GOOD + "# changed\n",
    "another description": GOOD + "description: a new one\n",
    "keys reordered": """
search: {samples: 4, algorithm: tpe}
space:
  activation.p: {uniform: [0.0, 1.0]}
  model.arch: {choice: [mlp, bottleneck]}
  model.code_bits: {when: {model.arch: [bottleneck]}, choice: [8, 16]}
fixed: {budget.epochs: 3, data.name: synthetic}
name: t
""",
    "block style, 1 for 1.0": """
name: t
fixed:
  data.name: synthetic
  budget.epochs: 3
space:
  activation.p:
    uniform: [0, 1]
  model.arch:
    choice:
      - mlp
      - bottleneck
  model.code_bits: {choice: [8, 16], when: {model.arch: [bottleneck]}}
search:
  algorithm: tpe
  samples: 4
""",
    "a key set to its default": GOOD.replace("budget.epochs: 3}", "budget.epochs: 3, optim.lr: 0.001}"),
    "defaults spelled out": GOOD + "seeds: [0]\nmax_failures: 2\nscheduler: {name: asha}\n",
    "max_trials": GOOD + "max_trials: 50\n",
    "a smoke section (full load)": GOOD + "smoke: {fixed: {budget.epochs: 1}}\n",
    "a quick section (full load)": GOOD + "quick: {fixed: {budget.epochs: 1}}\n",
}
OTHER_MEANING = {
    "a fixed value": GOOD.replace("budget.epochs: 3", "budget.epochs: 4"),
    "a range": GOOD.replace("uniform: [0.0, 1.0]", "uniform: [0.0, 0.9]"),
    "a choice": GOOD.replace("choice: [8, 16]", "choice: [8, 32]"),
    "the mode": GOOD + "mode: min\n",
    "the space order": GOOD.replace("  activation.p: {uniform: [0.0, 1.0]}\n", "").replace(
        "search:", "  activation.p: {uniform: [0.0, 1.0]}\nsearch:"),
    "the seeds": GOOD + "seeds: [1]\n",
    "the search seed": GOOD.replace("samples: 4}", "samples: 4, seed: 1}"),
    "the metric": GOOD + "metric: val/accuracy_soft\n",
}


@pytest.mark.parametrize("change", SAME_MEANING)
def test_sweep_id_follows_the_meaning_not_the_text(change, tmp_path):
    base = load_spec(write(tmp_path, GOOD, "a.yaml"))
    assert len(base.digest) == 12 and base.sweep_id == f"t-{base.digest[:8]}"
    assert load_spec(write(tmp_path, SAME_MEANING[change], "b.yaml")).sweep_id == base.sweep_id


@pytest.mark.parametrize("change", OTHER_MEANING)
def test_a_changed_meaning_is_another_sweep(change, tmp_path):
    base = load_spec(write(tmp_path, GOOD, "a.yaml"))
    assert load_spec(write(tmp_path, OTHER_MEANING[change], "b.yaml")).sweep_id != base.sweep_id


def test_smoke_and_full_sweeps_have_different_ids(tmp_path):
    path = write(tmp_path, GOOD + "smoke: {}\n")
    full, smoke = load_spec(path), load_spec(path, size="smoke")
    assert full.digest != smoke.digest and smoke.sweep_id.startswith("t-smoke-")


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


FILES = {
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "a NUL byte at offset 8: a binary file"),
    "NUL bytes in text": (GOOD.encode() + b"\0\0", "a NUL byte at offset"),
    "UTF-16": (GOOD.encode("utf-16"), "a NUL byte at offset"),
    "Latin-1": (GOOD.replace("name: t", "description: caf\xe9\nname: t").encode("latin-1"),
                "not UTF-8 text (byte 0xe9 at offset 17)"),
    "empty": (b"", "empty: a spec is a mapping"),
    "comments only": (b"# a spec to come\n", "empty: a spec is a mapping"),
    "larger than 1 MB": (GOOD.encode() + b"#" * 1_000_000, "larger than 1 MB"),
}


@pytest.mark.parametrize("kind", FILES)
def test_a_file_that_is_no_spec_is_refused_in_one_line(kind, tmp_path):
    content, message = FILES[kind]
    path = tmp_path / "spec.yaml"
    path.write_bytes(content)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_folder_is_no_spec(tmp_path):
    with pytest.raises(SpecError, match="a folder, not a spec file"):
        load_spec(tmp_path)


def test_utf8_with_a_byte_order_mark_and_dates_as_text_are_fine(tmp_path):
    spec = load_spec(write(tmp_path, "\ufeff" + GOOD + "description: 2024-01-01\n"))
    assert spec.description == "2024-01-01"


def test_an_alias_bomb_is_refused_quickly(tmp_path):
    levels = "".join(f"l{i + 1}: &l{i + 1} [{', '.join([f'*l{i}'] * 10)}]\n" for i in range(12))
    path = write(tmp_path, "name: t\nl0: &l0 [lol]\n" + levels)
    start = time.perf_counter()
    with pytest.raises(SpecError, match="an alias bomb"):
        load_spec(path)
    assert time.perf_counter() - start < 1


def test_a_million_point_grid_is_counted_not_listed(tmp_path, monkeypatch):
    values = {"activation.p": [i / 10 for i in range(10)], "activation.slope": list(range(1, 11)),
              "activation.cutoff": [1 + i / 10 for i in range(10)],
              "activation.noise_std": [i / 10 for i in range(10)],
              "optim.lr": [(i + 1) / 100 for i in range(10)],
              "model.arch": ["mlp", "bottleneck"]}
    space = {key: {"grid": v} for key, v in values.items()}
    space["model.code_bits"] = {"grid": [8, 16, 32, 64, 128], "when": {"model.arch": ["bottleneck"]}}
    text = edit_spec(GOOD, space=space, search={"algorithm": "grid"}, seeds=[0, 1])
    monkeypatch.setattr(SweepSpec, "grid", lambda self: pytest.fail("the grid was listed"))
    start = time.perf_counter()
    with pytest.raises(SpecError, match="the grid has 1200000 trials"):
        load_spec(write(tmp_path, text))
    spec = load_spec(write(tmp_path, text + "max_trials: 1200000\n"))
    assert spec.num_trials == 10**5 * (1 + 5) * 2 and spec.max_trials == 1_200_000
    assert time.perf_counter() - start < 1


def test_the_count_agrees_with_the_listed_grid_under_nested_conditions(tmp_path):
    spec = load_spec(write(tmp_path, """
name: g
fixed: {data.name: synthetic}
variants: {plain: {}, sgd: {optim.name: sgd}}
space:
  model.arch: {grid: [mlp, cnn, bottleneck]}
  model.filters: {grid: [[8], [8, 16]], when: {model.arch: [cnn]}}
  model.code_bits: {grid: [8, 16, 32], when: {model.arch: [bottleneck]}}
  optim.momentum: {grid: [0.5, 0.9], when: {optim.name: [sgd], model.arch: [cnn, bottleneck]}}
  activation.p: {grid: [0.0, 1.0]}
search: {algorithm: grid}
seeds: [0, 1]
"""))
    assert spec.num_trials == len(spec.grid()) == ((1 + 2 + 3) + (1 + 2 * 2 + 3 * 2)) * 2 * 2


def test_a_smoke_override_of_null_removes_a_space_entry(tmp_path):
    text = edited(**{"smoke/space": {"model.arch": {"choice": ["mlp"]}, "model.code_bits": None}})
    assert [d.key for d in load_spec(write(tmp_path, text), size="smoke").space] == ["activation.p",
                                                                                      "model.arch"]
    with pytest.raises(SpecError, match="'bottleneck' is never a value of model.arch"):
        load_spec(write(tmp_path, edited(**{"smoke/space": {"model.arch": {"choice": ["mlp"]}}})),
                  size="smoke")


def test_a_condition_may_name_a_key_the_variants_set(tmp_path):
    spec = load_spec(write(tmp_path, """
name: v
fixed: {data.name: synthetic}
variants: {mlp: {model.arch: mlp}, bottleneck: {model.arch: bottleneck}}
space:
  activation.p: {grid: [0.0, 1.0]}
  model.code_bits: {grid: [8, 16], when: {model.arch: [bottleneck]}}
search: {algorithm: grid}
"""))
    assert spec.num_trials == len(spec.grid()) == 2 + 2 * 2
    with pytest.raises(SpecError, match="'cnn' is never a value of model.arch"):
        load_spec(write(tmp_path, spec.file.read_text().replace("[bottleneck]}", "[cnn]}")))


def test_repeats_keep_their_groups_through_a_searcher_checkpoint(tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    from sweeps.space import Repeats, sampler

    spec = load_spec(write(tmp_path, GOOD.replace("search:", "seeds: [0, 1]\nscheduler: {name: none}"
                                                                "\nsearch:")))

    def repeats():
        return Repeats(OptunaSearch(space=DefineByRun(spec), metric=spec.metric, mode=spec.mode,
                                    sampler=sampler(spec)), repeat=2)

    before = repeats()
    configs = [before.suggest(t) for t in ("a", "b", "c")]
    assert [c["__trial_index__"] for c in configs] == [0, 1, 0]
    assert spec.trial_config(configs[1]).seed == 1 and configs[0]["activation.p"] == configs[1][
        "activation.p"]
    before.save(str(tmp_path / "state.pkl"))
    after = repeats()  # a resumed driver
    after.restore(str(tmp_path / "state.pkl"))
    after.on_trial_complete("a", {spec.metric: 0.5})
    after.on_trial_complete("b", {spec.metric: 0.7})  # the group of a and b is told the mean
    [told] = [t for t in after.searcher._ot_study.trials if t.value is not None]
    assert told.value == pytest.approx(0.6)


def test_a_restored_study_search_closes_the_trials_asked_after_its_checkpoint(tmp_path):
    from sweeps.space import StudySearch, sampler, study_storage

    spec = load_spec(write(tmp_path, GOOD))
    url = f"sqlite:///{tmp_path}/optuna.db"

    def searcher():
        found = StudySearch(space=DefineByRun(spec), metric=spec.metric, mode=spec.mode,
                            sampler=sampler(spec), study_name=spec.sweep_id, storage=study_storage(url))
        found.set_search_properties(spec.metric, spec.mode, {})
        return found

    before = searcher()
    before.suggest("a")
    before.suggest("b")
    before.save(str(tmp_path / "state.pkl"))
    before.suggest("c")  # asked, then the driver dies before the next checkpoint
    after = searcher()
    after.restore(str(tmp_path / "state.pkl"))
    trials = optuna.load_study(study_name=spec.sweep_id, storage=url).trials
    assert [t.state.name for t in trials] == ["RUNNING", "RUNNING", "FAIL"]
    assert trials[2].user_attrs == {"orphaned": True}
    after.on_trial_complete("a", {spec.metric: 0.5})  # the restored searcher goes on with its own
    assert optuna.load_study(study_name=spec.sweep_id, storage=url).trials[0].value == 0.5
