"""Few-shot prompt tuning: deterministic k-shot subsets and the tuning loop of any prompt learner. [sibling/ours]

Building block of the evaluation protocols (few-shot, base-to-new, cross-dataset, domain
generalisation). Not yet a pipeline stage: the protocol fan-out is the prompt-learners issue's work.

- `few_shot(keys, labels, k, seed, tag)`: k training items per class, chosen by a seeded hash of
  each item's key, so the subset depends only on (dataset, k, seed) and not on file order; its
  hash is recorded with every result.
- `tune(learner, pixels, labels, names, ...)`: cross-entropy of the learner's logits, SGD with
  momentum, one warm-up epoch at a constant low rate then cosine decay (CoOp's recipe [sibling]).
  When the learner has no visual prompts the image features do not depend on θ and are computed
  once (the text tower then dominates, and truncating it to the longest EOS pays directly).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F


def few_shot(keys: list[str], labels: np.ndarray, k: int, seed: int, tag: str) -> tuple[np.ndarray, str]:
    """Indices of k items per class (all of a class with fewer than k) and the subset's hash."""
    def rank(key: str) -> str:
        return hashlib.sha256(f"{tag}:{k}:{seed}:{key}".encode()).hexdigest()

    chosen = []
    for c in np.unique(labels):
        members = [i for i in np.flatnonzero(labels == c)]
        members.sort(key=lambda i: rank(keys[i]))
        chosen += members[:k]
    chosen = np.array(sorted(chosen), dtype=np.int64)
    digest = hashlib.sha256("\n".join(sorted(keys[i] for i in chosen)).encode()).hexdigest()[:16]
    return chosen, digest


def cosine_lr(step: int, total: int, base: float, warmup: int, warmup_lr: float) -> float:
    if step < warmup:
        return warmup_lr
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1.0 + math.cos(math.pi * min(1.0, t)))


def tune(learner, pixels: torch.Tensor, labels: torch.Tensor, names: list[str], steps: int = 200,
         lr: float = 2.0e-3, batch_size: int = 32, momentum: float = 0.9, warmup: int = 0,
         warmup_lr: float = 1.0e-5, seed: int = 0) -> list[float]:
    """Tune the learner's θ in place on (pixels, labels); returns the loss of every step.

    Args:
        pixels: preprocessed images [N, 3, H, W]; labels: [N] indices into `names`.
    """
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in learner.parameters()]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    fixed_images = learner.visual_prompts(learner.theta())[0] is None
    if fixed_images:
        with torch.no_grad():
            feats = learner.image_features(pixels)  # [N, E], the same at every θ
    labels = labels.to(learner.backbone.device)
    losses = []
    n = len(labels)
    for step in range(steps):
        idx = torch.randperm(n, generator=gen)[:batch_size] if batch_size < n else torch.arange(n)
        idx = idx.to(labels.device)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, warmup, warmup_lr)
        txt = learner.text_features(names)  # [C, E]
        img = feats[idx] if fixed_images else learner.image_features(pixels[idx.cpu()])
        logits = learner.clip.logit_scale.exp().float() * img @ txt.T
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def predict(learner, pixels: torch.Tensor, names: list[str], batch_size: int = 256) -> np.ndarray:
    """Class predictions [N] of the learner at its current θ."""
    txt = learner.text_features(names)
    preds = []
    for i in range(0, len(pixels), batch_size):
        preds.append((learner.image_features(pixels[i:i + batch_size]) @ txt.T).argmax(-1).cpu())
    return torch.cat(preds).numpy()
