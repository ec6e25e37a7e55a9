"""Command line: `python -m study train --set activation.p=0.5 --set model.arch=mlp [--out result.json]`.

    python -m study config [--set KEY=VALUE ...]   print the resolved flat config (every key there is)
    python -m study train  [--set KEY=VALUE ...]   train one trial with a progress bar, write JSON
    python -m study data [--no-download]           locate (or download) Fashion-MNIST, say where
    python -m study estimator [--epochs 0,1,5] ...  the gradient estimators' table (study.estimator)

Bad input exits with status 2 and one line naming the problem.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from study.config import ConfigError, TrialConfig, flat_to_strings, parse_assignments
from study.data import DatasetError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("config", "print the resolved flat config"), ("train", "train one trial")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--set", dest="assignments", action="append", default=[],
                         metavar="KEY=VALUE", help="a dotted config key, e.g. activation.p=0.5")
    commands.choices["train"].add_argument(
        "--out", type=Path, help="result JSON (default: runs/train/<config hash>.json)")
    commands.choices["train"].add_argument("--quiet", action="store_true", help="no progress bar")
    data = commands.add_parser("data", help="locate (or download) Fashion-MNIST")
    data.add_argument("--no-download", action="store_true", help="only look in the local folders")
    _estimator_parser(commands)
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _config(args) -> int:
    flat = TrialConfig.from_flat(parse_assignments(args.assignments)).to_flat()
    for key, value in flat_to_strings(flat).items():
        print(f"{key}={value}")
    return 0


def _train(args) -> int:
    config = TrialConfig.from_flat(parse_assignments(args.assignments))
    from study.train import TrialDiverged, train  # TensorFlow is imported only now

    try:
        result = train(config, callbacks=[_print_epoch], verbose=0 if args.quiet else 1)
    except TrialDiverged as err:
        print(f"error: trial diverged: {err}", file=sys.stderr)
        return 1
    out = args.out or Path("runs/train") / f"{config_hash(config)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(result.to_json())
    print(json.dumps(result.test), f"-> {out}")
    return 0


def _data(args) -> int:
    from study.data import fashion_mnist, find_fashion_mnist

    x_train, _, x_test, _, _ = fashion_mnist(download=not args.no_download)
    where = find_fashion_mnist() or "the Keras download"
    print(f"Fashion-MNIST: {len(x_train)} training and {len(x_test)} test images from {where}")
    return 0


def _estimator_parser(commands) -> None:
    sub = commands.add_parser("estimator", help="bias, variance and cosine of the op's gradient "
                              "against the stochastic binary network's (study/estimator.py)")
    sub.add_argument("--out", type=Path, default=Path("paper/runs") / "estimator" / "estimator.csv",
                     help="the CSV; the settings go beside it (.json)")
    sub.add_argument("--epochs", help="checkpoints: epochs of training, e.g. 0,1,5")
    for name, kind, text in (("samples", int, "reference draws per checkpoint"),
                             ("draws", int, "draws of each random estimator"),
                             ("batch", int, "minibatch images"), ("sigma", float, "logistic noise scale"),
                             ("groups", int, "jackknife groups"), ("seed", int, "seed of all draws")):
        sub.add_argument(f"--{name}", type=kind, help=text)
    sub.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                     help="the training config (default: p = 0.5, c = 1.2, Adam 1e-3)")
    sub.epilog = "Defaults: study.estimator.Settings and TRAINING."


def _estimator(args) -> int:
    from study.estimator import TRAINING, Settings, check, run  # TensorFlow is imported only now

    given = {k: getattr(args, k) for k in ("samples", "draws", "batch", "sigma", "groups", "seed")}
    try:
        if args.epochs is not None:
            given["epochs"] = tuple(sorted({int(e) for e in args.epochs.split(",")}))
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
        config = TrialConfig.from_flat({**TRAINING, **parse_assignments(args.assignments),
                                        "budget.epochs": max(*settings.epochs, 1)})
        check(config, settings)
    except ValueError as err:
        raise ConfigError(f"estimator: {err}") from None
    run(config, settings, args.out)
    print(f"-> {args.out} and {args.out.with_suffix('.json')}")
    return 0


def config_hash(config: TrialConfig) -> str:
    """A short stable hash of the flat config."""
    text = json.dumps(flat_to_strings(config.to_flat()), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _print_epoch(epoch: int, metrics: dict[str, float], state) -> None:
    shown = ("train/loss", "val/accuracy_binary", "val/accuracy_soft", "time/epoch_s")
    print(f"epoch {epoch}: " + "  ".join(f"{k}={metrics[k]:.4f}" for k in shown), flush=True)


_COMMANDS = {"config": _config, "train": _train, "data": _data, "estimator": _estimator}

if __name__ == "__main__":
    sys.exit(main())
