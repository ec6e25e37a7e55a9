"""The fused CPU kernels (study/kernels/sigmoid_or_binary.cc) against the same formulas as separate
TensorFlow ops (`study.fused.disabled()`), the draws against keras.random, and the fallbacks."""

import contextlib
import dataclasses
import logging
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from study import fused
from study.activations import (
    SigmoidOrBinary,
    hard,
    saturating_sigmoid,
    saturation_threshold,
    sigmoid_or_binary,
)
from study.activations_tf import forget_gradients, traced_gradients
from study.config import ActivationConfig, ModelConfig
from study.evaluation import Evaluator, _with_parts
from study.models import build_network

from .conftest import ROOT


@pytest.fixture(autouse=True)
def _library_built():
    assert fused.ops() is not None, "the fused kernels are not built: run `make setup`"


def path(use_fused: bool):
    return contextlib.nullcontext() if use_fused else fused.disabled()


def edges(slope, cutoff, shape=(6, 5, 7), seed=0):
    """Values around 0, +-1 and +-T (the saturation edges), exactly on them, and random ones."""
    t = saturation_threshold(slope, cutoff)
    points = [0.0, 1.0, -1.0, 1 + 1e-3, -1 - 1e-3, 1 - 1e-3, 4.0, -9.0]
    if math.isfinite(t):
        points += [t, -t, t + 1e-3, t - 1e-3, -t + 1e-3, -t - 1e-3]
    x = np.random.default_rng(seed).normal(0, 2.5, shape).astype(np.float32)
    x.flat[: len(points)] = points
    return x


def value_and_grad(x, dy, use_fused, seed=3, **kwargs):
    gen = keras.random.SeedGenerator(seed)
    with path(use_fused):
        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = sigmoid_or_binary(x, seed=gen, **kwargs)
        g = tape.gradient(y, x, output_gradients=tf.constant(dy))
    return y.numpy(), g.numpy(), gen.state.numpy()


@pytest.mark.parametrize("p", [0.0, 1.0, 0.5, "tensor"])
@pytest.mark.parametrize("noise_std", [0.0, 1.0])
@pytest.mark.parametrize("slope,cutoff", [(1.0, 1.0), (1.0, 1.2), (2.5, 1.2)])
@pytest.mark.parametrize("surrogate", ["sigmoid", "ste", "hard_sigmoid"])
@pytest.mark.parametrize("granularity", ["batch", "example", "unit"])
def test_fused_equals_the_tensorflow_ops(granularity, surrogate, slope, cutoff, noise_std, p):
    p = tf.constant(0.3) if p == "tensor" else p
    x = edges(slope, cutoff)
    dy = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    kwargs = dict(p=p, slope=slope, cutoff=cutoff, granularity=granularity, noise_std=noise_std,
                  surrogate=surrogate)
    y_f, g_f, state_f = value_and_grad(x, dy, True, **kwargs)
    y_t, g_t, state_t = value_and_grad(x, dy, False, **kwargs)
    np.testing.assert_array_equal(state_f, state_t)  # the same draws taken from the generator
    # Same coins and noise; values a few ulps apart at most (TensorFlow's sigmoid computes some
    # elements with a scalar formula, the kernel all with the vectorized one; the normals differ
    # by a few ulps), so every branch and mask decision is the same.
    np.testing.assert_allclose(y_f, y_t, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(g_f, g_t, rtol=1e-5, atol=1e-6)
    if noise_std == 0:
        assert ((y_f == 0) | (y_f == 1)).mean() == ((y_t == 0) | (y_t == 1)).mean()


@pytest.mark.parametrize("kwargs", [
    dict(p=0.5, cutoff=1.2, granularity="unit", noise_std=1.0),
    dict(p=0.3, slope=2.0, granularity="example", surrogate="ste", noise_std=0.5),
    dict(p=0.5, cutoff=1.2, granularity="batch", surrogate="hard_sigmoid"),
])
def test_large_tensors_split_over_threads_equal_the_tensorflow_ops(kwargs):
    x = edges(kwargs.get("slope", 1.0), kwargs.get("cutoff", 1.0), shape=(64, 41, 60))
    dy = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    y_f, g_f, _ = value_and_grad(x, dy, True, **kwargs)
    y_t, g_t, _ = value_and_grad(x, dy, False, **kwargs)
    np.testing.assert_allclose(y_f, y_t, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(g_f, g_t, rtol=1e-5, atol=1e-6)


def op_types(fn, *args):
    return {op.type for op in fn.get_concrete_function(*args).graph.get_operations()}


def test_the_kernels_are_what_runs_unless_disabled_or_under_xla():
    layer = SigmoidOrBinary(p=0.5, cutoff=1.2, granularity="unit", seed=0)
    x = tf.zeros([4, 8])

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, x)

    assert {"StudySigmoidOrBinary", "StudySigmoidOrBinaryGrad"} <= op_types(tf.function(step), x)
    with fused.disabled():
        assert "StudySigmoidOrBinary" not in op_types(tf.function(step), x)
    assert "StudySigmoidOrBinary" not in op_types(tf.function(step, jit_compile=True), x)
    assert not fused.usable(tf.zeros([2], tf.float64))


@pytest.mark.parametrize("granularity", ["batch", "example", "unit"])
def test_inside_tf_function_with_training_and_p_as_tensors(granularity):
    x = tf.constant(edges(1.0, 1.2, shape=(16, 3, 40)))
    dy = tf.constant(np.random.default_rng(2).normal(size=x.shape).astype(np.float32))
    results = []
    for use_fused in (True, False):
        layer = SigmoidOrBinary(p=0.6, cutoff=1.2, granularity=granularity, noise_std=0.5,
                                p_ramp_steps=3, seed=11)

        @tf.function
        def step(x, training, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=training)
            return y, tape.gradient(y, x, output_gradients=dy)

        with path(use_fused):
            step.get_concrete_function(x, tf.TensorSpec([], tf.bool))
        results.append([[v.numpy() for v in step(x, tf.constant(t))] for t in (True, True, False)])
    for (y_f, g_f), (y_t, g_t) in zip(*results, strict=True):
        np.testing.assert_allclose(y_f, y_t, rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(g_f, g_t, rtol=1e-5, atol=1e-6)


def test_batch_and_example_coins_are_keras_uniform_draws_bit_for_bit():
    for seed in (0, 7, -5, 2**40 + 3):
        for granularity, shape in (("batch", []), ("example", [300, 1, 1])):
            gen, twin = keras.random.SeedGenerator(0), keras.random.SeedGenerator(0)
            gen.state.assign([seed, 9])
            twin.state.assign([seed, 9])
            y = sigmoid_or_binary(tf.fill([300, 7, 13], 0.5), p=0.37, granularity=granularity,
                                  seed=gen).numpy()
            u = keras.random.uniform(shape, seed=twin).numpy()
            np.testing.assert_array_equal(y == 1.0, np.broadcast_to(u < np.float32(0.37), y.shape))


@pytest.mark.parametrize("use_fused", [True, False])
def test_unit_coins_are_m_below_ceil_p_2_23_from_8_bits_a_coin(use_fused):
    """B = m < ceil(p 2^23), m = 256-valued top byte (bytes of the Philox blocks keras.random would
    draw) * 2^15 + 15 low bits (a second stream), a uniform 23-bit integer: the law of
    keras.random.uniform(...) < p."""
    # ceil(p 2^23) = 94 * 2^15 + 23209: ~600 ties on the top byte; more than 2^17 elements, so
    # the kernel runs on the intra-op pool
    shape, p = (700, 13, 17), 0.37
    n = int(np.prod(shape))
    for seed in (0, -5, 2**40 + 3):
        gen = keras.random.SeedGenerator(0)
        gen.state.assign([seed, 9])
        with path(use_fused):
            y = sigmoid_or_binary(tf.fill(shape, 0.5), p=p, granularity="unit", seed=gen).numpy()
        seed32 = tf.constant([seed % (2**31 - 2), 9], tf.int32)
        words = tf.random.stateless_uniform([(n + 15) // 16 * 4], seed=seed32, minval=None,
                                            maxval=None, dtype=tf.uint32).numpy()
        top = words.view(np.uint8)[:n].astype(np.int64)
        key, counter, alg = tf.raw_ops.StatelessRandomGetKeyCounterAlg(seed=seed32)
        ties = counter.numpy() ^ np.array([0, 2**63], np.uint64)
        low = tf.raw_ops.StatelessRandomUniformFullIntV2(shape=[n], key=key, counter=ties, alg=alg,
                                                         dtype=tf.uint32).numpy() & 0x7FFF
        m = top << 15 | low.astype(np.int64)
        threshold = math.ceil(float(np.float32(p)) * 2**23)
        assert (top == threshold >> 15).sum() > 50
        np.testing.assert_array_equal(y == 1.0, (m < threshold).reshape(shape))


@pytest.mark.parametrize("seed", [0, 12345, None])
def test_noise_is_keras_normal_to_a_few_ulps(seed):
    gen = keras.random.SeedGenerator(seed)
    twin = keras.random.SeedGenerator(seed)
    twin.state.assign(gen.state.value)
    shape = (517, 263)  # neither a multiple of 4 nor of a tile; more than 2^17 elements
    y = sigmoid_or_binary(tf.zeros(shape), p=0.0, noise_std=1.0, seed=gen).numpy()  # sigmoid(n)
    noise = keras.random.normal(shape, seed=twin).numpy()
    np.testing.assert_allclose(y, 1 / (1 + np.exp(-noise.astype(np.float64))), rtol=1e-6)


def test_int_seeds_draw_the_same_as_keras_with_that_seed():
    x = tf.fill([64, 10], 0.5)
    y = sigmoid_or_binary(x, p=0.5, granularity="example", seed=42).numpy()
    np.testing.assert_array_equal(y == 1.0, np.broadcast_to(
        keras.random.uniform([64, 1], seed=42).numpy() < 0.5, y.shape))
    np.testing.assert_array_equal(sigmoid_or_binary(x, p=0.5, granularity="example", seed=42), y)
    unit = sigmoid_or_binary(x, p=0.5, granularity="unit", seed=42).numpy()
    with fused.disabled():
        np.testing.assert_array_equal(sigmoid_or_binary(x, p=0.5, granularity="unit", seed=42), unit)


def train(use_fused, seed, jit=False):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 12)).astype(np.float32)
    y = (x[:, :6].sum(1) > 0).astype(np.int32)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(24),
                              SigmoidOrBinary(p=0.5, cutoff=1.2, granularity="example",
                                              noise_std=1.0, p_ramp_steps=8, seed=seed),
                              keras.layers.Dense(24),
                              SigmoidOrBinary(p=0.5, granularity="unit", surrogate="ste",
                                              seed=seed + 1),
                              keras.layers.Dense(2)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit)
    with path(use_fused):
        losses = model.fit(x, y, epochs=3, batch_size=32, verbose=0, shuffle=False).history["loss"]
    return losses, [w.numpy() for w in model.weights]


def test_model_fit_fused_matches_the_tensorflow_ops_and_seeded_runs_repeat_exactly():
    losses, weights = train(True, 0)
    again_losses, again_weights = train(True, 0)
    assert losses == again_losses
    for a, b in zip(weights, again_weights, strict=True):
        np.testing.assert_array_equal(a, b)
    other_losses, _ = train(True, 1)
    assert other_losses != losses
    ops_losses, ops_weights = train(False, 0)
    np.testing.assert_allclose(losses, ops_losses, rtol=1e-4)
    for a, b in zip(weights, ops_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_traced_gradients_are_forgotten_on_the_fused_path():
    before = traced_gradients()
    layer = SigmoidOrBinary(p=0.5, cutoff=1.2, seed=0)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, x)

    step(tf.ones([2, 3]))
    new = traced_gradients() - before
    assert new
    forget_gradients(new)
    assert traced_gradients() == before


def test_other_dtypes_run_the_tensorflow_ops():
    x = edges(1.0, 1.2).astype(np.float64)
    y, g, _ = value_and_grad(x, np.ones_like(x), True, p=0.0, cutoff=1.2)
    y32, g32, _ = value_and_grad(x.astype(np.float32), np.ones(x.shape, np.float32), True, p=0.0,
                                 cutoff=1.2)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, y32, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g, g32, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("slope,cutoff", [(1.0, 1.0), (1.0, 1.2), (2.0, 1.5)])
def test_hard_and_saturating_sigmoid_and_the_gradient_of_sat(slope, cutoff):
    x = tf.constant(edges(slope, cutoff))
    out = {}
    for use_fused in (True, False):
        with path(use_fused), tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            h, s = hard(x), saturating_sigmoid(x, slope, cutoff)
        out[use_fused] = h.numpy(), s.numpy(), tape.gradient(s, x).numpy(), tape.gradient(h, x)
    np.testing.assert_array_equal(out[True][0], out[False][0])
    np.testing.assert_allclose(out[True][1], out[False][1], rtol=2e-6, atol=1e-7)
    sig = 1 / (1 + np.exp(-slope * x.numpy().astype(np.float64)))
    inside = np.abs(x.numpy()) < np.float32(saturation_threshold(slope, cutoff))
    expected = np.where(inside, cutoff * slope * sig * (1 - sig), 0.0)  # sat'(x)
    np.testing.assert_allclose(out[True][2], expected, rtol=1e-5, atol=1e-7)
    assert out[True][3] is None and out[False][3] is None  # nothing flows through hard


@pytest.mark.parametrize("inside,bound", [("lt", 2.3978953), ("le", 1.0), ("lt", math.inf)])
def test_code_stats_counts_like_numpy(inside, bound):
    pre = np.random.default_rng(0).normal(0, 2, (37, 600)).astype(np.float32)
    pre.flat[:8] = [0.0, -0.0, np.nan, np.inf, -np.inf, bound, -bound, 1.0]
    ones, outside = fused.ops().study_code_stats(pre, inside=inside, bound=bound)
    np.testing.assert_array_equal(ones, (pre > 0).sum(0).astype(np.float32))
    with np.errstate(invalid="ignore"):
        within = np.abs(pre) < bound if inside == "lt" else np.abs(pre) <= bound
    assert int(outside) == int((~within).sum())


@pytest.mark.parametrize("arch,activation", [
    ("cnn", ActivationConfig(p=0.5, cutoff=1.2)),
    ("mlp", ActivationConfig(p=0.5)),  # c = 1: saturated all the same at |x| >= ln 11
    ("mlp", ActivationConfig(p=0.5, cutoff=1.01, slope=2.0)),
    ("gated", ActivationConfig(p=1.0, surrogate="ste", eval_mode="soft")),
    ("bottleneck", ActivationConfig(p=0.5, cutoff=1.2, noise_std=1.0, surrogate="hard_sigmoid")),
    ("mlp", ActivationConfig(kind="relu")),
])
def test_evaluation_numbers_are_those_of_the_tensorflow_ops(arch, activation):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1300, 8, 8, 1)).astype(np.uint8)  # a batch of 1000 and one of 300
    y = rng.integers(0, 10, 1300).astype(np.int32)
    keras.utils.set_random_seed(0)
    network = build_network(ModelConfig(arch=arch, widths=(48, 24), filters=(4, 8), dense_width=16,
                                        code_bits=12), activation, (8, 8, 1), 10)
    results = []
    for use_fused in (True, False):
        evaluator = Evaluator(network, activation, probe=1100)
        with path(use_fused):
            results.append([evaluator(x * 4, y, 1 / 64) for _ in range(2)])  # wide pre-activations
    assert repr(results[0]) == repr(results[1])
    parts = {"mlp": 2, "cnn": 3, "gated": 2, "bottleneck": 1}[arch]  # no copy of the concatenation
    assert len(_with_parts(network.evaluator).outputs) == 2 + parts
    stats = results[0][1].diagnostics
    assert "act/flip_rate" in stats
    if activation.kind == "sigmoid_or_binary":
        assert 0 < stats["act/saturated_fraction"] < 1


@pytest.mark.parametrize("use_fused", [True, False])
def test_saturation_is_one_bound_on_the_slope_scaled_input_for_every_surrogate(use_fused):
    """|s x| >= ln 11 whatever the surrogate and cutoff: the same network, evaluated as a sigmoid-,
    STE- or hard_sigmoid-trained unit (or at another cutoff), reports the same fraction."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (500, 8, 8, 1)).astype(np.uint8)
    y = rng.integers(0, 10, 500).astype(np.int32)
    keras.utils.set_random_seed(0)
    base = ActivationConfig(p=0.5, slope=2.0, cutoff=1.2)
    network = build_network(ModelConfig(arch="mlp", widths=(48, 24)), base, (8, 8, 1), 10)
    pre = np.concatenate([np.reshape(t, (500, -1)) for t in
                          _with_parts(network.evaluator)(x * 4 / 64.0)[2:]], 1)
    expected = float(np.mean(np.abs(2.0 * pre) >= np.log(11)))
    assert 0.05 < expected < 0.95
    with path(use_fused):
        seen = {(surrogate, cutoff): Evaluator(network, dataclasses.replace(
                    base, surrogate=surrogate, cutoff=cutoff))(x * 4, y, 1 / 64)
                .diagnostics["act/saturated_fraction"]
                for surrogate in ("sigmoid", "ste", "hard_sigmoid") for cutoff in (1.0, 1.2, 2.0)}
    assert list(seen.values()) == [pytest.approx(expected)] * len(seen)


def test_a_missing_stale_or_broken_library_falls_back_with_one_warning(monkeypatch, tmp_path, caplog):
    broken = tmp_path / "sigmoid_or_binary.so"
    broken.write_text("not a library")
    old = tmp_path / "old.so"
    old.write_bytes(fused.LIBRARY.read_bytes())
    os.utime(old, (0, 0))
    x = edges(1.0, 1.2)
    expected = value_and_grad(x, np.ones_like(x), False, p=0.5, cutoff=1.2)
    for library, reason in ((tmp_path / "missing.so", "is missing"), (old, "older than"),
                            (broken, "does not load")):
        monkeypatch.setattr(fused, "LIBRARY", library)
        fused.ops.cache_clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="study.fused"):
            assert not fused.usable(tf.constant(x))
            got = value_and_grad(x, np.ones_like(x), True, p=0.5, cutoff=1.2)
            fused.usable(tf.constant(x))
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 1 and reason in messages[0] and "make setup" in messages[0]
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)
    monkeypatch.undo()
    fused.ops.cache_clear()
    assert fused.ops() is not None


@pytest.mark.slow
def test_a_build_without_avx2_computes_the_same(tmp_path):
    """The portable code paths (scalar Philox, the compiler's default vector width)."""
    library = tmp_path / "portable.so"
    subprocess.run(["make", "-s", f"KERNEL={library}", "KERNEL_ARCH=", str(library)], cwd=ROOT,
                   check=True, capture_output=True)
    script = (
        "import sys, numpy as np, tensorflow as tf, keras\n"
        "from pathlib import Path\n"
        "from study import fused\n"
        "fused.LIBRARY = Path(sys.argv[1])\n"
        "from study.activations import sigmoid_or_binary\n"
        "x = tf.constant(np.random.default_rng(0).normal(0, 3, (33, 3, 17)).astype(np.float32))\n"
        "out = []\n"
        "for g in ('batch', 'example', 'unit'):\n"
        "    with tf.GradientTape() as tape:\n"
        "        tape.watch(x)\n"
        "        y = sigmoid_or_binary(x, p=0.4, cutoff=1.2, noise_std=0.7, granularity=g, seed=5)\n"
        "    out += [y.numpy(), tape.gradient(y, x).numpy()]\n"
        "assert fused.usable(x)\n"
        "np.save(sys.argv[2], np.stack(out))\n"
    )
    result = tmp_path / "out.npy"
    subprocess.run([sys.executable, "-c", script, str(library), str(result)], cwd=ROOT, check=True)
    x = tf.constant(np.random.default_rng(0).normal(0, 3, (33, 3, 17)).astype(np.float32))
    expected = []
    for g in ("batch", "example", "unit"):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = sigmoid_or_binary(x, p=0.4, cutoff=1.2, noise_std=0.7, granularity=g, seed=5)
        expected += [y.numpy(), tape.gradient(y, x).numpy()]
    np.testing.assert_array_equal(np.load(result), np.stack(expected))
