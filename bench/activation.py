"""Benchmarks 1-4: the activation's cost on every architecture, the evaluation pass against a
training epoch, throughput against the machine's matmul limit, the input pipeline. Each compares
candidates side by side in one process, blocks interleaved (A B C A B C ..., or B A B C B ... against
one base) in alternating order, and reports the median of the per-round ratios, so that machine noise
hits all candidates alike."""

from __future__ import annotations

import gc
import statistics
import time
from unittest import mock

import keras
import numpy as np
import tensorflow as tf

from study import fused, models
from study.activations import SigmoidOrBinary
from study.config import ActivationConfig, DataConfig, ModelConfig, TrialConfig
from study.data import load
from study.models import build_network
from study.train import Trainer, as_tensors, batches

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


# The study's architectures at the paper's shapes (sweeps/specs/t1_*.yaml, t2_grid.yaml: Fashion-MNIST
# 28x28x1, batch 128; ModelConfig's defaults but the CNN's filters).
ARCHS = {"mlp": ModelConfig(arch="mlp"), "cnn": ModelConfig(arch="cnn", filters=(16, 32)),
         "gated": ModelConfig(arch="gated"), "bottleneck": ModelConfig(arch="bottleneck")}
PAPER_BATCH, PAPER_INPUT = 128, (28, 28, 1)
# The variants the paper uses, p = 0.5 unless said; semhash as in T1 (p ramped over 1000 steps).
VARIANTS = {
    "batch c=1": ActivationConfig(p=0.5),
    "batch c=1.2": ActivationConfig(p=0.5, cutoff=1.2),
    "example c=1": ActivationConfig(p=0.5, granularity="example"),
    "example c=1.2": ActivationConfig(p=0.5, cutoff=1.2, granularity="example"),
    "unit c=1": ActivationConfig(p=0.5, granularity="unit"),
    "unit c=1.2": ActivationConfig(p=0.5, cutoff=1.2, granularity="unit"),
    "p=0 c=1.2": ActivationConfig(p=0.0, cutoff=1.2),
    "p=1 c=1": ActivationConfig(p=1.0),
    "p=1 c=1.2": ActivationConfig(p=1.0, cutoff=1.2),
    "ste c=1": ActivationConfig(p=1.0, surrogate="ste"),
    "ste c=1.2": ActivationConfig(p=1.0, cutoff=1.2, surrogate="ste"),
    "hard_sigmoid c=1": ActivationConfig(p=1.0, surrogate="hard_sigmoid"),
    "hard_sigmoid c=1.2": ActivationConfig(p=1.0, cutoff=1.2, surrogate="hard_sigmoid"),
    "semhash": ActivationConfig(p=0.5, cutoff=1.2, granularity="example", noise_std=1.0,
                                p_ramp_steps=1000),
}
# The random draws of each coin granularity alone, taken with keras.random beside Keras' sigmoid.
DRAWS = {"batch": ("batch", 0.0), "example": ("example", 0.0), "unit": ("unit", 0.0),
         "semhash": ("example", 1.0)}


class SigmoidBesideDraws(keras.layers.Layer):
    """Keras' sigmoid, computed after the draws of a coin granularity (and the noise) that it does
    not use: what those draws cost with Keras' generator (keras.random.uniform / normal). One
    element of each draw goes to a variable, so that the graph optimizer keeps the draws."""

    def __init__(self, granularity: str, noise_std: float, seed: int):
        super().__init__()
        self.granularity, self.noise_std = granularity, noise_std
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.sink = self.add_weight(shape=(2,), initializer="zeros", trainable=False, name="sink")

    def call(self, x, training=None):
        draws = [tf.zeros([1])]
        if self.noise_std:
            draws[0] = keras.random.normal(tf.shape(x), seed=self.seed_generator)
        shape = {"batch": [], "unit": tf.shape(x),
                 "example": tf.concat([tf.shape(x)[:1], tf.ones([tf.rank(x) - 1], tf.int32)], 0)}
        draws.append(keras.random.uniform(shape[self.granularity], seed=self.seed_generator))
        self.sink.assign(tf.concat([tf.reshape(d, [-1])[:1] for d in draws], 0))
        return tf.sigmoid(x)


def paper_network(arch: str, activation: ActivationConfig | None = None, draws=None) -> keras.Model:
    """The trained model of `arch` with `activation`, or with Keras' sigmoid beside `draws`."""
    keras.utils.set_random_seed(0)
    if draws is None:
        return build_network(ARCHS[arch], activation, PAPER_INPUT, 10).model
    with mock.patch.object(models, "_trained_activation",  # the builder's one activation hook
                           lambda cfg, seed: SigmoidBesideDraws(*draws, seed=seed)):
        return build_network(ARCHS[arch], ActivationConfig(kind="sigmoid"), PAPER_INPUT, 10).model


def against_base(base, candidates: dict, rounds: int, steps: int) -> dict[str, list[float]]:
    """Per round, each candidate's time over that of the base measured just before and just after
    it (B A B C B ..., the candidates' order reversed every other round); the base's times under
    the key "base"."""
    ratios = {name: [] for name in candidates}
    ratios["base"] = []

    def timed(fn):
        start = time.perf_counter()
        for _ in range(steps):
            out = fn()
        np.asarray(out)
        return (time.perf_counter() - start) / steps

    for fn in (base, *candidates.values()):
        for _ in range(3):
            fn()  # trace and warm up
    gc.disable()  # Python's collector pauses at random, whatever runs: collect between rounds only
    try:
        for round_ in range(rounds):
            gc.collect()
            before = timed(base)
            for name, fn in list(candidates.items())[:: -1 if round_ % 2 else 1]:
                t, after = timed(fn), timed(base)
                ratios[name].append(t / ((before + after) / 2))
                ratios["base"].append(after)
                before = after
    finally:
        gc.enable()
    return ratios


def activation_cost(rounds: int = 9, block_s: float = 0.06, archs=tuple(ARCHS)) -> dict[str, float]:
    """Training-step time of every paper variant on every architecture, relative to Keras' built-in
    sigmoid in the same network (graph mode, batch 128): the fused op, and the same formulas as
    separate TensorFlow ops ("TF ops": what runs under XLA or without the built kernels, and what
    ran before them); beside each coin granularity its draws alone with keras.random, and the part
    of the fused op's ratio that its own draws take (its ratio less that of the same op without
    them: p = 0 for the coins, the example coin without noise for semhash)."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((PAPER_BATCH, *PAPER_INPUT), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, PAPER_BATCH).astype(np.int32))
    out = {}
    for arch in archs:
        base = train_step(paper_network(arch, ActivationConfig(kind="sigmoid")))
        steps = {"keras relu": train_step(paper_network(arch, ActivationConfig(kind="relu")))}
        for name, cfg in VARIANTS.items():
            steps[name] = train_step(paper_network(arch, cfg))
            steps[f"{name} (TF ops)"] = ops_step = train_step(paper_network(arch, cfg))
            with fused.disabled():
                ops_step.get_concrete_function(x, y)  # traced as separate TensorFlow ops
        for name, draws in DRAWS.items():
            steps[f"{name} draws alone (keras.random)"] = train_step(paper_network(arch, draws=draws))
        if arch == "mlp":
            steps["stack overflow original"] = train_step(_stack_overflow_mlp())

        def base_fn(base=base):
            return base(x, y)

        for _ in range(3):
            base_fn()
        start = time.perf_counter()
        base_fn()
        block = max(5, round(block_s / (time.perf_counter() - start)))
        ratios = against_base(base_fn, {n: (lambda s=s: s(x, y)) for n, s in steps.items()},
                              rounds, block)
        medians = {n: statistics.median(r) for n, r in ratios.items() if n != "base"}
        for name, value in medians.items():
            out[f"{arch}: {name} / keras sigmoid"] = value
            out[f"{arch}: {name} / keras sigmoid per round"] = ratios[name]
        for coin in ("example", "unit"):
            out[f"{arch}: {coin} c=1.2 of which its draws"] = (medians[f"{coin} c=1.2"]
                                                              - medians["p=0 c=1.2"])
        out[f"{arch}: semhash of which its noise"] = medians["semhash"] - medians["example c=1.2"]
        out[f"{arch}: keras sigmoid step ms"] = 1000 * statistics.median(ratios["base"])
    return out


def _stack_overflow_mlp() -> keras.Model:
    """The paper's MLP with the original answer's op."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input(PAPER_INPUT)
    h = keras.layers.Flatten()(inputs)
    for width in ARCHS["mlp"].widths:
        h = stack_overflow_layer()(keras.layers.Dense(width)(h))
    return keras.Model(inputs, keras.layers.Dense(10)(h))


def evaluation_cost(epochs: int = 5, archs=tuple(ARCHS), train_size: int = 20000
                    ) -> dict[str, float]:
    """Per architecture (p = 0.5, c = 1.2, T1's data: 20000 training images, 6000 validation
    images, batch 128), the evaluation pass after an epoch (`study.evaluation`: the binary and
    soft twins and the diagnostics) over the training epoch, as a trial records them
    (time/eval_s, time/epoch_s): the median over epochs 2 to `epochs`."""
    out = {}
    data = load(DataConfig(train_size=train_size))
    for arch in archs:
        flat = {"model.arch": arch, "data.train_size": train_size, "budget.epochs": 100,
                "budget.batch_size": 128, "activation.p": 0.5, "activation.cutoff": 1.2}
        if arch == "cnn":
            flat["model.filters"] = list(ARCHS[arch].filters)
        trainer = Trainer(TrialConfig.from_flat(flat), dataset=data)
        try:
            history = [trainer.step() for _ in range(epochs)][1:]
        finally:
            trainer.close()
        out[f"{arch}: evaluation / training epoch"] = statistics.median(
            h["time/eval_s"] / h["time/epoch_s"] for h in history)
        out[f"{arch}: training epoch s"] = statistics.median(h["time/epoch_s"] for h in history)
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
            "step / matmul limit": matmul_s / step_s,
            "step / matmul limit per round": [m / s for s, m in zip(times["step"], times["matmuls"],
                                                                     strict=True)]}


def input_pipeline(rounds: int = 11, train_size: int | None = None) -> dict[str, float]:
    """A training epoch of Fashion-MNIST (the MLP above, batch 128) through the project's data path
    (`study.train.batches`: per-epoch stateless shuffle, one gather per batch from the images
    scaled to float once per trial) against the same epoch from float tensors in memory, unshuffled."""
    data = load(DataConfig() if train_size is None else DataConfig(train_size=train_size))
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
            "project data path / in-memory tensors per round": [
                a / b for a, b in zip(times["project"], times["in memory"], strict=True)],
            "in-memory epoch s": statistics.median(times["in memory"])}
