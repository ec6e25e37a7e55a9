"""The op as a GPU runs it, checked without a GPU: the separate-ops path (the one GPUs and XLA take;
`fused.disabled()` forces it here) traced into a training step has no `tf.cond` and no int32
element-wise op on data-sized tensors (graph inspection); every precision policy against the NumPy
reference; distinct, reproducible draws per replica on TensorFlow's logical devices; the
determinism switch."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from study import compat, fused, runtime
from study.activations import SigmoidOrBinary, saturation_threshold
from study.config import TrialConfig

from .conftest import ROOT
from .reference import ref_grad, ref_hard, ref_sat

ELEMENTWISE = {"Cast", "Less", "LessEqual", "Greater", "GreaterEqual", "Equal", "NotEqual", "Add",
               "AddV2", "Sub", "Mul", "FloorMod", "FloorDiv", "BitwiseAnd", "BitwiseOr",
               "BitwiseXor", "Select", "SelectV2", "Maximum", "Minimum", "Abs", "Neg"}
CONDITIONALS = {"If", "StatelessIf", "Case", "StatelessCase", "Switch", "Merge"}


def training_step_graph(**options) -> tf.Graph:
    """The graph of one training step (forward, loss, gradients) of a small model whose hidden
    activation, named "act", is the op on its separate-ops path."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
                              SigmoidOrBinary(cutoff=1.2, seed=0, name="act", **options),
                              keras.layers.Dense(2)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        return tape.gradient(value, model.trainable_variables)

    with fused.disabled():
        return step.get_concrete_function(tf.TensorSpec([None, 8]),
                                          tf.TensorSpec([None], tf.int32)).graph


def data_sized(tensor: tf.Tensor) -> bool:
    """Whether a tensor may be as large as the data (not a scalar or a shape-sized vector)."""
    shape = tensor.shape
    return shape.rank is None or (shape.rank >= 1 and (not shape.is_fully_defined()
                                                       or shape.num_elements() > 16))


@pytest.mark.parametrize("surrogate", ["sigmoid", "ste"])
@pytest.mark.parametrize("noise_std", [0.0, 0.5])
@pytest.mark.parametrize("granularity", ["batch", "example", "unit"])
@pytest.mark.parametrize("p", [0.5, 1.0])
def test_the_traced_training_step_has_no_cond_and_no_int32_element_wise_op(p, granularity,
                                                                           noise_std, surrogate):
    operations = training_step_graph(p=p, granularity=granularity, noise_std=noise_std,
                                     surrogate=surrogate).get_operations()
    assert any("act" in op.name for op in operations)
    assert not [op.name for op in operations if op.type in CONDITIONALS]
    int32 = [f"{op.type} {op.name}" for op in operations
             if op.type in ELEMENTWISE and "act" in op.name
             and any(t.dtype == tf.int32 and data_sized(t) for t in [*op.inputs, *op.outputs])]
    assert not int32


EPS = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}


@pytest.fixture
def policy():
    """Sets Keras' dtype policy for a test (through the trial's own setting) and restores float32."""
    yield runtime.configure_precision
    runtime.configure_precision("float32")


@pytest.mark.parametrize("surrogate", ["sigmoid", "ste", "hard_sigmoid"])
@pytest.mark.parametrize("slope,cutoff", [(1.0, 1.0), (1.0, 1.2), (2.5, 1.2)])
@pytest.mark.parametrize("p", [0.0, 1.0])
@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_every_precision_matches_the_reference(policy, precision, p, slope, cutoff, surrogate):
    policy(precision)
    layer = SigmoidOrBinary(p=p, slope=slope, cutoff=cutoff, surrogate=surrogate, seed=0)
    compute = layer.compute_dtype
    assert compute == precision.removeprefix("mixed_")
    x = tf.constant(np.linspace(-6, 6, 193), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
    grad = tape.gradient(y, x)
    assert y.dtype == compute
    # the reference at the input as the layer computes it (rounded to its dtype), away from the
    # edges of the surrogate's support, which rounding the threshold may move by an ulp
    x64 = tf.cast(tf.cast(x, compute), tf.float64).numpy()
    edges = [1.0, saturation_threshold(slope, cutoff)]
    away = np.all([np.abs(np.abs(x64) - e) > 4 * EPS[compute] * e for e in edges], axis=0)
    expected = ref_hard(x64) if p == 1 else ref_sat(x64, slope, cutoff)
    tolerance = 2 * EPS[compute]
    np.testing.assert_allclose(tf.cast(y, tf.float64).numpy()[away], expected[away],
                               rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(tf.cast(grad, tf.float64).numpy()[away],
                               ref_grad(x64, slope, cutoff, surrogate)[away],
                               rtol=8 * tolerance, atol=8 * tolerance * slope * cutoff)


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_a_mixed_precision_trial_trains_and_evaluates(policy, precision):
    from study.train import train

    policy("float32")
    config = TrialConfig.from_flat({"data.name": "synthetic", "budget.epochs": 2,
                                    "runtime.precision": precision})
    result = train(config)
    assert keras.config.dtype_policy().name == precision
    assert result.history[-1]["val/accuracy_binary"] > 0.5
    assert np.isfinite(result.history[-1]["train/loss"])


REPLICAS = """
import contextlib, json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from study import fused
from study.activations import SigmoidOrBinary

def draws(devices, granularity, separate, calls=12):
    strategy = tf.distribute.MirroredStrategy(devices) if devices else tf.distribute.get_strategy()
    with strategy.scope():
        layer = SigmoidOrBinary(p=0.5, granularity=granularity, noise_std=0.25, seed=3)
    x = tf.fill([16, 8], 0.5)
    with fused.disabled() if separate else contextlib.nullcontext():
        step = tf.function(lambda x: layer(x, training=True))
        out = [strategy.experimental_local_results(strategy.run(step, args=(x,)))
               for _ in range(calls)]
    return [[r.numpy().round(4).tolist() for r in replicas] for replicas in out]

granularity = sys.argv[1]
result = {}
for separate in (True, False):
    result[f"two{separate}"] = draws(["/cpu:0", "/cpu:1"], granularity, separate)
    result[f"again{separate}"] = draws(["/cpu:0", "/cpu:1"], granularity, separate)
    result[f"one{separate}"] = draws(["/cpu:0"], granularity, separate)
    result[f"none{separate}"] = draws(None, granularity, separate)
print(json.dumps(result))
"""


@pytest.mark.parametrize("granularity", ["batch", "example", "unit"])
def test_replicas_draw_distinct_reproducible_coins_and_noise(granularity):
    proc = subprocess.run([sys.executable, "-c", REPLICAS, granularity], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    drawn = json.loads(proc.stdout.splitlines()[-1])
    for separate in ("True", "False"):  # the separate ops (GPUs) and the fused kernels (CPU)
        two = drawn[f"two{separate}"]
        assert all(len(replicas) == 2 for replicas in two)
        assert all(a != b for a, b in two)  # the noise differs per replica, the coins too
        assert two == drawn[f"again{separate}"]  # reproducible from the seed
        # one replica draws what the layer draws without a strategy
        assert drawn[f"one{separate}"] == drawn[f"none{separate}"]
    np.testing.assert_allclose(drawn["twoTrue"], drawn["twoFalse"], atol=2e-4)  # the same draws
    if granularity != "batch":  # coins per example or unit: the replicas' hard units differ
        assert any((np.array(a) == 1).tolist() != (np.array(b) == 1).tolist()
                   for a, b in drawn["twoTrue"])


def test_the_determinism_setting_turns_op_determinism_on_and_off(monkeypatch):
    from tensorflow.python.framework import config as tf_config  # private: checked in compat

    try:
        runtime.configure_determinism(True)
        assert tf_config.is_op_determinism_enabled()
        runtime.configure_determinism(False)
        assert not tf_config.is_op_determinism_enabled()
    finally:
        compat.tf_set_op_determinism(False)


def test_each_trial_sets_its_precision_and_determinism(monkeypatch):
    from study import train

    asked = []
    monkeypatch.setattr(runtime, "configure_precision", lambda value: asked.append(value))
    monkeypatch.setattr(runtime, "configure_determinism", lambda value: asked.append(value))
    config = TrialConfig.from_flat({"data.name": "synthetic", "budget.epochs": 1,
                                    "runtime.precision": "mixed_bfloat16",
                                    "runtime.deterministic": True})
    train.Trainer(config)
    assert asked == ["mixed_bfloat16", True]
