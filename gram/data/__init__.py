"""Download stage and dataset access. [ours]

`gram download` fetches and prepares the data of a profile under `data/<profile>/`; the emoji
profile is implemented in `gram.data.emoji`. Downstream stages read classification datasets with
`load_dataset` / `split_images`, which know the on-disk layout so that no other module does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gram.config import DataParams
from gram.io import read_json


@dataclass
class Split:
    """One (dataset, domain, split): images and integer labels."""

    dataset: str
    domain: str
    split: str
    classes: list[str]
    images: np.ndarray  # [N, H, W, 3] uint8
    labels: np.ndarray  # [N] int64
    keys: list[str]


def load_dataset(data_dir: str | Path, name: str) -> dict:
    """The dataset description written by the download stage (`datasets/<name>.json`)."""
    return read_json(Path(data_dir) / "datasets" / f"{name}.json")


def split_images(data_dir: str | Path, name: str, domain: str, split: str) -> Split:
    """Images and labels of one split of dataset `name` in `domain` (a vendor for emoji)."""
    from gram.data.shards import load_images

    ds = load_dataset(data_dir, name)
    if domain not in ds["domains"]:
        raise KeyError(f"{data_dir}/datasets/{name}.json: no domain {domain!r} (has {ds['domains']})")
    items = [it for it in ds["items"] if it["split"] == split]
    keys = [f"{domain}_{it['hexcode'].lower()}" for it in items]
    keys, images, _ = load_images(Path(data_dir) / "shards" / domain, keys)
    labels = np.array([it["label"] for it in items], dtype=np.int64)
    return Split(name, domain, split, ds["classes"], images, labels, keys)


def run(cfg: DataParams, out_dir: str | Path) -> dict:
    if cfg.source == "npm":
        from gram.data import emoji

        return emoji.run(cfg, out_dir)
    raise RuntimeError(
        "data.source 'paper': the paper profile's corpus shards and the 11 few-shot datasets are "
        "not prepared by this version of gram yet (tracked in the paper-profile issue); "
        "use the emoji profile (`profile: emoji` in params.yaml).")


def main(argv: list[str] | None = None) -> None:
    from gram.cli import stage_parser, stage_setup

    p = stage_parser("download", __doc__)
    p.add_argument("--out", required=True, help="data directory of the profile, e.g. data/emoji")
    args = p.parse_args(argv)
    _, prof = stage_setup(args)
    run(prof.data, args.out)
