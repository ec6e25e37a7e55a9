"""Per-unit thresholds of the binary twin, recalibrated on validation images (study.calibration)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from study import calibration, models
from study.activations import hard
from study.calibration import best_thresholds, calibrate, reset, soft_output
from study.config import ActivationConfig, ModelConfig, TrialConfig
from study.evaluation import _with_parts
from study.models import HardAbove, build_network
from study.names import CALIBRATED, FINAL_METRICS
from study.train import CHECKPOINT, Trainer

X = (np.random.default_rng(0).random((300, 8, 8, 1)) * 255).astype(np.uint8)
SCALE = 1 / 255  # as the evaluator scales: tf.cast(x, float32) * scale
RELU = ActivationConfig(kind="relu")
KINDS = [RELU, ActivationConfig(kind="sigmoid"), ActivationConfig(slope=2.0, cutoff=1.2)]


def network(arch="mlp", activation=RELU, **model):
    keras.utils.set_random_seed(0)
    return build_network(ModelConfig(arch=arch, **model), activation, (8, 8, 1), 10)


def outputs(net, x=X):
    return [t.numpy() for t in net.evaluator(tf.cast(x, tf.float32) * SCALE, training=False)]


def parts(net, x=X):
    """The pre-activations of each activation layer, (samples, units) with a conv layer's positions
    as samples."""
    model = _with_parts(net.evaluator)
    found = model(tf.cast(x, tf.float32) * SCALE, training=False)[2:]
    return [p.numpy().reshape(-1, t.shape[0]) for p, t in zip(found, net.thresholds, strict=True)]


def corr(bits, a):
    if bits.std() == 0 or a.std() == 0:
        return 0.0
    return float(np.corrcoef(bits, a)[0, 1])


@pytest.mark.parametrize("arch", ["mlp", "cnn", "gated", "bottleneck"])
def test_zero_thresholds_leave_the_evaluator_bit_identical(arch, monkeypatch):
    net = network(arch, KINDS[2])
    assert all(not t.numpy().any() for t in net.thresholds)
    assert not any("threshold" in w.path for w in net.evaluator.weights + net.model.weights)
    with monkeypatch.context() as patch:  # the binary twin as it was: hard(x), no threshold
        patch.setattr(models, "HardAbove", lambda threshold: keras.layers.Activation(hard))
        before = outputs(network(arch, KINDS[2]))
    now = outputs(net)
    assert all(np.array_equal(b, n) for b, n in zip(before, now, strict=True))
    calibrate(net, KINDS[2], X, SCALE)
    assert any(t.numpy().any() for t in net.thresholds)
    reset(net)
    assert all(np.array_equal(b, n) for b, n in zip(before, outputs(net), strict=True))


def test_pre_activations_reported_are_x_not_x_minus_t():
    net = network()
    first = parts(net)[0]
    for t in net.thresholds:
        t.assign(tf.fill(t.shape, 0.3))
    assert np.array_equal(parts(net)[0], first)
    assert not np.array_equal(outputs(net)[0], outputs(network())[0])  # the bits did move


@pytest.mark.parametrize("activation", KINDS, ids=lambda a: a.kind)
def test_the_threshold_of_each_unit_is_the_brute_force_best(activation):
    rng = np.random.default_rng(1)
    x = np.round(rng.normal(0.3, 2.0, (400, 5)), 1).astype(np.float32)  # ties
    x[:, 4] = -1.0  # a constant unit keeps 0
    t = best_thresholds(x, activation)
    assert t.dtype == np.float32 and t[4] == 0
    for u in range(4):
        a = soft_output(x[:, u], activation)
        candidates = [-np.inf, *np.unique(x[:, u])]
        best = max(corr((x[:, u] > c).astype(float), a) for c in candidates)
        chosen = corr((x[:, u] > t[u]).astype(float), a)
        assert chosen == pytest.approx(best, abs=1e-12)
        assert chosen >= corr((x[:, u] > 0).astype(float), a)
        assert not np.isin(t[u], x[:, u]) or t[u] == 0  # a midpoint between two values


def test_blocks_of_units_give_the_same_thresholds(monkeypatch):
    x = np.random.default_rng(2).normal(size=(300, 7)).astype(np.float32)
    whole = best_thresholds(x, RELU)
    monkeypatch.setattr(calibration, "BLOCK", 600)  # two units at a time
    assert np.array_equal(best_thresholds(x, RELU), whole)


def test_layers_are_calibrated_in_order_on_binarized_earlier_layers():
    net = network(widths=(32, 16))
    first, second = calibrate(net, RELU, X, SCALE)
    pre = parts(net)  # layer 2's pre-activations with layer 1 at its calibrated thresholds
    np.testing.assert_array_equal(best_thresholds(pre[0], RELU), first)
    np.testing.assert_array_equal(best_thresholds(pre[1], RELU), second)
    reset(net)
    assert not np.array_equal(best_thresholds(parts(net)[1], RELU), second)


def test_calibration_is_deterministic_and_uses_the_first_images():
    runs = [calibrate(network(), RELU, X, SCALE, limit=200) for _ in range(2)]
    shuffled_tail = np.concatenate([X[:200], X[200:][::-1]])
    runs.append(calibrate(network(), RELU, shuffled_tail, SCALE, limit=200, batch_size=64))
    for other in runs[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(runs[0], other, strict=True))


def test_a_conv_layer_has_one_threshold_per_channel_shared_over_positions():
    net = network("cnn", filters=(4, 6), dense_width=8)
    assert [t.shape for t in net.thresholds] == [(4,), (6,), (8,)]
    found = calibrate(net, RELU, X, SCALE)
    np.testing.assert_array_equal(best_thresholds(parts(net)[0], RELU), found[0])
    layer = next(layer for layer in net.evaluator.layers if isinstance(layer, HardAbove))
    bits = keras.Model(net.evaluator.inputs, layer.output)(tf.cast(X, tf.float32) * SCALE).numpy()
    pre = parts(net)[0].reshape(bits.shape)
    assert bits.shape[-1] == 4 and np.array_equal(bits, (pre > found[0]).astype(np.float32))


def test_a_trained_relu_mlp_calibrated_on_validation(tmp_path):
    """The calibrated bit of every unit explains its soft output on the validation images at least
    as well as the bit at 0 (what the thresholds are chosen for); the done epoch reports the test
    accuracy with them, and the thresholds are 0 again after."""
    config = TrialConfig.from_flat({"data.name": "synthetic", "model.widths": [32, 16],
                                    "budget.epochs": 2, "budget.batch_size": 64,
                                    "activation.kind": "relu"})
    trainer = Trainer(config)
    first = trainer.step()
    assert CALIBRATED not in first and CALIBRATED not in FINAL_METRICS
    done = trainer.step()
    assert 0 <= done[CALIBRATED] <= 1 and set(FINAL_METRICS) <= set(done)
    assert all(not t.numpy().any() for t in trainer.network.thresholds)
    data = trainer.data
    test = trainer.evaluator(data.x_test, data.y_test, data.scale, diagnostics=False)
    assert test.accuracy_binary == done["test/accuracy_binary"]

    found = calibrate(trainer.network, RELU, data.x_val, data.scale)
    for pre, t in zip(parts_scaled(trainer), found, strict=True):
        a = soft_output(pre, RELU)
        at = [corr((pre[:, u] > t[u]).astype(float), a[:, u]) for u in range(len(t))]
        at_zero = [corr((pre[:, u] > 0).astype(float), a[:, u]) for u in range(len(t))]
        assert np.all(np.array(at) >= np.array(at_zero) - 1e-12)
    reset(trainer.network)

    trainer.save(tmp_path)  # the thresholds are no part of the checkpoint
    names = [name for name, _ in tf.train.list_variables(str(tmp_path / CHECKPOINT))]
    assert not any("threshold" in name for name in names)


def parts_scaled(trainer):
    data = trainer.data
    model = _with_parts(trainer.network.evaluator)
    found = model(tf.cast(data.x_val, tf.float32) * data.scale, training=False)[2:]
    return [p.numpy() for p in found]
