"""The paper's figures (PNG), after the Deep Learning Tuning Playbook: axis plots for every swept
parameter, isolation plots (the best over the other parameters at each value of the scientific one),
the p x slope heatmap per architecture, learning curves of the best trials, the gap against p."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.runs import Runs  # noqa: E402
from analysis.tables import ARCH_ORDER, SELECTION, finished  # noqa: E402

BINARY = "metrics.test/accuracy_binary"
PNG = {"dpi": 110, "metadata": {"Software": None}}  # no version string: identical bytes across runs


def _archs(frame: pd.DataFrame) -> list[str]:
    return [a for a in ARCH_ORDER if a in set(frame["params.model.arch"])]


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, **PNG)
    plt.close(fig)
    return path


def _best_on_validation(part: pd.DataFrame, keys, nuisance: list[str], metric: str) -> pd.Series:
    """Per value of `keys`: the mean of `metric` over seeds at the nuisance setting with the best
    mean `SELECTION`."""
    keys = [keys] if isinstance(keys, str) else list(keys)
    means = part.groupby([*keys, *nuisance])[[SELECTION, metric]].mean().reset_index()
    best = means.loc[means.groupby(keys)[SELECTION].idxmax()]
    return best.set_index(keys)[metric]


def axis_plots(runs: Runs, params: list[str], path: Path, metric: str = BINARY) -> Path:
    """The final metric of every finished trial against each swept parameter."""
    full = finished(runs)
    fig, axes = plt.subplots(1, len(params), figsize=(3.2 * len(params), 3), squeeze=False)
    for ax, param in zip(axes[0], params, strict=True):
        for arch in _archs(full):
            part = full[full["params.model.arch"] == arch]
            ax.scatter(part[f"params.{param}"], part[metric], s=14, alpha=0.7, label=arch)
        ax.set_xlabel(param)
        ax.set_ylabel(metric.removeprefix("metrics."))
        if param == "activation.slope":
            ax.set_xscale("log", base=2)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def isolation_plot(runs: Runs, scientific: str, path: Path, metric: str = BINARY) -> Path:
    """For each value of the scientific parameter: the mean (over seeds) of `metric` at the setting
    of all the other (nuisance) parameters that is best on validation (`SELECTION`), one line per
    architecture."""
    full = finished(runs)
    nuisance = [c for c in ("params.activation.p", "params.activation.slope",
                            "params.activation.cutoff") if c != f"params.{scientific}"]
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    for arch in _archs(full):
        part = full[full["params.model.arch"] == arch]
        best = _best_on_validation(part, f"params.{scientific}", nuisance, metric)
        ax.plot(best.index, best.values, marker="o", label=arch)
    ax.set_xlabel(scientific)
    ax.set_ylabel(f"best {metric.removeprefix('metrics.')}")
    if scientific == "activation.slope":
        ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    ax.set_title(f"isolation: {scientific}", fontsize=9)
    return _save(fig, path)


def heatmap(runs: Runs, path: Path, metric: str = BINARY) -> Path:
    """Binary-eval accuracy over p x slope, one panel per architecture (at the cutoff best on
    validation)."""
    full = finished(runs)
    archs = _archs(full)
    fig, axes = plt.subplots(1, len(archs), figsize=(3.6 * len(archs), 3.2), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        part = full[full["params.model.arch"] == arch]
        grid = _best_on_validation(part, ["params.activation.p", "params.activation.slope"],
                                   ["params.activation.cutoff"], metric).unstack()
        image = ax.imshow(grid.values, origin="lower", aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(grid.columns)), [f"{s:g}" for s in grid.columns])
        ax.set_yticks(range(len(grid.index)), [f"{p:g}" for p in grid.index])
        for (i, j), value in np.ndenumerate(grid.values):
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=7,
                    color="white" if value < np.nanmean(grid.values) else "black")
        ax.set_xlabel("slope s")
        ax.set_ylabel("p")
        ax.set_title(f"{arch}: test binary-eval accuracy", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def gap_against_p(runs: Runs, path: Path) -> Path:
    """Soft minus binary test accuracy against p (mean over slopes and cutoffs), per architecture."""
    full = finished(runs)
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    for arch in _archs(full):
        part = full[full["params.model.arch"] == arch]
        gap = part.groupby("params.activation.p")["gap"].agg(["mean", "std"])
        ax.errorbar(gap.index, gap["mean"], yerr=gap["std"].fillna(0), marker="o", capsize=3,
                    label=arch)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("p (binarization probability)")
    ax.set_ylabel("soft - binary test accuracy")
    ax.legend(fontsize=7)
    return _save(fig, path)


def learning_curves(runs: Runs, path: Path, by: str = "tags.trial.variant", top: int = 3) -> Path:
    """val/accuracy_binary per epoch of the `top` best trials of each architecture (by `SELECTION`),
    the tested epoch of each marked."""
    full = finished(runs)
    archs = _archs(full)
    fig, axes = plt.subplots(1, len(archs), figsize=(3.6 * len(archs), 3), squeeze=False)
    curves = runs.history[runs.history["key"] == "val/accuracy_binary"]
    for ax, arch in zip(axes[0], archs, strict=True):
        part = full[full["params.model.arch"] == arch].nlargest(top, SELECTION)
        for _, trial in part.iterrows():
            curve = curves[curves["run_id"] == trial["run_id"]].sort_values("step")
            label = f"{trial.get(by, '')} seed {trial['params.seed']:g}".strip()
            [line] = ax.plot(curve["step"], curve["value"], marker=".", label=label)
            ax.plot([trial["metrics.test/epoch"]], [trial[SELECTION]], marker="o", ms=7,
                    mfc="none", color=line.get_color())
        ax.set_title(f"{arch} (circled: the tested epoch)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val binary-eval accuracy")
        ax.legend(fontsize=6)
    return _save(fig, path)
