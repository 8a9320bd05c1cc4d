"""Tune stage: one tuned method, one protocol, one (dataset, shots, seed) per job. [sibling/ours]

`gram tune --protocol P --dataset D --method M --shots K --seed S --out RUN.json` tunes the method
`<profile>.methods.M` on K shots per class of dataset D (train split, in `protocols.domain`) and
scores it with the protocol's scorer (`gram.evaluate.score_protocol`), writing one JSON: the
scores per target, the protocol's summary, the method's config, the subset hash and wall times.

- few-shot: tune on all classes; score the test split. `--save-prompt` keeps θ (safetensors) for
  the transfer protocols.
- base-to-new: tune on the base classes only; score base and new classes separately.
- cross-dataset / domain-generalisation: no tuning: `--load-prompt` reads the few-shot θ of
  `grid.transfer` and scores it on the other datasets / domains.

Building blocks:
- `gram.data.fewshot.few_shot(keys, labels, k, seed, tag)`: k training items per class, chosen by a
  seeded hash of each item's key, so the subset depends only on (dataset, k, seed) and not on file
  order; its hash is recorded with every result.
- `tune(learner, pixels, labels, names, ...)`: cross-entropy of the learner's logits; Adam or SGD
  with momentum under a cosine schedule, after an optional warm-up at a constant small learning rate,
  with optional weight decay (CoOp's recipe: SGD 2e-3, one warm-up epoch at 1e-5, weight decay 5e-4;
  a recipe's `warmup`, `warmup_lr` and `weight_decay`). Image features are computed once when θ has
  no visual part and text features once when it has no text part.
- `LinearProbe`: L2-regularised logistic regression on frozen image features (scikit-learn).
- GRAM methods (`meta_init`, `meta_regulator`; `--meta` = the meta-train output of the method's
  recipe in `grid.gram`): start from the meta-learned θ and/or pass every gradient through the frozen
  ψ_φ(g; h) before the optimiser step (`gram.meta`). Init only, regulator only and both are three
  method recipes over the same meta-training run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gram.backbone import load
from gram.config import MethodParams, to_dict
from gram.data.datasets import load_dataset, split_images, split_index
from gram.data.fewshot import few_shot
from gram.evaluate import PROTOCOLS, NotApplicable, score_protocol
from gram.images import preprocess
from gram.io import check_finite, file_sha256, write_json
from gram.prompts import make_learner
from gram.prompts.encoders import encode_image_prompted, normalize
from gram.regulator import META, load_meta, meta_run
from gram.stage import stage_parser, stage_setup
from gram.tensorio import load_prompt, save_prompt

log = logging.getLogger("gram.tune")


def max_shots(labels: np.ndarray, class_ids: list[int]) -> int:
    """The largest meaningful `--shots`: the most train images any class of `class_ids` has (with more, every
    class gives all its images, the subset of this maximum); 0 when the classes have none."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=max(class_ids, default=-1) + 1)
    return int(counts[class_ids].max()) if len(class_ids) else 0


def cosine_lr(step: int, total: int, base: float, warmup: int = 0, warmup_lr: float = 1.0e-5) -> float:
    """The learning rate of step `step` (0-based) of `total`: `warmup_lr` for the first `warmup` steps (CoOp's
    constant warm-up), then `base` decaying to 0 along a half cosine over the remaining steps."""
    if step < warmup:
        return warmup_lr
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1.0 + math.cos(math.pi * min(1.0, t)))


def tune(learner, pixels: torch.Tensor, labels: torch.Tensor, names: list[str], steps: int = 200,
         lr: float = 2.0e-3, batch_size: int = 32, optimizer: str = "sgd", momentum: float = 0.9,
         warmup: int = 0, warmup_lr: float = 1.0e-5, weight_decay: float = 0.0, seed: int = 0,
         progress: bool = False, regulator=None, what: str = "tune") -> list[float]:
    """Tune the learner's θ in place on (pixels, labels); returns the loss of every step.

    Args:
        pixels: preprocessed images [N, 3, H, W]; labels: [N] indices into `names`.
        batch_size: images per step (0 or >= N: the full batch every step).
        warmup, warmup_lr: the first `warmup` steps run at `warmup_lr`, the rest follow the cosine from `lr`
            (`cosine_lr`).
        weight_decay: sgd: L2, the optimiser adds weight_decay·θ to the gradient; adam: decoupled
            (`torch.optim.AdamW`), θ ← θ − lr·weight_decay·θ besides the Adam step. Either way it is the
            optimiser's, so a regulator does not see it.
        regulator: a frozen `gram.regulator.Regulators` (GRAM's ψ_φ): every step's gradient g of θ is
            replaced by ψ_φ(g; h) before the optimiser sees it, h = the mean frozen image feature of
            the step's images [sibling].
        what: the run, as an error names it.

    Raises:
        DivergedError at the first non-finite loss or θ, naming `what`, the step and the value.
    """
    gen = torch.Generator().manual_seed(seed)
    params = list(learner.parameters())
    if optimizer == "adam":  # AdamW at weight_decay 0 is Adam: the decoupled decay is skipped
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r} (adam or sgd)")
    theta = learner.theta()
    fixed_images = learner.visual_prompts(theta)[0] is None
    fixed_texts = learner.context_vectors(theta, 1) is None
    with torch.no_grad():
        feats = learner.image_features(pixels) if fixed_images else None  # [N, E], the same at every θ
        txt_fixed = learner.text_features(names) if fixed_texts else None  # [C, E]
    labels = labels.to(learner.backbone.device)
    if regulator is not None:
        with torch.no_grad():
            frozen = feats if fixed_images else frozen_features(learner, pixels)  # [N, E], for h
    n = len(labels)
    full = batch_size <= 0 or batch_size >= n
    losses = []
    for step in tqdm(range(steps), desc="tune", unit="step", disable=not progress, mininterval=2.0):
        idx = torch.arange(n) if full else torch.randperm(n, generator=gen)[:batch_size]
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, warmup, warmup_lr)
        txt = txt_fixed if fixed_texts else learner.text_features(names)  # [C, E]
        img = feats[idx.to(feats.device)] if fixed_images else learner.image_features(pixels[idx])
        logits = learner.clip.logit_scale.exp().float() * img @ txt.T
        loss = F.cross_entropy(logits, labels[idx.to(labels.device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if regulator is not None:
            with torch.no_grad():
                grads = {k: p.grad for k, p in learner.named_parameters() if p.grad is not None}
                h = frozen[idx.to(frozen.device)].mean(0)
                for k, g in regulator(grads, h).items():
                    grads[k].copy_(g)
        opt.step()
        losses.append(loss.item())
        check_finite(what, step + 1, steps, losses[-1], learner.named_parameters())
    return losses


@torch.no_grad()
def frozen_features(learner, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image features [N, E] of the frozen backbone (no visual prompts)."""
    bb = learner.backbone
    return torch.cat([normalize(encode_image_prompted(bb.model, pixels[i:i + batch_size].to(bb.device, bb.dtype),
                                                      None)) for i in range(0, len(pixels), batch_size)])


@torch.no_grad()
def predict(learner, pixels: torch.Tensor, names: list[str], batch_size: int = 256) -> np.ndarray:
    """Class predictions [N] of the learner at its current θ."""
    txt = learner.text_features(names)
    preds = []
    for i in range(0, len(pixels), batch_size):
        preds.append((learner.image_features(pixels[i:i + batch_size]) @ txt.T).argmax(-1).cpu())
    return torch.cat(preds).numpy()


# ------------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------------
def is_gram(m: MethodParams) -> bool:
    """A GRAM method: it starts from the meta-learned θ, or regulates its gradients with ψ_φ, or both."""
    return m.meta_init or m.meta_regulator


class LinearProbe:
    """Multinomial logistic regression on L2-normalised frozen image features (the CLIP paper's probe)."""

    def __init__(self, bb, dataset: str, class_ids: list[int], C: float, batch_size: int = 256):
        self.bb, self.dataset, self.class_ids, self.C, self.batch_size = bb, dataset, list(class_ids), C, batch_size
        self.weight = self.bias = None

    def fit(self, images: np.ndarray, labels: np.ndarray) -> None:
        from sklearn.linear_model import LogisticRegression

        x = self.bb.encode_images(images, self.batch_size).cpu().numpy()
        clf = LogisticRegression(C=self.C, max_iter=1000).fit(x, labels)
        w = np.zeros((len(self.class_ids), x.shape[1]), np.float32)
        b = np.full(len(self.class_ids), -np.inf, np.float32)  # a class without shots is never predicted
        if len(clf.classes_) == 2:  # scikit-learn keeps one row for two classes: logit of class 1
            w[clf.classes_[1]], b[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
            w[clf.classes_[0]], b[clf.classes_[0]] = 0.0, 0.0
        else:
            w[clf.classes_], b[clf.classes_] = clf.coef_, clf.intercept_
        self.weight, self.bias = torch.from_numpy(w), torch.from_numpy(b)

    def theta(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias}

    def load_theta(self, theta: dict[str, torch.Tensor]) -> None:
        self.weight, self.bias = theta["weight"], theta["bias"]

    def predict(self, images: np.ndarray, dataset: str, class_ids: list[int], names: list[str]) -> np.ndarray:
        if dataset != self.dataset or not set(class_ids) <= set(self.class_ids):
            raise NotApplicable(f"a linear probe trained on {self.dataset} has no weights for these classes")
        rows = [self.class_ids.index(c) for c in class_ids]
        x = self.bb.encode_images(images, self.batch_size).cpu()
        return (x @ self.weight[rows].T + self.bias[rows]).argmax(-1).numpy()


class Tuned:
    """A prompt learner as a classifier: its θ scores any class names, and images through its prompts."""

    def __init__(self, learner, dataset: str, class_ids: list[int], batch_size: int = 256):
        self.learner, self.dataset, self.class_ids, self.batch_size = learner, dataset, list(class_ids), batch_size

    def predict(self, images: np.ndarray, dataset: str, class_ids: list[int], names: list[str]) -> np.ndarray:
        if getattr(self.learner, "class_specific", False) and (dataset != self.dataset or class_ids != self.class_ids):
            raise NotApplicable("class-specific context exists only for the classes it was tuned on")
        if len(images) == 0:
            return np.zeros(0, np.int64)
        with torch.no_grad():
            txt = self.learner.text_features(names)
            out = []
            for i in range(0, len(images), self.batch_size):
                px = preprocess(images[i:i + self.batch_size], self.learner.backbone.spec)
                out.append((self.learner.image_features(px) @ txt.T).argmax(-1).cpu())
        return torch.cat(out).numpy()


# ------------------------------------------------------------------------------------------------
# one run
# ------------------------------------------------------------------------------------------------
def fit(bb, name: str, m: MethodParams, dataset: str, pc, shots: int, seed: int, data_dir: Path,
        class_ids: list[int], meta_dir: str | Path | None = None) -> tuple[object, dict]:
    """Tune method `m` on `shots` per class of `class_ids` (train split, domain `pc.domain`); a GRAM
    method (meta_init / meta_regulator) takes θ and ψ_φ from the meta-train output `meta_dir`."""
    index = split_index(data_dir, dataset, pc.domain, "train")  # nothing decoded: ImageNet's train split is large
    pos = {c: i for i, c in enumerate(class_ids)}
    rows = [i for i, lab in enumerate(index.labels) if int(lab) in pos]
    keys = [index.keys[i] for i in rows]
    labels = np.array([pos[int(index.labels[i])] for i in rows], dtype=np.int64)
    idx, digest = few_shot(keys, labels, shots, seed, dataset)
    images = split_images(data_dir, dataset, pc.domain, "train", size=bb.spec.size,
                          indices=[rows[i] for i in idx]).images  # only the chosen shots
    labels = labels[idx]
    names = [index.classes[c] for c in class_ids]
    t0 = time.time()
    torch.manual_seed(seed)
    meta_info = None
    if m.kind == "linear-probe":
        clf = LinearProbe(bb, dataset, class_ids, m.C, pc.batch_size)
        clf.fit(images, labels)
        losses = []
    else:
        learner = make_learner(bb, m, len(class_ids), seed)
        regulator = None
        if is_gram(m):
            run_dir, run = meta_run(meta_dir, seed)  # recipes with several seeds: the run of this seed
            theta0, regs, mm = load_meta(run_dir, learner)
            if m.meta_init:
                learner.load_state_dict({k: v.to(bb.device) for k, v in theta0.items()})
            if m.meta_regulator:
                regulator = regs.to(bb.device)
            meta_info = {"recipe": mm["recipe"], "run": run, "sha256": file_sha256(run_dir / META),
                         "init": m.meta_init, "regulator": m.meta_regulator}
        losses = tune(learner, preprocess(images, bb.spec), torch.as_tensor(labels), names, m.steps,
                      m.lr, m.batch_size, m.optimizer, warmup=m.warmup, warmup_lr=m.warmup_lr,
                      weight_decay=m.weight_decay, seed=seed, progress=True, regulator=regulator,
                      what=f"tune {name} ({dataset}, {shots} shots, seed {seed})")
        clf = Tuned(learner, dataset, class_ids, pc.batch_size)
    info = {"meta": meta_info, "subset_hash": digest, "n_train": int(len(idx)),
            "train_keys": sorted(keys[i] for i in idx),
            "train": {"steps": len(losses), "loss_first": losses[0] if losses else None,
                      "loss_last": losses[-1] if losses else None, "time_s": round(time.time() - t0, 3)}}
    log.info("%s on %s (%d classes, %d shots each -> %d images, subset %s): %s", name, dataset, len(class_ids),
             shots, len(idx), digest, f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "fitted")
    return clf, info


def restore(bb, m: MethodParams, name: str, path: str | Path, pc) -> tuple[object, dict]:
    """The classifier saved by a few-shot run; its method config must match `m`."""
    theta, meta = load_prompt(path)
    if meta.get("method_config") != to_dict(m):
        raise ValueError(f"{path}: tuned with {meta.get('method_config')}, but methods.{name} is now {to_dict(m)}; "
                         "rerun its few-shot job")
    class_ids = meta["class_ids"]
    if m.kind == "linear-probe":
        clf = LinearProbe(bb, meta["dataset"], class_ids, m.C, pc.batch_size)
        clf.load_theta(theta)
    else:
        learner = make_learner(bb, m, len(class_ids), meta["seed"])
        learner.load_state_dict({k: v.to(bb.device) for k, v in theta.items()})
        clf = Tuned(learner, meta["dataset"], class_ids, pc.batch_size)
    return clf, meta


def run(params, prof, protocol: str, dataset: str, method: str, shots: int, seed: int, data_dir: str | Path,
        backbone_dir: str | Path, out: str | Path, save: str | Path | None = None,
        load_from: str | Path | None = None, meta_dir: str | Path | None = None) -> dict:
    """One (protocol, dataset, method, shots, seed) run; writes the record to `out`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r} (one of {', '.join(PROTOCOLS)})")
    if method not in prof.methods:
        raise KeyError(f"method {method!r} is not defined in {params.profile}.methods "
                       f"(defined: {', '.join(prof.methods) or 'none'})")
    pc, m = prof.protocols, prof.methods[method]
    tunes = protocol in ("few-shot", "base-to-new")
    if tunes and is_gram(m) and meta_dir is None:
        raise ValueError(f"method {method!r} is a GRAM method (meta_init/meta_regulator): pass --meta, the "
                         "meta-train output of its recipe in grid.gram")
    if meta_dir is not None and not is_gram(m):
        raise ValueError(f"--meta given, but method {method!r} uses neither meta_init nor meta_regulator")
    if not pc.domain:
        raise ValueError("protocols.domain is not set: the domain in which to tune and test")
    data_dir, t0 = Path(data_dir), time.time()
    ds = load_dataset(data_dir, dataset)
    if tunes:  # checked before the backbone loads: a bad --shots fails at once
        class_ids = list(range(len(ds["classes"]))) if protocol == "few-shot" else ds["base"]
        most = max_shots(split_index(data_dir, dataset, pc.domain, "train").labels, class_ids)
        if not 1 <= shots <= most:
            raise ValueError(f"--shots {shots} is outside the allowed range 1..{most}: training images per class, "
                             f"at most the most train images any {'base ' if protocol == 'base-to-new' else ''}"
                             f"class of {dataset} has in domain {pc.domain}")
    elif shots < 1:
        raise ValueError(f"--shots {shots} is outside the allowed range (at least 1): the shots of the few-shot "
                         "prompt to score, one of grid.shots")
    bb = load(backbone_dir, prof.backbone.device, prof.backbone.dtype, hub=prof.backbone.source == "hub")
    exclude: set[str] = set()
    if tunes:
        clf, info = fit(bb, method, m, dataset, pc, shots, seed, data_dir, class_ids, meta_dir)
        if save is not None:
            meta = {"method": method, "method_config": to_dict(m), "dataset": dataset, "domain": pc.domain,
                    "shots": shots, "seed": seed, "class_ids": class_ids, "subset_hash": info["subset_hash"],
                    "train_keys": info["train_keys"], "meta": info["meta"]}
            save_prompt(save, clf.theta() if m.kind == "linear-probe" else clf.learner.theta(), meta)
    else:
        if load_from is None:
            raise ValueError(f"protocol {protocol} scores tuned prompts without tuning: pass --load-prompt")
        clf, meta = restore(bb, m, method, load_from, pc)
        if (meta["dataset"], meta["shots"], meta["seed"]) != (dataset, shots, seed):
            raise ValueError(f"{load_from}: prompt of {meta['dataset']} k={meta['shots']} seed {meta['seed']}, "
                             f"asked for {dataset} k={shots} seed {seed}")
        exclude = set(meta["train_keys"])
        info = {"meta": meta.get("meta"), "subset_hash": meta["subset_hash"], "n_train": len(meta["train_keys"]),
                "train_keys": meta["train_keys"], "train": None}
    scored = score_protocol(clf, protocol, dataset, data_dir, pc, exclude, size=bb.spec.size)
    record = {"protocol": protocol, "dataset": dataset, "domain": pc.domain, "method": method, "kind": m.kind,
              "shots": shots, "seed": seed, "subset_hash": info["subset_hash"], "n_train": info["n_train"],
              **scored, "train": info["train"], "meta": info["meta"],
              "config": {"method": to_dict(m), "protocols": to_dict(pc)},
              "wall_time_s": round(time.time() - t0, 3)}
    write_json(out, record)
    log.info("%s %s/%s k=%d seed %d: %s", method, protocol, dataset, shots, seed,
             json.dumps(record["summary"]["balanced_accuracy"]))
    return record


def main(argv: list[str] | None = None) -> None:
    p = stage_parser("tune", __doc__)
    p.add_argument("--protocol", required=True, choices=PROTOCOLS, help="evaluation protocol")
    p.add_argument("--dataset", required=True, help="source dataset (a key of data.datasets)")
    p.add_argument("--method", required=True, help="tuned method (a key of <profile>.methods)")
    p.add_argument("--shots", required=True, type=int, help="training images per class: 1 to the most train "
                                                            "images any class of the dataset has")
    p.add_argument("--seed", required=True, type=int, help="seed of the subset, the init and the batches")
    p.add_argument("--data", required=True, help="data directory of the profile, e.g. data/emoji")
    p.add_argument("--backbone", required=True, help="backbone directory, e.g. models/emoji/backbone")
    p.add_argument("--out", required=True, help="the run's JSON record")
    p.add_argument("--save-prompt", default=None, help="few-shot/base-to-new: also write the tuned θ here")
    p.add_argument("--load-prompt", default=None, help="cross-dataset/domain-generalisation: the θ to score")
    p.add_argument("--meta", default=None, help="GRAM methods: the meta-train output of the method's recipe "
                                                "(grid.gram), e.g. models/emoji/meta/coop")
    args = p.parse_args(argv)
    params, prof = stage_setup(args)
    run(params, prof, args.protocol, args.dataset, args.method, args.shots, args.seed, args.data, args.backbone,
        args.out, args.save_prompt, args.load_prompt, args.meta)
