"""Download stage: the data of a profile under `data/<profile>/`. [ours]

`gram download` fetches and prepares the emoji profile in `gram.data.emoji`, the paper profile in
`gram.data.paper` (the CoOp-layout datasets and the corpus shards of `data.paper`). Both write the
corpus shards, one description per classification dataset (`datasets/<name>.json`, read through
`gram.data.datasets`) and `download.json`.
"""

from __future__ import annotations

from pathlib import Path

from gram.config import DataParams
from gram.data import emoji, paper
from gram.io import write_manifest
from gram.stage import stage_parser, stage_setup


def run(cfg: DataParams, out_dir: str | Path) -> dict:
    """Download and prepare the data of `cfg` (one profile's `data` section) into `out_dir`."""
    if cfg.source == "npm":
        return emoji.run(cfg, out_dir)
    return paper.run(cfg, out_dir)


def main(argv: list[str] | None = None) -> None:
    p = stage_parser("download", __doc__)
    p.add_argument("--out", required=True, help="data directory of the profile, e.g. data/emoji")
    args = p.parse_args(argv)
    _, prof = stage_setup(args)
    run(prof.data, args.out)
    for name in ("shards", "datasets"):  # Snakemake follows these directories' content through manifests
        write_manifest(Path(args.out) / name)
