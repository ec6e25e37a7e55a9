"""The activation against an independent NumPy reference (after larq's quantizers_test.py)."""

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from study.activations import SigmoidOrBinary, saturation_threshold, sigmoid_or_binary

from .conftest import ROOT
from .reference import SETTINGS, hard_share_bound, inputs, ref_grad, ref_hard, ref_sat, ref_sigmoid


def value_and_grad(x, **kwargs):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = sigmoid_or_binary(x, **kwargs)
    return y.numpy(), tape.gradient(y, x).numpy()


@pytest.mark.parametrize("surrogate", ["sigmoid", "ste", "hard_sigmoid"])
@pytest.mark.parametrize("slope,cutoff", SETTINGS)
@pytest.mark.parametrize("p", [0.0, 1.0])  # the soft branch and the hard branch
def test_value_and_gradient_match_reference(p, slope, cutoff, surrogate):
    x = inputs(slope, cutoff)
    y, g = value_and_grad(x, p=p, slope=slope, cutoff=cutoff, surrogate=surrogate, seed=0)
    expected = ref_hard(x) if p == 1 else ref_sat(x.astype(np.float64), slope, cutoff)
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g, ref_grad(x.astype(np.float64), slope, cutoff, surrogate),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("surrogate", ["sigmoid", "ste"])
@pytest.mark.parametrize("noise_std", [0.5, 1.0])
@pytest.mark.parametrize("p", [0.0, 1.0])
def test_noise_is_added_before_both_branches_and_the_gradient(p, noise_std, surrogate):
    x = np.linspace(-3, 3, 61).astype(np.float32)
    # An int seed makes the draw stateless, so the same noise can be drawn again for the reference.
    noise = keras.random.normal((61,), seed=7).numpy().astype(np.float64)
    z = x + noise_std * noise
    y, g = value_and_grad(x, p=p, slope=1.5, cutoff=1.2, noise_std=noise_std,
                          surrogate=surrogate, seed=7)
    np.testing.assert_allclose(y, ref_hard(z) if p == 1 else ref_sat(z, 1.5, 1.2), atol=1e-5)
    np.testing.assert_allclose(g, ref_grad(z, 1.5, 1.2, surrogate), atol=1e-5)


def test_the_original_answers_numbers():
    tf.random.set_seed(0)
    x = tf.random.uniform([4], -1, 1)
    np.testing.assert_allclose(x, [-0.416049719, -0.586867094, 0.0707814693, 0.122514963],
                               rtol=1e-7)
    gradient = [0.239486054, 0.229652107, 0.249687135, 0.249064222]
    for p, forward in ((0.0, [0.397462428, 0.357354015, 0.517688, 0.530590475]),
                       (1.0, [0, 0, 1, 1])):
        y, g = value_and_grad(x, p=p, seed=0)
        np.testing.assert_allclose(y, forward, rtol=1e-6)
        np.testing.assert_allclose(g, gradient, rtol=1e-6)  # both branches: sigmoid'(x)


def test_saturation_starts_at_ln11_for_cutoff_1_2():
    t = saturation_threshold(1.0, 1.2)
    assert t == pytest.approx(2.398, abs=1e-3)
    y, g = value_and_grad(np.array([t, -t, t * 1.5, -t * 1.5], np.float32), p=0.0, cutoff=1.2)
    np.testing.assert_allclose(y, [1, 0, 1, 0], atol=1e-6)
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("granularity", ["batch", "example", "unit"])
def test_share_and_shape_of_the_coin(granularity, p):
    # At x = 0.5, hard = 1 and sat = sigmoid(0.5) = 0.62: every output tells which branch it took.
    shape = (64, 8, 16)
    layer = SigmoidOrBinary(p=p, granularity=granularity, seed=1)
    x = tf.fill(shape, 0.5)
    calls = 400 if granularity == "batch" else 4
    draws = []
    for _ in range(calls):
        is_hard = layer(x, training=True).numpy() == 1.0
        if granularity == "batch":
            assert is_hard.all() or not is_hard.any()
            draws.append(is_hard.flat[0])
        elif granularity == "example":
            per_example = is_hard.reshape(shape[0], -1)
            assert (per_example.all(axis=1) | ~per_example.any(axis=1)).all()
            draws.extend(per_example[:, 0])
        else:
            assert 0 < is_hard[0].mean() < 1  # units of one example draw separately
            draws.extend(is_hard.ravel())
    share = np.mean(draws)
    assert abs(share - p) <= hard_share_bound(p, len(draws)), (share, len(draws))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("granularity", ["batch", "example"])
def test_the_coin_draws_float32_uniforms_whatever_the_compute_dtype(dtype, granularity):
    # bfloat16 and float16 would round p and the uniforms: the coin is the float32 one bit for bit
    shape, p = (4096, 1), 0.3 + 2**-10
    x = tf.fill(shape, tf.constant(0.5, dtype))
    hard = sigmoid_or_binary(x, p=p, granularity=granularity, training=True, seed=7).numpy() == 1.0
    drawn = [] if granularity == "batch" else [shape[0], 1]
    expected = keras.random.uniform(drawn, dtype="float32", seed=7).numpy() < np.float32(p)
    assert (hard == expected).all()


@pytest.mark.parametrize("eval_mode", ["binary", "soft"])
def test_evaluation_is_deterministic_follows_eval_mode_and_never_draws(eval_mode):
    layer = SigmoidOrBinary(p=0.5, cutoff=1.2, slope=2.0, noise_std=1.0, eval_mode=eval_mode,
                            granularity="unit", seed=3)
    x = np.linspace(-3, 3, 101).astype(np.float32)[None]
    state = layer.seed_generator.state.numpy().copy()
    first, second = layer(x, training=False).numpy(), layer(x).numpy()
    np.testing.assert_array_equal(first, second)
    expected = ref_hard(x) if eval_mode == "binary" else ref_sat(x.astype(np.float64), 2.0, 1.2)
    np.testing.assert_allclose(first, expected, atol=1e-6)
    np.testing.assert_array_equal(layer.seed_generator.state.numpy(), state)


def test_a_traced_function_does_not_freeze_the_training_flag():
    layer = SigmoidOrBinary(p=0.0, seed=0)  # training: sigmoid; evaluation: hard
    x = tf.constant([[-1.0, 0.5]])
    f = tf.function(lambda x, training: layer(x, training=training))
    np.testing.assert_allclose(f(x, True), ref_sigmoid(np.array([[-1.0, 0.5]])), rtol=1e-6)
    np.testing.assert_array_equal(f(x, False), [[0.0, 1.0]])
    np.testing.assert_array_equal(f(x, tf.constant(False)), [[0.0, 1.0]])  # a tensor flag too


def draws_of(seed, calls=3, jit=False):
    layer = SigmoidOrBinary(p=0.5, granularity="unit", noise_std=0.5, seed=seed)
    x = tf.zeros([4, 32]) + 0.3
    f = tf.function(lambda x: layer(x, training=True), jit_compile=jit)
    return [f(x).numpy() for _ in range(calls)]


@pytest.mark.parametrize("jit", [False, True])
def test_seeded_layers_reproduce_and_redraw_each_call(jit):
    a, b, c = draws_of(5, jit=jit), draws_of(5, jit=jit), draws_of(6, jit=jit)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], a[1])  # a fresh draw per call
    assert not np.array_equal(a[0], c[0])  # another seed, other draws


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("granularity", ["batch", "unit"])
def test_gradient_under_tf_function_and_xla(jit, granularity):
    x = tf.constant(inputs(1.0, 1.2))
    layer = SigmoidOrBinary(p=0.5, cutoff=1.2, granularity=granularity, seed=0)

    @tf.function(jit_compile=jit)
    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, x)

    np.testing.assert_allclose(grad(x), ref_grad(x.numpy().astype(np.float64), 1.0, 1.2,
                                                 "sigmoid"), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("jit", [False, True])
def test_trains_inside_model_fit(jit):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8)).astype(np.float32)
    y = (x[:, :4].sum(1) > 0).astype(np.int32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32),
                              SigmoidOrBinary(p=0.5, cutoff=1.2, granularity="example",
                                              p_ramp_steps=20, seed=0),
                              keras.layers.Dense(2)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=jit)
    history = model.fit(x, y, epochs=8, batch_size=64, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    assert model.evaluate(x, y, verbose=0)[1] > 0.8
    assert int(model.layers[1].steps.numpy()) == 8 * 8  # one ramp step per training batch


def test_p_ramps_linearly_over_the_first_steps():
    layer = SigmoidOrBinary(p=0.8, granularity="unit", p_ramp_steps=4, seed=0)
    x = tf.fill([200, 100], 0.5)
    shares = [float(np.mean(layer(x, training=True).numpy() == 1.0)) for _ in range(6)]
    for step, share in enumerate(shares, start=1):
        p = 0.8 * min(step / 4, 1)
        assert abs(share - p) <= hard_share_bound(p, 20000), (step, share)


def test_options_out_of_range_are_refused_by_name():
    for kwargs, name in (({"p": 1.5}, "p"), ({"slope": 0.0}, "slope"), ({"cutoff": 0.9}, "cutoff"),
                         ({"noise_std": -1.0}, "noise_std"), ({"granularity": "row"}, "granularity"),
                         ({"surrogate": "tanh"}, "surrogate"), ({"eval_mode": "x"}, "eval_mode"),
                         ({"p_ramp_steps": -1}, "p_ramp_steps")):
        with pytest.raises(ValueError, match=name):
            SigmoidOrBinary(**kwargs)


def test_config_round_trip():
    layer = SigmoidOrBinary(p=0.3, slope=2.0, cutoff=1.2, granularity="unit", noise_std=0.5,
                            surrogate="ste", eval_mode="soft", p_ramp_steps=10, seed=4, name="act")
    clone = SigmoidOrBinary.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(restored, SigmoidOrBinary) and restored.get_config() == layer.get_config()


def test_keras_file_loads_in_a_fresh_process(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6),
                              SigmoidOrBinary(p=0.5, cutoff=1.2, eval_mode="soft",
                                              p_ramp_steps=3, seed=1),
                              keras.layers.Dense(2)])
    model(np.ones((2, 5), np.float32), training=True)  # a ramp step, so there is state to save
    path = tmp_path / "model.keras"
    model.save(path)
    x = np.linspace(-2, 2, 15, dtype=np.float32).reshape(3, 5)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np, keras, study.activations\n"
        "m = keras.models.load_model(sys.argv[1])\n"
        "act = m.layers[1]\n"
        "assert type(act).__name__ == 'SigmoidOrBinary', act\n"
        "print(int(act.steps.numpy()), act.eval_mode)\n"
        "np.save(sys.argv[2], m.predict(np.load(sys.argv[3]), verbose=0))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "y.npy"),
                          str(tmp_path / "x.npy")], capture_output=True, text=True, cwd=ROOT,
                         check=True)
    assert out.stdout.split() == ["1", "soft"]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), model.predict(x, verbose=0),
                               rtol=1e-6)
