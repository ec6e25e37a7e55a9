"""Per-unit thresholds for the binary twin, recalibrated on validation images.

The binary twin computes b = hard(x - t) = 1[x > t] per unit (`study.models`), t = 0 by default. For
the full-precision baselines that is the trained network binarized where its units happen to cross
0; `calibrate` instead sets each unit's t to the bit that best explains its soft output linearly:

    t_u = argmax_t corr_n(1[x_nu > t], a(x_nu))

over the calibration samples n (the first `limit` images; for a conv layer every position of every
image, one t per channel), with a the unit's soft activation: relu, sigmoid, or for the study's unit
sat(x) = clip(c sigmoid(s x) - (c - 1) / 2, 0, 1). Layers are calibrated in network order, layer k
on the pre-activations x it gets with layers < k binarized at their calibrated thresholds.

Exactly, for every split at once: sort x_u descending, x_(1) >= ... >= x_(N) (a is non-decreasing,
so a(x_(n)) is in the same order); the bit with the top k samples on has
corr = S_k / sqrt(k (N - k) / N * sum_n ac_n^2), S_k the cumulative sum of the centred
ac = a - mean(a) in that order; only k with x_(k) > x_(k+1) are thresholds, t the midpoint of
x_(k+1) and x_(k). A unit keeps t = 0 unless a split beats t = 0's correlation by more than 1e-9
(a constant a or a constant bit has correlation 0), so ties, dead and saturated units stay at 0.
Deterministic: the first `limit` images, the first maximising k.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from study.config import ActivationConfig
from study.evaluation import _with_parts
from study.models import Network

BLOCK = 2**21  # samples x units sorted at once (~100 MB of work arrays)
TOLERANCE = 1e-9  # the correlation a threshold must gain over t = 0


def calibrate(network: Network, activation: ActivationConfig, x: np.ndarray, scale: float, *,
              limit: int = 2000, batch_size: int = 500) -> list[np.ndarray]:
    """Set `network.thresholds` layer by layer from the first `limit` images of `x` (module
    docstring) and return them; the labels play no part. `reset` puts them back to 0."""
    reset(network)
    images, parts = x[:limit], _with_parts(network.evaluator).outputs[2:]
    found = []
    for part, threshold in zip(parts, network.thresholds, strict=True):
        model = keras.Model(network.evaluator.inputs, part)
        pre = np.concatenate([model(tf.cast(images[i:i + batch_size], tf.float32) * scale,
                                    training=False).numpy()
                              for i in range(0, len(images), batch_size)])
        threshold.assign(best_thresholds(pre.reshape(-1, threshold.shape[0]), activation))
        found.append(threshold.numpy())
    return found


def reset(network: Network) -> None:
    """Every threshold back to 0: the binary twin is hard(x) again."""
    for threshold in network.thresholds:
        threshold.assign(tf.zeros_like(threshold))


def best_thresholds(x: np.ndarray, activation: ActivationConfig) -> np.ndarray:
    """t per column of x (samples, units), float32: the correlation-maximising threshold."""
    step = max(1, BLOCK // max(len(x), 1))
    return np.concatenate([_block(x[:, i:i + step], activation)
                           for i in range(0, x.shape[1], step)]).astype(np.float32)


def soft_output(x: np.ndarray, activation: ActivationConfig) -> np.ndarray:
    """a(x) in float64: relu, sigmoid or sat (with the activation's slope s and cutoff c)."""
    x = np.asarray(x, np.float64)
    if activation.kind == "relu":
        return np.maximum(x, 0.0)
    if activation.kind == "sigmoid":
        return 0.5 + 0.5 * np.tanh(0.5 * x)
    c = activation.cutoff
    return np.clip(c * (0.5 + 0.5 * np.tanh(0.5 * activation.slope * x)) - (c - 1) / 2, 0.0, 1.0)


def _block(x: np.ndarray, activation: ActivationConfig) -> np.ndarray:
    n = len(x)
    if n < 2:
        return np.zeros(x.shape[1])
    xs = np.sort(x.T, axis=1)[:, ::-1]  # (units, samples) descending; a is monotone: a(xs) is in order
    centred = soft_output(xs, activation)
    centred -= centred.mean(1, keepdims=True)
    k = np.arange(1, n, dtype=np.float64)  # samples on
    spread = (centred**2).sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.cumsum(centred, 1)[:, :-1] / np.sqrt(k * (n - k) / n * spread)
    r[spread[:, 0] == 0] = 0.0  # a constant a: correlation 0 at every threshold
    r[~(xs[:, :-1] > xs[:, 1:])] = -np.inf  # only splits between distinct values
    units = np.arange(x.shape[1])
    on_at_zero = (x > 0).sum(0)
    r_zero = np.where((on_at_zero > 0) & (on_at_zero < n),
                      r[units, np.clip(on_at_zero - 1, 0, n - 2)], 0.0)
    best = r.argmax(1)
    better = r[units, best] > r_zero + TOLERANCE
    low, high = xs[units, best + 1], xs[units, best]
    mid = (low.astype(np.float64) + (high.astype(np.float64) - low) / 2).astype(x.dtype)
    mid = np.where(mid < high, mid, low)  # low <= t < high in x's precision
    return np.where(better, mid, 0.0)
