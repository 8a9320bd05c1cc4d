"""Evaluate stage: score one method on every (dataset, domain) of a profile. [ours]

Writes one JSON per (dataset, domain) under `--out` (the method's directory), named
`<dataset>/<domain>.json`, with accuracy, class-balanced accuracy (mean per-class recall),
per-class accuracy, the majority and chance rates of the scored split, the parameters used and the
wall time. Methods:

- `zeroshot`: CLIP zero-shot with the single template `evaluate.template` ("a {} emoji.").
- `zeroshot-ensemble`: the mean of the L2-normalised text features of the `evaluate.ensemble`
  templates, renormalised (the CLIP paper's prompt ensembling).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gram.config import EvaluateParams, to_dict
from gram.io import write_json

log = logging.getLogger("gram.evaluate")

METHODS = ("zeroshot", "zeroshot-ensemble")


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


def evaluate_one(bb, cfg: EvaluateParams, method: str, data_dir: Path, dataset: str, domain: str) -> dict:
    from gram.data import split_images

    t0 = time.time()
    sp = split_images(data_dir, dataset, domain, cfg.split)
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


def run(cfg: EvaluateParams, method: str, data_dir: str | Path, backbone_dir: str | Path, out: str | Path,
        device: str = "auto", dtype: str = "float32") -> list[dict]:
    """Score `method` on every configured (dataset, domain); write `<out>/<dataset>/<domain>.json`."""
    from gram.backbone import load
    from gram.io import atomic_dir

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
    bb = load(backbone_dir, device, dtype)
    results = []
    with atomic_dir(out) as tmp:
        for dataset in cfg.datasets:
            for domain in cfg.domains:
                r = evaluate_one(bb, cfg, method, Path(data_dir), dataset, domain)
                write_json(tmp / dataset / f"{domain}.json", r)
                results.append(r)
    return results


def main(argv: list[str] | None = None) -> None:
    from gram.cli import stage_parser, stage_setup

    p = stage_parser("evaluate", __doc__)
    p.add_argument("--method", required=True, choices=METHODS, help="method to score")
    p.add_argument("--data", required=True, help="data directory of the profile, e.g. data/emoji")
    p.add_argument("--backbone", required=True, help="backbone directory, e.g. models/emoji/backbone")
    p.add_argument("--out", required=True, help="directory of this method's JSONs")
    args = p.parse_args(argv)
    _, prof = stage_setup(args)
    run(prof.evaluate, args.method, args.data, args.backbone, args.out, prof.backbone.device, prof.backbone.dtype)
