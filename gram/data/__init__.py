"""Download stage and dataset access. [ours]

`gram download` fetches and prepares the data of a profile under `data/<profile>/`: the emoji
profile in `gram.data.emoji`, the paper profile in `gram.data.paper` (the CoOp-layout datasets and
the corpus shards of `data.paper`). Both write one description per classification dataset,
`datasets/<name>.json`, and downstream stages read datasets only through `split_index` (keys and
labels, nothing decoded) and `split_images` (decoded images), which know both layouts so that no
other module does.

A dataset has domains: the emoji vendors, or for the paper profile `default` (the dataset itself)
plus the test sets of `data.datasets.<name>.shifts` (ImageNet-V2/-Sketch/-A/-R as domains of
ImageNet). A domain may hold only some classes (ImageNet-A and -R: 200 of the 1000); its
`class_subset` says which, labels stay in the dataset's label space, and scoring restricts the
prediction to that subset (`Split.restricted`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from gram.config import DataParams
from gram.io import read_json

DEFAULT_DOMAIN = "default"  # the paper profile's name for a dataset's own test set


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
    class_subset: list[int] | None = None  # the classes this domain holds (None: all)

    def restricted(self) -> "Split":
        """The same split as a plain dataset of its `class_subset` (labels renumbered 0..K-1)."""
        if self.class_subset is None:
            return self
        pos = {c: i for i, c in enumerate(self.class_subset)}
        return replace(self, classes=[self.classes[c] for c in self.class_subset],
                       labels=np.array([pos[int(y)] for y in self.labels], dtype=np.int64), class_subset=None)


@dataclass
class SplitIndex:
    """One (dataset, domain, split) without its images: what few-shot sampling needs."""

    dataset: str
    domain: str
    split: str
    classes: list[str]
    keys: list[str]
    labels: np.ndarray  # [N] int64, in the dataset's label space
    class_subset: list[int] | None


def load_dataset(data_dir: str | Path, name: str) -> dict:
    """The dataset description written by the download stage (`datasets/<name>.json`)."""
    return read_json(Path(data_dir) / "datasets" / f"{name}.json")


def dataset_domains(data_dir: str | Path, name: str, wanted=()) -> list[str]:
    """The domains to score `name` on: `wanted` (each must exist), or all of the dataset's if empty."""
    have = list(load_dataset(data_dir, name)["domains"])
    missing = [d for d in wanted if d not in have]
    if missing:
        raise KeyError(f"{data_dir}/datasets/{name}.json: no domain {missing[0]!r} (has {have})")
    return list(wanted) or have


def decoded_mb(data_dir: str | Path, datasets, backbone: str | Path, split: str = "test", shots: int = 0) -> float:
    """MB of uint8 images a job holds at once when it decodes the paper profile's `datasets`.

    The largest `split` of any domain of any of them (scoring decodes one at a time), plus `shots`
    images per class of the first (few-shot tuning's training images), at the decoded side of the
    `backbone` directory's preprocessing (224 while it does not exist yet) x 3 bytes an image.
    0 for datasets read from shards (the emoji profile's images are small) and for
    datasets whose description the download stage has not written yet. What a SLURM job's `mem_mb`
    adds for its images (`workflow/rules/resources.smk`).
    """
    largest, train = 0, 0
    for i, name in enumerate(datasets):
        path = Path(data_dir) / "datasets" / f"{name}.json"
        if not path.is_file():
            continue
        ds = read_json(path)
        if ds.get("source") != "fewshot":
            continue
        largest = max([largest] + [n[split] for n in ds["splits"].values() if split in n])
        if i == 0:
            train = shots * len(ds["classes"])
    if not largest + train:
        return 0.0
    size = 224
    if (Path(backbone) / "preprocessor_config.json").is_file():
        from gram.backbone import image_spec

        size = image_spec(backbone).size
    return (largest + train) * size * size * 3 / 2**20


def _domain(data_dir: str | Path, name: str, domain: str) -> dict:
    ds = load_dataset(data_dir, name)
    if domain not in ds["domains"]:
        raise KeyError(f"{data_dir}/datasets/{name}.json: no domain {domain!r} (has {ds['domains']})")
    return ds


def split_index(data_dir: str | Path, name: str, domain: str, split: str) -> SplitIndex:
    """Keys and labels of one split of dataset `name` in `domain`, nothing decoded."""
    ds = _domain(data_dir, name, domain)
    if ds.get("source") == "fewshot":
        from gram.data import paper

        listing, labels, subset = paper.domain_listing(data_dir, ds, domain, split)
        return SplitIndex(name, domain, split, ds["classes"], listing.keys, labels, subset)
    items = [it for it in ds["items"] if it["split"] == split]
    keys = [f"{domain}_{it['hexcode'].lower()}" for it in items]
    labels = np.array([it["label"] for it in items], dtype=np.int64)
    return SplitIndex(name, domain, split, ds["classes"], keys, labels, None)


def split_images(data_dir: str | Path, name: str, domain: str, split: str, size: int | None = None,
                 indices=None) -> Split:
    """Images and labels of one split of dataset `name` in `domain` (a vendor for emoji).

    Args:
        size: side of the decoded images (the backbone's `spec.size`); the paper profile's datasets
            need it (shortest side resized, centre crop), the emoji shards hold images of one size.
        indices: decode only these items of `split_index(...)`'s order (default: all).
    """
    ds = _domain(data_dir, name, domain)
    if ds.get("source") == "fewshot":
        from gram.data import fewshot, paper

        if size is None:
            raise ValueError(f"{name}: the paper profile's images are decoded at the backbone's size; pass size")
        listing, labels, subset = paper.domain_listing(data_dir, ds, domain, split)
        sp = fewshot.decode(listing, size, indices, domain=domain)
        idx = np.arange(len(labels)) if indices is None else np.asarray(indices, dtype=np.int64)
        return replace(sp, dataset=name, classes=list(ds["classes"]), labels=labels[idx], class_subset=subset)
    from gram.data.shards import load_images

    index = split_index(data_dir, name, domain, split)
    keys, labels = index.keys, index.labels
    if indices is not None:
        idx = np.asarray(indices, dtype=np.int64)
        keys, labels = [keys[i] for i in idx], labels[idx]
    keys, images, _ = load_images(Path(data_dir) / "shards" / domain, keys)
    return Split(name, domain, split, ds["classes"], images, labels, keys)


def run(cfg: DataParams, out_dir: str | Path) -> dict:
    if cfg.source == "npm":
        from gram.data import emoji

        return emoji.run(cfg, out_dir)
    from gram.data import paper

    return paper.run(cfg, out_dir)


def main(argv: list[str] | None = None) -> None:
    from gram.cli import stage_parser, stage_setup
    from gram.io import write_manifest

    p = stage_parser("download", __doc__)
    p.add_argument("--out", required=True, help="data directory of the profile, e.g. data/emoji")
    args = p.parse_args(argv)
    _, prof = stage_setup(args)
    run(prof.data, args.out)
    for name in ("shards", "datasets"):
        write_manifest(Path(args.out) / name)
