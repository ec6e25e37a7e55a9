"""Every table, figure and check of the paper from the runs of its three sweeps.

    T1 main results (t1-main): accuracy per architecture x variant, the binary-eval pivot,
       T4 diagnostics at convergence and T5 cost (from the same runs), learning curves
    T2 the p x slope x cutoff grid (t2-grid): grid tables, best setting per architecture, axis and
       isolation plots, the heatmap, the gap against p
    T3 ablations (t3-ablations)

At a named size of the specs (`smoke`, `quick`) the experiments are NAME-SIZE (t1-main-quick, ...).
"""

from __future__ import annotations

from pathlib import Path

from analysis import figures
from analysis.checks import checks
from analysis.claims import T1_CLAIMS, claims_table, p_claims, slope_claims
from analysis.importance import importance_lines
from analysis.runs import Runs
from analysis.tables import (
    Table,
    accuracy_table,
    best_table,
    cost_table,
    diagnostics_table,
    grid_tables,
    pivot_table,
)
from sweeps.spec import SIZES

SPECS = {"t1": "t1-main", "t2": "t2-grid", "t3": "t3-ablations"}
# the file-name prefixes of what each sweep's runs make (T4 and T5 come from the T1 runs)
OUTPUTS = {"t1": ("t1_", "t4_", "t5_"), "t2": ("t2_",), "t3": ("t3_",), "claims": ("claims",)}


def experiments(size: str = "") -> dict[str, str]:
    """The experiment of each paper sweep at `size` ("" or "full": the specs as written, else one
    of SIZES)."""
    if size not in ("", "full", *SIZES):
        raise ValueError(f"unknown size {size!r} (full, {', '.join(SIZES)})")
    return {k: f"{v}-{size}" if size not in ("", "full") else v for k, v in SPECS.items()}


def spec_name(experiment: str) -> str:
    """The spec's name of an experiment, whatever its size (t1-main-quick -> t1-main)."""
    for size in SIZES:
        if experiment.endswith(f"-{size}") and experiment.removesuffix(f"-{size}") in SPECS.values():
            return experiment.removesuffix(f"-{size}")
    return experiment


def variants(runs: Runs) -> list[str]:
    """Variant names in the spec's order (grid trial ids follow it)."""
    if "tags.trial.variant" not in runs.trials:
        return []
    ordered = runs.trials.sort_values("tags.trial.id")["tags.trial.variant"].dropna()
    return list(dict.fromkeys(ordered))


def build(runs: Runs, out: Path, size: str = "") -> tuple[list[Table], list[Path], list[str]]:
    """Write tables (out/tables), figures (out/figures) and out/checks.md from the paper sweeps at
    `size`; return what was made. Of the sweeps read, a table or figure an earlier build wrote and
    this one did not (a grid that lost an axis value) is removed; those of sweeps not read stay."""
    names = experiments(size)
    tables: list[Table] = []
    pngs: list[Path] = []
    notes: list[str] = []
    claimed = []  # (an experiment's runs, the paired comparisons made on them)
    fig_dir = out / "figures"
    if names["t1"] in runs.experiments:
        t1 = runs.of(names["t1"])
        order = variants(t1)
        tables += [
            pivot_table(t1, "t1_binary", "T1 binary-eval test accuracy (mean ± std over seeds)",
                        "params.model.arch", "tags.trial.variant",
                        "metrics.test/accuracy_binary", order),
            accuracy_table(t1, "t1_main", "T1 main results: soft- and binary-eval test accuracy",
                           ["params.model.arch", "tags.trial.variant"], order),
            diagnostics_table(t1, "t4_diagnostics", "T4 activation diagnostics at the last epoch",
                              order),
            cost_table(t1, "t5_cost", "T5 cost: parameters, binarized units, seconds per epoch",
                       order),
        ]
        pngs.append(figures.learning_curves(t1, fig_dir / "t1_learning_curves.png"))
        notes += checks(t1)
        claimed.append((t1, list(T1_CLAIMS)))
    if names["t2"] in runs.experiments:
        t2 = runs.of(names["t2"])
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
        claimed.append((t2, p_claims(t2) + slope_claims(t2)))
    if names["t3"] in runs.experiments:
        t3 = runs.of(names["t3"])
        tables.append(accuracy_table(t3, "t3_ablations", "T3 ablations of the default unit "
                                     "(mlp, p = 0.5, c = 1.2)", ["tags.trial.variant"],
                                     variants(t3)))
        notes += checks(t3)
    if claimed:
        tables.append(claims_table(claimed, "claims", "Paired differences over seeds behind the "
                                   "findings (A - B; verdict by the 95% interval)"))
    written = {path for table in tables for path in table.write(out / "tables")} | set(pngs)
    built = [k for k in SPECS if names[k] in runs.experiments] + (["claims"] if claimed else [])
    remove_stale(out, tuple(p for k in built for p in OUTPUTS[k]), written)
    (out / "checks.md").write_text("# Checks\n\n" + "".join(f"- {n}\n" for n in notes))
    return tables, pngs, notes


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
        prefix = {"t1-main": "t1_", "t2-grid": "t2_", "t3-ablations": "t3_"}.get(
            spec_name(parent["experiment"]))
        for png in pngs:
            if prefix and png.name.startswith(prefix):
                client.log_artifact(parent["run_id"], str(png), artifact_path="figures")
