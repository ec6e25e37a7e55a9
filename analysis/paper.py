"""Every table, figure and check of the paper from the runs of its sweeps, part by part.

    LR  learning-rate selection (lr-select, lr-select-wide, lr-select-cnn): the monitored
        validation accuracy of each variant and architecture at each rate, the rate selected
    T1  main results (t1-mlp, t1-gated, t1-bottleneck, t1-cnn, at the selected rates): accuracy per
        architecture x variant, the binary-eval pivot, threshold 0 against recalibrated thresholds,
        T4 diagnostics of the tested weights and T5 cost (from the same runs), learning curves
    T2  the p x slope x cutoff grid (t2-grid): grid tables, best setting per architecture, axis and
        isolation plots, the heatmap, the gap against p
    T3  ablations (t3-ablations)
    T6  the estimator's gradient against the expected loss's (`analysis.estimator`, from its CSV)
    claims.md  the families of claims (`analysis.claims`) tested on T1, T2 and T3

At a named size of the specs (`smoke`, `quick`) the experiments are NAME-SIZE (t1-mlp-quick, ...).
"""

from __future__ import annotations

from pathlib import Path

from analysis import estimator, figures
from analysis.checks import checks
from analysis.claims import claims_table, paper_families
from analysis.importance import importance_lines
from analysis.runs import Runs
from analysis.tables import (
    Table,
    accuracy_table,
    best_table,
    calibration_table,
    cost_table,
    diagnostics_table,
    grid_tables,
    lr_table,
    pivot_table,
    selected_rates,
)
from sweeps.spec import SIZES

# The experiments (one per spec) of each part of the paper, tabulated together.
PARTS = {"lr": ("lr-select", "lr-select-wide", "lr-select-cnn"),
         "t1": ("t1-mlp", "t1-gated", "t1-bottleneck", "t1-cnn"),
         "t2": ("t2-grid",), "t3": ("t3-ablations",)}
# the file-name prefixes of what each part makes (T4 and T5 come from the T1 runs)
OUTPUTS = {"lr": ("lr_",), "t1": ("t1_", "t4_", "t5_"), "t2": ("t2_",), "t3": ("t3_",),
           "claims": ("claims",), "t6": ("t6_",)}
ESTIMATOR = Path("estimator") / "estimator.csv"  # in an export folder: `python -m study estimator`


def experiments(size: str = "") -> dict[str, tuple[str, ...]]:
    """The experiments of each part at `size` ("" or "full": the specs as written, else one of
    SIZES)."""
    if size not in ("", "full", *SIZES):
        raise ValueError(f"unknown size {size!r} (full, {', '.join(SIZES)})")
    suffix = f"-{size}" if size not in ("", "full") else ""
    return {k: tuple(f"{name}{suffix}" for name in names) for k, names in PARTS.items()}


def all_experiments(size: str = "") -> list[str]:
    return [name for names in experiments(size).values() for name in names]


def spec_name(experiment: str) -> str:
    """The spec's name of an experiment, whatever its size (t1-mlp-quick -> t1-mlp)."""
    known = all_experiments()
    for size in SIZES:
        if experiment.endswith(f"-{size}") and experiment.removesuffix(f"-{size}") in known:
            return experiment.removesuffix(f"-{size}")
    return experiment


def variants(runs: Runs) -> list[str]:
    """Variant names in their specs' order (a grid's trial ids follow it), over every experiment."""
    if "tags.trial.variant" not in runs.trials:
        return []
    trials = runs.trials.dropna(subset=["tags.trial.variant"])
    rank = trials.groupby("experiment")["tags.trial.id"].rank(method="dense")
    first = trials.assign(rank=rank).groupby("tags.trial.variant")["rank"].min()
    return list(first.sort_values(kind="stable").index)


def build(runs: Runs, out: Path, size: str = "", estimates: Path | None = None
          ) -> tuple[list[Table], list[Path], list[str]]:
    """Write tables (out/tables), figures (out/figures) and out/checks.md from the paper sweeps at
    `size` (and T6 from the CSV `estimates`, when given); return what was made. Of the parts read,
    a table or figure an earlier build wrote and this one did not (a grid that lost an axis value)
    is removed; those of parts not read stay."""
    present = {k: [n for n in names if n in runs.experiments]
               for k, names in experiments(size).items()}
    part = {k: runs.of(*names) for k, names in present.items() if names}
    tables: list[Table] = []
    pngs: list[Path] = []
    notes: list[str] = []
    fig_dir = out / "figures"
    if "lr" in part:
        lr = part["lr"]
        tables.append(lr_table(lr, "lr_selection", "Learning-rate selection: monitored validation "
                               "accuracy of the tested weights (mean ± std over seeds)", variants(lr)))
        notes += [line for name in present["lr"] for line in checks(lr.of(name))]
        notes += lr_edges(lr)
    if "t1" in part:
        t1 = part["t1"]
        order = variants(t1)
        tables += [
            pivot_table(t1, "t1_binary", "T1 binary-eval test accuracy (mean ± std over seeds)",
                        "params.model.arch", "tags.trial.variant",
                        "metrics.test/accuracy_binary", order),
            accuracy_table(t1, "t1_main", "T1 main results: soft- and binary-eval test accuracy",
                           ["params.model.arch", "tags.trial.variant"], order),
            calibration_table(t1, "t1_calibrated", "T1 binary-eval test accuracy at threshold 0 "
                              "and at per-unit thresholds recalibrated on validation", order),
            diagnostics_table(t1, "t4_diagnostics", "T4 activation diagnostics of the tested "
                              "weights (validation set; saturated: |s x| ≥ ln 11)", order),
            cost_table(t1, "t5_cost", "T5 cost: parameters, binarized units, seconds per epoch",
                       order),
        ]
        pngs.append(figures.learning_curves(t1, fig_dir / "t1_learning_curves.png"))
        notes += [line for name in present["t1"] for line in checks(t1.of(name))]
    if "t2" in part:
        t2 = part["t2"]
        tables += grid_tables(t2, "t2_binary", "metrics.test/accuracy_binary",
                              "T2 binary-eval test accuracy over p x slope")
        tables += grid_tables(t2, "t2_gap", "gap", "T2 gap (soft - binary test accuracy)")
        tables.append(best_table(t2, "t2_best", "Best (p, slope, cutoff) per architecture, "
                                 "selected on validation", ["params.activation.p",
                                                            "params.activation.slope",
                                                            "params.activation.cutoff"]))
        pngs += [
            figures.heatmap(t2, fig_dir / "t2_heatmap.png"),
            figures.axis_plots(t2, ["activation.p", "activation.slope", "activation.cutoff"],
                               fig_dir / "t2_axis.png"),
            figures.isolation_plot(t2, "activation.p", fig_dir / "t2_isolation_p.png"),
            figures.isolation_plot(t2, "activation.slope", fig_dir / "t2_isolation_slope.png"),
            figures.gap_against_p(t2, fig_dir / "t2_gap_vs_p.png"),
        ]
        notes += checks(t2) + importance_lines(t2)
    if "t3" in part:
        t3 = part["t3"]
        tables.append(accuracy_table(t3, "t3_ablations", "T3 ablations of the default unit "
                                     "(mlp, p = 0.5, c = 1.2)", ["tags.trial.variant"],
                                     variants(t3)))
        notes += checks(t3)
    families = paper_families(part)
    if families:
        tables.append(claims_table(families, "claims", "Claims tested over seeds, by declared "
                                   "family (Holm within each family)"))
    if estimates is not None:
        tables.append(estimator.table(estimates))
    written = {path for table in tables for path in table.write(out / "tables")} | set(pngs)
    built = [*part, *(["claims"] if families else []),
             *(["t6"] if any(t.name.startswith("t6_") for t in tables) else [])]
    remove_stale(out, tuple(p for k in built for p in OUTPUTS[k]), written)
    (out / "checks.md").write_text("# Checks\n\n" + "".join(f"- {n}\n" for n in notes))
    return tables, pngs, notes


def lr_edges(lr: Runs) -> list[str]:
    """A line per (architecture, variant) whose selected rate is the lowest or highest one tried:
    its best rate may lie beyond the grid."""
    tried = sorted(set(lr.trials["params.optim.lr"].dropna()))
    edges = sorted(f"{arch} {variant} ({rate:g})" for (arch, variant), rate in
                   selected_rates(lr).items() if len(tried) > 1 and rate in (tried[0], tried[-1]))
    return [f"learning-rate selection: {len(edges)} selected rates at an end of the grid "
            f"[{tried[0]:g}, {tried[-1]:g}]: {', '.join(edges)}"] if edges else []


def remove_stale(out: Path, prefixes: tuple[str, ...], written: set[Path]) -> None:
    """Delete the tables and figures under `out` named with one of `prefixes` that are not in
    `written`."""
    for path in [*out.glob("tables/*.md"), *out.glob("tables/*.tex"), *out.glob("figures/*.png")]:
        if path.name.startswith(prefixes) and path not in written:
            path.unlink()


def log_figures(tracking_uri: str, runs: Runs, pngs: list[Path]) -> None:
    """Attach the figures to the parent run of each paper sweep they come from."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    for _, parent in runs.parents.iterrows():
        name = spec_name(parent["experiment"])
        key = next((k for k, names in PARTS.items() if name in names), None)
        for png in pngs:
            if key and png.name.startswith(OUTPUTS[key]):
                client.log_artifact(parent["run_id"], str(png), artifact_path="figures")
