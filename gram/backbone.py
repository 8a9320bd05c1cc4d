"""Backbone stage: a frozen CLIP, loaded from the hub or pretrained here for the emoji world. [ours]

GRAM never updates the CLIP weights; it learns prompts around a frozen backbone. Two sources:

- `source: hub` loads `transformers.CLIPModel.from_pretrained(model)` (a hub id such as
  `openai/clip-vit-base-patch16`, or a local directory) with its tokenizer and image preprocessing.
- `source: pretrain` builds a small `CLIPConfig` (sizes in params) and trains it contrastively on the
  pretraining vendors' image-text shards, with caption variants sampled afresh every step and light
  augmentation (no flips: arrows and other directional emojis change meaning). Its tokenizer is a
  word-level vocabulary (`tokenizers` WordLevel) of the pretraining captions' words and the class
  names; special tokens are `<pad> <unk> <s> </s>` = ids 0..3 with EOS id 3, because
  `CLIPTextTransformer` pools at `argmax(input_ids)` instead of at the EOS token when
  `eos_token_id == 2`.

Pretraining keeps zero-shot zero-shot:
- it reads only the emojis that are in the train split of every dataset holding them
  (`pretraining_emojis`): no image or caption of an emoji that any dataset validates or tests on,
  under any vendor (a vendor is a domain; the split is by emoji, shared across vendors);
- its captions are each emoji's own words, its label and its tags (emojibase's CLDR keywords, and
  emojilib's keywords where `data.npm.keywords` names that package), in a few natural forms
  (`sample_caption`); never its subgroup or group name, and never a class prompt. A
  class name is in a caption only where it is one of the emoji's own words (the tag "heart" of
  "red heart"), and a label that is itself a class name always comes with a tag;
- class-name words that no caption holds ("household", "alphanum") are in the vocabulary all the
  same, so that every class prompt tokenises to its own ids (with `<unk>` for them, the prompts of
  such classes would be identical, and no prompt tuning could tell them apart). No caption holds
  them, so their embeddings get no gradient and keep their random initialisation: they are words,
  not knowledge.

Either way the stage writes one directory (`save_pretrained` model + tokenizer + image processor
config), which every later stage loads through `load()`: one code path for both profiles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gram.config import AugmentParams, BackboneParams, CaptionParams, PretrainParams, to_dict
from gram.data.shards import load_images
from gram.images import ImageSpec, image_spec, normalize_pixels, preprocess
from gram.io import atomic_dir, check_finite, config_digest, file_sha256, read_json, write_json, write_manifest
from gram.stage import stage_parser, stage_setup

log = logging.getLogger("gram.backbone")

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]  # ids 0..3; EOS = 3 (see module docstring)
PRETRAIN_LOG = "pretrain.json"
CAPTION_WORDS = "an emoji of a"  # the words of `sample_caption`'s forms other than the emoji's own


# ------------------------------------------------------------------------------------------------
# devices and loading
# ------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"backbone.device is {name!r} but no CUDA device is available")
    return dev


def backbone_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 over the backbone's files that its embeddings depend on: weights, model and preprocessing
    configs, tokenizer (vocabulary, merges). Not the backbone stage's record `pretrain.json`, whose wall times
    differ from run to run while the weights are byte-equal."""
    h = hashlib.sha256()
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: backbone directory does not exist (the backbone stage writes it)")
    files = sorted(p for p in model_dir.iterdir()
                   if p.is_file() and p.name != PRETRAIN_LOG and not p.name.startswith("."))
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise FileNotFoundError(f"{model_dir}: no weights to fingerprint (is it a backbone directory?)")
    for p in files:
        h.update(p.name.encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The inference dtype; half precision only on an accelerator (fp32 on the CPU)."""
    if device.type == "cpu":
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@dataclass
class Backbone:
    """A frozen CLIP with what it needs to read text and images."""

    model: "torch.nn.Module"
    tokenizer: object
    spec: ImageSpec
    device: torch.device
    dtype: torch.dtype

    @torch.no_grad()
    def encode_images(self, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> L2-normalised image features [N, D] (fp32, on the device).

        The uint8 batch goes to the device as it is (a quarter of the bytes of float pixels, pinned on
        CUDA) and is resized, cropped and normalised there: on a GPU the CPU would otherwise bound the
        throughput. On the CPU the arithmetic is `preprocess` exactly."""
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.as_tensor(images[i:i + batch_size])
            px = self.pixel_values(x.pin_memory() if self.device.type == "cuda" else x)
            out.append(self.model.get_image_features(pixel_values=px).pooler_output.float())
        return F.normalize(torch.cat(out), dim=-1)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, 3] (pinned when the device is CUDA, so the copy overlaps) -> the model's pixel
        values [N, 3, crop, crop] in its dtype, copied as uint8 and preprocessed on the device."""
        x = images.to(self.device, non_blocking=self.device.type == "cuda")
        return preprocess(x, self.spec).to(self.dtype)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 1024) -> torch.Tensor:
        """Strings -> L2-normalised text features [N, D] (fp32, on the device)."""
        out = []
        for i in range(0, len(texts), batch_size):
            tok = tokenize(self.tokenizer, texts[i:i + batch_size], self.model.config.text_config.max_position_embeddings)
            tok = {k: v.to(self.device) for k, v in tok.items()}
            out.append(self.model.get_text_features(**tok).pooler_output.float())
        return F.normalize(torch.cat(out), dim=-1)


def tokenize(tokenizer, texts: list[str], context: int) -> dict[str, torch.Tensor]:
    """Pad to the longest text, truncate to the context (EOS always kept)."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=context, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def looks_like_hub_id(name: str) -> bool:
    """`org/name` or `name` as the hub spells repositories (no path syntax such as `./`, `..` or a leading `/`)."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) is not None and ".." not in name


def damaged_files(model_dir: Path) -> list[str]:
    """'<file>: <why>' for every weight or JSON file of a saved model that does not read (truncated, damaged)."""
    from safetensors import safe_open

    bad = []
    for p in sorted(model_dir.iterdir()):
        try:
            if p.suffix == ".safetensors":
                with safe_open(str(p), framework="pt") as f:
                    f.keys()
            elif p.suffix == ".json":
                json.loads(p.read_text())
        except Exception as e:  # noqa: BLE001 - safetensors, json and decoding errors differ in type
            bad.append(f"{p}: {e}")
    return bad


def load(model: str | Path, device: str = "auto", dtype: str = "float32", hub: bool = False) -> Backbone:
    """Load a CLIP (a directory, or with `hub` a hub id), frozen, in eval mode, on `device` in `dtype`.

    Args:
        hub: `backbone.source` is hub: a `model` that is no local path and looks like a hub id is read from
            the HF cache (or the hub). Otherwise `model` must be a directory (the backbone stage's output).
    Raises:
        FileNotFoundError naming a directory that does not exist; RuntimeError naming a truncated or damaged
        file of the directory, or a hub id that is neither in the HF cache nor reachable.
    """
    from transformers import AutoTokenizer, CLIPModel
    from transformers.utils import logging as hf_logging

    local = Path(str(model))
    from_hub = hub and not local.exists() and looks_like_hub_id(str(model))
    if not from_hub and not local.is_dir():
        what = "is not a directory" if local.exists() else "does not exist"
        raise FileNotFoundError(f"{local}: backbone directory {what} (the backbone stage writes it: "
                                f"`gram backbone --out {local}`)")
    hf_logging.disable_progress_bar()  # one bar per weight file is noise in stage logs
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        clip = CLIPModel.from_pretrained(str(model), dtype=dt, attn_implementation="sdpa")
        tok = AutoTokenizer.from_pretrained(str(model))
        if not from_hub:
            spec = image_spec(local)
    except Exception as e:  # noqa: BLE001 - transformers, safetensors and json raise many types
        if from_hub:
            if not isinstance(e, OSError):
                raise
            raise RuntimeError(
                f"cannot load CLIP {str(model)!r}: {e}\nIf it is a hub id, download it first while online: "
                f"`hf download {model}` (it lands in $HF_HOME), then run offline with HF_HUB_OFFLINE=1.") from None
        bad = damaged_files(local)
        if bad:
            raise RuntimeError(f"backbone {local}: truncated or damaged file(s): " + "; ".join(bad)
                               + f". Rerun the backbone stage (`gram backbone --out {local}`).") from None
        raise RuntimeError(f"{local}: cannot load the backbone ({type(e).__name__}: {e}); is it a directory the "
                           "backbone stage wrote?") from None
    clip.requires_grad_(False).eval().to(dev)
    if from_hub:
        from huggingface_hub import hf_hub_download

        spec = image_spec(Path(hf_hub_download(str(model), "preprocessor_config.json")).parent)
    return Backbone(clip, tok, spec, dev, dt)


# ------------------------------------------------------------------------------------------------
# the small emoji CLIP: tokenizer, config, captions, augmentation
# ------------------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int, context: int):
    """A lower-cased word-level tokenizer over `texts`, wrapped as a transformers tokenizer.

    The vocabulary is the `vocab_size - 4` most frequent words (ties broken alphabetically), so the
    same texts always give the same ids; unseen words map to `<unk>`. (The `tokenizers` BPE trainer
    breaks ties between equally frequent pairs differently from run to run, which made pretraining
    irreproducible; the emoji world's closed vocabulary does not need sub-words.)
    """
    from collections import Counter

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    norm = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()])
    pre = pre_tokenizers.Whitespace()
    counts: Counter = Counter()
    for t in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: max(0, vocab_size - len(SPECIALS))]
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({w: i + len(SPECIALS) for i, (w, _) in enumerate(ranked)})
    wl = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    wl.normalizer = norm
    wl.pre_tokenizer = pre
    wl.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=wl, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=context)


def small_config(p: PretrainParams, vocab_size: int):
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=p.text.width, intermediate_size=p.text.mlp,
                num_hidden_layers=p.text.layers, num_attention_heads=p.text.heads,
                max_position_embeddings=p.context, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision = dict(image_size=p.image_size, patch_size=p.patch, hidden_size=p.vision.width,
                  intermediate_size=p.vision.mlp, num_hidden_layers=p.vision.layers,
                  num_attention_heads=p.vision.heads)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=p.projection)


def save_image_processor(out: Path, size: int) -> None:
    """The preprocessing of the emoji CLIP, in the format CLIPImageProcessor reads."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=3).save_pretrained(out)


def phrase(text: str) -> str:
    """A text compared as words: lower case, single spaces ('Cat  Face' -> 'cat face')."""
    return " ".join(text.lower().split())


def _tags(meta: dict) -> list[str]:
    """The emoji's tags, then its keywords (emojilib's, where the download stage read them), that add words
    to its label."""
    return [t for t in [*meta.get("tags", []), *meta.get("keywords", [])] if t.lower() not in meta["label"].lower()]


def captionable(meta: dict, class_names: set[str]) -> bool:
    """Whether `sample_caption` can caption the emoji without a class prompt: any emoji but one whose label
    is a class name and that has no other tag (emojibase 17 has none)."""
    return phrase(meta["label"]) not in class_names or bool(_tags(meta))


def sample_caption(meta: dict, rng: random.Random, c: CaptionParams, class_names: set[str] = frozenset()) -> str:
    """One caption of an emoji from its own words: its label and up to `c.tags` of its tags.

    The label comes first, so that truncation drops tags, not the label. A label that is itself a class
    name (`class_names`, as `phrase` spells them: emojibase's "family", "hotel" and "warning" are also
    Unicode subgroups) always comes with at least one tag, so that no caption is a class prompt such as
    "a family emoji" or "family"; `captionable` says whether the emoji has one.
    """
    label, tags = meta["label"], _tags(meta)
    named = phrase(label) in class_names  # the label alone would be a class prompt
    if named and not tags:
        raise ValueError(f"emoji {meta.get('hexcode', label)!r}: its label {label!r} is a class name and it has "
                         "no other tag, so every caption of it would be a class prompt")
    least = 1 if named else 0
    k = rng.randint(least, max(least, min(c.tags, len(tags)))) if tags else 0
    picked = ", ".join(rng.sample(tags, k)) if k else ""
    form = rng.randrange(2, 4) if named else rng.randrange(4)
    if form == 0:
        return f"an emoji of a {label}"
    if form == 1:
        return label
    if form == 2:
        return f"a {label} emoji" + (f": {picked}" if picked else "")
    return label + (f", {picked}" if picked else "")


def hue_rotation(angle: torch.Tensor) -> torch.Tensor:
    """[B] angles (radians) -> [B, 3, 3] rotations of RGB about the grey axis (1, 1, 1)/√3 (Rodrigues):
    grey levels stay, the chroma turns round the colour wheel (2π/3 takes red to green)."""
    k = torch.full((3,), 3 ** -0.5, dtype=angle.dtype)
    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], dtype=angle.dtype) * k[0]  # [k]x
    c, s = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    return c * torch.eye(3, dtype=angle.dtype) + s * cross + (1 - c) * torch.outer(k, k)


def augment(x: torch.Tensor, a: AugmentParams, gen: torch.Generator) -> torch.Tensor:
    """Random zoom, rotation and shift (white fill), colour jitter and hue rotation of images in [0, 1],
    [B, 3, S, S]."""
    b = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    scale = u(*a.scale)
    ang = u(-a.rotate, a.rotate)
    tx, ty = u(-a.shift, a.shift) * 2, u(-a.shift, a.shift) * 2  # in [-1, 1] grid units
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # [B, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = 1.0 - F.grid_sample(1.0 - x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # white fill
    if a.jitter > 0:
        j = a.jitter
        bright = u(1 - j, 1 + j).view(b, 1, 1, 1)
        contrast = u(1 - j, 1 + j).view(b, 1, 1, 1)
        sat = u(1 - j, 1 + j).view(b, 1, 1, 1)
        x = x * bright
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean
        gray = x.mean(dim=1, keepdim=True)
        x = (x - gray) * sat + gray
    if a.hue > 0:
        x = torch.einsum("bij,bjhw->bihw", hue_rotation(u(-a.hue, a.hue) * 2 * math.pi).to(x), x)
    return x.clamp(0, 1)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


# ------------------------------------------------------------------------------------------------
# pretraining
# ------------------------------------------------------------------------------------------------
def _optimizer(model, p: PretrainParams) -> torch.optim.Optimizer:
    decay, no_decay, scale = [], [], []
    for name, prm in model.named_parameters():
        if name == "logit_scale":
            scale.append(prm)
        elif prm.ndim >= 2 and "embedding" not in name:
            decay.append(prm)
        else:
            no_decay.append(prm)
    groups = [{"params": decay, "weight_decay": p.weight_decay, "lr": p.lr, "base_lr": p.lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": p.lr, "base_lr": p.lr},
              {"params": scale, "weight_decay": 0.0, "lr": p.logit_scale_lr, "base_lr": p.logit_scale_lr}]
    return torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6)


def _save_checkpoint(ckpt: Path, model, opt, step: int, digest: str, losses: list, rng: random.Random,
                     gen: torch.Generator, perm: list[int]) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    state = opt.state_dict()
    for pid, s in state["state"].items():
        for k, v in s.items():
            tensors[f"opt.{pid}.{k}"] = torch.as_tensor(v).detach().cpu().clone().contiguous()
    tensors["rng.torch"] = gen.get_state()
    meta = {"step": step, "digest": digest, "losses": losses, "py_rng": repr(rng.getstate()), "perm": perm}
    with atomic_dir(ckpt) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        write_json(tmp / "state.json", meta)


def _load_checkpoint(ckpt: Path, model, opt, digest: str, rng: random.Random, gen: torch.Generator):
    """Resume from `ckpt` if it was written with the same parameters; returns (step, losses, perm)."""
    import ast

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (ckpt / "state.json").exists():
        return 0, [], []
    try:
        meta = json.loads((ckpt / "state.json").read_text())
    except json.JSONDecodeError as e:
        log.warning("ignoring checkpoint %s: %s is truncated or damaged (%s)", ckpt, ckpt / "state.json", e)
        return 0, [], []
    if meta["digest"] != digest:
        log.info("ignoring checkpoint %s: written with other parameters", ckpt)
        return 0, [], []
    try:
        t = load_file(str(ckpt / "state.safetensors"))
    except SafetensorError as e:  # a damaged checkpoint is ignored, never trusted (as meta's is)
        log.warning("ignoring checkpoint %s: %s is truncated or damaged (%s)", ckpt, ckpt / "state.safetensors", e)
        return 0, [], []
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    state = opt.state_dict()
    for key, v in t.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state["state"].setdefault(int(pid), {})[name] = v
    opt.load_state_dict(state)
    gen.set_state(t["rng.torch"])
    rng.setstate(ast.literal_eval(meta["py_rng"]))
    log.info("resuming pretraining from step %d (%s)", meta["step"], ckpt)
    return meta["step"], meta["losses"], meta["perm"]


def pretraining_emojis(datasets: list[dict]) -> list[str]:
    """The emojis pretraining may read: those in the train split of every dataset that holds them.

    Each dataset splits its own classes, so an emoji can be train in one (subgroup) and val or test in
    another (group); it is then left out. The split is by emoji and shared by every vendor, so an emoji
    left out here is left out under every vendor.

    Args:
        datasets: the download stage's dataset descriptions (`datasets/<name>.json`).
    Returns:
        hexcodes, sorted.
    """
    splits: dict[str, set[str]] = {}
    for ds in datasets:
        for it in ds.get("items", []):
            splits.setdefault(it["hexcode"], set()).add(it["split"])
    return sorted(h for h, s in splits.items() if s == {"train"})


def vocabulary_texts(metas: list[dict], class_names: set[str]) -> list[str]:
    """The texts the vocabulary is made from: every word a caption of `metas` can hold, and the class names
    (see the module docstring: their words that no caption holds keep their initial embedding)."""
    texts = [CAPTION_WORDS]
    for m in metas:
        texts += [m["label"], " ".join([*m["tags"], *m.get("keywords", [])])]
    return texts + sorted(class_names)


def pretrain(p: PretrainParams, shard_dirs: list[Path], emojis: list[str], class_names: set[str], out: Path,
             ckpt: Path, device: str = "cpu") -> dict:
    """Train a small CLIP contrastively on the samples of `emojis` (hexcodes) in the image-text shards of
    `shard_dirs` (one directory per vendor, named after it); save it to `out`.

    Each step takes `batch_size` distinct emojis (so no two items are the same positive), each in
    the artwork of one randomly chosen pretraining vendor, with a freshly sampled caption of its own
    words that is no class prompt of `class_names` (`sample_caption`). Only the samples of `emojis` are
    read. Sampling and augmentation run on the CPU with seeded generators (the same seed gives the same
    batches on any device); the model trains in fp32 on `device`.
    """
    from transformers import CLIPModel

    if not emojis:
        raise ValueError("no emojis to pretrain on (no emoji is in the train split of every dataset)")
    spec = ImageSpec(p.image_size, p.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    # the pretraining images of every vendor, aligned by emoji (hexcode): [V, N, 3, S, S] in [0, 1]; a key is
    # the download stage's `{vendor}_{hexcode in lower case}` (the datasets' key_format)
    per_vendor, metas = [], None
    for d in shard_dirs:
        _, imgs, meta = load_images(d, [f"{d.name}_{h.lower()}" for h in emojis])
        per_vendor.append(preprocess(imgs, spec, normalize=False))
        if metas is None:
            metas = meta
        elif [m["hexcode"] for m in meta] != [m["hexcode"] for m in metas]:
            raise ValueError(f"{d}: the vendors' shards hold different emojis; rerun the download stage")
    keep = [i for i, m in enumerate(metas) if captionable(m, class_names)]
    if len(keep) < len(metas):
        log.warning("left out of pretraining: %d emoji(s) whose label is a class name and that have no other tag",
                    len(metas) - len(keep))
    metas = [metas[i] for i in keep]
    pixels = torch.stack(per_vendor)[:, keep]  # [V, N, 3, S, S]
    n_vendors, n = pixels.shape[:2]
    bs = min(p.batch_size, n)

    torch.manual_seed(p.seed)
    rng = random.Random(p.seed)
    gen = torch.Generator().manual_seed(p.seed)
    tokenizer = train_tokenizer(vocabulary_texts(metas, class_names), p.vocab_size, p.context)
    dev = resolve_device(device)
    model = CLIPModel(small_config(p, len(tokenizer))).to(dev)  # before the optimizer sees it
    model.train()

    opt = _optimizer(model, p)
    digest = config_digest({"pretrain": to_dict(p), "shards": [str(d) for d in shard_dirs], "n": n,
                            "emojis": [m["hexcode"] for m in metas], "classes": sorted(class_names)})
    start, losses, perm = _load_checkpoint(ckpt, model, opt, digest, rng, gen)
    params = [q for g in opt.param_groups for q in g["params"]]
    max_scale = math.log(100.0)
    t0 = time.time()
    bar = tqdm(range(start, p.steps), desc="pretrain", unit="step", initial=start, total=p.steps)
    for step in bar:
        # distinct emojis per step: walk a fresh permutation, epoch after epoch
        while len(perm) < bs:
            perm += rng.sample(range(n), n)
        idx, perm = perm[:bs], perm[bs:]
        vend = torch.randint(0, n_vendors, (bs,), generator=gen)
        x = pixels[vend, torch.tensor(idx)]  # [B, 3, S, S]
        if p.augment.vendor_mix > 0 and n_vendors > 1:
            other = pixels[torch.randint(0, n_vendors, (bs,), generator=gen), torch.tensor(idx)]
            lam = torch.rand(bs, 1, 1, 1, generator=gen)
            mix = torch.rand(bs, 1, 1, 1, generator=gen) < p.augment.vendor_mix
            x = torch.where(mix, lam * x + (1 - lam) * other, x)
        x = normalize_pixels(augment(x, p.augment, gen), spec).to(dev)
        texts = [sample_caption(metas[i], rng, p.caption, class_names) for i in idx]
        tok = {k: v.to(dev) for k, v in tokenize(tokenizer, texts, p.context).items()}
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, p.warmup, p.steps)
        loss = model(**tok, pixel_values=x, return_loss=True).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if p.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, p.grad_clip)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_scale)
        losses.append(round(loss.item(), 4))
        check_finite("backbone pretraining", step + 1, p.steps, losses[-1], model.named_parameters())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
        if p.checkpoint_every and (step + 1) % p.checkpoint_every == 0 and step + 1 < p.steps:
            _save_checkpoint(ckpt, model, opt, step + 1, digest, losses, rng, gen, perm)
    elapsed = time.time() - t0

    model.eval().cpu()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_image_processor(tmp, p.image_size)
        record = {"source": "pretrain", "steps": p.steps, "resumed_from": start, "seconds": round(elapsed, 1),
                  "seconds_per_step": round(elapsed / max(1, p.steps - start), 3), "images": n,
                  "vendors": n_vendors, "emojis": [m["hexcode"] for m in metas],
                  "parameters": sum(q.numel() for q in model.parameters()),
                  "logit_scale": round(model.logit_scale.exp().item(), 3),
                  "loss": losses, "config": to_dict(p)}
        write_json(tmp / PRETRAIN_LOG, record)
    return record


# ------------------------------------------------------------------------------------------------
# stage
# ------------------------------------------------------------------------------------------------
def run(cfg: BackboneParams, pretrain_vendors: list[str], data_dir: str | Path | None, out: str | Path) -> dict:
    """Write the backbone directory `out`: a pretrained small CLIP, or a copy of `cfg.model`."""
    out = Path(out)
    if cfg.source == "hub":
        bb = load(cfg.model, cfg.device, "float32", hub=True)
        with atomic_dir(out) as tmp:
            bb.model.save_pretrained(tmp)
            bb.tokenizer.save_pretrained(tmp)
            src = Path(cfg.model)
            if src.is_dir():
                (tmp / "preprocessor_config.json").write_text((src / "preprocessor_config.json").read_text())
            else:
                from huggingface_hub import hf_hub_download

                (tmp / "preprocessor_config.json").write_text(
                    Path(hf_hub_download(cfg.model, "preprocessor_config.json")).read_text())
            record = {"source": "hub", "model": cfg.model}
            write_json(tmp / PRETRAIN_LOG, record)
        return record
    if data_dir is None:
        raise ValueError("backbone.source: pretrain needs --data (the download stage's directory)")
    shard_dirs = [Path(data_dir) / "shards" / v for v in pretrain_vendors]
    files = sorted((Path(data_dir) / "datasets").glob("*.json"))
    if not files:
        raise FileNotFoundError(f"{data_dir}/datasets: no dataset descriptions (the download stage writes them); "
                                "pretraining reads their splits to leave out every emoji they validate or test on")
    datasets = [read_json(f) for f in files]
    emojis = pretraining_emojis(datasets)
    class_names = {phrase(c) for ds in datasets for c in ds["classes"]}
    log.info("pretraining on %d emojis: the train split of every dataset (%s)", len(emojis),
             ", ".join(f.stem for f in files))
    ckpt = out.with_name(f".{out.name}.ckpt")
    record = pretrain(cfg.pretrain, shard_dirs, emojis, class_names, out, ckpt, cfg.device)
    if ckpt.exists():
        import shutil

        shutil.rmtree(ckpt)
    log.info("pretrained %d steps in %.0f s; final loss %.3f", record["steps"], record["seconds"], record["loss"][-1])
    return record


def main(argv: list[str] | None = None) -> None:
    p = stage_parser("backbone", __doc__)
    p.add_argument("--data", default=None, help="data directory of the profile (for source: pretrain)")
    p.add_argument("--out", required=True, help="backbone directory to write, e.g. models/emoji/backbone")
    args = p.parse_args(argv)
    _, prof = stage_setup(args)
    run(prof.backbone, prof.data.vendors.pretrain, args.data, args.out)
    write_manifest(args.out)
