"""Benchmarks 1-3: the activation's cost, throughput against the machine's matmul limit, the input
pipeline. Each compares candidates side by side in one process, blocks interleaved (A B C A B C ...),
and reports the median of the per-round ratios, so that machine noise hits all candidates alike."""

from __future__ import annotations

import statistics
import time

import keras
import numpy as np
import tensorflow as tf

from study.activations import SigmoidOrBinary
from study.config import DataConfig
from study.data import load
from study.train import as_tensors, batches

WIDTHS, BATCH = (512, 512), 256


def stack_overflow_layer(p: float = 0.5):
    """The original answer's op, as the baseline: tf.cond forward, tf.gradients of the sigmoid
    inside the custom gradient (the gradient recomputes the forward's sigmoid)."""

    def op(x):
        rand = tf.random.uniform([])

        @tf.custom_gradient
        def sigmoid_or_bin(x):
            y = tf.cond(rand < p, lambda: tf.cast(x > 0, x.dtype), lambda: tf.sigmoid(x))

            def grad(dy):
                return tf.gradients(tf.sigmoid(x), x)[0] * dy

            return y, grad

        return sigmoid_or_bin(x)

    return keras.layers.Lambda(op)


def mlp(activation) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((784,))
    x = inputs
    for width in WIDTHS:
        x = activation()(keras.layers.Dense(width)(x))
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def train_step(model: keras.Model):
    optimizer = keras.optimizers.Adam(1e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer.build(model.trainable_variables)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    return step


def interleaved(candidates: dict, rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds per call of each candidate, per round (each call run `steps` times per round); the
    order of the candidates is reversed every other round, so none always runs first."""
    times = {name: [] for name in candidates}
    for fn in candidates.values():
        for _ in range(3):
            fn()  # trace and warm up
    for round_ in range(rounds):
        for name, fn in list(candidates.items())[:: -1 if round_ % 2 else 1]:
            start = time.perf_counter()
            for _ in range(steps):
                out = fn()
            np.asarray(out)
            times[name].append((time.perf_counter() - start) / steps)
    return times


def ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    return statistics.median(a / b for a, b in zip(times[name], times[base], strict=True))


def activation_cost(rounds: int = 15, steps: int = 20) -> dict[str, float]:
    """Training-step time relative to Keras' built-in sigmoid (graph mode, MLP 784-512-512-10)."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((BATCH, 784), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, BATCH).astype(np.int32))
    variants = {
        "keras sigmoid": lambda: keras.layers.Activation("sigmoid"),
        "stack overflow original": stack_overflow_layer,
        "SigmoidOrBinary batch": lambda: SigmoidOrBinary(p=0.5, seed=0),
        "SigmoidOrBinary example": lambda: SigmoidOrBinary(p=0.5, granularity="example", seed=0),
        "SigmoidOrBinary unit": lambda: SigmoidOrBinary(p=0.5, granularity="unit", seed=0),
        "SigmoidOrBinary batch c=1.2": lambda: SigmoidOrBinary(p=0.5, cutoff=1.2, seed=0),
    }
    steps_fns = {name: train_step(mlp(make)) for name, make in variants.items()}
    candidates = {name: (lambda s=s: s(x, y)) for name, s in steps_fns.items()}
    times = interleaved(candidates, rounds, steps)
    out = {f"{name} / keras sigmoid": ratio(times, name, "keras sigmoid") for name in variants
           if name != "keras sigmoid"}
    out["keras sigmoid step ms"] = 1000 * statistics.median(times["keras sigmoid"])
    return out


def throughput(rounds: int = 15, steps: int = 20) -> dict[str, float]:
    """FLOP/s of the MLP training step against bare matmuls of the same shapes, same process."""
    rng = np.random.default_rng(0)
    dims = (784, *WIDTHS, 10)
    x = tf.constant(rng.random((BATCH, 784), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, BATCH).astype(np.int32))
    step = train_step(mlp(lambda: SigmoidOrBinary(p=0.5, seed=0)))
    acts = [tf.constant(rng.random((BATCH, d), dtype=np.float32)) for d in dims]
    shapes = list(zip(dims, dims[1:], strict=False))
    weights = [tf.constant(rng.random(shape, dtype=np.float32)) for shape in shapes]

    @tf.function
    def matmuls():  # forward, weight gradient and input gradient of every dense layer
        total = 0.0
        for i, w in enumerate(weights):
            total += tf.reduce_sum(tf.matmul(acts[i], w)) * 0
            total += tf.reduce_sum(tf.matmul(acts[i], acts[i + 1], transpose_a=True)) * 0
            total += tf.reduce_sum(tf.matmul(acts[i + 1], w, transpose_b=True)) * 0
        return total

    flops = 3 * 2 * BATCH * sum(a * b for a, b in zip(dims, dims[1:], strict=False))
    times = interleaved({"step": lambda: step(x, y), "matmuls": matmuls}, rounds, steps)
    step_s, matmul_s = statistics.median(times["step"]), statistics.median(times["matmuls"])
    return {"step GFLOP/s": flops / step_s / 1e9, "matmul GFLOP/s": flops / matmul_s / 1e9,
            "step / matmul limit": matmul_s / step_s}


def input_pipeline(rounds: int = 11) -> dict[str, float]:
    """A training epoch of Fashion-MNIST (the MLP above, batch 128) through the project's data path
    (`study.train.batches`: per-epoch stateless shuffle, one gather per batch from the images
    scaled to float once per trial) against the same epoch from float tensors in memory, unshuffled."""
    data = load(DataConfig())
    model = mlp(lambda: SigmoidOrBinary(p=0.5, seed=0))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x_float = tf.constant(data.x_train.reshape(len(data.x_train), -1).astype(np.float32) / 255)
    y = tf.constant(data.y_train)
    steps = int(np.ceil(len(data.x_train) / 128))
    flat = keras.layers.Reshape((784,))

    images, labels = as_tensors(data.x_train, data.y_train, data.scale)  # once per trial

    def project():
        ds = batches(images, labels, 128, 0, epoch=0)
        model.fit(ds.map(lambda a, b: (flat(a), b)), steps_per_epoch=steps, verbose=0)
        return 0

    def in_memory():
        ds = tf.data.Dataset.from_tensor_slices((x_float, y)).batch(128)
        model.fit(ds, steps_per_epoch=steps, verbose=0)
        return 0

    times = interleaved({"project": project, "in memory": in_memory}, rounds, 1)
    return {"project data path / in-memory tensors": ratio(times, "project", "in memory"),
            "in-memory epoch s": statistics.median(times["in memory"])}
