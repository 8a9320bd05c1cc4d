"""Meta-train stage: GRAM's meta-learned prompt initialisation θ and gradient regulator ψ_φ. [abstract/sibling/ours]

GRAM meta-learns, on image-text pairs only, an initialisation of the prompt parameters θ and a
function ψ_φ that regulates their gradient [abstract]. Per outer step, for a batch of the tasks
stage's meta-tasks (support and query sets of pairs from different CHC clusters):

    g_S  = ∇θ L_S(θ)                        torch.func.grad; detached unless `second_order`
    θ'   = θ − α · ψ_φ(g_S; h)               `inner_steps` times (h: mean frozen support image feature)
    loss = L_Q(θ') [+ λ (c − (1 + mean_rows cos(g_Q, ψ_φ(g_S)))/2)²]
    θ, φ ← Adam(∇θ,φ of the mean loss over the batch [+ anchor·Σ‖θ − θ₀‖²]), each gradient norm-clipped

First order (the default, as in the sibling method [sibling]): ∂θ'/∂θ = I, yet φ gets its exact
gradient through θ' = θ − α ψ_φ(g_S). `second_order: true` differentiates through g_S as well.

L_S and L_Q are the text-as-class loss [ours, method-notes §1]: the n captions of a set are its n
classes, each prompted as `[BOS] θ_text caption [EOS]` (captions truncated to fit the context);
loss = cross-entropy of CLIP's logit scale times cos(f(image_i), g(prompt_j)) with target i (and
the transposed term with `symmetric`). With N-way tasks (`tasks.kind: nway`, gram/tasks.py) a set is
N clusters' pairs, the classes are the clusters' phrases, each prompted as `[BOS] θ_text phrase [EOS]`,
and the loss is the N-way cross-entropy of each image against the N phrases: the same use of θ as
few-shot prompt tuning, on classes that the query set replaces by their neighbours. θ is any prompt method's (CoOp, VPT, joint), so the same
loop meta-learns text, visual or both prompts. The meta-regulariser [sibling] (λ = `reg_lambda`,
form "mix" only) pulls the gate c towards SUPMER's target (1 + mean row-wise cos(g_Q, ψ_φ(g_S)))/2:
the agreement, row by row (one row per prompt token, over all θ tensors), of the query gradient at θ'
(detached) with the regulated support gradient of the first inner step. Its gradient reaches φ (the gate,
and ψ through the cosine) but, first order, not θ: g_S and g_Q are detached, so the term does not depend
on θ; with `second_order` it reaches θ through g_S(θ) inside ψ_φ(g_S).

The corpus (`load_corpus`) holds only what the tasks' pairs need: their captions and frozen image
features [N, E] (encoded once, in batches), and `Corpus.pixels`, a `gram.data.corpus.LazyPixels` that
reads and decodes a set's images when a loss asks for them. A local tar shard is indexed from its
headers, so a used row costs its location (about 30 bytes) and one seek per read; a shard addressed by
URL, `pipe:` or s3:// (or compressed) cannot be sought, so the encoded images of its used rows stay in
memory (gram/data/corpus.py).

On CUDA the losses run under bf16 autocast (ψ stays fp32); on the CPU in fp32. A checkpoint (θ, φ,
the optimiser, the history) is written every `checkpoint_every` steps to `.<out>.ckpt/` beside the
output and resumed when the parameters and inputs are the same; the task order is a function of
(seed, step), so a resumed run equals an uninterrupted one.

Several processes (gram/distributed.py): with `GRAM_NPROC` > 1 (or `auto` and several GPUs) `gram meta`
restarts itself under torchrun. Each rank takes every N-th task of an outer step, divides its losses by
the whole batch's size, and the ranks sum their gradients before the clip and the Adam step, so every
rank holds the same θ, φ and the run equals the one-process run with the same batch (to float rounding).
Rank 0 alone validates, checkpoints and writes the outputs; a checkpoint resumes with any process count.

`gram meta --recipe NAME --data D --chc C --tasks T --backbone B --out models/<p>/meta/NAME` writes
  meta.safetensors  `theta.<name>` (the initialisation) and `phi.<name>` (ψ's parameters); metadata:
                    the recipe with its prompt and regulator, the context width.
  meta.json         the history (losses and gate per step) and the meta-validation: the mean query
                    loss over validation tasks before and after meta-training, unadapted and after one
                    regulated inner step (the tasks stage's tasks-val over held-out clusters when it wrote
                    them, else a sample of the training tasks); `select`; `world_size`, the number of
                    processes.

Early stopping (`select.dataset`) [ours]: a class-name dev task, the `select.split` (val) split of a
dataset in the meta-training domains (data.vendors.meta; never a held-out domain, never test), scored
with θ's prompts of its class names (N-way cross-entropy, no adaptation) at the initialisation and every
`select.every` steps; the θ and φ of the best dev score (`select.metric`: accuracy by default) are
written, the initialisation included (so a meta-training that only moves θ away from names that
classify is undone).
  meta.png          the loss curves.

Downstream (`gram tune` with a method of `grid.gram`, `gram tpt`): `gram.regulator.load_meta` gives θ and ψ_φ back.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gram import distributed
from gram.backbone import backbone_fingerprint, load
from gram.cluster import KEYS
from gram.config import MetaParams, to_dict
from gram.data.corpus import LazyPixels, locate_pairs
from gram.distributed import World
from gram.io import atomic_dir, check_finite, config_digest, file_sha256, save_png, write_json, write_manifest
from gram.prompts import make_learner
from gram.prompts.encoders import encode_image_prompted, normalize
from gram.prototypes import PROTOTYPES, load_structure
from gram.regulator import META, Regulators, make_regulators, regulate
from gram.stage import stage_parser, stage_setup
from gram.tasks import VAL_TASKS, Labelled, load_tasks, task_file
from gram.tensorio import load_tensors, save_tensors, save_theta

log = logging.getLogger("gram.meta")


# ------------------------------------------------------------------------------------------------
# the corpus a task draws from
# ------------------------------------------------------------------------------------------------
@dataclass
class Corpus:
    """The pairs of the hierarchy rows, in row order.

    pixels: the preprocessed images [N, 3, crop, crop] as `pixels[rows]` (a `LazyPixels`, which decodes
    the rows it is asked for; tests may pass a tensor); frozen: the frozen backbone's L2-normalised image
    features [N, E] (the task context h, and the image side of the loss when θ has no visual part);
    captions: N strings. Rows no task uses have zero features and an empty caption, and `pixels` refuses them."""

    keys: list[str]
    captions: list[str]
    pixels: LazyPixels | torch.Tensor
    frozen: torch.Tensor


def load_corpus(bb, data_dir: str | Path, keys: list[str], rows: np.ndarray, batch_size: int = 256,
                cache_rows: int = 256, workers: int = 0, allow_pipe: bool = False) -> Corpus:
    """The corpus of the pairs `keys` (hierarchy order, `<domain>/<key>`) of which the tasks use `rows`.

    The pairs are found in the shards of each domain by `gram.data.corpus.locate_pairs` (a local
    uncompressed tar is indexed and only the members of `rows` are read, with a seek each; any other shard
    is streamed once and the encoded images of `rows` are kept in memory). The frozen features are encoded
    `batch_size` rows at a time (in row order) and no pixels are kept: `Corpus.pixels` is a `LazyPixels`
    (`cache_rows`, `workers`: its LRU cache and decoding threads). A `pipe:` address of a manifest is refused
    unless `allow_pipe` (`data.paper.allow_pipe`).

    Raises:
        FileNotFoundError naming a domain without shards; ValueError when a pair of `rows` is in no shard;
        ShardError naming a shard that cannot be read.
    """
    captions, shards, local, raw, streamed = locate_pairs(data_dir, keys, rows, allow_pipe)
    pixels = LazyPixels(bb.spec, keys, shards, local, raw, cache_rows, workers)
    frozen = torch.zeros(len(keys), bb.model.config.projection_dim)
    order = sorted(set(int(r) for r in rows))
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            px = pixels.load(idx, cache=False)  # [b, 3, crop, crop], dropped after the batch
            feats = encode_image_prompted(bb.model, px.to(bb.device, bb.dtype), None)
            frozen[idx] = normalize(feats).cpu()
    log.info("corpus: %d of %d shards indexed, %d streamed (%d rows held as bytes)", len(shards) - streamed,
             len(shards), streamed, len(raw))
    return Corpus(keys=keys, captions=captions, pixels=pixels, frozen=frozen)


# ------------------------------------------------------------------------------------------------
# the meta-learner
# ------------------------------------------------------------------------------------------------
def autocast_for(device: torch.device, mode: str):
    """bf16 autocast on CUDA ("auto" or "bf16"), on the CPU only when asked ("bf16"); else nothing."""
    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def attention_for(second_order: bool):
    """The math SDPA kernel when the meta-gradient differentiates through a gradient (the fused CPU and
    flash kernels have no double backward); the default kernels otherwise."""
    if not second_order:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


class MetaLearner:
    """θ (the learner's parameters) and φ (the regulators'), with the text-as-class task loss."""

    def __init__(self, learner, regs: Regulators, cfg: MetaParams, corpus: Corpus, structure=None):
        if cfg.context == "structure" and structure is None:
            raise ValueError("context: structure needs the prototypes (a gram.regulator.StructureContext)")
        self.learner, self.regs, self.cfg, self.corpus = learner, regs, cfg, corpus
        self.structure = structure.to(learner.backbone.device) if cfg.context == "structure" else None
        self.device = learner.backbone.device
        self.theta = dict(learner.named_parameters())
        self.theta0 = {k: v.detach().clone() for k, v in self.theta.items()}  # the init, for `anchor`
        self.phi = dict(regs.named_parameters())
        self.visual = learner.visual_prompts(self.theta)[0] is not None
        self.scale = learner.clip.logit_scale.exp().float().detach()
        self.frozen = corpus.frozen.to(self.device)
        self.best: dict | None = None  # select: θ, φ of the best dev score so far, with its step and scores
        self.dev_initial: dict | None = None  # select: the dev score of the initialisation

    # -- losses -----------------------------------------------------------------------------
    def set_loss(self, theta: dict[str, torch.Tensor], rows: np.ndarray | Labelled) -> torch.Tensor:
        """The loss of one set at θ: text-as-class for rows of pairs (their captions are the classes), N-way
        cross-entropy for a `Labelled` set (its class names are the classes)."""
        labelled = isinstance(rows, Labelled)
        rows, labels, names = (rows.rows, rows.labels, rows.names) if labelled else (rows, None, None)
        if self.visual:  # numpy rows: a tensor made here would be torch.func's, which LazyPixels cannot read
            img = self.learner.image_features(self.corpus.pixels[np.asarray(rows, dtype=np.int64)], theta)
        else:
            img = self.frozen[torch.as_tensor(rows, dtype=torch.long, device=self.device)]
        txt = self.learner.text_features(names if labelled else [self.corpus.captions[r] for r in rows], theta)
        dt = torch.promote_types(torch.promote_types(img.dtype, txt.dtype), torch.float32)  # fp32 at least
        logits = self.scale * img.to(dt) @ txt.to(dt).T  # [n, n] or [n, N]
        if labelled:
            return F.cross_entropy(logits, torch.as_tensor(labels, dtype=torch.long, device=logits.device))
        target = torch.arange(len(rows), device=logits.device)
        loss = F.cross_entropy(logits, target)
        if self.cfg.symmetric:
            loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
        return loss

    def context(self, rows: np.ndarray | Labelled) -> torch.Tensor:
        """h: the mean frozen image feature of a set, or (context: structure) its relation to the prototypes."""
        rows = rows.rows if isinstance(rows, Labelled) else rows
        h = self.frozen[torch.as_tensor(rows, dtype=torch.long, device=self.device)].mean(0)
        return h if self.structure is None else self.structure(h)

    def adapt(self, theta, phi, support: np.ndarray, steps: int | None = None, lr: float | None = None):
        """θ' after the regulated inner steps on `support`; returns (θ', support loss at θ, ψ(g_S) of step 1)."""
        cfg = self.cfg
        h = self.context(support)
        th, first_loss, first_reg = theta, None, None
        for k in range(cfg.inner_steps if steps is None else steps):
            g, loss = torch.func.grad_and_value(lambda t: self.set_loss(t, support))(th)
            if not cfg.second_order:
                g = {n: v.detach() for n, v in g.items()}
            reg = regulate(self.regs, phi, g, h)
            th = {n: t - (cfg.inner_lr if lr is None else lr) * reg[n] for n, t in th.items()}
            if k == 0:
                first_loss, first_reg = loss.detach(), reg
        return th, first_loss, first_reg

    def task_loss(self, theta, phi, support: np.ndarray, query: np.ndarray):
        """The outer loss of one task and its parts (support loss, query loss, gate)."""
        cfg = self.cfg
        with attention_for(cfg.second_order):
            adapted, ls, reg_s = self.adapt(theta, phi, support)
            lq = self.set_loss(adapted, query)
        loss = lq
        gate = self.gate_value(phi, support)
        if cfg.reg_lambda > 0:
            names = list(adapted)
            g_q = torch.autograd.grad(lq, [adapted[n] for n in names], retain_graph=True)
            loss = loss + cfg.reg_lambda * (gate - regulariser_target({n: g.detach() for n, g in zip(names, g_q)},
                                                                       reg_s)) ** 2
        return loss, ls, lq.detach(), gate.detach()

    def gate_value(self, phi, support: np.ndarray) -> torch.Tensor:
        """Mean "mix" gate c over the regulators at φ (NaN for the "gate" and "precond" forms, which have none)."""
        if self.cfg.regulator.form != "mix":
            return torch.tensor(float("nan"), device=self.device)
        h = self.context(support) if self.cfg.regulator.context else None
        return torch.func.functional_call(_Gates(self.regs), {f"regs.{n}": v for n, v in phi.items()}, (h,)).mean()

    @torch.no_grad()
    def validate(self, tasks, ids: np.ndarray) -> dict[str, float]:
        """Mean query loss over tasks `ids`: at θ (unadapted) and at θ' (one regulated inner step)."""
        plain, adapted = [], []
        for t in ids:
            s, q = task_sets(tasks, t)
            plain.append(float(self.set_loss(self.theta, q)))
            with torch.enable_grad():
                th, _, _ = self.adapt(self.theta, self.phi, s)
            adapted.append(float(self.set_loss({n: v.detach() for n, v in th.items()}, q)))
        return {"query_loss": round(float(np.mean(plain)), 5), "query_loss_adapted": round(float(np.mean(adapted)), 5)}


def task_sets(tasks, t: int):
    """(support, query) of task t: `Tasks.sets` (row arrays, or `Labelled` sets of N-way tasks); any object with
    `support`/`query` lists of rows (tests) gives its rows."""
    return tasks.sets(t) if hasattr(tasks, "sets") else (tasks.support[t], tasks.query[t])


class DevTask:
    """The class-name dev task of `select` [ours]: one split of a dataset in the meta-training domains, scored
    with θ's prompts of the dataset's class names (N-way cross-entropy and accuracy, no adaptation)."""

    def __init__(self, learner, pixels: torch.Tensor, labels: np.ndarray, names: list[str], batch_size: int = 256):
        self.learner, self.names, self.batch_size = learner, names, batch_size
        self.labels = torch.as_tensor(labels, dtype=torch.long, device=learner.backbone.device)
        self.pixels = pixels
        theta = dict(learner.named_parameters())
        self.visual = learner.visual_prompts(theta)[0] is not None
        self.frozen = None if self.visual else self._images(theta)  # no visual prompt: θ does not change them

    @torch.no_grad()
    def _images(self, theta) -> torch.Tensor:
        return torch.cat([self.learner.image_features(self.pixels[i:i + self.batch_size], theta).float()
                          for i in range(0, len(self.pixels), self.batch_size)])

    @torch.no_grad()
    def score(self, theta: dict[str, torch.Tensor]) -> dict[str, float]:
        img = self._images(theta) if self.visual else self.frozen
        txt = self.learner.text_features(self.names, theta).float()
        logits = self.learner.clip.logit_scale.exp().float() * img @ txt.T
        return {"loss": round(float(F.cross_entropy(logits, self.labels)), 5),
                "accuracy": round(float((logits.argmax(1) == self.labels).float().mean()), 5)}


def load_dev_task(learner, data_dir: str | Path, dataset: str, domains: list[str], split: str) -> DevTask:
    """The dev task of `select`: `split` of `dataset` in every one of `domains` (the meta-training ones)."""
    from gram.data.datasets import split_images
    from gram.images import preprocess

    px, labels, names = [], [], None
    for d in domains:
        sp = split_images(data_dir, dataset, d, split, size=learner.backbone.spec.size)
        if not len(sp.labels):
            raise ValueError(f"meta select: dataset {dataset!r} has no {split} images in domain {d!r}")
        px.append(preprocess(sp.images, learner.backbone.spec))
        labels.append(np.asarray(sp.labels))
        names = list(sp.classes)
    return DevTask(learner, torch.cat(px), np.concatenate(labels), names)


def anchor_loss(theta: dict[str, torch.Tensor], theta0: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
    """`anchor`'s term weight·Σ‖θ − θ₀‖² over every θ tensor [ours]: its gradient 2·weight·(θ − θ₀) pulls the
    meta-learned θ back towards its initialisation (the words of the prompt) at every outer step."""
    return weight * sum(((theta[k] - theta0[k].to(theta[k].dtype)) ** 2).sum() for k in theta)


def regulariser_target(g_query: dict[str, torch.Tensor], reg_support: dict[str, torch.Tensor]) -> torch.Tensor:
    """SUPMER's target of the gate [sibling]: (1 + mean row-wise cos(g_Q, ψ(g_S)))/2, in [0, 1].

    Args:
        g_query: the query gradient at θ' per θ tensor; reg_support: ψ_φ(g_S) per θ tensor (same names).
    Returns:
        a scalar: the rows are the last dimension of each tensor, pooled over all tensors before the mean (a
        zero row counts as cosine 0).
    """
    cos = [F.cosine_similarity(g.reshape(-1, g.shape[-1]), reg_support[n].to(g.dtype).reshape(-1, g.shape[-1]),
                               dim=-1) for n, g in g_query.items()]  # [rows of tensor n] each
    return 0.5 * (1.0 + torch.cat(cos).mean())


class _Gates(torch.nn.Module):
    """The "mix" gates of all regulators as one forward (so `functional_call` can evaluate them at any φ)."""

    def __init__(self, regs: Regulators):
        super().__init__()
        self.regs = regs

    def forward(self, h):
        return torch.stack([m.gate(h) for m in self.regs.psi.values()])


# ------------------------------------------------------------------------------------------------
# the outer loop
# ------------------------------------------------------------------------------------------------
def task_batch(n_tasks: int, per_step: int, step: int, seed: int) -> np.ndarray:
    """Task ids of outer step `step`: consecutive slices of per-epoch permutations, a function of
    (seed, step) only, so a resumed run draws what an uninterrupted one would."""
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(i, n_tasks)
        out.append(int(_epoch_order(n_tasks, seed, epoch)[pos]))
    return np.array(out, dtype=np.int64)


@functools.lru_cache(maxsize=4)
def _epoch_order(n_tasks: int, seed: int, epoch: int) -> np.ndarray:
    """The task permutation of one epoch (cached: every step of the epoch reads it)."""
    return np.random.default_rng([seed, epoch]).permutation(n_tasks)


def _opt_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    sd = opt.state_dict()["state"]
    return {f"opt.{i}.{k}": torch.as_tensor(v).detach().cpu() for i, st in sd.items() for k, v in st.items()}


def _load_opt(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        if name.startswith("opt."):
            _, i, k = name.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def save_checkpoint(ckpt: Path, ml: MetaLearner, opt, step: int, digest: str, history: list) -> None:
    tensors = {**{f"theta.{n}": v.detach().cpu() for n, v in ml.theta.items()},
               **{f"phi.{n}": v.detach().cpu() for n, v in ml.phi.items()}, **_opt_tensors(opt)}
    best = ml.best
    if best is not None:  # the dev task's best step so far (select), kept across a resume
        tensors.update({f"best.theta.{n}": v for n, v in best["theta"].items()})
        tensors.update({f"best.phi.{n}": v for n, v in best["phi"].items()})
    meta = {"step": step, "digest": digest, "history": history,
            **({"best": {k: v for k, v in best.items() if k not in ("theta", "phi")},
                "dev_initial": ml.dev_initial} if best is not None else {})}
    with atomic_dir(ckpt) as tmp:
        save_tensors(tmp / "state.safetensors", tensors, meta)


def load_checkpoint(ckpt: Path, ml: MetaLearner, opt, digest: str) -> tuple[int, list]:
    """Resume from `ckpt` when it was written with the same digest; returns (step, history)."""
    if not (ckpt / "state.safetensors").exists():
        return 0, []
    try:
        tensors, meta = load_tensors(ckpt / "state.safetensors")
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint is ignored, never trusted
        log.warning("ignoring checkpoint %s: unreadable (%s)", ckpt, e)
        return 0, []
    if meta.get("digest") != digest:
        log.info("ignoring checkpoint %s: written with other parameters or inputs", ckpt)
        return 0, []
    with torch.no_grad():
        for n, v in ml.theta.items():
            v.copy_(tensors[f"theta.{n}"])
        for n, v in ml.phi.items():
            v.copy_(tensors[f"phi.{n}"])
    _load_opt(opt, {k: v.to(ml.device) if k.split(".")[-1] != "step" else v for k, v in tensors.items()})
    if "best" in meta:
        ml.best = {**meta["best"], "theta": {n: tensors[f"best.theta.{n}"] for n in ml.theta},
                   "phi": {n: tensors[f"best.phi.{n}"] for n in ml.phi}}
        ml.dev_initial = meta.get("dev_initial")
    log.info("resuming meta-training from step %d (%s)", meta["step"], ckpt)
    return int(meta["step"]), list(meta["history"])


def _keep_if_best(ml: MetaLearner, step: int, score: dict) -> None:
    """Keep θ, φ of `step` as `ml.best` when its dev score is the best so far (`select.metric`: the highest
    accuracy or the lowest loss; ties: the earlier step)."""
    best = ml.best
    better = (score["accuracy"] > best["accuracy"] if ml.cfg.select.metric == "accuracy" else
              score["loss"] < best["loss"]) if best is not None else True
    if better:
        ml.best = {"step": step, **score, "theta": {n: v.detach().cpu().clone() for n, v in ml.theta.items()},
                   "phi": {n: v.detach().cpu().clone() for n, v in ml.phi.items()}}


def meta_train(ml: MetaLearner, tasks, cfg: MetaParams, ckpt: Path | None = None, digest: str = "",
               progress: bool = True, stop_after: int | None = None, world: World = World(),
               what: str = "meta", dev: DevTask | None = None) -> list[dict]:
    """Run the outer loop of `cfg` (resuming from `ckpt`); returns the per-step history.

    `dev` (select): scored at the initialisation and every `cfg.select.every` steps (and the last); the
    history records `dev_loss`/`dev_accuracy` there, and `ml.best` holds the θ, φ of the best dev score.

    Raises DivergedError (naming `what`, the step and the value) at the first non-finite loss, θ or φ,
    before that step is checkpointed.

    `stop_after`: return after this many steps of this call (tests interrupt a run with it).
    `world`: this process's rank among the meta-training processes (gram.distributed.init); each rank
    computes its share of every outer step's tasks, and only rank 0 shows progress and checkpoints."""
    opt = torch.optim.Adam([{"params": list(ml.theta.values()), "lr": cfg.lr},
                            {"params": list(ml.phi.values()), "lr": cfg.regulator_lr}])
    start, history = load_checkpoint(ckpt, ml, opt, digest) if ckpt is not None else (0, [])
    if not distributed.same_on_all(start, world):
        raise RuntimeError(f"{ckpt}: the meta-training processes resumed from different steps (every process "
                           f"must read the same checkpoint directory)")
    params = list(ml.theta.values()) + list(ml.phi.values())
    distributed.broadcast_params(params, world)  # every rank starts from rank 0's θ, φ
    if dev is not None and start == 0:
        ml.best = None
        ml.dev_initial = dev.score(ml.theta)
        _keep_if_best(ml, 0, ml.dev_initial)
    amp = autocast_for(ml.device, cfg.autocast)
    bar = tqdm(range(start, cfg.steps), desc="meta", unit="step", disable=not (progress and world.main),
               mininterval=2.0, initial=start, total=cfg.steps)
    done = 0
    for step in bar:
        ids = task_batch(len(tasks), cfg.tasks_per_step, step, cfg.seed)
        opt.zero_grad(set_to_none=True)
        parts = []
        for t in distributed.shard(ids, world):
            with amp:
                loss, ls, lq, gate = ml.task_loss(ml.theta, ml.phi, *task_sets(tasks, t))
            (loss / len(ids)).backward()  # the whole batch's size: the ranks' sum is the batch mean
            parts.append(torch.stack([ls.float(), lq.float(), gate.float()]))
        if cfg.anchor > 0 and world.main:  # once per step: the ranks' gradients are summed next
            anchor_loss(ml.theta, ml.theta0, cfg.anchor).backward()
        distributed.all_reduce_grads(params, world)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(ml.theta.values()), cfg.grad_clip)
            torch.nn.utils.clip_grad_norm_(list(ml.phi.values()), cfg.grad_clip)
        opt.step()
        # [support, query, gate, tasks] summed over this rank's tasks, then over the ranks
        sums = torch.zeros(4, device=ml.device)
        if parts:
            sums[:3] = torch.stack(parts).sum(0)
            sums[3] = len(parts)
        sums = distributed.all_reduce_sum(sums, world)
        ls, lq, gate = (sums[:3] / sums[3]).tolist()  # one host sync per outer step
        check_finite(what, step + 1, cfg.steps, ls + lq, [*ml.theta.items(), *ml.phi.items()])
        history.append({"step": step + 1, "support_loss": round(ls, 5), "query_loss": round(lq, 5),
                        "gate": None if gate != gate else round(gate, 5)})
        if dev is not None and ((step + 1) % cfg.select.every == 0 or step + 1 == cfg.steps):
            score = dev.score(ml.theta)  # every rank holds the same θ, so every rank keeps the same best
            history[-1].update(dev_loss=score["loss"], dev_accuracy=score["accuracy"])
            _keep_if_best(ml, step + 1, score)
        bar.set_postfix(support=f"{ls:.3f}", query=f"{lq:.3f}", refresh=False)
        if world.main and ckpt is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 \
                and step + 1 < cfg.steps:
            save_checkpoint(ckpt, ml, opt, step + 1, digest, history)
        done += 1
        if stop_after is not None and done >= stop_after:
            break
    bar.close()
    return history


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------
def save_meta(path: Path, ml: MetaLearner, meta: dict) -> None:
    """The meta-learned θ and φ, in float32, as `gram.regulator.load_meta` reads them."""
    save_theta(path, ml.theta, ml.phi, meta)


def _plot(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("support_loss", "support loss at θ"), ("query_loss", "query loss at θ' (adapted)")):
        y = np.array([h[key] for h in history])
        w = max(1, len(y) // 50)
        smooth = np.convolve(y, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, label=label)
    ax.set_xlabel("outer step")
    ax.set_ylabel(f"text-as-class loss (mean of {max(1, len(history) // 50)} steps)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def run(prof, recipe: str, data_dir: str | Path, chc_dir: str | Path, tasks_dir: str | Path,
        backbone_dir: str | Path, out: str | Path, progress: bool = True,
        prototypes_dir: str | Path | None = None, world: World = World()) -> dict:
    """Meta-train recipe `<profile>.meta.<recipe>`; writes `out` (meta.safetensors, meta.json, meta.png).
    `prototypes_dir` (the prototypes stage's output) is read by recipes with context: structure.
    `world` (gram.distributed.init): every rank trains; rank 0 alone validates and writes `out`.

    With `seeds` = N > 1 the recipe is trained N times (seeds seed .. seed + N − 1): run 0 is written at
    the top of `out` as with one seed, run k in `out/run<k>/`, and meta.json lists every run under `runs`.
    Finished runs wait in `.<out>.runs/` beside `out` (kept while the inputs are the same), so an
    interrupted job resumes at its first unfinished run."""
    if recipe not in prof.meta:
        raise KeyError(f"meta recipe {recipe!r} is not defined in <profile>.meta "
                       f"(defined: {', '.join(prof.meta) or 'none'})")
    cfg = prof.meta[recipe]
    args = (data_dir, chc_dir, tasks_dir, backbone_dir)
    if cfg.seeds == 1:
        return _run_one(prof, recipe, cfg, *args, Path(out), progress, prototypes_dir, world)
    out = Path(out)
    staging = out.with_name(f".{out.name}.runs")
    inputs = [Path(tasks_dir) / task_file(cfg.tasks), Path(tasks_dir) / VAL_TASKS, Path(chc_dir) / KEYS]
    if cfg.context == "structure" and prototypes_dir is not None:
        inputs.append(Path(prototypes_dir) / PROTOTYPES)
    key = config_digest({"config": to_dict(cfg), "backbone": backbone_fingerprint(backbone_dir),
                         "files": {f.name: file_sha256(f) for f in inputs if f.exists()}})
    stamp = staging / "inputs.json"
    if world.main and staging.exists() and not (stamp.exists() and json.loads(stamp.read_text()).get("digest") == key):
        shutil.rmtree(staging)  # runs of other parameters or inputs
    if world.main:
        staging.mkdir(parents=True, exist_ok=True)
        write_json(stamp, {"digest": key})
    distributed.barrier(world)
    infos = []
    for k in range(cfg.seeds):
        sub = staging / f"run{k}"
        if (sub / "meta.json").exists():  # finished before an interruption
            infos.append(json.loads((sub / "meta.json").read_text()))
            log.info("meta %s: run %d of %d (seed %d) finished earlier", recipe, k + 1, cfg.seeds, cfg.seed + k)
            continue
        log.info("meta %s: run %d of %d (seed %d)", recipe, k + 1, cfg.seeds, cfg.seed + k)
        infos.append(_run_one(prof, recipe, dataclasses.replace(cfg, seed=cfg.seed + k, seeds=1), *args, sub,
                              progress, prototypes_dir, world))
    if not world.main:
        return infos[0]
    runs = [{"run": k, "seed": cfg.seed + k, "dir": "." if k == 0 else f"run{k}", "validation": i.get("validation"),
             "select": i.get("select"), "last50": i.get("last50")} for k, i in enumerate(infos)]
    with atomic_dir(out) as tmp:
        for f in (staging / "run0").iterdir():
            shutil.copy2(f, tmp / f.name)
        for k in range(1, cfg.seeds):
            shutil.copytree(staging / f"run{k}", tmp / f"run{k}")
        top = json.loads((tmp / "meta.json").read_text())
        write_json(tmp / "meta.json", {**top, "config": to_dict(cfg), "runs": runs})
    shutil.rmtree(staging)
    return {**infos[0], "runs": runs}


def _run_one(prof, recipe: str, cfg: MetaParams, data_dir: str | Path, chc_dir: str | Path, tasks_dir: str | Path,
             backbone_dir: str | Path, out: Path, progress: bool = True, prototypes_dir: str | Path | None = None,
             world: World = World()) -> dict:
    """One meta-training run of `cfg` (its own seed) into `out`."""
    out, t0 = Path(out), time.time()
    tasks, tmeta = load_tasks(tasks_dir, cfg.tasks)
    keys_path = Path(chc_dir) / KEYS
    if not keys_path.exists():
        raise FileNotFoundError(f"{keys_path}: missing (did the cluster stage run?)")
    keys_sha = file_sha256(keys_path)
    if tmeta.get("keys_sha256") != keys_sha:
        raise ValueError(f"{Path(tasks_dir) / task_file(cfg.tasks)} was drawn from another hierarchy than "
                         f"{keys_path}; rerun the tasks stage")
    keys = keys_path.read_text().splitlines()
    bb = load(backbone_dir, prof.backbone.device, prof.backbone.dtype)
    torch.manual_seed(cfg.seed)
    learner = make_learner(bb, cfg.prompt, 0, cfg.seed)
    for p in learner.parameters():  # θ in float32 whatever the backbone's dtype
        p.data = p.data.float()
    context_dim = int(bb.model.config.projection_dim)
    regs = make_regulators(dict(learner.named_parameters()), cfg.regulator, context_dim).to(bb.device)
    val_tasks = load_tasks(tasks_dir, "val")[0] if (Path(tasks_dir) / VAL_TASKS).exists() else None
    rows = np.unique(np.concatenate(tasks.support + tasks.query + ([] if val_tasks is None else
                                                                   val_tasks.support + val_tasks.query)))
    t_load = time.time()
    corpus = load_corpus(bb, data_dir, keys, rows, allow_pipe=prof.data.paper.allow_pipe)
    log.info("corpus: %d pairs of %d encoded in %.1f s; %d tasks (%s)", len(rows), len(keys), time.time() - t_load,
             len(tasks), cfg.tasks)
    structure, proto_sha = None, None
    if cfg.context == "structure":
        structure, proto_sha = load_structure(prototypes_dir, cfg.structure, f"meta.{recipe}")
    ml = MetaLearner(learner, regs, cfg, corpus, structure)
    if val_tasks is not None:  # tasks over held-out clusters (tasks.val_fraction)
        val_set, val_ids = val_tasks, np.arange(len(val_tasks))
    else:  # a sample of the training tasks
        val_set = tasks
        val_ids = np.random.default_rng([cfg.seed, 1 << 20]).choice(len(tasks), min(64, len(tasks)), replace=False)
    n_val = len(val_ids)
    before = ml.validate(val_set, val_ids) if world.main else None
    dev = None
    if cfg.select.dataset is not None:
        dev = load_dev_task(learner, data_dir, cfg.select.dataset, list(prof.data.vendors.meta), cfg.select.split)
    digest = config_digest({"config": to_dict(cfg), "tasks": file_sha256(Path(tasks_dir) / task_file(cfg.tasks)),
                            "backbone": backbone_fingerprint(backbone_dir), "keys": keys_sha,
                            **({"val_tasks": file_sha256(Path(tasks_dir) / VAL_TASKS)} if val_tasks is not None else {}),
                            **({"prototypes": proto_sha} if proto_sha else {})})
    ckpt = out.with_name(f".{out.name}.ckpt")
    t_train = time.time()
    history = meta_train(ml, tasks, cfg, ckpt, digest, progress, world=world, what=f"meta {recipe}", dev=dev)
    train_s = time.time() - t_train
    select = None
    if dev is not None:  # the θ, φ of the best dev step are the output
        with torch.no_grad():
            for n, v in ml.theta.items():
                v.copy_(ml.best["theta"][n])
            for n, v in ml.phi.items():
                v.copy_(ml.best["phi"][n])
        scored = [h for h in history if "dev_loss" in h]
        select = {"dataset": cfg.select.dataset, "split": cfg.select.split, "domains": list(prof.data.vendors.meta),
                  "classes": len(dev.names), "images": len(dev.labels),
                  "best": {k: ml.best[k] for k in ("step", "loss", "accuracy")},
                  "last": {"step": scored[-1]["step"], "loss": scored[-1]["dev_loss"],
                           "accuracy": scored[-1]["dev_accuracy"]} if scored else None}
        select["initial"] = ml.dev_initial
        log.info("select: dev %s accuracy %.3f (loss %.4f) at step %d of %d", cfg.select.dataset, ml.best["accuracy"],
                 ml.best["loss"], ml.best["step"], len(history))
    if not world.main:  # rank 0 validates and publishes; the others wait for it, then leave
        distributed.barrier(world)
        return {"recipe": recipe, "steps": len(history), "world_size": world.size}
    after = ml.validate(val_set, val_ids)
    last = history[-min(len(history), 50):]
    info = {"recipe": recipe, "config": to_dict(cfg), "context_dim": context_dim, "kind": cfg.prompt.kind,
            "theta": {n: list(v.shape) for n, v in ml.theta.items()},
            "phi_parameters": int(sum(v.numel() for v in ml.phi.values())),
            "tasks": {"file": task_file(cfg.tasks), "n": len(tasks), "level": tmeta.get("level"),
                      "kind": tmeta.get("kind", "pairs"), "cross_cluster": tmeta.get("cross_cluster")},
            "digest": digest, "steps": len(history), "world_size": world.size,
            "last50": {k: round(float(np.mean([h[k] for h in last])), 5) for k in ("support_loss", "query_loss")},
            "validation": {"tasks": n_val, "held_out_clusters": val_tasks is not None, "before": before, "after": after},
            "select": select,
            "train_time_s": round(train_s, 2), "time_s": round(time.time() - t0, 2)}
    with atomic_dir(out) as tmp:
        # no digest or wall times in the tensor file: the same run gives the same metadata with any tool
        save_meta(tmp / META, ml, {k: info[k] for k in ("recipe", "config", "context_dim", "kind")})
        write_json(tmp / "meta.json", {**info, "history": history})
        _plot(history, tmp / "meta.png", f"meta-training {recipe} ({cfg.prompt.kind})")
    if ckpt.exists():
        shutil.rmtree(ckpt)
    log.info("meta-trained %s: %d steps in %.0f s; held-out query loss %.3f -> %.3f unadapted, %.3f -> %.3f "
             "after the regulated step", recipe, len(history), train_s, before["query_loss"], after["query_loss"],
             before["query_loss_adapted"], after["query_loss_adapted"])
    distributed.barrier(world)
    return info


def main(argv: list[str] | None = None) -> None:
    p = stage_parser("meta", __doc__)
    p.add_argument("--recipe", required=True, help="meta-training recipe (a key of <profile>.meta)")
    p.add_argument("--data", required=True, help="data directory of the profile (its shards), e.g. data/emoji")
    p.add_argument("--chc", required=True, help="output of the cluster stage, e.g. data/emoji/chc")
    p.add_argument("--tasks", required=True, help="output of the tasks stage, e.g. data/emoji/tasks")
    p.add_argument("--backbone", required=True, help="backbone directory, e.g. models/emoji/backbone")
    p.add_argument("--prototypes", default=None, help="output of the prototypes stage, e.g. data/emoji/prototypes "
                                                        "(read by recipes with context: structure)")
    p.add_argument("--out", required=True, help="output directory, e.g. models/emoji/meta/coop")
    args = p.parse_args(argv)
    _, prof = stage_setup(args)
    if not distributed.launched():
        n = distributed.processes_wanted(prof.backbone.device)
        if n > 1:  # the same command, on n processes under torchrun
            log.info("meta-training on %d processes under torchrun (%s=%s)", n, distributed.NPROC,
                     os.environ.get(distributed.NPROC, "auto"))
            rc = distributed.relaunch(n, ["meta", *(sys.argv[1:] if argv is None else argv)])
            if rc != 0:  # the failing rank printed its error
                log.error("meta-training on %d processes failed (torchrun exit code %d)", n, rc)
                raise SystemExit(rc)
            return
    world = distributed.init(prof.backbone.device)
    if not world.main:  # one log and one progress bar: rank 0's
        logging.getLogger("gram").setLevel(logging.WARNING)
    elif world.size > 1:
        log.info("meta-training process 0 of %d (%s backend)", world.size, torch.distributed.get_backend())
    try:
        run(prof, args.recipe, args.data, args.chc, args.tasks, args.backbone, args.out,
            prototypes_dir=args.prototypes, world=world)
        if world.main:
            write_manifest(args.out)
    finally:
        distributed.close(world)
