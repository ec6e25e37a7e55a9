"""The activation on whichever Keras backend runs the tests (KERAS_BACKEND: tensorflow in `make
test`; jax and torch in `make test-backends`, an environment without TensorFlow), against the same
float64 NumPy reference: values, surrogate gradients (by the backend's own autodiff, as
bench/gpu_check.py takes them), the coin's law and shape, noise before both branches, training
inside `fit` (compiled or not) and a saved model loaded again. Nothing here imports TensorFlow at
module level."""

import keras
import numpy as np
import pytest
from keras import ops

from bench.gpu_check import value_and_grad
from study.activations import SigmoidOrBinary, sigmoid_or_binary

from .reference import SETTINGS, hard_share_bound, inputs, ref_grad, ref_hard, ref_sat

BACKEND = keras.backend.backend()


@pytest.mark.parametrize("surrogate", ["sigmoid", "ste", "hard_sigmoid"])
@pytest.mark.parametrize("slope,cutoff", SETTINGS)
@pytest.mark.parametrize("p", [0.0, 1.0])  # the soft branch and the hard branch
def test_value_and_surrogate_gradient_match_the_reference(p, slope, cutoff, surrogate):
    x = inputs(slope, cutoff)
    y, g = value_and_grad(lambda x: sigmoid_or_binary(x, p=p, slope=slope, cutoff=cutoff,
                                                      surrogate=surrogate, seed=0), x)
    expected = ref_hard(x) if p == 1 else ref_sat(x.astype(np.float64), slope, cutoff)
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g, ref_grad(x.astype(np.float64), slope, cutoff, surrogate),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("granularity", ["batch", "example", "unit"])
def test_the_coin_picks_a_branch_per_value_and_the_gradient_is_the_surrogates(granularity):
    x = np.linspace(-3, 3, 32 * 7, dtype=np.float32).reshape(32, 7)
    y, g = value_and_grad(lambda x: sigmoid_or_binary(x, p=0.5, cutoff=1.2,
                                                      granularity=granularity, seed=3), x)
    hard, soft = ref_hard(x.astype(np.float64)), ref_sat(x.astype(np.float64), 1.0, 1.2)
    took_hard = np.isclose(y, hard, atol=1e-6) & ~np.isclose(hard, soft, atol=1e-3)
    took_soft = np.isclose(y, soft, atol=1e-6)
    assert (took_hard | took_soft).all()
    if granularity == "batch":  # one coin: one branch for every value
        assert took_soft.all() or (hard == y).all()
    else:
        assert took_hard.any() and took_soft.any()
    np.testing.assert_allclose(g, ref_grad(x.astype(np.float64), 1.0, 1.2, "sigmoid"), atol=1e-6)


@pytest.mark.parametrize("p", [0.2, 0.7])
@pytest.mark.parametrize("granularity", ["batch", "example", "unit"])
def test_share_and_shape_of_the_coin(granularity, p):
    # At x = 0.5, hard = 1 and sat = sigmoid(0.5) = 0.62: every output tells which branch it took.
    shape = (64, 8, 16)
    layer = SigmoidOrBinary(p=p, granularity=granularity, seed=1)
    x = ops.full(shape, 0.5)
    draws = []
    for _ in range(200 if granularity == "batch" else 2):
        is_hard = ops.convert_to_numpy(layer(x, training=True)) == 1.0
        if granularity == "batch":
            assert is_hard.all() or not is_hard.any()
            draws.append(is_hard.flat[0])
        elif granularity == "example":
            per_example = is_hard.reshape(shape[0], -1)
            assert (per_example.all(axis=1) | ~per_example.any(axis=1)).all()
            draws.extend(per_example[:, 0])
        else:
            assert 0 < is_hard[0].mean() < 1  # the units of one example draw separately
            draws.extend(is_hard.ravel())
    assert abs(np.mean(draws) - p) <= hard_share_bound(p, len(draws))


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_noise_is_added_before_both_branches_and_the_gradient(p):
    x = np.linspace(-3, 3, 61).astype(np.float32)
    # An int seed makes the draw stateless, so the same noise can be drawn again for the reference.
    z = x + 0.5 * ops.convert_to_numpy(keras.random.normal((61,), seed=7)).astype(np.float64)
    y, g = value_and_grad(lambda x: sigmoid_or_binary(x, p=p, slope=1.5, cutoff=1.2, noise_std=0.5,
                                                      seed=7), x)
    np.testing.assert_allclose(y, ref_hard(z) if p == 1 else ref_sat(z, 1.5, 1.2), atol=1e-5)
    np.testing.assert_allclose(g, ref_grad(z, 1.5, 1.2, "sigmoid"), atol=1e-5)


@pytest.mark.parametrize("eval_mode", ["binary", "soft"])
def test_evaluation_follows_eval_mode_without_a_draw(eval_mode):
    x = inputs(1.0, 1.2)
    layer = SigmoidOrBinary(p=0.5, cutoff=1.2, eval_mode=eval_mode, noise_std=1.0, seed=0)
    y = ops.convert_to_numpy(layer(x, training=False))
    expected = ref_hard(x) if eval_mode == "binary" else ref_sat(x.astype(np.float64), 1.0, 1.2)
    np.testing.assert_allclose(y, expected, atol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_trains_inside_fit_and_reloads(tmp_path, jit):
    if jit and BACKEND == "torch":
        pytest.skip("Keras compiles the PyTorch backend with torch.compile, which bench/gpu_check.py"
                    " times; here its compilation would take minutes")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8)).astype(np.float32)
    y = (x[:, :4].sum(1) > 0).astype(np.int32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32),
                              SigmoidOrBinary(p=0.5, cutoff=1.2, granularity="example",
                                              p_ramp_steps=20, seed=0),
                              keras.layers.Dense(2)])
    model.compile(keras.optimizers.Adam(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=jit)
    history = model.fit(x, y, epochs=8, batch_size=64, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    assert model.evaluate(x, y, verbose=0)[1] > 0.9  # chance: 0.5
    assert int(ops.convert_to_numpy(model.layers[1].steps.value)) == 8 * 8  # a ramp step a batch
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(ops.convert_to_numpy(loaded(x[:16], training=False)),
                               ops.convert_to_numpy(model(x[:16], training=False)), atol=1e-6)
    assert loaded.layers[1].get_config() == model.layers[1].get_config()


def test_the_gpu_check_runs_end_to_end(tmp_path):
    """bench/gpu_check.py at its smoke size, as a GPU machine runs it (here on the CPU)."""
    import json
    import os
    import subprocess
    import sys

    from .conftest import ROOT

    out = tmp_path / "gpu-check.json"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(out)],
                          cwd=ROOT, env={**os.environ, "KERAS_BACKEND": BACKEND},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["backend"] == BACKEND and report["mismatches"] == []
    assert set(report["step_ratio"]) == {"eager", "compiled"}
    assert all(ratio > 0 for mode in report["step_ratio"].values() for ratio in mode.values())
    assert "values and gradients against the reference: ok" in proc.stdout
