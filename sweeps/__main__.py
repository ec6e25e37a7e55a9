"""Command line: `python -m sweeps run SPEC [--size smoke|quick]` and `python -m sweeps check SPEC...`.

    run    validate the spec, then run it (or resume it: the same command continues an
           interrupted sweep) on local Ray or $RAY_ADDRESS, recording into $MLFLOW_TRACKING_URI
           (default: runs/mlflow.db), with trial storage in $STORAGE (default: runs/ray)
    check  validate specs only (exit status 2 and one line per bad spec)
    status the state of each recorded sweep (running, finished, interrupted, failed, left open);
           --repair closes the runs of a sweep left open by a driver that died
    ui     print where the MLflow UI shows each experiment's runs

`--size NAME` applies the spec's `NAME:` section of overrides (smoke: CI's size; quick: a laptop
check; full, the default: none, the spec as written); `--smoke` is `--size smoke`.
"""

from __future__ import annotations

import argparse
import os
import sys

from study.errors import StudyError
from sweeps.spec.sizes import add_size_option, chosen_size

# Ray Tune's own console output gives way to sweeps.progress.Progress; its per-trial records stay.
QUIET = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
         "TF_CPP_MIN_LOG_LEVEL": "2", "RAY_DEDUP_LOGS": "1",
         # a tracking server that is away fails fast; the tracker queues and replays instead
         "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
         "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeps", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run or resume a sweep")
    run.add_argument("spec")
    add_size(run)
    check = commands.add_parser("check", help="validate specs")
    check.add_argument("specs", nargs="+")
    add_size(check)
    check.add_argument("--reachable", action="store_true",
                       help="also check that $RAY_ADDRESS and $MLFLOW_TRACKING_URI answer")
    status = commands.add_parser("status", help="the state of each recorded sweep (of SPECs, or "
                                 "all); --repair closes the runs of sweeps left open")
    status.add_argument("specs", nargs="*", metavar="SPEC")
    add_size(status)
    status.add_argument("--repair", action="store_true",
                        help="close the runs of sweeps left open (RUNNING without a live driver) "
                             "as KILLED, as an interruption would have")
    ui = commands.add_parser("ui", help="print the address of each experiment's runs in the UI")
    ui.add_argument("--tracking-uri", required=True)
    ui.add_argument("--base", required=True, help="the UI's address, e.g. http://127.0.0.1:5000")
    args = parser.parse_args(argv)
    if args.command == "status":
        from sweeps.status import main as status_main

        return status_main(args.specs, chosen_size(args), args.repair)
    if args.command == "ui":
        from sweeps.ui import addresses

        found = addresses(args.tracking_uri, args.base)
        for name, address in found:
            print(f"  {name}: {address}")
        if not found:
            print(f"  {args.base} (no runs yet: make sweep)")
        return 0

    from sweeps.spec import load_spec

    try:
        specs = [load_spec(path, size=chosen_size(args))
                 for path in (args.specs if args.command == "check" else [args.spec])]
    except StudyError as err:
        return refused(err)
    if args.command == "check":
        if args.reachable:
            from sweeps.checklist import before_client_submits

            try:
                before_client_submits(specs, os.environ.get("RAY_ADDRESS"))
            except StudyError as err:
                return refused(err)
        for spec in specs:
            print(f"{spec.path}: ok ({spec.num_trials} trials, {spec.search.algorithm})")
        return 0

    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    from sweeps import interrupt, launch  # Ray is imported only for a valid spec
    from sweeps.settings import Interrupted

    try:
        results = launch.run(specs[0], launch.Settings.from_env(), resume_command(args))
    except Interrupted as err:
        print(f"{err} ({resume_command(args)})", file=sys.stderr)
        return interrupt.exit_status()
    except KeyboardInterrupt:
        print(interrupt.last_line(launch.recording, resume_command(args)), file=sys.stderr)
        return interrupt.exit_status()
    except StudyError as err:
        return refused(err)
    print(summary(results, specs[0]))
    return 0 if not results.errors else 1


def refused(err: StudyError) -> int:
    """A mistake the user can fix: its one line on stderr, exit status 2."""
    print(f"error: {err}", file=sys.stderr)
    return 2


def add_size(command: argparse.ArgumentParser) -> None:
    add_size_option(command, "apply the spec's section of overrides of that name (default: full, "
                             "the spec as written)")


def resume_command(args) -> str:
    return f"make sweep SPEC={args.spec}{f' SIZE={args.size}' if chosen_size(args) else ''}"


def summary(results, spec) -> str:
    """The sweep's outcome: trials, failures, and the best trial by its score (`trainable.SCORE`),
    ranked as the parent run's summary ranks it."""
    from sweeps.tracking.summary import Summary
    from sweeps.trainable import SCORE

    lines = [f"{spec.sweep_id}: {len(results)} trials, {len(results.errors)} failed"]
    ranking, ended = Summary(spec), {}
    for result in results:
        if result.metrics and result.error is None:
            ended[result.metrics["trial_id"]] = result
            ranking.report(result.metrics["trial_id"], result.metrics.get(SCORE))
    if (best := ranking.best()) is not None:
        trial_id, value = best
        lines.append(f"best {spec.metric} = {value:.4f} (trial {trial_id}): " + ", ".join(
            f"{k}={v}" for k, v in spec.trial_config(ended[trial_id].config).to_flat().items()
            if k.startswith(("activation.", "model."))))
    return "\n".join(lines)


def exit_at_once(code: int) -> None:
    """End the process when `main` is done: Ray shut down (as its own atexit handler would, at
    once for a local cluster: `launch.stop_ray`), logs and output flushed, then `os._exit`, without
    the interpreter's finalization of Ray, MLflow, SQLAlchemy and pandas, which takes a second
    after a sweep. Nothing is left to write by then: the record is closed, the tracker flushed, Ray
    Tune's state synced, every database write committed."""
    import logging

    if "sweeps.launch" in sys.modules:
        sys.modules["sweeps.launch"].stop_ray()
    elif "ray" in sys.modules:
        sys.modules["ray"].shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_at_once(main())
