"""Binary- and soft-eval accuracy and the activation diagnostics, in one batched pass.

For the pre-activations x of all N examples and U units (binary code b = 1[x > 0]):

    ones_fraction      = mean(b)
    bit_entropy        = mean_u H(q_u), q_u = mean_n b[n, u], H(q) = -q log2 q - (1 - q) log2(1 - q)
    saturated_fraction = mean(|s x| >= ln 11), s the slope (sigmoid_or_binary only): one definition
                         for every surrogate, where the paper's unit (c = 1.2) clips to 0 or 1, so
                         rows of different surrogates compare (with c = 1.2 and the sigmoid
                         surrogate it is exactly where no gradient flows; the STE's window is |x| <= 1)
    flip_rate          = mean(b != b_previous) on the first `probe` examples, b_previous the codes at
                         the previous call (the previous epoch)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from study import fused
from study.activations import saturation_threshold
from study.config import ActivationConfig
from study.models import Network


@dataclass(frozen=True)
class Evaluation:
    accuracy_binary: float
    accuracy_soft: float
    diagnostics: dict[str, float]


class Evaluator:
    """Evaluates a network's binary and soft twins; remembers the probe codes for the flip rate."""

    def __init__(self, network: Network, activation: ActivationConfig, batch_size: int = 1000,
                 probe: int = 1000):
        self.network, self.activation = network, activation
        self.batch_size, self.probe = batch_size, probe
        self.previous_codes: np.ndarray | None = None
        self._model = _with_parts(network.evaluator)
        self._batch = tf.function(self._evaluate_batch, reduce_retracing=True)  # traced per `probe`

    def __call__(self, x: np.ndarray, y: np.ndarray, scale: float, diagnostics: bool = True
                 ) -> Evaluation:
        correct_binary = correct_soft = saturated = 0
        ones_per_unit = None
        probe_codes = []
        for start in range(0, len(x), self.batch_size):
            xb = tf.constant(x[start:start + self.batch_size])
            yb = tf.constant(y[start:start + self.batch_size])
            probe = diagnostics and start < self.probe
            cb, cs, ones, sat, codes = self._batch(xb, yb, scale, probe)
            correct_binary += int(cb)
            correct_soft += int(cs)
            saturated += int(sat)
            ones = ones.numpy()
            ones_per_unit = ones if ones_per_unit is None else ones_per_unit + ones
            if probe:  # only the probe's codes are computed for the flip rate
                probe_codes.append(codes[: self.probe - start].numpy())
        n = len(x)
        stats = {}
        if diagnostics:
            q = ones_per_unit / n
            stats["act/ones_fraction"] = float(q.mean())
            stats["act/bit_entropy"] = float(_binary_entropy(q).mean())
            if self.activation.kind == "sigmoid_or_binary":
                stats["act/saturated_fraction"] = saturated / (n * len(q))
            codes = np.concatenate(probe_codes)
            if self.previous_codes is not None:
                stats["act/flip_rate"] = float((codes != self.previous_codes).mean())
            self.previous_codes = codes
        return Evaluation(correct_binary / n, correct_soft / n, stats)

    def _evaluate_batch(self, x, y, scale, probe: bool):
        binary, soft, *parts = self._model(tf.cast(x, tf.float32) * scale, training=False)
        y = tf.cast(y, tf.int64)
        correct_binary = tf.reduce_sum(tf.cast(tf.argmax(binary, -1) == y, tf.int32))
        correct_soft = tf.reduce_sum(tf.cast(tf.argmax(soft, -1) == y, tf.int32))
        codes = tf.concat([p > 0 for p in parts], 1) if probe else tf.zeros([0], tf.bool)
        ones, saturated = _code_stats(parts, self.activation)
        return correct_binary, correct_soft, ones, saturated, codes


def _code_stats(parts: list[tf.Tensor], a: ActivationConfig) -> tuple[tf.Tensor, tf.Tensor]:
    """Ones per unit and how many units are saturated (|x| >= `saturation_bound`; 0 but for
    sigmoid_or_binary) of the pre-activations `parts` ([N, U_k] each, side by side): one pass over
    each with the fused kernel, else TensorFlow ops."""
    bound = saturation_bound(a) if a.kind == "sigmoid_or_binary" else math.inf
    if fused.usable(parts[0]):
        stats = [fused.ops().study_code_stats(p, inside="lt", bound=bound) for p in parts]
        saturated = tf.add_n([outside for _, outside in stats])
        return (tf.concat([ones for ones, _ in stats], 0),
                tf.cast(saturated, tf.int32) if a.kind == "sigmoid_or_binary" else tf.constant(0))
    pre = tf.concat(parts, 1) if len(parts) > 1 else parts[0]
    ones = tf.reduce_sum(tf.cast(pre > 0, tf.float32), axis=0)
    if a.kind != "sigmoid_or_binary":
        return ones, tf.constant(0)
    return ones, tf.reduce_sum(tf.cast(tf.abs(pre) >= bound, tf.int32))


def _with_parts(evaluator: keras.Model) -> keras.Model:
    """The evaluator with the pre-activations that it concatenates into its third output as
    separate outputs (the same values, without the copy), or the evaluator itself when its third
    output is no concatenation."""
    pre = evaluator.outputs[2]
    for layer in evaluator.layers:
        if isinstance(layer, keras.layers.Concatenate) and layer.output is pre:
            return keras.Model(evaluator.inputs, [*evaluator.outputs[:2], *layer.input])
    return evaluator


def saturation_bound(a: ActivationConfig) -> float:
    """ln(11) / s: the |x| from which a unit counts as saturated, whatever its surrogate and cutoff
    (`saturation_threshold` of the paper's c = 1.2 at the unit's slope)."""
    return saturation_threshold(a.slope, 1.2)


def _binary_entropy(q: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(q * np.log2(q) + (1 - q) * np.log2(1 - q))
    return np.nan_to_num(h, nan=0.0)
