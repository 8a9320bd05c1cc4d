"""What every stage's `main(argv)` shares: the common flags and the set-up they drive. [ours]

Below the stage modules, so that they need not import `gram.cli`, which imports them (by name, from
its STAGES table): the CLI is the top layer and nothing imports it (tests/test_layers.py).
"""

from __future__ import annotations

import argparse

from gram import config as C
from gram.io import setup_logging


def stage_parser(stage: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser for `gram <stage>` with `--params`, `--profile`, `--log` and `-v`; the stage adds its paths."""
    p = argparse.ArgumentParser(prog=f"gram {stage}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    p.add_argument("--profile", default=None, choices=C.PROFILES,
                   help="profile section to use (default: the file's `profile:` key)")
    p.add_argument("--log", default=None, help="also append the log to this file")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def stage_setup(args: argparse.Namespace) -> tuple[C.Params, C.ProfileParams]:
    """Start logging as `args` say and load the parameters (the whole file, and the chosen profile)."""
    setup_logging(args.log, args.verbose)
    return C.load(args.params, args.profile)
