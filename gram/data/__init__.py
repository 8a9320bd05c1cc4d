"""The data of the pipeline: corpus shards, classification datasets and their splits. [ours]

Modules, bottom up: `names` (words of the emoji names), `shards` (webdataset shards of image-text pairs),
`corpus` (random access to the meta-training corpus), `fewshot` (the paper profile's listings and
decoding, and the few-shot sampler), `paper` / `emoji` (each profile's download), `fetch` and
`img2dataset` (opt-in downloads), `datasets` (reading any downloaded dataset), `download` (the stage),
`check` (a data check tool).

This file holds only the types a split is returned as, so that importing any submodule (which runs
this file first) imports nothing else of gram.

A dataset has domains: the emoji vendors, or for the paper profile `default` (the dataset itself)
plus the test sets of `data.datasets.<name>.shifts` (ImageNet-V2/-Sketch/-A/-R as domains of
ImageNet). A domain may hold only some classes (ImageNet-A and -R: 200 of the 1000); its
`class_subset` says which, labels stay in the dataset's label space, and scoring restricts the
prediction to that subset (`Split.restricted`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


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
