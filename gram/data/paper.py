"""The paper profile's download stage: datasets in CoOp's layout and the corpus shards. [ours]

`gram download` with `data.source: paper` does not copy images. It
  1. fetches each missing dataset of `data.datasets` (and of their `shifts`) from its official
     source when `data.paper.fetch` is on and the dataset has one (`gram.data.fetch`: checksums
     kept in the repo); datasets that need a manual step are collected, and the stage stops after
     everything else with the exact steps and the expected layout of each;
  2. lists every split once (`gram.data.fewshot.read`, which checks the split files against the
     images) and writes the listing (`datasets/<name>/<domain>.<split>.json`: image folder,
     relative paths, labels) and the dataset description `datasets/<name>.json`: class names,
     base/new classes (the first ⌈C/2⌉ labels are base, as in CoCoOp's protocol), the domains
     (`default` and the shifts), per-domain class subsets and split sizes;
  3. resolves the corpus of every domain of `data.vendors.meta` (`data.paper.corpus`, a brace
     pattern, folder or URL; or the opt-in img2dataset output) to a manifest
     `shards/<domain>.json` that every later stage reads (`gram.data.shards.corpus_shards`);
  4. writes `download.json` (counts, fetch records, corpus size).
Later stages decode images from the listings (`gram.data.datasets.split_images`), so the data root must be
readable where they run. A shift's labels are mapped into its dataset's label space through
`Listing.imagenet_index`; a shift holding a subset of the classes records it (`class_subsets`).
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from gram.config import DataParams
from gram.data import fetch
from gram.data.fewshot import SPECS, DatasetMissing, Listing, read
from gram.data.shards import expand_shards, is_local, local_path, refuse_pipes
from gram.io import atomic_dir, read_json, write_json

log = logging.getLogger("gram.data.paper")

DEFAULT_DOMAIN = "default"


class ManualSteps(RuntimeError):
    """Some datasets need a manual step; the message lists them all."""


def base_new(n_classes: int) -> tuple[list[int], list[int]]:
    """Base = the first ⌈C/2⌉ labels, new = the rest (the split CoCoOp's base-to-new protocol uses)."""
    m = math.ceil(n_classes / 2)
    return list(range(m)), list(range(m, n_classes))


def listing_doc(listing: Listing) -> dict:
    return {"dataset": listing.dataset, "split": listing.split, "image_dir": str(listing.image_dir),
            "source": listing.source, "classes": list(listing.classes), "paths": list(listing.paths),
            "labels": listing.labels.tolist(), "imagenet_index": listing.imagenet_index}


@lru_cache(maxsize=32)
def _read_listing(path: str, mtime: float) -> Listing:
    d = read_json(path)
    return Listing(d["dataset"], d["split"], Path(d["image_dir"]), d["paths"], np.asarray(d["labels"], dtype=np.int64),
                   d["classes"], d["source"], d["imagenet_index"])


def listing_path(data_dir: str | Path, name: str, domain: str, split: str) -> Path:
    return Path(data_dir) / "datasets" / name / f"{domain}.{split}.json"


def domain_listing(data_dir: str | Path, ds: dict, domain: str, split: str) -> tuple[Listing, np.ndarray, list | None]:
    """(listing, labels in the dataset's label space, class subset or None) of one domain's split."""
    path = listing_path(data_dir, ds["name"], domain, split)
    if not path.is_file():
        have = ", ".join(ds["splits"][domain])
        raise FileNotFoundError(f"{path}: no {split!r} split of {ds['name']}/{domain} (has {have})")
    listing = _read_listing(str(path), path.stat().st_mtime)
    labels = listing.labels
    if domain != DEFAULT_DOMAIN and listing.imagenet_index is not None:
        labels = np.asarray(listing.imagenet_index, dtype=np.int64)[labels]
    return listing, labels, ds["class_subsets"].get(domain)


def describe(root: Path, name: str, shifts: list[str], out: Path) -> dict:
    """List every split of `name` and its shifts; write the listings under `out/<name>/`; the description."""
    listings: dict[str, dict[str, Listing]] = {DEFAULT_DOMAIN: {s: read(root, name, s) for s in SPECS[name].splits}}
    for shift in shifts:
        listings[shift] = {s: read(root, shift, s) for s in SPECS[shift].splits}
    main = listings[DEFAULT_DOMAIN]
    classes = next(iter(main.values())).classes
    for split, lst in main.items():
        if lst.classes != classes:
            raise ValueError(f"{lst.source}: the {split} split names {len(lst.classes)} classes differently from "
                             f"the other splits of {name}")
    subsets: dict[str, list[int] | None] = {DEFAULT_DOMAIN: None}
    for shift in shifts:
        for split, lst in listings[shift].items():
            if lst.imagenet_index is None:
                raise ValueError(f"{shift}: not a test set of ImageNet's classes, so it cannot be a shift of {name}")
            bad = [i for i, c in zip(lst.imagenet_index, lst.classes) if i >= len(classes) or classes[i] != c]
            if bad:
                raise ValueError(f"{lst.source}: class {bad[0]} of {shift} is not class {bad[0]} of {name} "
                                 f"({len(bad)} such); the shift must use {name}'s class names")
            ids = sorted(set(lst.imagenet_index))
            subsets[shift] = ids if len(ids) < len(classes) else None
    for domain, splits in listings.items():
        for split, lst in splits.items():
            write_json(out / name / f"{domain}.{split}.json", listing_doc(lst))
    base, new = base_new(len(classes))
    return {"source": "fewshot", "name": name, "root": str(root), "classes": classes, "base": base, "new": new,
            "domains": list(listings), "domain_datasets": {DEFAULT_DOMAIN: name, **{s: s for s in shifts}},
            "class_subsets": subsets,
            "splits": {d: {s: len(lst) for s, lst in splits.items()} for d, splits in listings.items()}}


def ensure_present(cfg: DataParams, names: list[str]) -> dict[str, dict]:
    """Fetch what is missing (when allowed); raise `ManualSteps` listing every dataset still missing."""
    root, records, manual = Path(cfg.paper.root), {}, []
    for name in names:
        try:
            for split in SPECS[name].splits:
                read(root, name, split)
            records[name] = {"dataset": name, "status": "present"}
            continue
        except (DatasetMissing, FileNotFoundError) as e:
            missing = str(e)
        if not cfg.paper.fetch:
            manual.append(f"{name}: {missing}\n  (data.paper.fetch is off; `gram fetch-data --root {root} "
                          f"--dataset {name}` fetches it where a public source exists)")
            continue
        try:
            records[name] = fetch.fetch(root, name)
        except fetch.ManualStep as e:
            manual.append(f"{name}:\n{e}")
    if manual:
        raise ManualSteps(f"{len(manual)} dataset(s) under {root} need a manual step; everything else is in "
                          "place. Do the steps below, then rerun the download stage.\n\n" + "\n\n".join(manual))
    return records


def corpus_manifest(domain: str, spec, allow_pipe: bool = False) -> dict:
    """The resolved shard list of one corpus domain; a local shard that is absent is an error naming it, and so
    is a `pipe:` address unless `allow_pipe` (`data.paper.allow_pipe`)."""
    shards = []
    for url in refuse_pipes(expand_shards(spec, allow_pipe=True), allow_pipe, f"data.paper.corpus.{domain}"):
        entry = {"url": url}
        if is_local(url):
            path = local_path(url)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard of corpus domain {domain!r} (data.paper.corpus.{domain} "
                                        f"= {spec!r}) does not exist")
            entry["bytes"] = path.stat().st_size
        shards.append(entry)
    return {"domain": domain, "spec": spec, "shards": shards}


def corpus_spec(cfg: DataParams, domain: str):
    if domain in cfg.paper.corpus:
        return cfg.paper.corpus[domain]
    i2d = cfg.paper.img2dataset
    if i2d.enabled and i2d.domain == domain:
        return i2d.output
    raise KeyError(f"data.vendors.meta names corpus domain {domain!r}, but data.paper.corpus has no entry for it "
                   f"(has {sorted(cfg.paper.corpus)}) and data.paper.img2dataset does not build it")


def run(cfg: DataParams, out_dir: str | Path) -> dict:
    """Prepare the paper profile's data under `out_dir` (see the module docstring)."""
    out = Path(out_dir)
    unknown = sorted({n for n, d in cfg.datasets.items() for n in [n, *d.shifts]} - set(SPECS))
    if unknown:
        raise ValueError(f"data.datasets names {unknown}; the paper profile reads {', '.join(SPECS)}")
    names = [n for name, d in cfg.datasets.items() for n in [name, *d.shifts]]
    manifests = {d: corpus_manifest(d, corpus_spec(cfg, d), cfg.paper.allow_pipe)  # cheap errors first
                 for d in cfg.vendors.meta}
    fetched = ensure_present(cfg, list(dict.fromkeys(names)))
    root = Path(cfg.paper.root)
    record = {"source": "paper", "root": str(root), "datasets": {}, "fetch": fetched, "corpus": {}}
    with atomic_dir(out / "datasets") as tmp:
        for name, d in cfg.datasets.items():
            desc = describe(root, name, list(d.shifts), tmp)
            write_json(tmp / f"{name}.json", desc)
            record["datasets"][name] = {"classes": len(desc["classes"]), "splits": desc["splits"]}
            log.info("%s: %d classes, %s", name, len(desc["classes"]), desc["splits"])
    with atomic_dir(out / "shards") as tmp:
        for domain, man in manifests.items():
            write_json(tmp / f"{domain}.json", man)
            record["corpus"][domain] = {"shards": len(man["shards"]),
                                        "bytes": sum(s.get("bytes", 0) for s in man["shards"])}
            log.info("corpus %s: %d shards", domain, len(man["shards"]))
    write_json(out / "download.json", record)
    return record
