"""The typed trial config and its flat dotted form."""

import subprocess
import sys

import pytest

from study import data
from study.config import (
    ConfigError,
    DataConfig,
    TrialConfig,
    check_value,
    flat_to_strings,
    parse_assignments,
    train_images,
)


def test_flat_round_trip():
    config = TrialConfig.from_flat({"model.arch": "bottleneck", "model.code_bits": 32,
                                    "activation.p": 1, "optim.name": "sgd", "seed": 3})
    flat = config.to_flat()
    assert flat["activation.p"] == 1.0 and isinstance(flat["activation.p"], float)
    assert flat["model.code_bits"] == 32 and flat["optim.momentum"] == 0.9
    assert TrialConfig.from_flat(flat) == config


def test_keys_that_do_not_apply_are_left_out_of_the_flat_form():
    flat = TrialConfig.from_flat({"model.arch": "cnn", "activation.kind": "relu"}).to_flat()
    assert "model.filters" in flat and "model.widths" not in flat and "model.code_bits" not in flat
    assert "activation.p" not in flat and "optim.momentum" not in flat


@pytest.mark.parametrize("flat,message", [
    ({"activation.pp": 0.5}, r"activation.pp: unknown key \(did you mean activation.p\?\)"),
    ({"p": 0.5}, "p: unknown key"),
    ({"activation.p": 1.5}, r"activation.p = 1.5: must be in \[0, 1\]"),
    ({"activation.p": -0.1}, "activation.p"),
    ({"activation.slope": 0}, "activation.slope = 0.0: must be > 0"),
    ({"activation.slope": -2.0}, "activation.slope"),
    ({"activation.cutoff": 0.5}, "activation.cutoff = 0.5: must be >= 1"),
    ({"activation.noise_std": -1.0}, "activation.noise_std"),
    ({"activation.granularity": "row"}, "activation.granularity = \"row\": expected one of"),
    ({"model.arch": "resnet"}, "model.arch = \"resnet\": expected one of mlp, cnn, gated"),
    ({"model.widths": []}, "model.widths = \\[\\]: must be a non-empty list"),
    ({"model.widths": [64, 0]}, "model.widths"),
    ({"model.widths": "64"}, "model.widths = \"64\": expected a list of integers"),
    ({"model.batch_norm": 1}, "model.batch_norm = 1: expected true or false"),
    ({"budget.epochs": 0}, "budget.epochs = 0: must be >= 1"),
    ({"budget.epochs": 2.5}, "budget.epochs = 2.5: expected an integer"),
    ({"seed": True}, "seed = true: expected an integer"),
    ({"optim.lr": "fast"}, "optim.lr = \"fast\": expected a number"),
    ({"data.val_fraction": 0.9}, "data.val_fraction"),
    ({"model.code_bits": 16}, "model.code_bits does not apply when model.arch = mlp"),
    ({"optim.momentum": 0.5}, "optim.momentum does not apply when optim.name = adam"),
    ({"activation.kind": "relu", "activation.p": 0.5}, "activation.p does not apply"),
    # counts and sizes: a maximum each, or the data there is
    ({"budget.epochs": 1_000_000_000}, "budget.epochs = 1000000000: must be <= 10000"),
    ({"budget.patience": 10**6}, "budget.patience = 1000000: must be <= 10000"),
    ({"model.widths": [256, 10**6]}, r"model.widths = \[256, 1000000\]: each must be <= 65536"),
    ({"model.widths": [16] * 100}, "model.widths: 100 layers, at most 64"),
    ({"model.arch": "cnn", "model.filters": [32, 10**6]}, "model.filters = .*: each must be <= 65536"),
    ({"model.arch": "cnn", "model.filters": [8] * 65}, "model.filters: 65 layers, at most 64"),
    ({"model.arch": "cnn", "model.dense_width": 10**6}, "model.dense_width = 1000000: must be <= 65536"),
    ({"model.arch": "bottleneck", "model.code_bits": 10**6}, "model.code_bits = 1000000: must be <= 65536"),
    ({"activation.p_ramp_steps": 10**12}, "activation.p_ramp_steps = 1000000000000: must be <= 1000000000"),
    ({"runtime.threads": 10**5}, "runtime.threads = 100000: must be <= 1024"),
    ({"data.train_size": 10_000_000}, r"data.train_size: 10000000 is more than the 54000 training images of "
                                      r"fashion_mnist left after the validation split \(val_fraction 0.1\)"),
    ({"data.name": "digits", "data.train_size": 1797}, "data.train_size: 1797 is more than the 1294 training "
                                                       "images of digits"),
    ({"data.train_size": 50_000, "data.val_fraction": 0.2}, r"more than the 48000 training images of "
                                                            r"fashion_mnist .*\(val_fraction 0.2\)"),
    ({"data.train_size": 100}, r"budget.batch_size: 128 is more than the 100 training images a trial "
                               r"trains on \(data.train_size 100\)"),
    ({"data.name": "synthetic", "budget.batch_size": 4096}, "budget.batch_size: 4096 is more than the 2700 "
                                                            "training images of synthetic left after"),
])
def test_bad_keys_and_values_raise_an_error_naming_the_key(flat, message):
    with pytest.raises(ConfigError, match=message):
        TrialConfig.from_flat(flat)


def test_direct_construction_is_checked_too():
    from study.config import ActivationConfig

    with pytest.raises(ConfigError, match="activation.p"):
        TrialConfig(activation=ActivationConfig(p=2.0))


def test_command_line_assignments():
    flat = parse_assignments(["activation.p=0.5", "model.widths=[64, 32]", "model.arch=cnn",
                              "model.batch_norm=true"])
    assert flat == {"activation.p": 0.5, "model.widths": [64, 32], "model.arch": "cnn",
                    "model.batch_norm": True}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_assignments(["activation.p"])


def test_strings_for_mlflow_params_read_back():
    config = TrialConfig.from_flat({"model.widths": [64, 32], "model.batch_norm": True})
    strings = flat_to_strings(config.to_flat())
    assert strings["model.widths"] == "[64, 32]" and strings["model.batch_norm"] == "true"
    assert TrialConfig.from_flat(parse_assignments(f"{k}={v}" for k, v in strings.items())) == config


FLOAT_KEYS = [key for key, value in TrialConfig().to_flat().items() if isinstance(value, float)] + [
    "optim.momentum"]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 10**400])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_non_finite_numbers(key, value):
    flat = {key: value, **({"optim.name": "sgd"} if key == "optim.momentum" else {})}
    with pytest.raises(ConfigError, match=f"{key}.*: expected a finite number"):
        TrialConfig.from_flat(flat)
    with pytest.raises(ConfigError, match="expected a finite number"):
        check_value(key, value)


def test_the_float_keys_are_all_covered():
    assert {"activation.p", "activation.slope", "activation.cutoff", "activation.noise_std", "optim.lr",
            "optim.momentum", "data.val_fraction"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("text", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_the_command_line_refuses_non_finite_numbers(text):
    proc = subprocess.run([sys.executable, "-m", "study", "train", "--set", f"activation.slope={text}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: activation.slope = ") and "expected a finite number" in proc.stderr


@pytest.mark.parametrize("key", ["seed", "data.split_seed"])
def test_seeds_fit_numpys_32_bits(key):
    assert TrialConfig.from_flat({key: 2**32 - 1}).to_flat()[key] == 2**32 - 1
    with pytest.raises(ConfigError, match=r"must be in \[0, 2\*\*32\)"):
        TrialConfig.from_flat({key: 2**32})


def test_check_value_checks_one_key_on_its_own():
    assert check_value("activation.p", 1) == 1.0 and check_value("model.widths", [8]) == (8,)
    assert check_value("model.code_bits", 16) == 16  # applies or not: not its business
    with pytest.raises(ConfigError, match=r"activation.pp: unknown key \(did you mean activation.p\?\)"):
        check_value("activation.pp", 0.5)
    with pytest.raises(ConfigError, match="model.arch = 3: expected one of"):
        check_value("model.arch", 3)


def test_an_error_message_stays_on_one_line():
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_flat({"model.a\nb\u2028c": 1})
    assert len(str(err.value).splitlines()) == 1 and "model.a\\nb\\u2028c: unknown key" in str(err.value)


# (a config exactly at a bound, the key one past it, the message then)
AT_THE_BOUND = [
    ({"budget.epochs": 10_000}, "budget.epochs", "must be <= 10000"),
    ({"budget.patience": 10_000}, "budget.patience", "must be <= 10000"),
    ({"model.widths": [65_536]}, "model.widths", "each must be <= 65536"),
    ({"model.widths": [8] * 64}, "model.widths", "65 layers, at most 64"),
    ({"model.arch": "cnn", "model.filters": [65_536]}, "model.filters", "each must be <= 65536"),
    ({"model.arch": "cnn", "model.dense_width": 65_536}, "model.dense_width", "must be <= 65536"),
    ({"model.arch": "bottleneck", "model.code_bits": 65_536}, "model.code_bits", "must be <= 65536"),
    ({"activation.p_ramp_steps": 10**9}, "activation.p_ramp_steps", "must be <= 1000000000"),
    ({"runtime.threads": 1024}, "runtime.threads", "must be <= 1024"),
    ({"data.train_size": 54_000}, "data.train_size", "is more than the 54000 training images"),
    ({"data.name": "digits", "data.train_size": 1294}, "data.train_size", "more than the 1294"),
    ({"data.name": "synthetic", "data.val_fraction": 0.5, "data.train_size": 1500}, "data.train_size",
     r"more than the 1500 training images of synthetic left after the validation split \(val_fraction 0.5\)"),
    ({"data.train_size": 100, "budget.batch_size": 100}, "budget.batch_size", "more than the 100"),
    ({"data.name": "digits", "budget.batch_size": 1294}, "budget.batch_size",
     "1295 is more than the 1294 training images of digits"),
]


@pytest.mark.parametrize("flat,key,message", AT_THE_BOUND)
def test_a_count_or_size_at_its_bound_is_accepted_and_one_more_refused(flat, key, message):
    config = TrialConfig.from_flat(flat)
    value = flat[key]
    longer = [*value, value[-1]] if key == "model.widths" and len(value) > 1 else None
    past = longer or ([value[0] + 1] if isinstance(value, list) else value + 1)
    with pytest.raises(ConfigError, match=f"^{key}.*{message}"):
        config.replace(**{key: past})


@pytest.mark.parametrize("name,val_fraction", [("fashion_mnist", 0.1), ("digits", 0.15), ("synthetic", 0.5)])
def test_the_sizes_checked_are_those_the_data_has(name, val_fraction):
    """The training images available are known without loading the data: the same as loaded."""
    config = DataConfig(name=name, val_fraction=val_fraction)
    assert len(data.load(config).x_train) == train_images(config)


def test_the_command_line_refuses_a_train_size_beyond_the_data_and_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "study", "train", "--set", "data.train_size=10000000"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: data.train_size: 10000000 is more than the 54000 training")
    assert list(tmp_path.iterdir()) == []
