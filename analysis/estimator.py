"""T6, the gradient estimators, from the CSV and JSON of `python -m study estimator` (the method and
the statistics are defined in study/estimator.py).

One row per checkpoint (epochs of training) and estimator, over all kernels as one vector: the bias
||E g_hat - g_true|| / ||g_true|| ("< b" below its Monte-Carlo floor b), the variance
tr Cov(g_hat) / ||g_true||^2, the cosine of one draw E[cos(g_hat, g_true)] and of the mean
cos(E g_hat, g_true), and the cosine of the mean on the first layer's kernel alone; each value ± its
jackknife standard error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from analysis.tables import Table

NAME = "t6_estimator"
COLUMNS = {"cos_draw": "cos, 1 draw", "cos_mean": "cos, mean"}
FIRST = "dense_1"  # the first Dense layer's kernel


def table(csv: Path, settings: Path | None = None) -> Table:
    """The T6 table of `csv`, its settings from `settings` (default: the CSV's .json beside it)."""
    rows = pd.read_csv(csv)
    meta = json.loads((settings or csv.with_suffix(".json")).read_text())
    whole = rows[rows["kernel"] == "all"].reset_index(drop=True)
    first = rows[rows["kernel"] == FIRST].set_index(["epoch", "estimator"])
    frame = pd.DataFrame({"epoch": whole["epoch"].astype(int), "estimator": whole["estimator"]})
    frame["bias"] = [_cell(v, e) if v >= floor else f"< {floor:.3f}" for v, e, floor in
                     zip(whole["bias"], whole["bias_se"], whole["bias_floor"], strict=True)]
    frame["variance"] = [_cell(v, e) if draws > 1 else "0 (deterministic)" for v, e, draws in
                         zip(whole["variance"], whole["variance_se"], whole["draws"], strict=True)]
    for stat, label in COLUMNS.items():
        frame[label] = [_cell(v, e) for v, e in zip(whole[stat], whole[f"{stat}_se"], strict=True)]
    layer = first.loc[list(zip(whole["epoch"], whole["estimator"], strict=True))]
    frame["cos, mean, layer 1"] = [_cell(v, e) for v, e in
                                   zip(layer["cos_mean"], layer["cos_mean_se"], strict=True)]
    title = (f"T6 gradient estimators against the gradient of the expected loss of the stochastic "
             f"binary network (logistic noise, scale {meta['sigma']:g}) on {meta['batch']} training "
             f"images: bias and variance relative to the true gradient (< b: no bias above the "
             f"Monte-Carlo floor b), cosines (± jackknife SE, {meta['groups']} groups); reference: "
             f"local expectation gradients, {meta['samples']} draws, relative standard error at "
             f"most {whole['ref_se'].max():.3f} (all kernels), {first['ref_se'].max():.3f} (layer 1)")
    return Table(NAME, title, frame, provenance(meta))


def provenance(meta: dict) -> str:
    """Code commit, the training, the sample sizes and the run's date and duration."""
    c = meta["config"]
    dirty = " (dirty tree)" if meta.get("git.dirty") == "true" else ""
    widths = "-".join(map(str, c["model.widths"]))
    training = (f"mlp {widths}, p = {c['activation.p']:g}, slope {c['activation.slope']:g}, cutoff "
                f"{c['activation.cutoff']:g}, {c['activation.granularity']} coin, {c['optim.name']} "
                f"{c['optim.lr']:g}, batch {c['budget.batch_size']}, seed {c['seed']}")
    epochs = ", ".join(map(str, meta["epochs"]))
    return (f"study.estimator at code {meta['git.commit'][:10]}{dirty}; training {training}; "
            f"checkpoints after {epochs} epochs; {meta['draws']} draws per random estimator; seed "
            f"{meta['seed']}; ran {meta['ended']} in {meta['seconds'] / 60:.1f} min")


def _cell(value: float, error: float) -> str:
    return f"{value:.3f} ± {error:.3f}"
