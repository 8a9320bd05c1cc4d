"""Meta-train stage: GRAM's meta-learned prompt initialisation θ and gradient regulator ψ_φ. [abstract/sibling/ours]

GRAM meta-learns, on image-text pairs only, an initialisation of the prompt parameters θ and a
function ψ_φ that regulates their gradient [abstract]. Per outer step, for a batch of the tasks
stage's meta-tasks (support and query sets of pairs from different CHC clusters):

    g_S  = ∇θ L_S(θ)                        torch.func.grad; detached unless `second_order`
    θ'   = θ − α · ψ_φ(g_S; h)               `inner_steps` times (h: mean frozen support image feature)
    loss = L_Q(θ') [+ λ (c − sim/2 − cos(g_Q, ψ_φ(g_S))/2)²]
    θ, φ ← Adam(∇θ,φ of the mean loss over the batch), each gradient norm-clipped

First order (the default, as in the sibling method [sibling]): ∂θ'/∂θ = I, yet φ gets its exact
gradient through θ' = θ − α ψ_φ(g_S). `second_order: true` differentiates through g_S as well.

L_S and L_Q are the text-as-class loss [ours, method-notes §1]: the n captions of a set are its n
classes, each prompted as `[BOS] θ_text caption [EOS]` (captions truncated to fit the context);
loss = cross-entropy of CLIP's logit scale times cos(f(image_i), g(prompt_j)) with target i (and
the transposed term with `symmetric`). θ is any prompt method's (CoOp, VPT, joint), so the same
loop meta-learns text, visual or both prompts. The meta-regulariser [sibling] (λ = `reg_lambda`,
form "mix" only) pulls the gate c towards half the domain similarity of the two clusters plus half
the agreement of the query gradient at θ' with the regulated support gradient.

The corpus (`load_corpus`) holds only what the tasks' pairs need: their captions and frozen image
features [N, E] (encoded once, in batches), and `Corpus.pixels`, a `LazyPixels` that reads and decodes
a set's images when a loss asks for them. A local tar shard is indexed from its headers, so a used row
costs its location (about 30 bytes) and one seek per read; a shard addressed by URL, `pipe:` or s3://
(or compressed) cannot be sought, so the encoded images of its used rows stay in memory.

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
                    loss over held-out tasks before and after meta-training, unadapted and after one
                    regulated inner step; `world_size`, the number of processes.
  meta.png          the loss curves.

Downstream (`gram tune` with a method of `grid.gram`): `load_meta` gives θ and ψ_φ back.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import tarfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gram import distributed
from gram.config import MetaParams, to_dict
from gram.distributed import World
from gram.regulator import Regulators, regulate

log = logging.getLogger("gram.meta")

META = "meta.safetensors"


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


def read_member(path: str, offset: int, size: int) -> bytes:
    """The `size` bytes at `offset` of a local file (a tar member's data, located by `index_tar`).

    Raises:
        ShardError naming the shard when the file ends before them (it changed since it was indexed).
    """
    from gram.data.shards import ShardError

    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise ShardError(f"{path}: {size} bytes at offset {offset} are past the end of the shard (did it change "
                         f"since the meta stage indexed it?)")
    return data


def index_tar(path: str | Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """The samples of a local uncompressed tar shard, from its headers alone (tarfile seeks past the data):
    (key, {lower-case extension: (offset of the member's data, its size)}), in shard order, grouped as
    `gram.data.shards.iter_shard` groups them (consecutive members of one key; no `__x__` or non-file members).

    Raises:
        tarfile.ReadError when the file is no uncompressed tar (a compressed shard cannot be sought: read it
        as a stream); ShardError naming the shard when it is truncated or a sample repeats a member.
    """
    from gram.data.shards import ShardError, ended_cleanly, member_key

    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    with tarfile.open(path, mode="r:") as tar:
        end = os.fstat(tar.fileobj.fileno()).st_size
        while (info := tar.next()) is not None:
            tar.members = []  # the index below is all that is kept
            named = member_key(info)
            if named is None:
                continue
            key, ext = named
            if info.offset_data + info.size > end:
                raise ShardError(f"{path}: the shard is truncated (member {info.name} ends past the file, after "
                                 f"{len(samples)} samples)")
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            members = samples[-1][1]
            if ext.lower() in members:
                raise ShardError(f"{path}: sample {key} has two `{ext.lower()}` members (after {len(samples) - 1} "
                                 "samples)")
            members[ext.lower()] = (info.offset_data, info.size)
        if not ended_cleanly(tar):
            raise ShardError(f"{path}: the shard is truncated or damaged after {len(samples)} samples (no "
                             "end-of-archive marker where its last member ends)")
    return samples


class LazyPixels:
    """`pixels[rows]` -> the preprocessed images [len(rows), 3, crop, crop] (float32, CPU), read and decoded on
    demand: exactly `gram.backbone.preprocess(decoded uint8 images of rows, spec)`, whatever the rows (repeats
    too), the order and the mix of image sizes.

    A row of a local tar shard is its location (shard, data offset, size, extension; about 30 bytes a row,
    in numpy arrays) and is read with one seek (`read_member`). A row of a shard that cannot be sought (an
    http(s)://, pipe:, s3:// … address or a compressed tar) keeps its encoded image bytes in memory, as
    the streamed shard cannot be reopened at a position (CC3M at 256 px: some 10-20 kB a row). The last
    `cache_rows` preprocessed rows are kept (an inner loop re-reads its support set every step); misses
    are decoded on `workers` threads.
    """

    def __init__(self, spec, keys: list[str], shards: list[str], local: dict[int, tuple[int, int, int, str]],
                 raw: dict[int, tuple[int, bytes]], cache_rows: int = 256, workers: int = 0):
        """`local`: row -> (index in `shards`, offset, size, extension); `raw`: row -> (index in `shards`,
        image bytes). A row in neither is refused."""
        self.spec, self.keys, self.shards = spec, keys, list(shards)
        self.exts = sorted({e for _, _, _, e in local.values()})
        rows = np.array(sorted(local), dtype=np.int64)
        self._rows = rows  # sorted, for searchsorted
        self._shard = np.array([local[r][0] for r in rows], dtype=np.int32)
        self._offset = np.array([local[r][1] for r in rows], dtype=np.int64)
        self._size = np.array([local[r][2] for r in rows], dtype=np.int64)
        self._ext = np.array([self.exts.index(local[r][3]) for r in rows], dtype=np.int8)
        self._raw = dict(raw)
        self.cache_rows = cache_rows
        self.workers = workers or min(8, os.cpu_count() or 1)
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return len(self.keys), 3, self.spec.crop, self.spec.crop

    def location(self, row: int) -> tuple[str, int, int, str] | tuple[str, None, int, None]:
        """(shard, data offset, size, extension) of a row; offset and extension are None for a row held in memory."""
        j = int(np.searchsorted(self._rows, row))
        if j < len(self._rows) and self._rows[j] == row:
            return (self.shards[self._shard[j]], int(self._offset[j]), int(self._size[j]), self.exts[self._ext[j]])
        if row in self._raw:
            shard, data = self._raw[row]
            return self.shards[shard], None, len(data), None
        raise KeyError(f"row {row} ({self.keys[row] if 0 <= row < len(self.keys) else 'out of range'}) is used by "
                       f"no task: the corpus holds only the rows of the tasks")

    def read(self, row: int) -> bytes:
        """The encoded image of one row."""
        shard, offset, size, _ = self.location(row)
        return self._raw[row][1] if offset is None else read_member(shard, offset, size)

    def decode(self, row: int) -> torch.Tensor:
        """One row read, decoded and preprocessed -> [3, crop, crop] (not cached)."""
        from gram.backbone import preprocess
        from gram.data.shards import decode_rgb

        rgb = decode_rgb(self.read(row), f"{self.location(row)[0]}:{self.keys[row]}")  # errors name the shard
        # a writable copy (torch wants one); contiguous like a row of a pixel tensor (preprocess keeps the
        # channels-last strides of the decoded image)
        return preprocess(np.array(rgb)[None], self.spec)[0].contiguous()

    def load(self, rows, cache: bool = True) -> torch.Tensor:
        """pixels[rows]; `cache`: keep the decoded rows in (and take them from) the LRU cache."""
        idx = self._as_rows(rows)
        have: dict[int, torch.Tensor] = {}
        if cache:
            for r in dict.fromkeys(idx.tolist()):
                if r in self._cache:
                    self._cache.move_to_end(r)
                    have[r] = self._cache[r]
        todo = [r for r in dict.fromkeys(idx.tolist()) if r not in have]
        if len(todo) > 1 and self.workers > 1:
            with ThreadPoolExecutor(min(self.workers, len(todo))) as pool:
                decoded = list(pool.map(self.decode, todo))
        else:
            decoded = [self.decode(r) for r in todo]
        have.update(zip(todo, decoded))
        if cache and self.cache_rows > 0:
            for r, px in zip(todo, decoded):
                self._cache[r] = px
            while len(self._cache) > self.cache_rows:
                self._cache.popitem(last=False)
        if not len(idx):
            return torch.zeros(0, 3, self.spec.crop, self.spec.crop)
        return torch.stack([have[r] for r in idx.tolist()])  # [n, 3, crop, crop]

    def __getitem__(self, rows) -> torch.Tensor:
        """pixels[rows] for a LongTensor, array, list or slice of rows ([3, crop, crop] for one int)."""
        if isinstance(rows, (int, np.integer)) or (isinstance(rows, torch.Tensor) and rows.ndim == 0):
            return self.load([int(rows)])[0]
        return self.load(rows)

    def _as_rows(self, rows) -> np.ndarray:
        """Rows as a 1-D int64 array, negatives counted from the end; IndexError beyond [-N, N)."""
        n = len(self.keys)
        if isinstance(rows, slice):
            return np.arange(*rows.indices(n), dtype=np.int64)
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu().numpy()
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"rows out of range for a corpus of {n} pairs")
        return np.where(idx < 0, idx + n, idx)


def load_corpus(bb, data_dir: str | Path, keys: list[str], rows: np.ndarray, batch_size: int = 256,
                cache_rows: int = 256, workers: int = 0) -> Corpus:
    """The corpus of the pairs `keys` (hierarchy order, `<domain>/<key>`) of which the tasks use `rows`.

    The shards of each domain are `gram.data.shards.corpus_shards(data_dir, domain)` (a folder of tars, or
    the download stage's manifest of addresses). A local uncompressed tar is indexed from its headers
    (`index_tar`) and only the members of `rows` are read, with a seek each; any other shard (URL, pipe:,
    s3://, compressed) is streamed once (`gram.embed.read_shard`) and the encoded images of `rows` are kept
    in memory. A key found in several shards is taken from the last, as a sample is taken only with an
    image and a non-blank caption (as `gram.data.shards.ShardPairs` does). The frozen features are encoded
    `batch_size` rows at a time (in row order) and no pixels are kept: `Corpus.pixels` is a `LazyPixels`
    (`cache_rows`, `workers`: its LRU cache and decoding threads).

    Raises:
        FileNotFoundError naming a domain without shards; ValueError when a pair of `rows` is in no shard;
        ShardError naming a shard that cannot be read.
    """
    from gram.data.shards import IMAGE_EXTS, corpus_shards, is_local, local_path
    from gram.embed import read_shard
    from gram.prompts.encoders import encode_image_prompted, normalize

    where = {k: i for i, k in enumerate(keys)}
    wanted = set(int(r) for r in rows)
    captions = [""] * len(keys)
    shards: list[str] = []
    local: dict[int, tuple[int, int, int, str]] = {}  # row -> (shard, offset, size, extension)
    raw: dict[int, tuple[int, bytes]] = {}  # row -> (shard, image bytes): the shards that cannot be sought
    streamed = 0
    for d in sorted({k.split("/", 1)[0] for k in keys}):
        for url in corpus_shards(data_dir, d):
            s = len(shards)
            shards.append(str(local_path(url)) if is_local(url) else url)
            samples = None
            if is_local(url):
                try:
                    samples = index_tar(shards[s])
                except (tarfile.ReadError, OSError):  # compressed or unreadable: the stream reader says which
                    samples = None
            if samples is None:
                streamed += 1
                for key, data, caption in read_shard(url):
                    i = where.get(f"{d}/{key}")
                    if i in wanted:
                        captions[i] = caption
                        raw[i] = (s, data)
                        local.pop(i, None)
                continue
            for key, members in samples:
                i = where.get(f"{d}/{key}")
                if i not in wanted:
                    continue
                ext = next((e for e in IMAGE_EXTS if e in members), None)
                caption = read_member(shards[s], *members["txt"]).decode("utf-8", "replace") if "txt" in members else ""
                if ext is None or not caption.strip():
                    continue  # not a pair: ShardPairs skips it
                captions[i] = caption
                local[i] = (s, *members[ext], ext)
                raw.pop(i, None)
    missing = sorted(wanted - set(local) - set(raw))
    if missing:
        raise ValueError(f"{data_dir}/shards: {len(missing)} pairs of the hierarchy are in no shard "
                         f"(first: {keys[missing[0]]}); rerun the embed and cluster stages on these shards")
    pixels = LazyPixels(bb.spec, keys, shards, local, raw, cache_rows, workers)
    frozen = torch.zeros(len(keys), bb.model.config.projection_dim)
    order = sorted(wanted)
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


def make_regulators(theta: dict[str, torch.Tensor], cfg, context_dim: int) -> Regulators:
    """ψ_φ for every θ tensor, as `cfg` (RegulatorParams) says; φ in float32."""
    from gram.config import reads_context

    r = cfg
    return Regulators(theta, form=r.form, rank=r.rank, hidden=r.hidden, init=r.init,
                      context_dim=context_dim if reads_context(r) else None,
                      gate_context=r.form == "gate" and r.gate_context)


class MetaLearner:
    """θ (the learner's parameters) and φ (the regulators'), with the text-as-class task loss."""

    def __init__(self, learner, regs: Regulators, cfg: MetaParams, corpus: Corpus, structure=None):
        if cfg.context == "structure" and structure is None:
            raise ValueError("context: structure needs the prototypes (a gram.regulator.StructureContext)")
        self.learner, self.regs, self.cfg, self.corpus = learner, regs, cfg, corpus
        self.structure = structure.to(learner.backbone.device) if cfg.context == "structure" else None
        self.device = learner.backbone.device
        self.theta = dict(learner.named_parameters())
        self.phi = dict(regs.named_parameters())
        self.visual = learner.visual_prompts(self.theta)[0] is not None
        self.scale = learner.clip.logit_scale.exp().float().detach()
        self.frozen = corpus.frozen.to(self.device)

    # -- losses -----------------------------------------------------------------------------
    def set_loss(self, theta: dict[str, torch.Tensor], rows: np.ndarray) -> torch.Tensor:
        """Text-as-class loss of one set of pairs at θ."""
        if self.visual:  # numpy rows: a tensor made here would be torch.func's, which LazyPixels cannot read
            img = self.learner.image_features(self.corpus.pixels[np.asarray(rows, dtype=np.int64)], theta)
        else:
            img = self.frozen[torch.as_tensor(rows, dtype=torch.long, device=self.device)]
        txt = self.learner.text_features([self.corpus.captions[r] for r in rows], theta)
        dt = torch.promote_types(torch.promote_types(img.dtype, txt.dtype), torch.float32)  # fp32 at least
        logits = self.scale * img.to(dt) @ txt.to(dt).T  # [n, n]
        target = torch.arange(len(rows), device=logits.device)
        loss = F.cross_entropy(logits, target)
        if self.cfg.symmetric:
            loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
        return loss

    def context(self, rows: np.ndarray) -> torch.Tensor:
        """h: the mean frozen image feature of a set, or (context: structure) its relation to the prototypes."""
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

    def task_loss(self, theta, phi, support: np.ndarray, query: np.ndarray, similarity: float):
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
            a = torch.cat([g.detach().flatten() for g in g_q])
            b = torch.cat([reg_s[n].flatten() for n in names])
            cos = F.cosine_similarity(a, b, dim=0)
            loss = loss + cfg.reg_lambda * ((gate - 0.5 * similarity - 0.5 * cos) ** 2)
        return loss, ls, lq.detach(), gate.detach()

    def gate_value(self, phi, support: np.ndarray) -> torch.Tensor:
        """Mean "mix" gate c over the regulators at φ (NaN for the "gate" form, which has none)."""
        if self.cfg.regulator.form != "mix":
            return torch.tensor(float("nan"), device=self.device)
        h = self.context(support) if self.cfg.regulator.context else None
        return torch.func.functional_call(_Gates(self.regs), {f"regs.{n}": v for n, v in phi.items()}, (h,)).mean()

    @torch.no_grad()
    def validate(self, tasks, ids: np.ndarray) -> dict[str, float]:
        """Mean query loss over tasks `ids`: at θ (unadapted) and at θ' (one regulated inner step)."""
        plain, adapted = [], []
        for t in ids:
            s, q = tasks.support[t], tasks.query[t]
            plain.append(float(self.set_loss(self.theta, q)))
            with torch.enable_grad():
                th, _, _ = self.adapt(self.theta, self.phi, s)
            adapted.append(float(self.set_loss({n: v.detach() for n, v in th.items()}, q)))
        return {"query_loss": round(float(np.mean(plain)), 5), "query_loss_adapted": round(float(np.mean(adapted)), 5)}


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
    from gram.io import atomic_dir
    from gram.tensorio import save_tensors

    tensors = {**{f"theta.{n}": v.detach().cpu() for n, v in ml.theta.items()},
               **{f"phi.{n}": v.detach().cpu() for n, v in ml.phi.items()}, **_opt_tensors(opt)}
    with atomic_dir(ckpt) as tmp:
        save_tensors(tmp / "state.safetensors", tensors, {"step": step, "digest": digest, "history": history})


def load_checkpoint(ckpt: Path, ml: MetaLearner, opt, digest: str) -> tuple[int, list]:
    """Resume from `ckpt` when it was written with the same digest; returns (step, history)."""
    from gram.tensorio import load_tensors

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
    log.info("resuming meta-training from step %d (%s)", meta["step"], ckpt)
    return int(meta["step"]), list(meta["history"])


def meta_train(ml: MetaLearner, tasks, cfg: MetaParams, ckpt: Path | None = None, digest: str = "",
               progress: bool = True, stop_after: int | None = None, world: World = World()) -> list[dict]:
    """Run the outer loop of `cfg` (resuming from `ckpt`); returns the per-step history.

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
                loss, ls, lq, gate = ml.task_loss(ml.theta, ml.phi, tasks.support[t], tasks.query[t],
                                                  float(tasks.similarity[t]))
            (loss / len(ids)).backward()  # the whole batch's size: the ranks' sum is the batch mean
            parts.append(torch.stack([ls.float(), lq.float(), gate.float()]))
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
        history.append({"step": step + 1, "support_loss": round(ls, 5), "query_loss": round(lq, 5),
                        "gate": None if gate != gate else round(gate, 5)})
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
    from gram.tensorio import save_tensors

    tensors = {**{f"theta.{n}": v.detach().float().cpu() for n, v in ml.theta.items()},
               **{f"phi.{n}": v.detach().float().cpu() for n, v in ml.phi.items()}}
    save_tensors(path, tensors, meta)


def load_meta(meta_dir: str | Path, learner=None) -> tuple[dict[str, torch.Tensor], Regulators, dict]:
    """(θ, ψ_φ with φ loaded and frozen, metadata) of a meta-train output directory.

    With `learner`, θ's names and shapes must equal the learner's (the error names the file)."""
    from gram.config import RegulatorParams, _build
    from gram.tensorio import load_tensors

    path = Path(meta_dir) / META
    tensors, meta = load_tensors(path)
    theta = {n[len("theta."):]: v for n, v in tensors.items() if n.startswith("theta.")}
    phi = {n[len("phi."):]: v for n, v in tensors.items() if n.startswith("phi.")}
    if learner is not None:
        want = {n: tuple(p.shape) for n, p in learner.named_parameters()}
        have = {n: tuple(v.shape) for n, v in theta.items()}
        if want != have:
            raise ValueError(f"{path}: meta-learned θ has tensors {have}, the method's prompt has {want} "
                             f"(meta recipe prompt {meta.get('config', {}).get('prompt')})")
    rcfg = _build(RegulatorParams, meta["config"]["regulator"], "regulator", str(path))
    regs = make_regulators(theta, rcfg, int(meta["context_dim"]))
    regs.load_state_dict(phi)
    regs.requires_grad_(False)
    return theta, regs, meta


def load_structure(prototypes_dir: str | Path | None, cfg, who: str):
    """The `StructureContext` of StructureParams `cfg` over the prototypes stage's output, and its SHA-256."""
    from gram.embed import file_sha256
    from gram.prototypes import PROTOTYPES
    from gram.regulator import StructureContext
    from gram.tensorio import load_tensors

    if prototypes_dir is None:
        raise ValueError(f"{who} relates samples to the prototypes: pass --prototypes (e.g. data/emoji/prototypes)")
    path = Path(prototypes_dir) / PROTOTYPES
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (did the prototypes stage run?)")
    tensors, _ = load_tensors(path)
    return StructureContext(tensors, cfg.levels, cfg.tau, cfg.modality, cfg.sub), file_sha256(path)


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
    from gram.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def run(prof, recipe: str, data_dir: str | Path, chc_dir: str | Path, tasks_dir: str | Path,
        backbone_dir: str | Path, out: str | Path, progress: bool = True,
        prototypes_dir: str | Path | None = None, world: World = World()) -> dict:
    """Meta-train recipe `<profile>.meta.<recipe>`; writes `out` (meta.safetensors, meta.json, meta.png).
    `prototypes_dir` (the prototypes stage's output) is read by recipes with context: structure.
    `world` (gram.distributed.init): every rank trains; rank 0 alone validates and writes `out`."""
    from gram.backbone import load
    from gram.cluster import KEYS
    from gram.embed import backbone_fingerprint, file_sha256
    from gram.io import atomic_dir, config_digest, write_json
    from gram.tasks import load_tasks, task_file
    from gram.tune import make_learner

    if recipe not in prof.meta:
        raise KeyError(f"meta recipe {recipe!r} is not defined in <profile>.meta "
                       f"(defined: {', '.join(prof.meta) or 'none'})")
    cfg = prof.meta[recipe]
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
    rows = np.unique(np.concatenate(tasks.support + tasks.query))
    t_load = time.time()
    corpus = load_corpus(bb, data_dir, keys, rows)
    log.info("corpus: %d pairs of %d encoded in %.1f s; %d tasks (%s)", len(rows), len(keys), time.time() - t_load,
             len(tasks), cfg.tasks)
    structure, proto_sha = None, None
    if cfg.context == "structure":
        structure, proto_sha = load_structure(prototypes_dir, cfg.structure, f"meta.{recipe}")
    ml = MetaLearner(learner, regs, cfg, corpus, structure)
    n_val = min(64, len(tasks))
    val_ids = np.random.default_rng([cfg.seed, 1 << 20]).choice(len(tasks), n_val, replace=False)
    before = ml.validate(tasks, val_ids) if world.main else None
    digest = config_digest({"config": to_dict(cfg), "tasks": file_sha256(Path(tasks_dir) / task_file(cfg.tasks)),
                            "backbone": backbone_fingerprint(backbone_dir), "keys": keys_sha,
                            **({"prototypes": proto_sha} if proto_sha else {})})
    ckpt = out.with_name(f".{out.name}.ckpt")
    t_train = time.time()
    history = meta_train(ml, tasks, cfg, ckpt, digest, progress, world=world)
    train_s = time.time() - t_train
    if not world.main:  # rank 0 validates and publishes; the others wait for it, then leave
        distributed.barrier(world)
        return {"recipe": recipe, "steps": len(history), "world_size": world.size}
    after = ml.validate(tasks, val_ids)
    last = history[-min(len(history), 50):]
    info = {"recipe": recipe, "config": to_dict(cfg), "context_dim": context_dim, "kind": cfg.prompt.kind,
            "theta": {n: list(v.shape) for n, v in ml.theta.items()},
            "phi_parameters": int(sum(v.numel() for v in ml.phi.values())),
            "tasks": {"file": task_file(cfg.tasks), "n": len(tasks), "level": tmeta.get("level"),
                      "cross_cluster": tmeta.get("cross_cluster")},
            "digest": digest, "steps": len(history), "world_size": world.size,
            "last50": {k: round(float(np.mean([h[k] for h in last])), 5) for k in ("support_loss", "query_loss")},
            "validation": {"tasks": n_val, "before": before, "after": after},
            "train_time_s": round(train_s, 2), "time_s": round(time.time() - t0, 2)}
    with atomic_dir(out) as tmp:
        # no digest or wall times in the tensor file: the same run gives the same metadata with any tool
        save_meta(tmp / META, ml, {k: info[k] for k in ("recipe", "config", "context_dim", "kind")})
        write_json(tmp / "meta.json", {**info, "history": history})
        _plot(history, tmp / "meta.png", f"meta-training {recipe} ({cfg.prompt.kind})")
    if ckpt.exists():
        import shutil

        shutil.rmtree(ckpt)
    log.info("meta-trained %s: %d steps in %.0f s; held-out query loss %.3f -> %.3f unadapted, %.3f -> %.3f "
             "after the regulated step", recipe, len(history), train_s, before["query_loss"], after["query_loss"],
             before["query_loss_adapted"], after["query_loss_adapted"])
    distributed.barrier(world)
    return info


def main(argv: list[str] | None = None) -> None:
    from gram.cli import stage_parser, stage_setup
    from gram.io import write_manifest

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
