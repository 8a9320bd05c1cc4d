"""Evaluate stage: score one method on every (dataset, domain) of a profile. [ours]

Writes one JSON per (dataset, domain) under `--out` (the method's directory), named
`<dataset>/<domain>.json`, with accuracy, class-balanced accuracy (mean per-class recall),
per-class accuracy, the majority and chance rates of the scored split, the parameters used and the
wall time. Methods:

- `zeroshot`: CLIP zero-shot with the single template `evaluate.template` (emoji: "an emoji of a {}").
- `zeroshot-ensemble`: the mean of the L2-normalised text features of the `evaluate.ensemble`
  templates, renormalised (the CLIP paper's prompt ensembling).

The same job also scores its method under every evaluation protocol of the profile, into
`<out>/protocols/<protocol>/<dataset>.json` (zero-shot has no shots and no seed, so one job per
method covers them). The protocol scorers (`score_protocol`) are shared with `gram tune`, which
runs the tuned methods; a classifier is anything with `predict(images, dataset, class_ids, names)`:

- few-shot: the test split of the dataset in `protocols.domain`, all classes;
- base-to-new: base classes scored among base classes, new among new, and their harmonic mean;
- cross-dataset: every dataset of `protocols.cross_dataset` in the same domain, test items whose
  emoji was in the tuning subset left out (their number is recorded);
- domain-generalisation: the source dataset in every domain of `protocols.domain_generalisation`.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gram.backbone import load
from gram.config import EvaluateParams, to_dict
from gram.data.datasets import dataset_domains, load_dataset, split_images
from gram.io import atomic_dir, write_json, write_manifest
from gram.stage import stage_parser, stage_setup

log = logging.getLogger("gram.evaluate")

METHODS = ("zeroshot", "zeroshot-ensemble")
PROTOCOLS = ("few-shot", "base-to-new", "cross-dataset", "domain-generalisation")


class NotApplicable(Exception):
    """The classifier cannot score these classes (a linear probe on classes it was not trained on)."""


def class_text_features(bb, classes: list[str], templates: list[str]) -> torch.Tensor:
    """Zero-shot classifier weights [C, D]: per class, the normalised mean over templates."""
    feats = []
    for t in templates:
        feats.append(bb.encode_texts([t.format(c) for c in classes]))  # [C, D]
    return F.normalize(torch.stack(feats).mean(0), dim=-1)


def scores(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> dict:
    """Accuracy, class-balanced accuracy over the classes present, per-class accuracy, baselines."""
    counts = np.bincount(labels, minlength=n_classes)
    hits = np.bincount(labels[pred == labels], minlength=n_classes)
    present = counts > 0
    per_class = np.where(present, hits / np.maximum(counts, 1), np.nan)
    return {
        "n": int(len(labels)), "n_classes": int(present.sum()),
        "accuracy": float((pred == labels).mean()),
        "balanced_accuracy": float(np.nanmean(per_class)),
        "per_class_accuracy": [None if np.isnan(a) else float(a) for a in per_class],
        "majority_accuracy": float(counts.max() / counts.sum()),
        "chance_balanced_accuracy": float(1.0 / present.sum()),
    }


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


class ZeroShot:
    """CLIP zero-shot: class weights from templates (averaged when there are several)."""

    def __init__(self, bb, templates: list[str], batch_size: int = 256):
        self.bb, self.templates, self.batch_size = bb, templates, batch_size

    def predict(self, images: np.ndarray, dataset: str, class_ids: list[int], names: list[str]) -> np.ndarray:
        w = class_text_features(self.bb, names, self.templates)  # [C, D]
        x = self.bb.encode_images(images, self.batch_size)  # [N, D]
        return (x @ w.T).argmax(-1).cpu().numpy()


def restrict(sp, class_ids: list[int], exclude: set[str] = frozenset()):
    """Images and labels of `sp` whose class is in class_ids (relabelled 0..len-1), minus excluded keys."""
    pos = {c: i for i, c in enumerate(class_ids)}
    in_classes = [i for i, lab in enumerate(sp.labels) if int(lab) in pos]
    keep = [i for i in in_classes if sp.keys[i] not in exclude]
    labels = np.array([pos[int(sp.labels[i])] for i in keep], dtype=np.int64)
    return sp.images[keep], labels, len(in_classes) - len(keep)


def score_split(clf, sp, class_ids: list[int], exclude: set[str] = frozenset()) -> dict:
    """Scores of the classifier on split `sp`, classes `class_ids` only, scored among themselves."""
    images, labels, n_excluded = restrict(sp, class_ids, exclude)
    names = [sp.classes[c] for c in class_ids]
    out = {"dataset": sp.dataset, "domain": sp.domain, "n_excluded": n_excluded}
    try:
        pred = clf.predict(images, sp.dataset, class_ids, names)
    except NotApplicable as e:
        return {**out, "applicable": False, "reason": str(e)}
    return {**out, "applicable": True, **scores(pred, labels, len(class_ids))}


def score_protocol(clf, protocol: str, dataset: str, data_dir: Path, pc, exclude: set[str] = frozenset(),
                   size: int | None = None) -> dict:
    """Score a (tuned or zero-shot) classifier under one protocol; returns {"results": [...], "summary": {...}}.

    Args:
        pc: the profile's `ProtocolParams`; exclude: keys of the tuning subset (cross-dataset only);
        size: the backbone's image size (the paper profile decodes its datasets at it).
    A target domain holding a subset of the classes (ImageNet-A/-R) is scored among that subset only.
    """
    decoded = partial(split_images, size=size)
    ds = load_dataset(data_dir, dataset)
    everything = list(range(len(ds["classes"])))
    results = []
    if protocol == "few-shot":
        results.append({"target": "all", **score_split(clf, decoded(data_dir, dataset, pc.domain, pc.split),
                                                       everything)})
    elif protocol == "base-to-new":
        sp = decoded(data_dir, dataset, pc.domain, pc.split)
        results.append({"target": "base", **score_split(clf, sp, ds["base"])})
        results.append({"target": "new", **score_split(clf, sp, ds["new"])})
    elif protocol == "cross-dataset":
        for target in pc.cross_dataset:
            sp = decoded(data_dir, target, pc.domain, pc.split)
            results.append({"target": target, **score_split(clf, sp, list(range(len(sp.classes))), exclude)})
    elif protocol == "domain-generalisation":
        for target in pc.domain_generalisation:
            sp = decoded(data_dir, dataset, target, pc.split)
            results.append({"target": target, **score_split(clf, sp, sp.class_subset or everything)})
    else:
        raise ValueError(f"unknown protocol {protocol!r} (one of {', '.join(PROTOCOLS)})")
    return {"results": results, "summary": summarise(protocol, results)}


def summarise(protocol: str, results: list[dict]) -> dict:
    """The protocol's headline numbers: base/new/HM, or the mean over targets."""
    ok = [r for r in results if r["applicable"]]
    out = {}
    for metric in ("accuracy", "balanced_accuracy"):
        if protocol == "base-to-new":
            base, new = results
            b = base[metric] if base["applicable"] else None
            n = new[metric] if new["applicable"] else None
            out[metric] = {"base": b, "new": n, "hm": None if b is None or n is None else harmonic_mean(b, n)}
        else:
            out[metric] = float(np.mean([r[metric] for r in ok])) if ok else None
    return out


def evaluate_one(bb, cfg: EvaluateParams, method: str, data_dir: Path, dataset: str, domain: str) -> dict:
    t0 = time.time()
    sp = split_images(data_dir, dataset, domain, cfg.split, size=bb.spec.size).restricted()
    templates = [cfg.template] if method == "zeroshot" else list(cfg.ensemble)
    if not templates:
        raise ValueError(f"method {method}: evaluate.ensemble is empty")
    w = class_text_features(bb, sp.classes, templates)  # [C, D]
    x = bb.encode_images(sp.images, cfg.batch_size)  # [N, D]
    pred = (x @ w.T).argmax(-1).cpu().numpy()
    out = {"dataset": dataset, "domain": domain, "method": method, "protocol": "zero-shot", "split": cfg.split,
           "classes": sp.classes, **scores(pred, sp.labels, len(sp.classes)),
           "config": {"templates": templates, "evaluate": to_dict(cfg)},
           "wall_time_s": round(time.time() - t0, 3)}
    log.info("%s %s/%s: acc %.3f, balanced %.3f (n=%d, %d classes)", method, dataset, domain,
             out["accuracy"], out["balanced_accuracy"], out["n"], out["n_classes"])
    return out


def protocol_jobs(grid, pc) -> list[tuple[str, str]]:
    """(protocol, dataset) pairs a zero-shot method is scored on: those the tuned runs report."""
    jobs = [(p, d) for d in grid.datasets for p in ("few-shot", "base-to-new")]
    if grid.transfer.dataset in grid.datasets:
        if pc.cross_dataset:
            jobs.append(("cross-dataset", grid.transfer.dataset))
        if pc.domain_generalisation:
            jobs.append(("domain-generalisation", grid.transfer.dataset))
    return jobs


def run(cfg: EvaluateParams, method: str, data_dir: str | Path, backbone_dir: str | Path, out: str | Path,
        device: str = "auto", dtype: str = "float32", grid=None, protocols=None, hub: bool = False) -> list[dict]:
    """Score `method` on every configured (dataset, domain) into `<out>/<dataset>/<domain>.json`, and
    under every protocol of `grid` into `<out>/protocols/<protocol>/<dataset>.json` (`hub`: `backbone_dir`
    may be a hub id, as with backbone.source: hub)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
    bb = load(backbone_dir, device, dtype, hub=hub)
    results = []
    templates = [cfg.template] if method == "zeroshot" else list(cfg.ensemble)
    with atomic_dir(out) as tmp:
        for dataset in cfg.datasets:
            for domain in dataset_domains(data_dir, dataset, cfg.domains):
                r = evaluate_one(bb, cfg, method, Path(data_dir), dataset, domain)
                write_json(tmp / dataset / f"{domain}.json", r)
                results.append(r)
        if grid is not None and protocols is not None and protocols.domain:
            clf = ZeroShot(bb, templates, protocols.batch_size)
            for protocol, dataset in protocol_jobs(grid, protocols):
                t0 = time.time()
                r = {"protocol": protocol, "dataset": dataset, "domain": protocols.domain, "method": method,
                     "kind": "zero-shot", "shots": 0, "seed": None, "subset_hash": None,
                     **score_protocol(clf, protocol, dataset, Path(data_dir), protocols, size=bb.spec.size),
                     "config": {"templates": templates, "protocols": to_dict(protocols)},
                     "wall_time_s": round(time.time() - t0, 3)}
                write_json(tmp / "protocols" / protocol / f"{dataset}.json", r)
                log.info("%s %s/%s: %s", method, protocol, dataset, r["summary"]["balanced_accuracy"])
    return results


def main(argv: list[str] | None = None) -> None:
    p = stage_parser("evaluate", __doc__)
    p.add_argument("--method", required=True, choices=METHODS, help="method to score")
    p.add_argument("--data", required=True, help="data directory of the profile, e.g. data/emoji")
    p.add_argument("--backbone", required=True, help="backbone directory, e.g. models/emoji/backbone")
    p.add_argument("--out", required=True, help="directory of this method's JSONs")
    args = p.parse_args(argv)
    params, prof = stage_setup(args)
    run(prof.evaluate, args.method, args.data, args.backbone, args.out, prof.backbone.device, prof.backbone.dtype,
        params.grid, prof.protocols, prof.backbone.source == "hub")
    write_manifest(args.out)
