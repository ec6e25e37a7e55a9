"""Command line: the paper's tables and figures from the runs, and a summary of any sweep.

    python -m analysis tables [--source URI|DIR] [--out paper] [--size SIZE] [--sweep SWEEP_ID ...]
    python -m analysis export [--source URI] [--out paper/runs] [--size SIZE] [--sweep SWEEP_ID ...]
                              [--experiment NAME ...]
    python -m analysis summary --experiment NAME [--source URI|DIR] [--sweep SWEEP_ID]

`--source` is a tracking URI or an export folder. By default: $MLFLOW_TRACKING_URI, else the local
store runs/mlflow.db when it holds the experiments read, else the committed exports paper/runs. An
export writes each experiment into OUT/EXPERIMENT/ and leaves the others there, so each spec's export
can be committed as its sweep ends (`--experiment NAME`); reading a folder reads every export in it.
One sweep per experiment is read: the one named with `--sweep` (repeatable), else the latest complete
one; a line per experiment says which. Runs RUNNING are refused (exit 2, one line): those left open
by a driver that is gone (`python -m sweeps status --repair` closes them), and those of a sweep still
running (`tables` and `summary` read one when it is named with `--sweep`, and say so).
`--size quick|smoke` reads the paper sweeps run at that size of their specs (experiments
t1-mlp-quick, ...; `--smoke` is `--size smoke`) and writes by default into runs/paper-SIZE (tables)
and runs/paper-SIZE/runs (export), not the committed paper/; `--size full` (the default) is the specs
as written. `summary` tabulates one experiment, any spec's (`analysis.summary`): one row per setting
of its swept parameters, best first.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from study.errors import first_line

PROJECT = Path(__file__).resolve().parents[1]
LOCAL_STORE = PROJECT / "runs" / "mlflow.db"
EXPORT = PROJECT / "paper" / "runs"


def default_source(experiments: list[str]) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if LOCAL_STORE.exists():  # checked first: opening a store that does not exist would create it
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{LOCAL_STORE}")
        if any(client.get_experiment_by_name(name) for name in experiments):
            return f"sqlite:///{LOCAL_STORE}"
    return str(EXPORT)


def default_out(command: str, size: str) -> Path:
    """paper/ and paper/runs for the full size; runs/paper-SIZE and runs/paper-SIZE/runs otherwise."""
    if size == "full":
        return PROJECT / "paper" if command == "tables" else EXPORT
    folder = PROJECT / "runs" / f"paper-{size}"
    return folder if command == "tables" else folder / "runs"


def main(argv: list[str] | None = None) -> int:
    from sweeps.spec.sizes import add_size_option

    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("tables", "export"):
        sub = commands.add_parser(name)
        sub.add_argument("--source")
        full, other = (default_out(name, size).relative_to(PROJECT) for size in ("full", "SIZE"))
        sub.add_argument("--out", type=Path, help=f"default: {full} (full size), {other}")
        add_size_option(sub, "the paper sweeps at this size of their specs (default: full)")
        sub.add_argument("--sweep", action="append", default=[], metavar="SWEEP_ID",
                         help="read this sweep of its experiment (default: the latest complete one)")
        sub.add_argument("--experiment", action="append", default=[], metavar="NAME",
                         help="only this paper experiment (repeatable; default: all of them), e.g. to "
                              "export a spec's runs as soon as its sweep ends")
    sub = commands.add_parser("summary", help="one sweep's settings, best first (any experiment)")
    sub.add_argument("--experiment", required=True, metavar="NAME",
                     help="the MLflow experiment: a spec's name, or NAME-SIZE at a named size")
    sub.add_argument("--source", help="a tracking URI or an export folder")
    sub.add_argument("--sweep", metavar="SWEEP_ID",
                     help="read this sweep of the experiment (default: the latest complete one)")
    args = parser.parse_args(argv)
    if args.command == "summary":
        return summary_main(args)
    args.out = args.out or default_out(args.command, args.size)

    from analysis import paper, runs

    names = paper.all_experiments(args.size)
    unknown = sorted(set(args.experiment) - set(names))
    if unknown:
        print(f"error: --experiment {', '.join(unknown)}: not a paper experiment at this size "
              f"({', '.join(names)})", file=sys.stderr)
        return 2
    names = [n for n in names if n in args.experiment] if args.experiment else names
    source = args.source or default_source(names)
    try:
        loaded = runs.load(source, names, args.sweep, read_running=args.command == "tables")
    except (FileNotFoundError, runs.SelectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in loaded.selection:
        print(line)
    if loaded.trials.empty:
        print(f"error: no runs of {', '.join(names)} in {source}", file=sys.stderr)
        return 2
    if args.command == "export":
        runs.export(loaded, args.out)
        print(f"exported {len(loaded.trials)} trial runs of {', '.join(loaded.experiments)} "
              f"-> {args.out}")
        return 0
    estimates = Path(source) / paper.ESTIMATOR  # T6's CSV, beside the exports it was read with
    tables, pngs, notes = paper.build(loaded, args.out, size=args.size,
                                      estimates=estimates if estimates.is_file() else None)
    if "://" in source:  # not on a sweep still running: its figures are not its final ones
        ended = loaded.parents[~loaded.parents["tags.sweep.id"].isin(loaded.running)]
        paper.log_figures(source, runs.Runs(loaded.trials, ended, loaded.history), pngs)
    for note in notes:
        print(note)
    print(f"{len(tables)} tables and {len(pngs)} figures from {source} -> {args.out}")
    return 0


def summary_main(args) -> int:
    """`python -m analysis summary`: the table on stdout, after the line saying which sweep."""
    from analysis import runs, summary

    source = args.source or default_source([args.experiment])
    if source.startswith("sqlite:///") and not Path(source.removeprefix("sqlite:///")).is_file():
        print(f"error: {source}: no such tracking store", file=sys.stderr)
        return 2
    refused: tuple[type[Exception], ...] = (FileNotFoundError, runs.SelectionError)
    if "://" in source:
        from mlflow.exceptions import MlflowException

        refused += (MlflowException,)
    try:
        loaded = runs.load(source, [args.experiment], [args.sweep] if args.sweep else [],
                           read_running=True)
        if loaded.trials.empty:
            known = ", ".join(summary.experiments_in(source)) or "none"
            print(f"error: no runs of experiment {args.experiment} in {source} (its experiments: "
                  f"{known})", file=sys.stderr)
            return 2
    except refused as err:
        print(f"error: {first_line(err, 300)}", file=sys.stderr)
        return 2
    for line in loaded.selection:
        print(line)
    table = summary.summary(loaded)
    print()
    print(summary.render(table))
    print()
    print(f"{len(table)} settings, {table['trials'].sum()} trials, {table['finished'].sum()} ran to "
          f"their end (the means are over these); best first by {summary.RANKED_BY}, the validation "
          "binary accuracy of the tested weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
