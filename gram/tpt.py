"""Test-time stage: TPT and GRAM's structure-induced regulator, per test image, many images at once.
[sibling: TPT; abstract: structure-induced regulator; ours: its form, the batched path]

TPT [sibling: Shu et al., NeurIPS 2022; method-notes §5], for one unlabelled test image:
  1. views: the image itself (CLIP's preprocessing) and V − 1 augmented views — random resized crops
     and flips, or AugMix-style chains on top of them for the fine-grained sets (`tpt.augmix`);
  2. logits of every view at θ; keep the ⌊ρ·V⌋ views of lowest prediction entropy (chosen once, at
     the first step);
  3. S AdamW steps on the entropy of the kept views' averaged probability;
  4. predict the image itself at the tuned θ; reset θ before the next image.
θ is a CoOp text context, initialised from words (`init: words`), from a few-shot-tuned prompt
(`init: tuned`) or from GRAM's meta-learned θ (`init: meta`).

Structure-induced regulator [abstract; form ours]: the test-time gradient g of θ is replaced by
ψ_φ(g; h) before the AdamW step, ψ_φ the meta-learned regulator (`gram.regulator`) and h the context:
`structure`: h = Σ_k softmax(cos(f, P_k)/τ)·P_k averaged over hierarchy levels, f the mean frozen
feature of the kept views and P the meta-training prototypes (`gram.regulator.StructureContext`);
`plain`: h = f itself (the ablation without structure). The recipe `context: structure` of
`gram meta` meta-trains ψ with the same h of its support sets.

Fast and exact. Every image's episode is independent, so B images are tuned together with B prompt
copies ctx [B, M, D]: the loss is the sum of the B entropies, so the gradient of copy b is exactly
that of image b, and AdamW is elementwise, so one AdamW over [B, M, D] is B independent ones. The
views are encoded once (CoOp leaves the image tower unchanged); each text sequence stops at the
longest EOS position; and the `[BOS] ctx` prefix, the same for every class of an image, goes through
the text tower once per image, the class tokens attending to its cached keys and values
(`encode_shared_prefix`; under the causal mask the prefix never sees the class tokens, so this is
the same computation). `tpt_reference` is the plain per-image loop of the same algorithm (77-token
sequences, views re-encoded per image); tests check that both give the same predictions.

Output (`gram tpt --dataset D --method M --seed S --out RUN.json`): per domain of `tpt.domains`, the
scores of the initial prompt on the images themselves (`before`) and after test-time tuning
(`after`), their mean over domains, the method's config and timings (ms per image). A non-finite
entropy or context at any step of any image stops the run (`gram.io.DivergedError`, naming the run,
the image, the step and the value) before anything is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gram.backbone import backbone_fingerprint, load
from gram.config import TptMethodParams, TptParams, to_dict
from gram.data.datasets import dataset_domains, split_images
from gram.evaluate import scores
from gram.images import normalize_pixels, preprocess
from gram.io import check_finite, config_digest, file_sha256, write_json
from gram.prompts import make_learner
from gram.prompts.encoders import encode_image_prompted, encode_text_embeds, normalize
from gram.prototypes import load_structure
from gram.regulator import META, load_meta, meta_run
from gram.stage import stage_parser, stage_setup
from gram.tensorio import DamagedFile, load_prompt, load_tensors, save_tensors
from gram.tune import frozen_features

log = logging.getLogger("gram.tpt")

INITS = ("words", "tuned", "meta")


# ------------------------------------------------------------------------------------------------
# views
# ------------------------------------------------------------------------------------------------
def view_generator(seed: int, key: str) -> torch.Generator:
    """The random stream of one image's views: a function of (seed, image key) only, so an image gets
    the same views whichever batch it is in and whichever path tunes it."""
    digest = hashlib.sha256(f"tpt:{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def crop_boxes(gen: torch.Generator, n: int, scale: tuple[float, float],
               ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10) -> torch.Tensor:
    """n random resized crop boxes [n, 4] = (x0, y0, w, h) as fractions of a square image: area in
    `scale`, log-uniform aspect ratio in `ratio`, the first of `tries` draws that fits (else the whole
    image), as torchvision's RandomResizedCrop draws them."""
    area = torch.empty(n, tries).uniform_(scale[0], scale[1], generator=gen)
    logr = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    w, h = torch.sqrt(area * logr.exp()), torch.sqrt(area / logr.exp())
    ok = (w <= 1) & (h <= 1)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    pos = torch.rand(n, 2, generator=gen)
    rows = torch.arange(n)
    w = torch.where(first >= 0, w[rows, first.clamp(min=0)], torch.ones(n))
    h = torch.where(first >= 0, h[rows, first.clamp(min=0)], torch.ones(n))
    return torch.stack([pos[:, 0] * (1 - w), pos[:, 1] * (1 - h), w, h], dim=1)


def _affine(x: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Resample images x [n, 3, H, W] through affine maps theta [n, 2, 3] (output -> input, in [-1, 1]
    coordinates) at size x size, sampling at twice the size then averaging down (antialiasing)."""
    n = x.shape[0]
    grid = F.affine_grid(theta.to(x.dtype), [n, 3, 2 * size, 2 * size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return F.avg_pool2d(out, 2)  # [n, 3, size, size]


def resized_crops(image: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Crops `boxes` [n, 4] of one image [3, H, W] (values in [0, 1]), flipped where `flips` [n], resized
    to [n, 3, size, size]."""
    n = boxes.shape[0]
    x0, y0, w, h = boxes.unbind(1)
    sx = torch.where(flips.to(boxes.device), -w, w)  # the draws live on the CPU (their generator's device)
    theta = torch.zeros(n, 2, 3, dtype=boxes.dtype, device=boxes.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, 2 * (x0 + w / 2) - 1
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * (y0 + h / 2) - 1
    return _affine(image.expand(n, -1, -1, -1), theta.to(image.device), size)


# AugMix-style operations at severity 1 [sibling: Hendrycks et al.; TPT uses them for fine-grained sets]:
# each takes images [n, 3, s, s] in [0, 1] and magnitudes [n] in (0, 1]; equalize is left out.
def _autocontrast(x, m):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-6), x)


def _posterize(x, m):
    step = 2.0 ** (8 - (4 - (m * 4 / 10).floor())).view(-1, 1, 1, 1)  # 4 bits at severity 1
    return torch.floor(x * 255 / step) * step / 255


def _solarize(x, m):
    thr = ((256 - (m * 256 / 10).floor()) / 255).view(-1, 1, 1, 1)
    return torch.where(x >= thr, 1 - x, x)


def _geometric(x, m, sign, kind: str):
    n, s = x.shape[0], x.shape[-1]
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    if kind == "rotate":
        a = sign * (m * 30 / 10).floor() * math.pi / 180
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    elif kind == "shear_x":
        theta[:, 0, 1] = sign * m * 0.3 / 10
    elif kind == "shear_y":
        theta[:, 1, 0] = sign * m * 0.3 / 10
    elif kind == "translate_x":
        theta[:, 0, 2] = sign * (m * s / 3 / 10).floor() * 2 / s
    else:
        theta[:, 1, 2] = sign * (m * s / 3 / 10).floor() * 2 / s
    return _affine(x, theta, s)


AUGMIX_OPS = ("autocontrast", "posterize", "solarize", "rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def augmix(x: torch.Tensor, gen: torch.Generator, width: int = 3, severity: float = 1.0) -> torch.Tensor:
    """AugMix-style views [n, 3, s, s] of views x (values in [0, 1]): `width` chains of 1-3 random
    operations, mixed with Dirichlet(1) weights, then mixed with x by a Beta(1, 1) weight."""
    n = x.shape[0]
    dev = x.device
    w = -torch.log(torch.rand(n, width, generator=gen).clamp(min=1e-12))
    w = (w / w.sum(1, keepdim=True)).to(dev)  # Dirichlet(1, ..., 1)
    mix = torch.zeros_like(x)
    for c in range(width):
        depth = torch.randint(1, 4, (n,), generator=gen)
        y = x
        for d in range(3):
            op = torch.randint(len(AUGMIX_OPS), (n,), generator=gen)
            mag = torch.empty(n).uniform_(0.1, severity, generator=gen)  # AugMix's level
            sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
            active = (d < depth).to(dev)
            out = y
            for k, name in enumerate(AUGMIX_OPS):
                sel = ((op == k).to(dev) & active)
                if not bool(sel.any()):
                    continue
                m, sg = mag.to(dev), sign.to(dev)
                if name in ("autocontrast", "posterize", "solarize"):
                    z = {"autocontrast": _autocontrast, "posterize": _posterize, "solarize": _solarize}[name](y, m)
                else:
                    z = _geometric(y, m, sg, name)
                out = torch.where(sel.view(-1, 1, 1, 1), z, out)
            y = out
        mix = mix + w[:, c].view(-1, 1, 1, 1) * y
    b = torch.rand(n, generator=gen).to(dev).view(-1, 1, 1, 1)
    return b * x + (1 - b) * mix


def make_views(image: np.ndarray, spec, views: int, gen: torch.Generator, augment: str = "crop-flip",
               crop_scale: tuple[float, float] = (0.08, 1.0), device: str | torch.device = "cpu") -> torch.Tensor:
    """Normalised pixel values [views, 3, crop, crop] of one uint8 image [H, W, 3]: view 0 is CLIP's
    preprocessing of the image; the others are random resized crops of its centred square (flipped
    with probability ½), AugMix-style for `augment: augmix`."""
    first = preprocess(image[None], spec).to(device)  # [1, 3, s, s]
    if views == 1:
        return first
    x = torch.as_tensor(image).permute(2, 0, 1).float().div(255.0).to(device)  # [3, H, W]
    side = min(x.shape[-2:])
    top, left = (x.shape[-2] - side) // 2, (x.shape[-1] - side) // 2
    x = x[:, top:top + side, left:left + side]
    n = views - 1
    boxes = crop_boxes(gen, n, tuple(crop_scale))
    flips = torch.rand(n, generator=gen) < 0.5
    aug = resized_crops(x, boxes, flips, spec.crop).clamp(0, 1)  # [n, 3, s, s]
    if augment == "augmix":
        aug = augmix(aug, gen).clamp(0, 1)
    elif augment != "crop-flip":
        raise ValueError(f"unknown augment {augment!r} (crop-flip or augmix)")
    return torch.cat([first, normalize_pixels(aug, spec)])


# ------------------------------------------------------------------------------------------------
# the text side: one shared context per image, many classes
# ------------------------------------------------------------------------------------------------
def _heads(x: torch.Tensor, attn) -> torch.Tensor:
    return x.view(*x.shape[:-1], attn.num_heads, attn.head_dim).transpose(-3, -2)  # [N, L, D] -> [N, H, L, d]


def encode_shared_prefix(clip, prefix: torch.Tensor, suffix: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Projected text features [B, C, E] of the B·C sequences `prefix[b] + suffix[c]`, encoding each
    prefix once.

    Args:
        prefix: token embeddings [B, p, D] shared by all classes of image b ([BOS] + context).
        suffix: token embeddings [C, s, D] of the class tokens (name, template suffix, EOS).
        eos: EOS positions [C] in the whole sequence (p <= eos < p + s).
    Under the causal mask the prefix positions attend only to the prefix, so their hidden states are
    computed once per image; the class positions attend to the prefix's keys and values of every layer.
    """
    tm = clip.text_model
    B, p, D = prefix.shape
    C, s, _ = suffix.shape
    pos = tm.embeddings.position_embedding.weight  # [L_max, D]
    hp = prefix + pos[:p].to(prefix.dtype)  # [B, p, D]
    hs = (suffix + pos[p:p + s].to(suffix.dtype)).unsqueeze(0).expand(B, C, s, D).reshape(B * C, s, D)
    allowed = torch.ones(s, p + s, dtype=torch.bool, device=prefix.device)
    allowed[:, p:] = torch.ones(s, s, dtype=torch.bool, device=prefix.device).tril()  # [s, p + s]
    for layer in tm.encoder.layers:
        a = layer.self_attn
        xp, xs = layer.layer_norm1(hp), layer.layer_norm1(hs)
        qp, kp, vp = (_heads(f(xp), a) for f in (a.q_proj, a.k_proj, a.v_proj))  # [B, H, p, d]
        qs, ks, vs = (_heads(f(xs), a) for f in (a.q_proj, a.k_proj, a.v_proj))  # [B·C, H, s, d]
        op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=a.scale)
        kp_c = kp.unsqueeze(1).expand(B, C, *kp.shape[1:]).reshape(B * C, *kp.shape[1:])  # [B·C, H, p, d]
        vp_c = vp.unsqueeze(1).expand(B, C, *vp.shape[1:]).reshape(B * C, *vp.shape[1:])
        os_ = F.scaled_dot_product_attention(qs, torch.cat([kp_c, ks], 2), torch.cat([vp_c, vs], 2),
                                             attn_mask=allowed, scale=a.scale)
        hp = hp + a.out_proj(op.transpose(1, 2).reshape(B, p, D))
        hs = hs + a.out_proj(os_.transpose(1, 2).reshape(B * C, s, D))
        hp = hp + layer.mlp(layer.layer_norm2(hp))
        hs = hs + layer.mlp(layer.layer_norm2(hs))
    rel = (eos - p).to(hs.device).repeat(B)  # [B·C]
    pooled = tm.final_layer_norm(hs[torch.arange(B * C, device=hs.device), rel])  # [B·C, D]
    return clip.text_projection(pooled).view(B, C, -1)


class ClassPrompts:
    """The class names of one dataset as CoOp prompts, text features for a batch of contexts.

    Args:
        learner: a `gram.prompts.CoOp` with a shared context (it gives the template and the tokens).
        names: class names.
        shared_prefix: encode `[BOS] ctx` once per context (`encode_shared_prefix`); false: every
            (context, class) sequence whole, truncated at the longest EOS.
    """

    def __init__(self, learner, names: list[str], shared_prefix: bool = True):
        self.learner, self.names, self.shared_prefix = learner, list(names), shared_prefix
        ids, eos = learner.prompt_ids(self.names)  # [C, L], [C]
        dev = learner.backbone.device
        self.eos = eos.to(dev)
        length = int(eos.max()) + 1
        with torch.no_grad():
            self.tokens = learner.clip.text_model.embeddings.token_embedding(ids[:, :length].to(dev))  # [C, L', D]
        self.p = 1 + learner.n_ctx

    def __len__(self) -> int:
        return len(self.names)

    def features(self, ctx: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features [B, C, E] for contexts ctx [B, M, D]."""
        clip, B, C = self.learner.clip, ctx.shape[0], len(self.names)
        ctx = ctx.to(self.tokens.dtype)
        bos = self.tokens[:1, :1].expand(B, 1, -1)  # [B, 1, D]
        if self.shared_prefix:
            out = encode_shared_prefix(clip, torch.cat([bos, ctx], 1), self.tokens[:, self.p:], self.eos)
        else:
            emb = torch.cat([self.tokens[:, :1].unsqueeze(0).expand(B, -1, -1, -1),
                             ctx.unsqueeze(1).expand(-1, C, -1, -1),
                             self.tokens[:, self.p:].unsqueeze(0).expand(B, -1, -1, -1)], 2)  # [B, C, L', D]
            out = encode_text_embeds(clip, emb.reshape(B * C, *emb.shape[2:]), self.eos.repeat(B)).view(B, C, -1)
        return normalize(out)


# ------------------------------------------------------------------------------------------------
# the algorithm
# ------------------------------------------------------------------------------------------------
def view_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Prediction entropy of every view: logits [..., V, C] -> [..., V]."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def average_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean probability over views: logits [..., V, C] -> [...]."""
    logp = logits.log_softmax(-1)
    avg = torch.logsumexp(logp, dim=-2) - math.log(logits.shape[-2])  # log of the mean probability [..., C]
    return -(avg.exp() * avg).sum(-1)


def n_kept(views: int, keep: float) -> int:
    """Views kept by the confidence selection: ⌊keep·views⌋, at least 1."""
    return max(1, int(views * keep))


def _clock(device: torch.device) -> float:
    """perf_counter after the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _master(ctx: torch.Tensor) -> torch.Tensor:
    """The context as tuned: float32 at least (a bf16 backbone still tunes an fp32 θ; float64 stays)."""
    return ctx.detach().to(torch.promote_types(ctx.dtype, torch.float32))


def tune_batch(prompts: ClassPrompts, feats: torch.Tensor, ctx0: torch.Tensor, scale: torch.Tensor, steps: int,
               lr: float, weight_decay: float, keep: float, regulator=None,
               context: Callable[[torch.Tensor], torch.Tensor] | None = None, what: str = "tpt",
               keys: list[str] | None = None) -> dict:
    """TPT of B images at once, each with its own copy of the context.

    Args:
        feats: L2-normalised view features [B, V, E] (view 0: the image itself).
        ctx0: the initial context [M, D].
        scale: CLIP's logit scale (exp'd).
        regulator: a frozen `gram.regulator.Regulators` for θ = {"ctx"}, or None.
        context: maps the mean feature of an image's kept views [B, E] to ψ's context h [B, E].
        what, keys: the run and the B images' keys, as an error names them.
    Returns:
        {"before": [B] predictions at ctx0, "after": [B] after tuning, "ctx": [B, M, D] tuned contexts,
         "kept": [B, k] kept view indices, "loss": [B] entropy at the first step}.
    Raises:
        DivergedError at the first step whose entropy or updated context is not finite for some image,
        naming `what`, that image, the step and the value.
    """
    B, V, _ = feats.shape
    ctx = _master(ctx0).unsqueeze(0).repeat(B, 1, 1).requires_grad_(True)  # [B, M, D]
    opt = torch.optim.AdamW([ctx], lr=lr, weight_decay=weight_decay)
    kept = h = first_loss = before = None
    for step in range(steps):
        logits = scale * torch.einsum("bve,bce->bvc", feats, prompts.features(ctx))  # [B, V, C]
        if kept is None:
            with torch.no_grad():
                before = logits[:, 0].argmax(-1)
                kept = view_entropy(logits).argsort(dim=1, stable=True)[:, :n_kept(V, keep)]  # [B, k]
                if regulator is not None:
                    f = feats.gather(1, kept.unsqueeze(-1).expand(-1, -1, feats.shape[-1])).mean(1)  # [B, E]
                    h = context(f) if context is not None else f
        sel = logits.gather(1, kept.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # [B, k, C]
        loss = average_entropy(sel)  # [B]
        if step == 0:
            first_loss = loss.detach()
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # image b's entropy depends only on ctx[b]: its exact gradient lands there
        if regulator is not None:
            with torch.no_grad():
                g = ctx.grad
                for b in range(B):
                    g[b] = regulator({"ctx": g[b]}, h[b])["ctx"]
        opt.step()
        check_finite_batch(what, keys, step + 1, steps, loss.detach(), ctx.detach())
    with torch.no_grad():
        txt = prompts.features(ctx)  # [B, C, E]
        after = torch.einsum("be,bce->bc", feats[:, 0], txt).argmax(-1)
        if before is None:  # steps = 0: the initial prompt's prediction
            before = after
    return {"before": before, "after": after, "ctx": ctx.detach(), "kept": kept,
            "loss": first_loss if first_loss is not None else torch.full((B,), float("nan"))}


def check_finite_batch(what: str, keys: list[str] | None, step: int, total: int, loss: torch.Tensor,
                       ctx: torch.Tensor) -> None:
    """`gram.io.check_finite` for B images tuned together: losses [B] and their contexts [B, M, D] after
    the step. One reduction (one host sync) per step; only when it fails are the images looked at one by
    one, to name the first that diverged (by its key, else its index in the batch)."""
    if bool(torch.isfinite(loss).all() & torch.isfinite(ctx).all()):
        return
    for b in range(len(loss)):
        image = keys[b] if keys is not None else f"#{b} of the batch"
        check_finite(f"{what}, image {image}", step, total, float(loss[b]), [("ctx", ctx[b])])


def tpt_reference(learner, views: torch.Tensor, names: list[str], ctx0: torch.Tensor, steps: int, lr: float,
                  weight_decay: float, keep: float, regulator=None,
                  context: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """The plain per-image TPT loop (one image, its views encoded here, every class's 77-token sequence
    encoded whole): what `tune_batch` must reproduce.

    Args:
        views: normalised pixels [V, 3, s, s] of one image (view 0: the image itself).
    Returns: {"before": int, "after": int, "ctx": [M, D]}.
    """
    clip, dev = learner.clip, learner.backbone.device
    ids, eos = learner.prompt_ids(names)
    full = torch.full((len(names), learner.context), learner.pad, dtype=ids.dtype)
    full[:, :ids.shape[1]] = ids  # every sequence padded to the context length, as CLIP's tokenizer does
    with torch.no_grad():
        tok = clip.text_model.embeddings.token_embedding(full.to(dev))  # [C, 77, D]
        feats = normalize(encode_image_prompted(clip, views.to(dev, learner.backbone.dtype), None))  # [V, E]
    m = learner.n_ctx

    def text(ctx):
        emb = torch.cat([tok[:, :1], ctx.unsqueeze(0).expand(len(names), -1, -1).to(tok.dtype), tok[:, 1 + m:]], 1)
        return normalize(encode_text_embeds(clip, emb, eos.to(dev), truncate=False))  # [C, E]

    scale = clip.logit_scale.exp().float()
    ctx = _master(ctx0).clone().requires_grad_(True)
    opt = torch.optim.AdamW([ctx], lr=lr, weight_decay=weight_decay)
    kept = h = None
    before = None
    for _ in range(steps):
        logits = scale * feats @ text(ctx).T  # [V, C]
        if kept is None:
            with torch.no_grad():
                before = int(logits[0].argmax())
                kept = view_entropy(logits).argsort(stable=True)[:n_kept(len(feats), keep)]
                if regulator is not None:
                    f = feats[kept].mean(0)
                    h = context(f[None])[0] if context is not None else f
        loss = average_entropy(logits[kept])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if regulator is not None:
            with torch.no_grad():
                ctx.grad.copy_(regulator({"ctx": ctx.grad}, h)["ctx"])
        opt.step()
    with torch.no_grad():
        after = int((feats[0] @ text(ctx).T).argmax())
    return {"before": after if before is None else before, "after": after, "ctx": ctx.detach()}


# ------------------------------------------------------------------------------------------------
# a dataset split, image by image
# ------------------------------------------------------------------------------------------------
class TestTimeTuner:
    """Runs TPT over many images in batches (see the module docstring).

    Args:
        learner: a CoOp learner (its template and context size; its θ is not changed).
        ctx0: the initial context [M, D].
        cfg: `TptParams` (views, keep, steps, lr, weight_decay, crop_scale, batch_size, max_prompts).
        regulator, context: as for `tune_batch`.
        image_batch: images per forward pass of the image tower.
    """

    def __init__(self, learner, ctx0: torch.Tensor, cfg: TptParams, regulator=None, context=None,
                 image_batch: int = 256, shared_prefix: bool = True):
        self.learner, self.cfg, self.regulator, self.context = learner, cfg, regulator, context
        self.ctx0 = _master(ctx0).to(learner.backbone.device)
        self.image_batch, self.shared_prefix = image_batch, shared_prefix

    def view_features(self, views: torch.Tensor) -> torch.Tensor:
        """Frozen L2-normalised features [N, E] of views [N, 3, s, s], `image_batch` at a time."""
        return frozen_features(self.learner, views, self.image_batch)

    def run(self, images: np.ndarray, keys: list[str], names: list[str], seed: int, augment: str = "crop-flip",
            progress: bool = False, cache: str | Path | None = None, what: str = "tpt") -> dict:
        """Tune on every image of `images` [N, H, W, 3] independently; returns numpy predictions
        (`before`, `after`) [N], the first-step entropies [N], the seconds spent on views, image
        features and tuning, and whether the view features came from `cache`.

        `cache`: a safetensors file for the view features [N, V, E]; read if it exists, else written.
        The caller names it by everything the features depend on (`views_cache_name`): the methods
        of one seed share the views, so their jobs encode them once.
        `what`: the run, as a `DivergedError` names it (with the image's key); the cache is written only
        after the last image, so a run that diverges leaves none."""
        cfg, dev = self.cfg, self.learner.backbone.device
        prompts = ClassPrompts(self.learner, names, self.shared_prefix)
        scale = self.learner.clip.logit_scale.exp().float().detach()
        per_batch = self.images_per_batch(len(names))
        cached = None
        if cache is not None and Path(cache).exists():
            try:
                cached = load_tensors(cache)[0]["features"]
            except DamagedFile as e:  # a cache: computed afresh (and rewritten) rather than trusted
                log.warning("%s; computing the view features afresh", e)
        if cached is not None and cached.shape[:2] != (len(images), cfg.views):
            raise ValueError(f"{cache}: view features of shape {list(cached.shape)}, expected "
                             f"[{len(images)}, {cfg.views}, E]; delete it")
        before, after, losses, computed = [], [], [], []
        t = {"views_s": 0.0, "encode_s": 0.0, "tune_s": 0.0}
        bar = tqdm(total=len(images), desc="tpt", unit="img", disable=not progress, mininterval=2.0)
        for i in range(0, len(images), per_batch):
            t0 = _clock(dev)
            rows = range(i, min(i + per_batch, len(images)))
            if cached is None:
                views = torch.stack([make_views(images[j], self.learner.backbone.spec, cfg.views,
                                                view_generator(seed, keys[j]), augment, tuple(cfg.crop_scale), dev)
                                     for j in rows])  # [B, V, 3, s, s]
                t1 = _clock(dev)
                feats = self.view_features(views.flatten(0, 1)).view(len(rows), cfg.views, -1)  # [B, V, E]
                if cache is not None:
                    computed.append(feats.cpu())
            else:
                t1 = _clock(dev)
                feats = cached[i:i + len(rows)].to(dev)
            t2 = _clock(dev)
            out = tune_batch(prompts, feats, self.ctx0, scale, cfg.steps, cfg.lr, cfg.weight_decay, cfg.keep,
                             self.regulator, self.context, what, [keys[j] for j in rows])
            t3 = _clock(dev)
            before.append(out["before"].cpu())
            after.append(out["after"].cpu())
            losses.append(out["loss"].cpu())
            t["views_s"] += t1 - t0
            t["encode_s"] += t2 - t1
            t["tune_s"] += t3 - t2
            bar.update(len(rows))
        bar.close()
        if cache is not None and cached is None and computed:
            save_tensors(cache, {"features": torch.cat(computed)}, {"images": len(images), "views": cfg.views})
        return {"before": torch.cat(before).numpy(), "after": torch.cat(after).numpy(),
                "entropy": torch.cat(losses).numpy(), "views_cached": cached is not None,
                **{k: round(v, 3) for k, v in t.items()}}

    def images_per_batch(self, n_classes: int) -> int:
        """Images tuned together: tpt.batch_size, fewer when images x classes would pass max_prompts."""
        return max(1, min(self.cfg.batch_size, self.cfg.max_prompts // max(1, n_classes)))


def views_cache_name(backbone_fp: str, cfg: TptParams, augment: str, seed: int, keys: list[str], batch: int,
                     image_batch: int, device: torch.device, dtype: torch.dtype) -> str:
    """File name of the view features of one split: a digest of everything they depend on (the batch
    sizes too, since they set which views are encoded together)."""
    return config_digest({"backbone": backbone_fp, "views": cfg.views, "crop_scale": list(cfg.crop_scale),
                          "augment": augment, "seed": seed, "batch": batch, "image_batch": image_batch,
                          "keys": hashlib.sha256("\n".join(keys).encode()).hexdigest(),
                          "device": device.type, "dtype": str(dtype)}) + ".safetensors"


# ------------------------------------------------------------------------------------------------
# one run
# ------------------------------------------------------------------------------------------------
def initial_context(learner, m: TptMethodParams, prompt_path=None, meta=None) -> tuple[torch.Tensor, dict]:
    """The context every image starts from, and where it came from."""
    if m.init == "words":
        return learner.ctx.detach().clone(), {"init": "words", "template": m.prompt.init}
    if m.init == "tuned":
        theta, meta_p = load_prompt(prompt_path)
        mc = meta_p.get("method_config", {})
        if mc.get("kind") != "coop" or mc.get("class_specific") or "ctx" not in theta:
            raise ValueError(f"{prompt_path}: not a shared CoOp context (method {meta_p.get('method')!r}, "
                             f"config {mc}); test-time tuning needs one")
        if tuple(theta["ctx"].shape) != tuple(learner.ctx.shape):
            raise ValueError(f"{prompt_path}: context of shape {list(theta['ctx'].shape)}, but this method's "
                             f"prompt has {list(learner.ctx.shape)}")
        return theta["ctx"], {"init": "tuned", "prompt": str(prompt_path), "sha256": file_sha256(prompt_path),
                              "source": {k: meta_p.get(k) for k in ("method", "dataset", "shots", "seed", "subset_hash")}}
    theta0, _, _ = meta
    return theta0["ctx"], {"init": "meta"}


def run(params, prof, dataset: str, method: str, seed: int, data_dir: str | Path, backbone_dir: str | Path,
        out: str | Path, prototypes_dir: str | Path | None = None, prompt_path: str | Path | None = None,
        meta_dir: str | Path | None = None, progress: bool = True, profile: str | None = None,
        views_cache: str | Path | None = None) -> dict:
    """One (dataset, test-time method, seed) run over every domain of `tpt.domains` (empty: all the dataset's
    domains); writes `out`.
    `profile` names the profile `prof` is (for messages; default the file's `profile:`); `views_cache`, a
    directory where the view features of a (split, seed) are kept for the other methods' jobs.
    Raises DivergedError (nothing written to `out`; of `views_cache`, only the view features of domains
    finished before, which do not depend on the tuning) when an image's tuning goes non-finite."""
    cfg, profile = prof.tpt, profile or params.profile
    if method not in cfg.methods:
        raise KeyError(f"test-time method {method!r} is not defined in {profile}.tpt.methods "
                       f"(defined: {', '.join(cfg.methods) or 'none'})")
    m = cfg.methods[method]
    needs_meta = m.init == "meta" or m.regulator != "none"
    if m.init == "tuned" and prompt_path is None:
        raise ValueError(f"test-time method {method!r} starts from a tuned prompt (init: tuned): pass --prompt")
    if prompt_path is not None and m.init != "tuned":
        raise ValueError(f"--prompt given, but test-time method {method!r} has init: {m.init}")
    if needs_meta and meta_dir is None:
        raise ValueError(f"test-time method {method!r} uses GRAM's meta-training (init: meta or a regulator): "
                         "pass --meta, the output of its recipe in grid.tpt.gram")
    if meta_dir is not None and not needs_meta:
        raise ValueError(f"--meta given, but test-time method {method!r} uses neither a meta init nor a regulator")
    t_start = time.time()
    data_dir = Path(data_dir)
    wanted = dataset_domains(data_dir, dataset, cfg.domains)  # clear errors before any work
    bb = load(backbone_dir, prof.backbone.device, prof.backbone.dtype)
    torch.manual_seed(seed)
    learner = make_learner(bb, m.prompt, 0, seed)
    meta = regulator = context = None
    meta_info = None
    if needs_meta:
        run_dir, run = meta_run(meta_dir, seed)  # recipes with several seeds: the run of this seed
        meta = load_meta(run_dir, learner)
        meta_info = {"recipe": meta[2]["recipe"], "run": run, "sha256": file_sha256(run_dir / META)}
        if m.regulator != "none":
            regulator = meta[1].to(bb.device).requires_grad_(False)
        if m.regulator == "structure":
            structure, proto_sha = load_structure(prototypes_dir, cfg.structure, f"tpt.methods.{method}")
            context = structure.to(bb.device)
            meta_info["prototypes_sha256"] = proto_sha
    ctx0, init_info = initial_context(learner, m, prompt_path, meta)
    run_cfg = cfg if m.lr is None else dataclasses.replace(cfg, lr=m.lr)  # the method's own lr, if it has one
    tuner = TestTimeTuner(learner, ctx0, run_cfg, regulator, context)
    augment = "augmix" if dataset in cfg.augmix else cfg.augment
    if views_cache is not None:
        fp = backbone_fingerprint(backbone_dir)
    domains = []
    for domain in wanted:  # a domain with a class subset (ImageNet-A/-R) is tuned and scored among it
        sp = split_images(data_dir, dataset, domain, cfg.split, size=bb.spec.size).restricted()
        t0 = time.time()
        cache = None
        if views_cache is not None:
            cache = Path(views_cache) / views_cache_name(fp, cfg, augment, seed, sp.keys,
                                                         tuner.images_per_batch(len(sp.classes)), tuner.image_batch,
                                                         bb.device, bb.dtype)
        res = tuner.run(sp.images, sp.keys, sp.classes, seed, augment, progress, cache,
                        what=f"tpt {method} ({dataset}, domain {domain}, seed {seed})")
        wall = time.time() - t0
        d = {"domain": domain, "n": int(len(sp.labels)), "classes": len(sp.classes),
             "before": scores(res["before"], sp.labels, len(sp.classes)),
             "after": scores(res["after"], sp.labels, len(sp.classes)),
             "changed": float(np.mean(res["before"] != res["after"])) if len(sp.labels) else 0.0,
             "mean_entropy": float(np.nanmean(res["entropy"])) if len(sp.labels) else None,
             "time": {k: res[k] for k in ("views_s", "encode_s", "tune_s")}, "views_cached": res["views_cached"],
             "wall_s": round(wall, 3),
             "ms_per_image": round(1000 * wall / max(1, len(sp.labels)), 3)}
        domains.append(d)
        log.info("%s %s/%s seed %d: balanced accuracy %.3f -> %.3f (%d images, %.1f ms/image)", method, dataset,
                 domain, seed, d["before"]["balanced_accuracy"], d["after"]["balanced_accuracy"], d["n"],
                 d["ms_per_image"])
    summary = {when: {metric: float(np.mean([d[when][metric] for d in domains]))
                      for metric in ("accuracy", "balanced_accuracy")} for when in ("before", "after")}
    record = {"protocol": "test-time", "dataset": dataset, "method": method, "seed": seed, "augment": augment,
              "init": init_info, "regulator": m.regulator, "meta": meta_info, "domains": domains,
              "summary": summary,
              "config": {"method": to_dict(m), "tpt": {k: v for k, v in to_dict(run_cfg).items() if k != "methods"}},
              "wall_time_s": round(time.time() - t_start, 3)}
    write_json(out, record)
    return record


def main(argv: list[str] | None = None) -> None:
    p = stage_parser("tpt", __doc__)
    p.add_argument("--dataset", required=True, help="dataset whose split of every tpt.domains is tuned on")
    p.add_argument("--method", required=True, help="test-time method (a key of <profile>.tpt.methods)")
    p.add_argument("--seed", required=True, type=int, help="seed of the views (and of the tuned prompt's run)")
    p.add_argument("--data", required=True, help="data directory of the profile, e.g. data/emoji")
    p.add_argument("--backbone", required=True, help="backbone directory, e.g. models/emoji/backbone")
    p.add_argument("--out", required=True, help="the run's JSON record")
    p.add_argument("--prototypes", default=None, help="structure regulator: the prototypes stage's output")
    p.add_argument("--prompt", default=None, help="init: tuned: the few-shot prompt to start from")
    p.add_argument("--meta", default=None, help="init: meta or a regulator: the meta-train output of its recipe")
    p.add_argument("--views-cache", default=None, help="directory that keeps the view features of each (split, "
                                                       "seed) for the other methods' jobs")
    args = p.parse_args(argv)
    params, prof = stage_setup(args)
    run(params, prof, args.dataset, args.method, args.seed, args.data, args.backbone, args.out, args.prototypes,
        args.prompt, args.meta, profile=args.profile or params.profile, views_cache=args.views_cache)
