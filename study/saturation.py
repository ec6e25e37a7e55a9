"""Where the saturating sigmoid saturates: one formula that the Keras-ops op (`study.activations`)
and its TensorFlow side (`study.activations_tf`, which passes it to the fused kernels) both use."""

from __future__ import annotations

import math


def saturation_threshold(slope: float, cutoff: float) -> float:
    """|x| from which sat(x) is clipped to 0 or 1: ln((c + 1) / (c - 1)) / s (infinite for c = 1)."""
    if cutoff == 1:
        return math.inf
    return math.log((cutoff + 1) / (cutoff - 1)) / slope
