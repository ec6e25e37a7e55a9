"""Command line: the paper's tables and figures from the runs.

    python -m analysis tables [--source URI|DIR] [--out paper] [--smoke] [--sweep SWEEP_ID ...]
    python -m analysis export [--source URI] [--out paper/runs] [--smoke] [--sweep SWEEP_ID ...]

`--source` is a tracking URI or an export folder. By default: $MLFLOW_TRACKING_URI, else the local
store runs/mlflow.db when it holds the paper's runs, else the committed export paper/runs.
One sweep per experiment is read: the one named with `--sweep` (repeatable), else the latest complete
one; a line per experiment says which.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, out in (("tables", PROJECT / "paper"), ("export", EXPORT)):
        sub = commands.add_parser(name)
        sub.add_argument("--source")
        sub.add_argument("--out", type=Path, default=out)
        sub.add_argument("--smoke", action="store_true", help="the smoke-size paper sweeps")
        sub.add_argument("--sweep", action="append", default=[], metavar="SWEEP_ID",
                         help="read this sweep of its experiment (default: the latest complete one)")
    args = parser.parse_args(argv)

    from analysis import paper, runs

    names = list(paper.experiments(args.smoke).values())
    source = args.source or default_source(names)
    try:
        loaded = runs.load(source, names, args.sweep)
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
    tables, pngs, notes = paper.build(loaded, args.out, smoke=args.smoke)
    if "://" in source:
        paper.log_figures(source, loaded, pngs)
    for note in notes:
        print(note)
    print(f"{len(tables)} tables and {len(pngs)} figures from {source} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
