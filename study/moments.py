"""The statistics of T6 (`study.estimator`): draws of a gradient estimate, summed in G groups, against
the reference's; bias, variance, MSE and cosines relative to the reference's norm, each with its
jackknife error over the groups (one group left out at a time).

With r and e the means of the reference's n and the estimator's m draws (per kernel, flattened),
v_ref and v their per-draw total variances, and ||g||^2 = r.r - v_ref / n (unbiased):
    bias^2 = (||e - r||^2 - v / m - v_ref / n) / ||g||^2        variance = v / ||g||^2
    mse = bias^2 + variance
    bias_floor = sqrt((v / m + v_ref / n) / ||g||^2): the bias the draws cannot tell from 0
    cos_draw: the mean cosine of one draw with r;  cos_mean: the cosine of e with r
    ref_se = sqrt(v_ref / n / r.r): the reference's own relative error;  grad_norm = ||g||
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

STATS = ("bias", "bias_floor", "variance", "mse", "cos_draw", "cos_mean", "ref_se", "grad_norm")


@dataclass
class Moments:
    """Draws of a gradient estimate in G groups (draw k in group k mod G), per kernel: the groups'
    sums (float64, flattened), sums of squared norms (G, kernels) and counts; per draw, its squared
    norms (draws, kernels) and inner products with the reference's group sums (draws, G, kernels)."""

    sums: list[np.ndarray]
    squares: np.ndarray
    counts: np.ndarray
    norms: list[np.ndarray]
    dots: list[np.ndarray]

    @classmethod
    def empty(cls, sizes: Sequence[int], groups: int) -> Moments:
        return cls([np.zeros((groups, s)) for s in sizes], np.zeros((groups, len(sizes))),
                   np.zeros(groups, dtype=int), [], [])

    @property
    def draws(self) -> int:
        return int(self.counts.sum())

    @property
    def group(self) -> np.ndarray:
        return np.arange(self.draws) % len(self.counts)

    def add(self, grads: Sequence[np.ndarray], reference: Moments | None = None) -> None:
        """Add K draws, per kernel (K, size)."""
        grads = [np.asarray(g, dtype=np.float64).reshape(len(g), -1) for g in grads]
        groups = (self.draws + np.arange(len(grads[0]))) % len(self.counts)
        norms = np.stack([(g * g).sum(1) for g in grads], axis=1)
        for k, group in enumerate(groups):
            for sums, g in zip(self.sums, grads, strict=True):
                sums[group] += g[k]
            self.squares[group] += norms[k]
            self.counts[group] += 1
        self.norms.append(norms)
        if reference is not None:
            self.dots.append(np.stack([g @ r.T for g, r in zip(grads, reference.sums, strict=True)],
                                      axis=2))


def statistics(ref: Moments, est: Moments, blocks: dict[str, Sequence[int]]
               ) -> dict[str, dict[str, float]]:
    """Per block of kernels, `STATS` of `est` against `ref` and their jackknife errors `<stat>_se`."""
    groups = len(ref.counts)
    parts = [_parts(ref, est, leave) for leave in [None, *range(groups)]]
    out = {}
    for name, kernels in blocks.items():
        values = np.array([[_point(p, kernels)[s] for s in STATS] for p in parts])
        spread = np.sqrt((groups - 1) / groups * ((values[1:] - values[1:].mean(0)) ** 2).sum(0))
        out[name] = {**dict(zip(STATS, values[0].tolist(), strict=True)),
                     **{f"{s}_se": float(e) for s, e in zip(STATS, spread, strict=True)}}
    return out


def _parts(ref: Moments, est: Moments, leave: int | None) -> dict:
    """Per kernel, the inner products the statistics need, with group `leave` left out of both."""
    keep = np.arange(len(ref.counts)) != leave
    n, m = ref.counts[keep].sum(), est.counts[keep].sum()
    r = [(s.sum(0) if leave is None else s.sum(0) - s[leave]) / n for s in ref.sums]
    e = [(s.sum(0) if leave is None else s.sum(0) - s[leave]) / m for s in est.sums]
    drawn = keep[est.group]
    return {"n": n, "m": m, "rr": np.array([a @ a for a in r]), "ee": np.array([a @ a for a in e]),
            "er": np.array([a @ b for a, b in zip(e, r, strict=True)]),
            "ref_squares": ref.squares[keep].sum(0), "squares": est.squares[keep].sum(0),
            "inner": np.concatenate(est.dots)[drawn][:, keep].sum(1) / n,
            "norms": np.concatenate(est.norms)[drawn]}


def _point(parts: dict, kernels: Sequence[int]) -> dict[str, float]:
    n, m = parts["n"], parts["m"]
    rr, ee, er = (float(parts[k][kernels].sum()) for k in ("rr", "ee", "er"))
    v_ref = max(parts["ref_squares"][kernels].sum() - n * rr, 0.0) / (n - 1)
    v = max(parts["squares"][kernels].sum() - m * ee, 0.0) / (m - 1)
    norm2 = rr - v_ref / n
    if not norm2 > 0:
        return dict.fromkeys(STATS, math.nan)
    bias2 = max(ee - 2 * er + rr - v / m - v_ref / n, 0.0) / norm2
    norms = np.sqrt(parts["norms"][:, kernels].sum(1))
    cosines = parts["inner"][:, kernels].sum(1) / np.maximum(norms, 1e-300) / math.sqrt(rr)
    return {"bias": math.sqrt(bias2), "bias_floor": math.sqrt((v / m + v_ref / n) / norm2),
            "variance": v / norm2, "mse": bias2 + v / norm2,
            "cos_draw": float(cosines.mean()), "cos_mean": er / max(math.sqrt(ee * rr), 1e-300),
            "ref_se": math.sqrt(v_ref / n / rr), "grad_norm": math.sqrt(norm2)}
