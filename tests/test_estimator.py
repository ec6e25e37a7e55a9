"""The estimator table (study/estimator.py, analysis/estimator.py) on tiny networks: the reference
against closed forms and exact enumeration, the estimators against the op and Keras, the statistics
on estimators whose bias is known."""

import itertools
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from analysis import estimator as t6
from study import estimator as est
from study.__main__ import main
from study.activations import saturation_threshold
from study.config import ActivationConfig, ModelConfig
from study.models import build_network
from study.moments import statistics

UNIT = est.Unit(slope=1.0, cutoff=1.2, granularity="batch")


def sigmoid(a):
    return 1 / (1 + np.exp(-a))


def identity_loss(logits, labels):
    """L = the single logit: with an output kernel [[1]], L = h of the one hidden unit."""
    return logits[..., 0]


def one_unit(w, bias=0.0):
    """x (B, d) -> h = hard(x w + bias + sigma eps) -> logit h (the output kernel is [[1]])."""
    w = np.asarray(w, np.float32).reshape(-1, 1)
    return est.Mlp((tf.constant(w), tf.constant([[1.0]])),
                   (tf.constant([bias], tf.float32), tf.constant([0.0])))


def tiny_mlp(seed=0, sizes=(3, 2, 2, 3)):
    rng = np.random.default_rng(seed)
    kernels = [rng.normal(0, 1.5, (a, b)).astype(np.float32) for a, b in zip(sizes, sizes[1:], strict=False)]
    biases = [rng.normal(0, 0.5, b).astype(np.float32) for b in sizes[1:]]
    return est.Mlp(tuple(map(tf.constant, kernels)), tuple(map(tf.constant, biases)))


def mean(moments, kernel):
    return moments.sums[kernel].sum(0) / moments.draws


def stats(ref, moments, kernels):
    return statistics(ref, moments, {"k": kernels})["k"]


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_reference_matches_the_closed_form_of_one_unit(sigma):
    """d/dw E[hard(w x + b + sigma eps)] = F'((w x + b) / sigma) x / sigma (exact in every draw:
    one unit has no other noise), d/dv E[v h] = F((w x + b) / sigma)."""
    x = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    w = np.array([0.4, -0.8, 0.3], np.float32)
    ref = est.reference(one_unit(w, 0.2), x, np.zeros(5, np.int32), samples=4000, groups=10,
                        sigma=sigma, seed=(1,), loss=identity_loss)
    fires = sigmoid((x @ w + 0.2) / sigma)
    np.testing.assert_allclose(mean(ref, 0), (x * (fires * (1 - fires) / sigma)[:, None]).mean(0),
                               rtol=1e-5)
    se = math.sqrt(fires.mean() * (1 - fires.mean()) / 4000)  # a bound: h's spread, averaged
    assert abs(mean(ref, 1)[0] - fires.mean()) < 4 * se


def exact_gradient(mlp, x, y, sigma=1.0):
    """The gradient of the expected loss, every bit pattern of the hidden units enumerated (float64)."""
    weights = [tf.Variable(tf.cast(w, tf.float64)) for w in mlp.kernels]
    biases = [tf.cast(b, tf.float64) for b in mlp.biases]
    x = tf.constant(x, tf.float64)

    def patterns(units):
        return tf.constant(list(itertools.product([0.0, 1.0], repeat=units)), tf.float64)

    def law(pre, bits):  # P(bits | pre): (..., patterns)
        fires = tf.sigmoid(pre / sigma)[..., None, :]
        return tf.reduce_prod(bits * fires + (1 - bits) * (1 - fires), axis=-1)

    with tf.GradientTape() as tape:
        h1, h2 = patterns(weights[0].shape[1]), patterns(weights[1].shape[1])
        p1 = law(x @ weights[0] + biases[0], h1)  # (B, 2^U1)
        p2 = law(h1 @ weights[1] + biases[1], h2)  # (2^U1, 2^U2)
        logits = h2 @ weights[2] + biases[2]  # (2^U2, C)
        losses = -tf.transpose(tf.gather(tf.nn.log_softmax(logits), y, axis=1))  # (B, 2^U2)
        expected = tf.reduce_mean(tf.reduce_sum((p1 @ p2) * losses, axis=1))
    return [g.numpy().ravel() for g in tape.gradient(expected, weights)]


def test_reference_is_unbiased_on_a_two_layer_network_by_exact_enumeration():
    mlp = tiny_mlp()
    x = np.random.default_rng(2).normal(size=(4, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 1], np.int32)
    n = 20_000
    eps = [est.logistic([n, 4, 2], tf.constant([3, i], tf.int64)) for i in range(2)]
    draws = np.concatenate([g.numpy().reshape(n, -1) for g in
                            est.local_gradients(mlp, tf.constant(x), tf.constant(y), eps, 1.0)], 1)
    exact = np.concatenate(exact_gradient(mlp, x, y))
    z = (draws.mean(0) - exact) / (draws.std(0, ddof=1) / math.sqrt(n))
    assert np.abs(z).max() < 4.5  # 16 elements: P(max |z| > 4.5) < 16 * 7e-6
    assert np.linalg.norm(draws.mean(0) - exact) / np.linalg.norm(exact) < 0.02


def test_an_estimator_equal_to_the_reference_scores_no_bias():
    mlp = tiny_mlp(seed=5)
    x = np.random.default_rng(6).normal(size=(8, 3)).astype(np.float32)
    y = np.arange(8, dtype=np.int32) % 3
    ref = est.reference(mlp, x, y, samples=4000, groups=10, sigma=1.0, seed=(7,))
    local = est.estimate(mlp, x, y, est.Estimator("local", local=True), ref, draws=4000,
                         sigma=1.0, unit=UNIT, seed=(8,))
    s = stats(ref, local, [0, 1, 2])
    assert s["bias"] < max(3 * s["bias_se"], s["bias_floor"])
    assert s["cos_mean"] > 0.999
    assert s["mse"] == pytest.approx(s["bias"] ** 2 + s["variance"])


def test_one_unit_sigmoid_surrogate_is_exact_and_the_ste_is_biased():
    """One unit, a = 0.5 (x = 1, twice: TensorFlow 2.21's graph mode fails on all-size-1 einsums):
    the true d/dw is sigmoid'(0.5) x; p = 1 with c = 1 gives exactly that, the STE gives
    1[|a| <= 1] x = x: a relative bias of 1 / sigmoid'(0.5) - 1."""
    x, y = np.array([[1.0], [1.0]], np.float32), np.zeros(2, np.int32)
    mlp = one_unit([0.5])
    ref = est.reference(mlp, x, y, samples=100, groups=10, sigma=1.0, seed=(1,), loss=identity_loss)
    slope = sigmoid(0.5) * (1 - sigmoid(0.5))
    for unit, surrogate, bias in ((est.Unit(cutoff=1.0), "sigmoid", 0.0),
                                  (est.Unit(cutoff=1.0), "ste", 1 / slope - 1)):
        moments = est.estimate(mlp, x, y, est.Estimator("e", surrogate=surrogate), ref, draws=10,
                               sigma=1.0, unit=unit, seed=(2,), loss=identity_loss)
        s = stats(ref, moments, [0])
        assert s["bias"] == pytest.approx(bias, abs=1e-5)
        assert s["cos_mean"] == pytest.approx(1.0) and s["variance"] < 1e-9


def test_noisy_estimator_draws_the_sbn_noise():
    """p = 1 noisy on one unit: E[g(a + eps)] x with g = 1.2 sigmoid' inside |z| < ln 11 and eps
    standard logistic, against the integral over the logistic density."""
    x, y = np.array([[1.0], [-2.0]], np.float32), np.zeros(2, np.int32)
    mlp = one_unit([0.7], -0.3)
    ref = est.reference(mlp, x, y, samples=20, groups=10, sigma=1.0, seed=(1,), loss=identity_loss)
    noisy = est.estimate(mlp, x, y, est.Estimator("noisy", noisy=True), ref, draws=20_000,
                         sigma=1.0, unit=UNIT, seed=(2,), loss=identity_loss)
    eps = np.linspace(-40, 40, 400_001)
    density = sigmoid(eps) * (1 - sigmoid(eps))
    expected = 0.0
    for xi in x[:, 0]:
        z = 0.7 * xi - 0.3 + eps
        g = np.where(np.abs(z) < saturation_threshold(1.0, 1.2), 1.2 * sigmoid(z) * (1 - sigmoid(z)), 0)
        expected += np.trapezoid(g * density, eps) * xi / 2
    draws = np.concatenate(noisy.norms)[:, 0]  # squared one-element gradients
    se = math.sqrt(draws.mean() / 20_000)
    assert abs(mean(noisy, 0)[0] - expected) < 4 * se


@pytest.mark.parametrize("p, surrogate", [(1.0, "sigmoid"), (1.0, "ste"), (0.0, "sigmoid")])
def test_deterministic_estimators_are_the_study_models_gradient(p, surrogate):
    """p in {0, 1} without noise: the estimator's gradient is that of study.models' MLP trained
    with the op (forward hard(a) or sat(a), backward the surrogate)."""
    keras.utils.set_random_seed(0)
    activation = ActivationConfig(p=p, cutoff=1.2, surrogate=surrogate)
    model = build_network(ModelConfig(widths=(5, 4)), activation, (6,), 3).model
    x = np.random.default_rng(0).normal(size=(7, 6)).astype(np.float32)
    y = np.arange(7, dtype=np.int32) % 3
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(est.cross_entropy(model(x, training=True), y))
    kernels = [layer.kernel for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    expected = tape.gradient(loss, kernels)
    mlp = est.Mlp.of(model)
    units = [est.op_unit(est.Estimator("e", p, surrogate), UNIT, seed=i) for i in range(2)]
    eps = [tf.zeros([1, 7, 5]), tf.zeros([1, 7, 4])]
    got = est.op_gradients(mlp, tf.constant(x), tf.constant(y), eps, 0.0, units)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g[0].numpy(), e.numpy(), atol=1e-6)


@pytest.mark.parametrize("granularity, coin_shape", [("batch", (40, 1, 1)), ("example", (40, 3, 1)),
                                                      ("unit", (40, 3, 4))])
def test_p_half_draws_one_coin_per_draw_and_granularity(granularity, coin_shape):
    z = tf.random.stateless_normal([40, 3, 4], seed=[0, 1], stddev=2.0)
    op = est.op_unit(est.Estimator("e", 0.5), est.Unit(1.0, 1.2, granularity), seed=3)
    with tf.GradientTape() as tape:
        tape.watch(z)
        out = op(z)
    hard = tf.cast(z > 0, tf.float32).numpy()
    soft = np.clip(1.2 * sigmoid(z.numpy()) - 0.1, 0, 1)
    axes = tuple(i for i, n in enumerate(coin_shape) if n == 1)  # the axes one coin covers
    cells_hard = np.isclose(out.numpy(), hard, atol=1e-6).all(axis=axes)
    cells_soft = np.isclose(out.numpy(), soft, atol=1e-6).all(axis=axes)
    assert (cells_hard | cells_soft).all()
    assert 0.3 < cells_hard[~(cells_hard & cells_soft)].mean() < 0.7  # both: hard and sat agree
    sig = sigmoid(z.numpy())
    sat_grad = np.where(np.abs(z.numpy()) < math.log(11), 1.2 * sig * (1 - sig), 0)
    np.testing.assert_allclose(tape.gradient(out, z).numpy(), sat_grad, atol=1e-6)


def test_compare_is_deterministic_given_the_seed():
    mlp = tiny_mlp(seed=9)
    x = np.random.default_rng(10).normal(size=(6, 3)).astype(np.float32)
    y = np.arange(6, dtype=np.int32) % 3

    def rows(seed):
        out = est.compare(mlp, x, y, est.ESTIMATORS, samples=60, draws=30, groups=5, sigma=1.0,
                          unit=UNIT, seed=(seed,))
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in out]

    first = rows(0)
    assert first == rows(0)
    assert first != rows(1)
    assert {r["kernel"] for r in first} == {"dense_1", "dense_2", "dense_3", "all"}
    assert len(first) == 4 * len(est.ESTIMATORS)
    deterministic = [r for r in first if r["estimator"] in ("p=0", "p=1", "p=1 ste")]
    assert all(r["variance"] < 1e-9 and r["draws"] == 1 for r in deterministic)


def test_the_table_from_a_csv(tmp_path):
    mlp = tiny_mlp(seed=11)
    x = np.random.default_rng(12).normal(size=(6, 3)).astype(np.float32)
    y = np.arange(6, dtype=np.int32) % 3
    rows = []
    for epoch in (0, 2):
        rows += [{"epoch": epoch, "val_accuracy_binary": 0.5, **r} for r in est.compare(
            mlp, x, y, est.ESTIMATORS, samples=30, draws=30, groups=3, sigma=1.0, unit=UNIT,
            seed=(epoch,))]
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp_path / "e.csv", index=False)
    config = {"model.widths": [2, 2], "activation.p": 0.5, "activation.slope": 1.0,
              "activation.cutoff": 1.2, "activation.granularity": "batch", "optim.name": "adam",
              "optim.lr": 0.001, "budget.batch_size": 128, "seed": 0}
    meta = {"epochs": [0, 2], "samples": 30, "draws": 30, "batch": 6, "sigma": 1.0, "groups": 3,
            "seed": 0, "config": config, "git.commit": "0123456789abcdef", "git.dirty": "false",
            "ended": "2026-01-01", "seconds": 60.0}
    (tmp_path / "e.json").write_text(json.dumps(meta))
    table = t6.table(tmp_path / "e.csv")
    assert table.name == "t6_estimator"
    assert len(table.frame) == 2 * len(est.ESTIMATORS)
    assert "local expectation gradients, 30 draws" in table.title
    assert "0123456789" in table.provenance
    assert (table.frame.loc[table.frame["estimator"] == "p=1", "variance"] == "0 (deterministic)").all()
    assert all(cell.startswith("< ") or " ± " in cell for cell in table.frame["bias"])
    table.write(tmp_path / "tables")


@pytest.mark.parametrize("args", [["--groups", "2"], ["--epochs", "0,x"], ["--set", "model.arch=cnn"],
                                  ["--batch", "100000"]])
def test_cli_refuses_bad_settings(args, capsys):
    assert main(["estimator", "--out", "/nonexistent/e.csv", *args]) == 2
    assert capsys.readouterr().err.startswith("error: estimator:")
