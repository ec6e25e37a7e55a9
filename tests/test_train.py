"""The training loop on the synthetic set: metrics, reproducibility, exact resume, divergence, CLI."""

import gc
import json
import subprocess
import sys

import numpy as np
import pytest

from study.config import TrialConfig
from study.names import CALIBRATED, EPOCH_METRICS, TEST_EPOCH, TRIAL_CONSTANTS
from study.train import Trainer, TrialDiverged, best_epoch, train

from .conftest import ROOT

SMALL = {"data.name": "synthetic", "model.widths": [32, 16], "budget.epochs": 3,
         "budget.batch_size": 64, "activation.cutoff": 1.2}
PER_EPOCH = {"epoch", *EPOCH_METRICS, *TRIAL_CONSTANTS}  # what sweeps, MLflow, analysis expect


def small(**flat):
    return TrialConfig.from_flat({**SMALL, **flat})


def test_metrics_per_epoch_and_at_the_end():
    seen = []
    result = train(small(), callbacks=[lambda epoch, metrics, state: seen.append(epoch)])
    assert seen == [1, 2, 3] and [h["epoch"] for h in result.history] == [1, 2, 3]
    assert all(set(h) == PER_EPOCH for h in result.history[:-1])
    assert set(result.history[-1]) == PER_EPOCH | {"test/accuracy_binary", "test/accuracy_soft",
                                                    TEST_EPOCH, CALIBRATED}
    for h in result.history:
        assert h["val/binary_gap"] == pytest.approx(h["val/accuracy_soft"] - h["val/accuracy_binary"])
        assert 0 <= h["act/ones_fraction"] <= 1 and 0 <= h["act/bit_entropy"] <= 1
    best = np.maximum.accumulate([h["val/accuracy_binary"] for h in result.history])
    np.testing.assert_allclose([h["val/accuracy_binary_best"] for h in result.history], best)
    assert result.history[-1]["val/accuracy_binary"] > 0.5  # it learns
    # 64 inputs -> 32 -> 16 -> 10 (weights and biases); 32 + 16 binary units
    assert result.history[0]["model/params"] == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    assert result.history[0]["model/binary_units"] == 48
    assert set(result.test) == {"test/accuracy_binary", "test/accuracy_soft", TEST_EPOCH, CALIBRATED}
    assert result.test[TEST_EPOCH] == 3  # without a patience: the last epoch's weights
    assert json.loads(result.to_json())["config"]["activation.cutoff"] == 1.2


def test_flip_rate_at_epoch_one_compares_with_the_initial_codes():
    result = train(small(**{"budget.epochs": 1}))
    assert 0 < result.history[0]["act/flip_rate"] < 1


def test_a_seeded_run_is_reproducible():
    a, b = train(small(**{"activation.granularity": "unit"})), train(
        small(**{"activation.granularity": "unit"}))
    c = train(small(**{"activation.granularity": "unit", "seed": 1}))

    def scores(r):
        return [(h["train/loss"], h["val/accuracy_binary"]) for h in r.history]

    assert scores(a) == scores(b) and scores(a) != scores(c)


def test_resume_from_a_checkpoint_continues_exactly(tmp_path):
    config = small(**{"activation.noise_std": 0.5, "activation.granularity": "example",
                      "activation.p_ramp_steps": 50})
    unbroken = train(config)

    def save_at_2(epoch, metrics, state):
        if epoch == 2:
            state.save(tmp_path / "ckpt")

    train(config.replace(**{"budget.epochs": 2}), callbacks=[save_at_2])
    resumed_epochs = []
    resumed = train(config, resume_from=tmp_path / "ckpt",
                    callbacks=[lambda epoch, m, s: resumed_epochs.append(epoch)])
    assert resumed_epochs == [3]

    def drop_time(h):  # (the 2-epoch run also scored its last epoch on the test set)
        return {k: v for k, v in h.items() if not k.startswith(("time/", "test/"))}

    assert [drop_time(h) for h in resumed.history] == [drop_time(h) for h in unbroken.history]
    assert resumed.test == unbroken.test


def test_a_cosine_schedule_decays_over_the_whole_budget_and_resumes_exactly(tmp_path):
    config = small(**{"optim.lr": 0.01, "optim.schedule": "cosine"})
    rates = []

    def look(epoch, metrics, trainer):
        optimizer = trainer.network.model.optimizer
        rates.append(float(optimizer.learning_rate))
        steps = int(optimizer.iterations)
        total = 3 * steps // epoch
        assert rates[-1] == pytest.approx(0.01 * (1 + np.cos(np.pi * steps / total)) / 2, rel=1e-5)
        if epoch == 1:
            trainer.save(tmp_path / "ckpt")

    unbroken = train(config, callbacks=[look])
    assert rates[0] < 0.01 and rates[-1] == pytest.approx(0, abs=1e-9)
    resumed = train(config, resume_from=tmp_path / "ckpt")
    assert ([h["train/loss"] for h in resumed.history] == [h["train/loss"] for h in unbroken.history]
            and resumed.test == unbroken.test)
    constant = train(small(**{"optim.lr": 0.01}))
    assert constant.history[-1]["train/loss"] != unbroken.history[-1]["train/loss"]


def test_best_epoch_is_the_first_of_the_highest_value():
    history = [{"m": v} for v in (0.5, 0.7, 0.6, 0.7, 0.65)]
    assert best_epoch(history, "m") == 2 and best_epoch([], "m") == 0


PLATEAU = {"budget.epochs": 12, "optim.lr": 0.05}  # synthetic data: val accuracy dips at epoch 6


def test_a_patience_ends_the_trial_on_a_plateau_and_tests_the_best_epochs_weights():
    without = train(small(**PLATEAU))
    values = [h["val/accuracy_binary"] for h in without.history]
    # the first epoch e whose next `patience` epochs do not beat the best up to e
    patience = 1
    stop = next(e for e in range(1, len(values)) if values[e] <= max(values[:e])) + 1
    best = best_epoch(without.history[:stop], "val/accuracy_binary")
    assert stop - best == patience and stop < PLATEAU["budget.epochs"], values  # the data's premise
    result = train(small(**PLATEAU, **{"budget.patience": patience}))
    assert [h["epoch"] for h in result.history] == list(range(1, stop + 1))
    assert result.test[TEST_EPOCH] == best
    # the same weights as a run whose budget ends at the best epoch: the test scores agree
    at_best = train(small(**{**PLATEAU, "budget.epochs": best}))
    assert {k: v for k, v in result.test.items() if k != TEST_EPOCH} == \
        {k: v for k, v in at_best.test.items() if k != TEST_EPOCH}
    def strip(history):
        return [{k: v for k, v in h.items() if not k.startswith(("time/", "test/"))} for h in history]

    assert strip(result.history) == strip(without.history[:stop])  # when training ends, not how


def test_a_patience_counts_on_the_monitored_metric():
    soft = train(small(**PLATEAU, **{"budget.patience": 2, "budget.monitor": "val/accuracy_soft"}))
    values = [h["val/accuracy_soft"] for h in soft.history]
    assert soft.test[TEST_EPOCH] == values.index(max(values)) + 1
    assert len(values) == PLATEAU["budget.epochs"] or len(values) - soft.test[TEST_EPOCH] == 2


def test_resume_with_a_patience_keeps_the_best_weights(tmp_path):
    config = small(**PLATEAU, **{"budget.patience": 2})
    unbroken = train(config)
    best = unbroken.test[TEST_EPOCH]
    assert best < len(unbroken.history)  # the checkpoint is taken after the best epoch
    trainer = Trainer(config)
    while trainer.epoch < best + 1:
        trainer.step()
    trainer.save(tmp_path / "ckpt")
    trainer.close()
    resumed = train(config, resume_from=tmp_path / "ckpt")
    assert resumed.test == unbroken.test
    with pytest.raises(ValueError, match="another config"):  # best weights expected, none saved
        train(config, resume_from=_without_patience_checkpoint(config, tmp_path / "plain"))


def _without_patience_checkpoint(config, folder):
    train(config.replace(**{"budget.patience": 0, "budget.epochs": 1}),
          callbacks=[lambda e, m, s: s.save(folder)])
    return folder


def test_checkpoint_of_another_config_is_refused(tmp_path):
    train(small(**{"budget.epochs": 1}), callbacks=[lambda e, m, s: s.save(tmp_path)])
    with pytest.raises(ValueError, match="another config"):
        train(small(**{"model.widths": [32, 16, 8]}), resume_from=tmp_path)


def test_divergence_raises_with_the_history_so_far():
    with pytest.raises(TrialDiverged, match=r"train/loss is (nan|inf) at epoch 1") as err:
        train(TrialConfig.from_flat({"data.name": "synthetic", "activation.kind": "relu",
                                     "optim.name": "sgd", "optim.lr": 1e30}))
    assert err.value.history == []


def test_trial_after_trial_in_one_process_leaves_nothing_behind():
    """A reused Ray worker trains one trial after another: a closed trainer leaves neither its
    custom-gradient registrations nor its traced graphs (nor any Python object) behind."""
    from study.activations_tf import traced_gradients

    registered = traced_gradients()  # (other tests in this process may have left some)

    def one_trial(seed):
        trainer = Trainer(small(**{"budget.epochs": 1, "seed": seed}))
        trainer.step()
        assert traced_gradients() > registered  # tracing registered the op's gradients ...
        trainer.close()

    one_trial(0)
    gc.collect()
    before = len(gc.get_objects())
    for seed in range(1, 4):
        one_trial(seed)
    gc.collect()
    assert traced_gradients() == registered  # ... and closing released them
    assert len(gc.get_objects()) <= before + 100  # (about 11,000 per trial without close)


def test_the_trainer_steps_one_epoch_at_a_time_like_train():
    trainer = Trainer(small())
    stepped = [trainer.step() for _ in range(3)]
    trainer.close()
    assert trainer.done and [m["epoch"] for m in stepped] == [1, 2, 3]

    def drop_time(h):
        return {k: v for k, v in h.items() if not k.startswith("time/")}

    assert [drop_time(m) for m in stepped] == [drop_time(h) for h in train(small()).history]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "study", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_cli_trains_and_writes_json(tmp_path):
    out = tmp_path / "r.json"
    proc = run_cli("train", "--quiet", "--out", str(out), *[f"--set={k}={json.dumps(v)}"
                                                          for k, v in SMALL.items()],
                   "--set", "model.arch=gated", "--set", "budget.epochs=1")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["config"]["model.arch"] == "gated" and len(result["history"]) == 1
    assert "epoch 1:" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["train", "--set", "activation.p=1.5"], "error: activation.p = 1.5: must be in [0, 1]"),
    (["train", "--set", "model.depth=3"], "error: model.depth: unknown key"),
    (["config", "--set", "activation.p"], "error: 'activation.p': expected KEY=VALUE"),
])
def test_cli_bad_input_is_one_line_and_status_2(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(message)
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_config_prints_every_applicable_key():
    proc = run_cli("config", "--set", "model.arch=cnn")
    assert proc.returncode == 0 and "model.filters=[32, 64]" in proc.stdout.splitlines()


def test_checkpoints_hold_variables_by_name_and_a_model_that_differs_is_refused(tmp_path):
    import tensorflow as tf

    train(small(**{"budget.epochs": 1}), callbacks=[lambda e, m, s: s.save(tmp_path)])
    names = [name for name, _ in tf.train.list_variables(str(tmp_path / "state"))]
    assert any(n.startswith("optimizer/") for n in names) and any(n.startswith("rng/") for n in names)
    # a model with one variable more (the p ramp's step counter) than the checkpoint holds
    with pytest.raises(ValueError, match="does not match this model"):
        train(small(**{"activation.p_ramp_steps": 10}), resume_from=tmp_path)
