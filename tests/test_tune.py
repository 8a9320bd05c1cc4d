"""Few-shot subsets and the tuning loop."""

from __future__ import annotations

import numpy as np
import torch

from gram import backbone as B
from gram.data import split_images
from gram.prompts import VPT, CoOp
from gram.tune import few_shot, predict, tune


def test_few_shot_subset_depends_only_on_dataset_k_seed():
    keys = [f"k{i}" for i in range(30)]
    labels = np.array([i % 3 for i in range(30)])
    idx, h = few_shot(keys, labels, 4, seed=1, tag="subgroup")
    assert len(idx) == 12 and all((labels[idx] == c).sum() == 4 for c in range(3))
    perm = np.random.default_rng(0).permutation(30)
    idx2, h2 = few_shot([keys[i] for i in perm], labels[perm], 4, seed=1, tag="subgroup")
    assert sorted(keys[i] for i in idx) == sorted(keys[perm[i]] for i in idx2) and h == h2
    assert few_shot(keys, labels, 4, seed=2, tag="subgroup")[1] != h
    small, _ = few_shot(keys, labels, 50, seed=1, tag="subgroup")
    assert len(small) == 30  # classes with fewer than k items give all they have


def test_tuning_fits_the_support_set(tiny_data, tiny_trained_dir):
    bb = B.load(tiny_trained_dir, "cpu")
    sp = split_images(tiny_data, "subgroup", "apple", "train")  # the held-out vendor
    px = B.preprocess(sp.images, bb.spec)
    labels = torch.as_tensor(sp.labels)
    for learner, lr in [(CoOp(bb, init=None, n_ctx=4, generator=torch.Generator().manual_seed(0)), 0.002),
                      (VPT(bb, n_tokens=2, generator=torch.Generator().manual_seed(0)), 0.01)]:
        before = (predict(learner, px, sp.classes) == sp.labels).mean()
        losses = tune(learner, px, labels, sp.classes, steps=100, lr=lr, batch_size=len(labels), seed=0)
        after = (predict(learner, px, sp.classes) == sp.labels).mean()
        # full batch: the loss on the support set must fall clearly, and the fit not get worse
        assert losses[-1] < 0.8 * losses[0] and after > before, (type(learner), losses[0], losses[-1], before, after)
    assert not any(p.requires_grad for p in bb.model.parameters())
