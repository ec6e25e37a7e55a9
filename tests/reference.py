"""The activation's independent reference, in float64 NumPy, written from the formulas of
`study.activations`' docstring and nothing else (after larq's quantizers_test.py). It imports no
deep-learning library, so that every Keras backend's tests use it."""

import math

import numpy as np


def ref_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def ref_sat(x, s, c):
    return np.clip(c * ref_sigmoid(s * x) - (c - 1) / 2, 0, 1)


def ref_hard(x):
    return (x > 0).astype(np.float64)


def ref_grad(x, s, c, surrogate):
    if surrogate == "sigmoid":
        sig = ref_sigmoid(s * x)
        u = c * sig - (c - 1) / 2
        return np.where((u > 0) & (u < 1), c * s * sig * (1 - sig), 0.0)
    inside = np.abs(x) <= 1
    return np.where(inside, 1.0 if surrogate == "ste" else 0.5, 0.0)


def ref_threshold(s, c):
    """|x| where sat saturates: ln((c + 1) / (c - 1)) / s, infinite for c = 1."""
    return math.inf if c == 1 else math.log((c + 1) / (c - 1)) / s


def inputs(s, c, eps=1e-3):
    """Always 0, +-1 (the STE edges), both saturation edges and points just inside and outside."""
    points = [0.0, 1.0, -1.0, 0.5, -0.5, 1 + eps, -1 - eps, 1 - eps, -1 + eps, 4.0, -4.0, 9.0, -9.0]
    t = ref_threshold(s, c)
    if math.isfinite(t):
        points += [t + eps, t - eps, -t + eps, -t - eps]
    return np.array(points, dtype=np.float32)


SETTINGS = [(1.0, 1.0), (1.0, 1.2), (2.5, 1.2), (0.5, 1.0), (1.0, 2.0)]  # (slope, cutoff)


def hard_share_bound(p, n):
    """Half-width of a 99.99% normal-approximation binomial interval for the share of hard draws."""
    return 3.9 * math.sqrt(p * (1 - p) / n) + 1e-9
