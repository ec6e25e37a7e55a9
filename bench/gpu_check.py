"""A self-contained check of the activation on a GPU machine that has Keras and JAX or PyTorch
(TensorFlow not needed): run it from a clone of the repository,

    KERAS_BACKEND=jax python bench/gpu_check.py          (or torch; tensorflow works too)

It needs only Keras, its backend and NumPy. It prints the device it ran on, then:

1. values and surrogate gradients of the op (`study.activations`, p = 0 and 1, every surrogate, five
   slope/cutoff settings) against the float64 NumPy reference of the tests (`tests/reference.py`),
   on the backend's default device (the GPU where there is one), and the coin's share at p = 0.5;
2. the cost of a training step of an MLP (784-512-512-10, batch 256) with each variant of the op
   against the same MLP with Keras' built-in sigmoid, with and without compilation (`jit_compile`),
   measured side by side: rounds of interleaved blocks, the median of the per-round ratios.

Exit status 0 when every value and gradient matches, 1 otherwise. `--smoke` shrinks part 2 to a
few steps (the tests run it on the CPU here). `--out FILE` writes the results as JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for study/ and tests/

import keras  # noqa: E402  (after the path, so that a clone runs it as is)
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from study.activations import SigmoidOrBinary, sigmoid_or_binary  # noqa: E402
from tests.reference import SETTINGS, inputs, ref_grad, ref_hard, ref_sat  # noqa: E402

VARIANTS = {  # the op's variants timed against keras.activations.sigmoid
    "p=0": {"p": 0.0},
    "p=0.5 batch": {"p": 0.5},
    "p=0.5 example": {"p": 0.5, "granularity": "example"},
    "p=0.5 unit": {"p": 0.5, "granularity": "unit"},
    "p=1": {"p": 1.0},
    "p=1 ste": {"p": 1.0, "surrogate": "ste"},
    "p=0.5 c=1.2 noise": {"p": 0.5, "cutoff": 1.2, "noise_std": 0.5},
}


def device() -> str:
    """The device the backend computes on by default."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return str(jax.devices()[0])
    if backend == "torch":
        import torch

        return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})" \
            if torch.cuda.is_available() else "cpu"
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else "/cpu:0"


def value_and_grad(fn, x: np.ndarray):
    """fn(x) and d sum(fn(x)) / dx by the backend's autodiff, as NumPy arrays."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        y, pullback = jax.vjp(fn, jax.numpy.asarray(x))
        (grad,) = pullback(jax.numpy.ones_like(y))
    elif backend == "torch":
        import torch

        xt = torch.tensor(x, requires_grad=True, device="cuda" if torch.cuda.is_available() else "cpu")
        y = fn(xt)
        y.backward(torch.ones_like(y))
        grad = xt.grad
    else:
        import tensorflow as tf

        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = fn(xt)
        grad = tape.gradient(y, xt)
    return ops.convert_to_numpy(y), ops.convert_to_numpy(grad)


def check_values() -> list[str]:
    """Every mismatch against the reference, one line each (none: the op is right here)."""
    failures = []
    for slope, cutoff in SETTINGS:
        x = inputs(slope, cutoff)
        x64 = x.astype(np.float64)
        for p in (0.0, 1.0):
            for surrogate in ("sigmoid", "ste", "hard_sigmoid"):
                y, g = value_and_grad(functools.partial(
                    sigmoid_or_binary, p=p, slope=slope, cutoff=cutoff, surrogate=surrogate,
                    seed=0), x)
                expected = ref_hard(x64) if p == 1 else ref_sat(x64, slope, cutoff)
                where = f"p={p} slope={slope} cutoff={cutoff} surrogate={surrogate}"
                if not np.allclose(y, expected, rtol=1e-5, atol=1e-6):
                    failures.append(f"value {where}: max error {np.abs(y - expected).max():.2e}")
                if not np.allclose(g, ref_grad(x64, slope, cutoff, surrogate), rtol=1e-4, atol=1e-6):
                    failures.append(f"gradient {where}")
    layer = SigmoidOrBinary(p=0.5, granularity="unit", seed=0)
    share = float(np.mean(ops.convert_to_numpy(layer(ops.full((256, 256), 0.5), training=True)) == 1))
    if abs(share - 0.5) > 0.01:  # 65,536 coins: 0.01 is 5 standard errors
        failures.append(f"coin: {share:.4f} of 65,536 unit coins at p = 0.5 came up hard")
    return failures


def mlp(activation) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs_ = keras.Input((784,))
    x = inputs_
    for _ in range(2):
        x = activation()(keras.layers.Dense(512)(x))
    return keras.Model(inputs_, keras.layers.Dense(10)(x))


def compiled(activation, jit: bool) -> keras.Model:
    """The MLP, trained at a learning rate too small to move its weights while it is timed: the
    same batch again and again at a usual rate drives the units into saturation, where gradients
    become subnormal numbers that a CPU without flush-to-zero (PyTorch's) computes many times slower,
    so each model's step cost would depend on how far it has trained."""
    model = mlp(activation)
    model.compile(keras.optimizers.Adam(1e-6),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit)
    return model


def time_steps(models: dict[str, keras.Model], x, y, steps: int, rounds: int) -> dict[str, float]:
    """Median over rounds of each model's step time divided by the base's ("sigmoid") in the same
    round; blocks of `steps` training steps, interleaved, in alternating order."""
    for model in models.values():  # compile and warm up
        for _ in range(3):
            model.train_on_batch(x, y)
    ratios = {name: [] for name in models if name != "sigmoid"}
    for round_ in range(rounds):
        order = list(models) if round_ % 2 == 0 else list(reversed(models))
        seconds = {}
        for name in order:
            started = time.perf_counter()
            for _ in range(steps):
                loss = models[name].train_on_batch(x, y)
            float(np.asarray(loss).ravel()[0])  # wait for the device
            seconds[name] = time.perf_counter() - started
        for name in ratios:
            ratios[name].append(seconds[name] / seconds["sigmoid"])
    return {name: statistics.median(values) for name, values in ratios.items()}


def time_variants(smoke: bool) -> dict[str, dict[str, float]]:
    """{"eager" | "compiled": {variant: step time / built-in sigmoid's}}."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 784)).astype("float32")
    y = rng.integers(0, 10, size=(256,)).astype("int32")
    steps, rounds = (2, 2) if smoke else (20, 7)
    variants = dict(list(VARIANTS.items())[:2]) if smoke else VARIANTS
    results = {}
    for jit in (False, True):
        models = {"sigmoid": compiled(lambda: keras.layers.Activation("sigmoid"), jit)}
        for name, options in variants.items():
            models[name] = compiled(lambda o=options: SigmoidOrBinary(seed=0, **o), jit)
        results["compiled" if jit else "eager"] = time_steps(models, x, y, steps, rounds)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps, two variants")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args(argv)
    where = device()
    print(f"Keras {keras.version()}, backend {keras.backend.backend()}, device {where}")
    failures = check_values()
    for line in failures:
        print(f"MISMATCH {line}")
    print(f"values and gradients against the reference: {'ok' if not failures else 'FAILED'}")
    costs = time_variants(args.smoke)
    print("training step time / built-in sigmoid's (median of rounds)")
    print(f"  {'variant':<20} {'eager':>8} {'compiled':>9}")
    for name in costs["eager"]:
        print(f"  {name:<20} {costs['eager'][name]:>8.2f} {costs['compiled'][name]:>9.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "keras": keras.version(), "backend": keras.backend.backend(), "device": where,
            "gpu": "cpu" not in where.lower(), "mismatches": failures, "step_ratio": costs,
            "smoke": args.smoke, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")},
            indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
