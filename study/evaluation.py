"""Binary- and soft-eval accuracy and the activation diagnostics, in one batched pass.

For the pre-activations x of all N examples and U units (binary code b = 1[x > 0]):

    ones_fraction      = mean(b)
    bit_entropy        = mean_u H(q_u), q_u = mean_n b[n, u], H(q) = -q log2 q - (1 - q) log2(1 - q)
    saturated_fraction = mean(g(x) < 0.01 * max g), g the surrogate gradient (sigmoid_or_binary only)
    flip_rate          = mean(b != b_previous) on the first `probe` examples, b_previous the codes at
                         the previous call (the previous epoch)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from study.activations import surrogate_gradient
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
        self._batch = tf.function(self._evaluate_batch, reduce_retracing=True)

    def __call__(self, x: np.ndarray, y: np.ndarray, scale: float, diagnostics: bool = True
                 ) -> Evaluation:
        correct_binary = correct_soft = saturated = 0
        ones_per_unit = None
        probe_codes = []
        for start in range(0, len(x), self.batch_size):
            xb = tf.constant(x[start:start + self.batch_size])
            yb = tf.constant(y[start:start + self.batch_size])
            cb, cs, ones, sat, codes = self._batch(xb, yb, scale)
            correct_binary += int(cb)
            correct_soft += int(cs)
            saturated += int(sat)
            ones = ones.numpy()
            ones_per_unit = ones if ones_per_unit is None else ones_per_unit + ones
            if diagnostics and start < self.probe:  # only the probe's codes leave TensorFlow
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

    def _evaluate_batch(self, x, y, scale):
        binary, soft, pre = self.network.evaluator(tf.cast(x, tf.float32) * scale, training=False)
        y = tf.cast(y, tf.int64)
        correct_binary = tf.reduce_sum(tf.cast(tf.argmax(binary, -1) == y, tf.int32))
        correct_soft = tf.reduce_sum(tf.cast(tf.argmax(soft, -1) == y, tf.int32))
        codes = pre > 0
        ones = tf.reduce_sum(tf.cast(codes, tf.float32), axis=0)
        saturated = tf.constant(0, tf.int32)
        if self.activation.kind == "sigmoid_or_binary":
            a = self.activation
            g = surrogate_gradient(pre, slope=a.slope, cutoff=a.cutoff, surrogate=a.surrogate)
            peak = {"sigmoid": a.slope * a.cutoff / 4, "ste": 1.0, "hard_sigmoid": 0.5}[a.surrogate]
            saturated = tf.reduce_sum(tf.cast(g < 0.01 * peak, tf.int32))
        return correct_binary, correct_soft, ones, saturated, codes


def _binary_entropy(q: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(q * np.log2(q) + (1 - q) * np.log2(1 - q))
    return np.nan_to_num(h, nan=0.0)
