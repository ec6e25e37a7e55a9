"""The paper's tables: aggregates over seeds, written as Markdown and LaTeX (booktabs) with provenance.

For a metric x over the n seeds of a group: mean, sample std s, and the 95% Student t interval
mean +- t(0.975, n - 1) * s / sqrt(n) (scipy.stats; no interval for n = 1). The LaTeX is pandas'
Styler's, with its escaping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from scipy import stats

from analysis.runs import Runs
from study.names import CALIBRATED, FINAL_METRICS, TEST_EPOCH

ARCH_ORDER = ("mlp", "cnn", "gated", "bottleneck")
# A trial is judged, everywhere (best cells, checks, importance, curves, diagnostics), at the epoch
# whose weights were tested (metrics.test/epoch: with a patience the best by its monitor, else the
# last), never at its last logged epoch: `finished` adds TESTED + key for every key in AT_TEST.
TESTED = "tested."
AT_TEST = ("val/accuracy_binary", "val/accuracy_soft", "act/saturated_fraction", "act/ones_fraction",
           "act/bit_entropy", "act/flip_rate")
SELECTION = TESTED + "val/accuracy_binary"  # validation binary accuracy of the tested weights


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    frame: pd.DataFrame  # cells already formatted as text
    provenance: str

    def markdown(self) -> str:
        header = "| " + " | ".join(map(str, self.frame.columns)) + " |"
        rule = "|" + "|".join("---" for _ in self.frame.columns) + "|"
        rows = ["| " + " | ".join(map(str, row)) + " |" for row in self.frame.itertuples(index=False)]
        return "\n".join([f"### {self.title}", "", f"*{self.provenance}*", "", header, rule, *rows,
                          ""])

    def latex(self) -> str:
        """A booktabs table float (pandas' Styler), preceded by the provenance as a comment."""
        styler = (self.frame.style.hide(axis="index")
                  .format(_signs, escape="latex").format_index(_signs, escape="latex", axis=1))
        table = styler.to_latex(caption=_signs(latex_escaped(self.title)), label=f"tab:{self.name}",
                                position="t", position_float="centering", hrules=True,
                                column_format="l" * len(self.frame.columns))
        return f"% {self.provenance}\n{table}"

    def write(self, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{self.name}.md", folder / f"{self.name}.tex"]
        paths[0].write_text(self.markdown())
        paths[1].write_text(self.latex())
        return paths


def latex_escaped(text: str) -> str:
    """`text` escaped for LaTeX as the Styler escapes the cells (`escape="latex"`), through a
    one-cell Styler: pandas has no public escaping function, and its Styler leaves a caption as is."""
    cell = pd.DataFrame([[text]]).style.format(escape="latex").hide(axis="index").hide(axis="columns")
    return cell.to_string(delimiter="").removesuffix("\n")


def provenance(runs: Runs) -> str:
    """Experiment, sweep ids, number of runs, code commit(s) and the date the runs ended (UTC)."""
    trials = runs.trials
    experiments = ", ".join(sorted(set(trials["experiment"])))
    sweeps = ", ".join(sorted(set(trials["tags.sweep.id"])))
    ran = (trials["tags.git.commits"].fillna(trials["tags.git.commit"])  # runs resumed across
           if "tags.git.commits" in trials else trials["tags.git.commit"])  # commits name each
    commits = sorted({commit[:10] for each in ran for commit in str(each).split(",")})
    dirty = " (some runs from a dirty tree)" if (trials["tags.git.dirty"] == "true").any() else ""
    ended = pd.to_datetime(trials["end_time"].max(), unit="ms", utc=True).strftime("%Y-%m-%d")
    return (f"MLflow experiment {experiments}; sweeps {sweeps}; {len(trials)} runs; code "
            f"{', '.join(commits)}{dirty}; runs ended {ended}")


def summarize(values: pd.Series) -> dict[str, float]:
    x = values.dropna().to_numpy(dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    lo = hi = math.nan
    if n > 1:
        sem = stats.sem(x)
        # scipy gives no interval for a zero spread (scale 0); its width is zero
        lo, hi = (mean, mean) if sem == 0 else map(float, stats.t.interval(0.95, n - 1, loc=mean,
                                                                            scale=sem))
    return {"mean": mean, "std": std, "n": n, "lo": lo, "hi": hi}


def aggregate(trials: pd.DataFrame, by: list[str], metrics: dict[str, str]) -> pd.DataFrame:
    """One row per group: for each named metric column, its mean, std, n and 95% interval."""
    rows = []
    for key, group in trials.groupby(by, sort=False, dropna=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
        for name, column in metrics.items():
            for stat, value in summarize(group[column]).items():
                row[f"{name}.{stat}"] = value
        rows.append(row)
    return pd.DataFrame(rows)


def ran_to_end(runs: Runs) -> pd.Series:
    """Per trial (aligned with `runs.trials`): whether it ended by its own rule, by its own record
    whatever its tags or its history of interruptions say: not FAILED, both test metrics, and
    `train/loss` in its history at every epoch 1..E of its last epoch E, where E is
    params.budget.epochs or, with a patience (params.budget.patience > 0), fewer (a plateau), and
    the test metrics with the epoch they were taken at (`study.names.TEST_EPOCH`)."""
    trials = runs.trials
    loss = runs.history[runs.history["key"] == "train/loss"]
    budget = trials.set_index("run_id")["params.budget.epochs"]
    loss = loss[loss["step"].between(1, loss["run_id"].map(budget))]
    epochs = trials["run_id"].map(loss.groupby("run_id")["step"].nunique())
    last = trials["run_id"].map(loss.groupby("run_id")["step"].max())
    patience = trials.get("params.budget.patience", pd.Series(0, index=trials.index)).fillna(0)
    whole = (epochs == trials["params.budget.epochs"]) | ((patience > 0) & (epochs == last))
    tested = trials.reindex(columns=[f"metrics.{m}" for m in (*FINAL_METRICS, TEST_EPOCH)]
                            ).notna().all(axis=1)
    return (trials["status"] != "FAILED") & whole & tested


def finished(runs: Runs) -> pd.DataFrame:
    """The trials that ended by their own rule (`ran_to_end`), with their test gap (soft - binary)
    and, as TESTED + key, each AT_TEST key's value at the tested epoch (`at_tested_epoch`)."""
    full = runs.trials[ran_to_end(runs)]
    tested = at_tested_epoch(Runs(full, runs.parents, runs.history), AT_TEST)
    full = full.assign(gap=full["metrics.test/accuracy_soft"] - full["metrics.test/accuracy_binary"])
    return full.assign(**{TESTED + key: full["run_id"].map(tested[key]) if key in tested
                          else float("nan") for key in AT_TEST})


def at_tested_epoch(runs: Runs, keys: tuple[str, ...]) -> pd.DataFrame:
    """Per trial (index run_id): each history key at step metrics.test/epoch, the epoch whose weights
    were tested; a column per key found."""
    tested = runs.trials.set_index("run_id")[f"metrics.{TEST_EPOCH}"]
    history = runs.history[runs.history["key"].isin(keys)]
    history = history[history["step"] == history["run_id"].map(tested)]
    return history.pivot_table(index="run_id", columns="key", values="value", aggfunc="last")


def by_setting(trials: pd.DataFrame, metrics: dict[str, str]) -> pd.DataFrame:
    """Repeated seeds of a searcher's sweep (`seeds: [...]` under tpe/qmc): one row per sampled
    setting (the tag `trial.setting` its seeds share), with each metric's mean, std, n and 95%
    interval over the seeds, best mean first by the first metric; the setting's parameters beside."""
    params = [c for c in trials.columns if c.startswith("params.") and c != "params.seed"]
    table = aggregate(trials, ["tags.trial.setting"], metrics)
    shown = trials.drop_duplicates("tags.trial.setting").set_index("tags.trial.setting")[params]
    table = table.join(shown, on="tags.trial.setting")
    first = next(iter(metrics))
    return table.sort_values(f"{first}.mean", ascending=False, kind="stable").reset_index(drop=True)


def pm(mean: float, std: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def interval(lo: float, hi: float, digits: int = 3) -> str:
    return "—" if math.isnan(lo) else f"[{lo:.{digits}f}, {hi:.{digits}f}]"


ACCURACY = {"soft": "metrics.test/accuracy_soft", "binary": "metrics.test/accuracy_binary",
            "gap": "gap"}


def _ordered(frame: pd.DataFrame, column: str, order) -> pd.DataFrame:
    rank = {v: i for i, v in enumerate(order)}
    return frame.sort_values(column, key=lambda s: s.map(lambda v: rank.get(v, len(rank))),
                             kind="stable")


def accuracy_table(runs: Runs, name: str, title: str, by: list[str], variants: list[str]) -> Table:
    """Soft- and binary-eval test accuracy and their gap, mean +- std over seeds, per group."""
    agg = aggregate(finished(runs), by, ACCURACY)
    if "tags.trial.variant" in by:
        agg = _ordered(agg, "tags.trial.variant", variants)
    if "params.model.arch" in by:
        agg = _ordered(agg, "params.model.arch", ARCH_ORDER)
    frame = pd.DataFrame({_label(c): agg[c] for c in by})
    for metric in ACCURACY:
        frame[f"{metric} eval" if metric != "gap" else "gap (soft - binary)"] = [
            pm(m, s) for m, s in zip(agg[f"{metric}.mean"], agg[f"{metric}.std"], strict=True)]
    frame["binary 95% CI"] = [interval(lo, hi) for lo, hi in
                              zip(agg["binary.lo"], agg["binary.hi"], strict=True)]
    frame["seeds"] = agg["binary.n"].astype(int)
    return Table(name, title, frame.reset_index(drop=True), provenance(runs))


def pivot_table(runs: Runs, name: str, title: str, rows: str, columns: str, metric: str,
                order: list[str]) -> Table:
    """`metric` (mean +- std over seeds) with `rows` down and `columns` across; "—" where a row
    has no runs of a column (a variant an architecture's spec leaves out)."""
    agg = aggregate(finished(runs), [rows, columns], {"m": metric})
    agg["cell"] = [pm(m, s) for m, s in zip(agg["m.mean"], agg["m.std"], strict=True)]
    wide = agg.pivot(index=rows, columns=columns, values="cell").fillna("—")
    wide = wide[[c for c in order if c in wide.columns]]
    wide = wide.loc[[r for r in ARCH_ORDER if r in wide.index] or sorted(wide.index)]
    frame = wide.reset_index().rename(columns={rows: _label(rows)})
    frame.columns = [str(c) for c in frame.columns]
    return Table(name, title, frame, provenance(runs))


def grid_tables(runs: Runs, name: str, metric: str, what: str) -> list[Table]:
    """Per architecture and cutoff: `metric` over the p (rows) x slope (columns) grid."""
    out = []
    full = finished(runs)
    for arch in [a for a in ARCH_ORDER if a in set(full["params.model.arch"])]:
        for cutoff in sorted(set(full["params.activation.cutoff"])):
            part = full[(full["params.model.arch"] == arch)
                        & (full["params.activation.cutoff"] == cutoff)]
            agg = aggregate(part, ["params.activation.p", "params.activation.slope"], {"m": metric})
            agg["cell"] = [pm(m, s) for m, s in zip(agg["m.mean"], agg["m.std"], strict=True)]
            wide = agg.pivot(index="params.activation.p", columns="params.activation.slope",
                             values="cell").sort_index()
            wide = wide[sorted(wide.columns)]
            frame = wide.reset_index()
            frame.columns = ["p \\ slope"] + [f"s = {c:g}" for c in wide.columns]
            frame["p \\ slope"] = [f"{p:g}" for p in frame["p \\ slope"]]
            out.append(Table(f"{name}_{arch}_c{cutoff:g}",
                             f"{what}, {arch}, cutoff c = {cutoff:g}", frame,
                             provenance(Runs(part, runs.parents, runs.history))))
    return out


def best_table(runs: Runs, name: str, title: str, keys: list[str]) -> Table:
    """Per architecture, the setting of `keys` with the best mean validation binary accuracy of the
    tested weights (`SELECTION`; the selection never sees the test set), and its test scores."""
    full = finished(runs)
    metrics = {"val": SELECTION, **ACCURACY}
    agg = aggregate(full, ["params.model.arch", *keys], metrics)
    best = agg.loc[agg.groupby("params.model.arch", sort=False)["val.mean"].idxmax()]
    best = _ordered(best, "params.model.arch", ARCH_ORDER)
    frame = pd.DataFrame({_label(c): best[c].map(lambda v: f"{v:g}" if isinstance(v, float) else v)
                          for c in ["params.model.arch", *keys]})
    frame["val binary"] = [f"{v:.3f}" for v in best["val.mean"]]
    for metric in ACCURACY:
        frame[f"test {metric}"] = [pm(m, s) for m, s in
                                   zip(best[f"{metric}.mean"], best[f"{metric}.std"], strict=True)]
    return Table(name, title, frame.reset_index(drop=True), provenance(runs))


def diagnostics_table(runs: Runs, name: str, title: str, variants: list[str]) -> Table:
    """The activation diagnostics of the tested weights (on the validation set, at the tested
    epoch), mean +- std over seeds; saturated: |s x| >= ln 11 (`study.evaluation`)."""
    columns = {"saturated": TESTED + "act/saturated_fraction", "ones": TESTED + "act/ones_fraction",
               "bit entropy": TESTED + "act/bit_entropy", "flip rate": TESTED + "act/flip_rate"}
    return _stat_table(runs, name, title, variants, columns, digits=3)


def cost_table(runs: Runs, name: str, title: str, variants: list[str]) -> Table:
    """Parameters, binarized units (bits per example) and seconds per training epoch."""
    full = finished(runs)
    epoch = runs.history[runs.history["key"] == "time/epoch_s"].groupby("run_id")["value"].mean()
    full = full.assign(epoch_s=full["run_id"].map(epoch))
    agg = aggregate(full, ["params.model.arch", "tags.trial.variant"],
                    {"params": "metrics.model/params", "bits": "metrics.model/binary_units",
                     "s": "epoch_s"})
    agg = _ordered(_ordered(agg, "tags.trial.variant", variants), "params.model.arch", ARCH_ORDER)
    frame = pd.DataFrame({"architecture": agg["params.model.arch"],
                          "variant": agg["tags.trial.variant"],
                          "parameters": agg["params.mean"].map(lambda v: f"{v:,.0f}"),
                          "binary units (bits)": agg["bits.mean"].map(lambda v: f"{v:,.0f}"),
                          "s / epoch": [pm(m, s, 2) for m, s in
                                        zip(agg["s.mean"], agg["s.std"], strict=True)]})
    return Table(name, title, frame.reset_index(drop=True), provenance(runs))


def _stat_table(runs: Runs, name: str, title: str, variants: list[str], columns: dict[str, str],
                digits: int) -> Table:
    full = finished(runs)
    present = {k: v for k, v in columns.items() if full[v].notna().any()}
    agg = aggregate(full, ["params.model.arch", "tags.trial.variant"], present)
    agg = _ordered(_ordered(agg, "tags.trial.variant", variants), "params.model.arch", ARCH_ORDER)
    frame = pd.DataFrame({"architecture": agg["params.model.arch"],
                          "variant": agg["tags.trial.variant"]})
    for label in present:
        frame[label] = [pm(m, s, digits) for m, s in
                        zip(agg[f"{label}.mean"], agg[f"{label}.std"], strict=True)]
    return Table(name, title, frame.reset_index(drop=True), provenance(runs))


def _label(column: str) -> str:
    return {"params.model.arch": "architecture", "tags.trial.variant": "variant"}.get(
        column, column.removeprefix("params.").removeprefix("activation."))


def _signs(value) -> str:
    """After pandas' LaTeX escaping: the non-ASCII signs of the cells as LaTeX."""
    text = str(value)
    for sign, tex in (("±", r"$\pm$"), ("—", "--"), ("≥", r"$\geq$"), ("<", "$<$"), (">", "$>$")):
        text = text.replace(sign, tex)
    return text



def monitored(full: pd.DataFrame) -> pd.Series:
    """Each trial's own monitored validation accuracy (params.budget.monitor: binary unless set)
    at its tested epoch: what a learning-rate selection compares."""
    monitor = full.get("params.budget.monitor", pd.Series(index=full.index, dtype=object))
    soft = monitor.fillna("val/accuracy_binary") == "val/accuracy_soft"
    return full[TESTED + "val/accuracy_soft"].where(soft, full[SELECTION])


def selected_rates(runs: Runs) -> dict[tuple[str, str], float]:
    """Per (architecture, variant): the learning rate (params.optim.lr) with the best mean
    `monitored` accuracy over seeds; of equal means, the lowest rate."""
    return _selected(finished(runs))


def _selected(full: pd.DataFrame) -> dict[tuple[str, str], float]:
    """`selected_rates` of the trials `full` (as `finished` gives them)."""
    means = (full.assign(m=monitored(full))
             .groupby(["params.model.arch", "tags.trial.variant", "params.optim.lr"])["m"].mean()
             .reset_index().sort_values("params.optim.lr", kind="stable"))
    best = means.loc[means.groupby(["params.model.arch", "tags.trial.variant"])["m"].idxmax()]
    return {(arch, variant): float(lr) for arch, variant, lr in
            zip(best["params.model.arch"], best["tags.trial.variant"], best["params.optim.lr"],
                strict=True)}


def lr_table(runs: Runs, name: str, title: str, variants: list[str]) -> Table:
    """Per architecture and variant: the monitored validation accuracy at the tested epoch (mean
    +- std over seeds) at each learning rate, and the rate selected (`selected_rates`)."""
    full = finished(runs)
    agg = aggregate(full.assign(m=monitored(full)),
                    ["params.model.arch", "tags.trial.variant", "params.optim.lr"], {"m": "m"})
    agg["cell"] = [pm(m, s) for m, s in zip(agg["m.mean"], agg["m.std"], strict=True)]
    wide = agg.pivot(index=["params.model.arch", "tags.trial.variant"], columns="params.optim.lr",
                     values="cell")
    wide = wide[sorted(wide.columns)].reset_index()
    wide = _ordered(_ordered(wide, "tags.trial.variant", variants), "params.model.arch", ARCH_ORDER)
    chosen = _selected(full)
    frame = pd.DataFrame({"architecture": wide["params.model.arch"],
                          "variant": wide["tags.trial.variant"]})
    for lr in [c for c in wide.columns if isinstance(c, float)]:
        frame[f"lr {lr:g}"] = wide[lr].fillna("—")
    frame["selected"] = [f"{chosen[(a, v)]:g}" for a, v in
                         zip(wide["params.model.arch"], wide["tags.trial.variant"], strict=True)]
    return Table(name, title, frame.reset_index(drop=True), provenance(runs))


def calibration_table(runs: Runs, name: str, title: str, variants: list[str]) -> Table:
    """Per architecture and variant: binary-eval test accuracy with every unit thresholded at 0 and
    with per-unit thresholds recalibrated on the validation set (`study.calibration`), mean +- std
    over seeds, and the paired difference's 95% interval."""
    full = finished(runs)
    column = f"metrics.{CALIBRATED}"
    full = full[full[column].notna()] if column in full else full.iloc[:0]
    full = full.assign(gain=full.get(column, 0) - full["metrics.test/accuracy_binary"])
    agg = aggregate(full, ["params.model.arch", "tags.trial.variant"],
                    {"zero": "metrics.test/accuracy_binary", "calibrated": column, "gain": "gain"}
                    ) if len(full) else pd.DataFrame()
    frame = pd.DataFrame(columns=["architecture", "variant", "threshold 0", "recalibrated",
                                  "recalibrated - 0 (95% CI)", "seeds"])
    if len(agg):
        agg = _ordered(_ordered(agg, "tags.trial.variant", variants), "params.model.arch",
                       ARCH_ORDER)
        frame = pd.DataFrame({
            "architecture": agg["params.model.arch"], "variant": agg["tags.trial.variant"],
            "threshold 0": [pm(m, s) for m, s in zip(agg["zero.mean"], agg["zero.std"], strict=True)],
            "recalibrated": [pm(m, s) for m, s in
                             zip(agg["calibrated.mean"], agg["calibrated.std"], strict=True)],
            "recalibrated - 0 (95% CI)": [f"{m:+.3f} {interval(lo, hi)}" for m, lo, hi in
                                          zip(agg["gain.mean"], agg["gain.lo"], agg["gain.hi"],
                                              strict=True)],
            "seeds": agg["zero.n"].astype(int)})
    return Table(name, title, frame.reset_index(drop=True), provenance(runs))
