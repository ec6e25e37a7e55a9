"""The command-line options that pick a spec's named size, shared by `python -m sweeps` and
`python -m analysis`: `--size full|smoke|quick` (full: the spec as written) and `--smoke`."""

from __future__ import annotations

import argparse

from sweeps.spec.model import SIZES


def add_size_option(parser: argparse.ArgumentParser, help: str) -> None:
    """--size (default full) and --smoke, its shorthand for --size smoke."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--size", choices=("full", *SIZES), default="full", help=help)
    size.add_argument("--smoke", dest="size", action="store_const", const="smoke",
                      help="the same as --size smoke")


def chosen_size(args: argparse.Namespace) -> str:
    """The size `load_spec` takes: "" for full (the spec as written), else the size's name."""
    return "" if args.size == "full" else args.size
