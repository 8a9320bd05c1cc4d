"""`gram schema`: write the JSON schema of params.yaml that Snakemake validates against. [ours]"""

from __future__ import annotations

import argparse

import yaml

from gram.config import json_schema
from gram.io import write_text

DEFAULT = "workflow/schemas/params.schema.yaml"


def render() -> str:
    return ("# Generated from gram/config.py by `gram schema`; do not edit by hand.\n"
            + yaml.safe_dump(json_schema(), sort_keys=False, width=100))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gram schema", description=__doc__)
    p.add_argument("--out", default=DEFAULT, help=f"where to write it (default: {DEFAULT})")
    write_text(p.parse_args(argv).out, render())
