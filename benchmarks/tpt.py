"""Benchmark: test-time prompt tuning (TPT), the batched path against the plain per-image loop.

`gram.tpt.TestTimeTuner.run` tunes B test images at once. Each image gets its own copy of the CoOp
context. The views are encoded once per batch, the text sequences stop at the longest EOS, and the
`[BOS] ctx` prefix goes through the text tower once per image (`encode_shared_prefix`).
`gram.tpt.tpt_reference` is the plain loop of the same algorithm, one image at a time: its views are
encoded inside the call, and every class's 77-token sequence is encoded whole. This script times both
on the same images in the same run, and checks that they predict the same classes.

Cases: one per class count C of `--classes` (default 10,100,1000), all on one model:

- Model: a CLIP with ViT-B/16 shapes and random weights (`transformers.CLIPConfig`; this machine has no
  hub access, and timings do not depend on the weights). Text tower: width 512, 12 layers, 8 heads,
  MLP 2048, context 77, vocabulary 49408. Vision tower: width 768, 12 layers, 12 heads, MLP 3072,
  patch 16, image 224. Projection 512. On CUDA the model is cast to `--dtype` as
  `gram.backbone.load` would cast it. The CPU always runs float32.
- Tokenizer: `gram.backbone.train_tokenizer` (word-level, special ids 0..3) over a few hundred
  synthetic words and the template's words. Its ids are far below 49408; the embedding table keeps
  CLIP's size.
- Learner: `gram.prompts.CoOp(bb, init="a photo of a {}.")`, so the context is 4 vectors and the
  initial θ is the embedding of "a photo of a". Class names are synthetic, 1-4 words each, so prompts
  are 8-11 tokens long with EOS, like ImageNet's names under CLIP's BPE.
- Images: random uint8 arrays [N, 256, 256, 3], with keys `img0`, `img1`, ... The views come from
  `make_views` (CLIP's preprocessing of the image plus V - 1 random resized crops and flips), seeded by
  `view_generator(--seed, key)`, so both paths tune on exactly the same views.

For every case:

- `fast`: `TestTimeTuner(learner, ctx0, TptParams(...)).run(images, keys, names, seed)` over
  `--images` images, timed as one call. The call's own breakdown (`views_s`, `encode_s`, `tune_s`) is
  kept. (`gram.tpt` synchronises CUDA before each reading, so GPU work
  is charged to the step that queued it.)
- `reference`: for each of the first `--reference-images` images, `make_views(...)` followed by
  `tpt_reference(learner, views, names, ctx0, steps, lr, weight_decay, keep)`. While it runs, a timing
  wrapper stands in for `gram.prompts.encoders.encode_image_prompted`, which splits the call into
  image encoding and tuning. The reference keeps activations of C x 77 tokens for the backward pass
  (about 0.5 MB per token in float32 at these shapes). It is skipped (`"reference": null` with the
  reason) when C is above `--max-reference-classes` (default 100 on the CPU, no limit on CUDA), or when
  that estimate exceeds the memory available.
- `check`: the `before` (initial prompt) and `after` (tuned prompt) predictions of both paths, on
  the images both ran. They must agree on every image. A mismatch is printed with the image and the
  classes, recorded in the JSON, and the script exits with status 1. Both paths compute the same
  thing in float32 but in a different order, so an argmax between two nearly tied classes could in
  principle flip; in bfloat16 that is more likely.

Before timing, each path runs one untimed warm-up per case: for the fast path one image batch (one
image on the CPU), for the reference one image. These use their own images (keys `warm0`, ...).

Run from the repository root:

    python benchmarks/tpt.py                                  # cuda if available, C = 10, 100, 1000
    python benchmarks/tpt.py --device cpu --threads 1 --images 3 --reference-images 2
    python benchmarks/tpt.py --device cuda --dtype bfloat16 --images 64 --reference-images 8

Results go to `benchmarks/results/tpt-<device>.json` (`--out` to change). The file is rewritten after
every case, so a run that is stopped keeps what it measured (`"complete": false`). A table is printed
at the end. See `benchmarks/README.md` for the fields.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script from anywhere: make `gram` importable
    sys.path.insert(0, str(ROOT))

from gram.config import TptParams  # noqa: E402
from benchenv import base_environment, device_and_dtype, read_peak, reset_peak, sync  # noqa: E402
from gram.io import write_json  # noqa: E402

GIB = 1024 ** 3
TEMPLATE = "a photo of a {}."
# CLIP ViT-B/16 (openai/clip-vit-base-patch16) shapes; the token ids come from the tokenizer built here
VITB16_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                   num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu")
VITB16_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     patch_size=16, image_size=224, hidden_act="quick_gelu")
VITB16_PROJECTION = 512
LOGIT_SCALE = 100.0  # exp(logit_scale) of the trained CLIPs (transformers' fresh default is 1 / 0.07)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIDE = 256
# how many words a class name has (1..4)
NAME_WORD_WEIGHTS = [0.35, 0.35, 0.2, 0.1]
# Activations a text layer keeps for the backward pass, in elements per token and unit of width. This
# was measured on the CPU: the 77-token ViT-B/16 text tower (12 layers, width 512) grew the peak RSS by
# about 0.49 MB per token in float32, that is about 20 x width elements per token and layer.
SAVED_PER_TOKEN_LAYER = 20


# ------------------------------------------------------------------------------------------------
# environment, clocks and memory
# ------------------------------------------------------------------------------------------------
def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    env = base_environment(device, dtype)
    env.update(transformers=transformers.__version__, numpy=np.__version__, platform=platform.platform(),
               memory_available_gib=round(available_bytes(torch.device("cpu")) / GIB, 2),
               # which version of the code under test ran (it changes while the repository is worked on)
               gram_tpt_sha256=hashlib.sha256((ROOT / "gram" / "tpt.py").read_bytes()).hexdigest())
    if device.type == "cuda":
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / GIB, 2)
    return env



def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(seconds, result) of fn(), the device synchronised before each reading of the clock."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def available_bytes(device: torch.device) -> int:
    """Free memory where the activations live: MemAvailable on the CPU, free device memory on CUDA."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))





@contextlib.contextmanager
def image_tower_clock(device: torch.device, seconds: list[float]):
    """Stand a timing wrapper in for `gram.prompts.encoders.encode_image_prompted`; every call's seconds
    are appended to `seconds`."""
    import gram.prompts.encoders as enc

    real = enc.encode_image_prompted

    def wrapper(*args, **kwargs):
        t, out = timed(lambda: real(*args, **kwargs), device)
        seconds.append(t)
        return out

    enc.encode_image_prompted = wrapper
    try:
        yield
    finally:
        enc.encode_image_prompted = real


# ------------------------------------------------------------------------------------------------
# the model, the classes and the images
# ------------------------------------------------------------------------------------------------
def synthetic_words(n: int, rng: random.Random, exclude: set[str]) -> list[str]:
    """n distinct pronounceable made-up words of 2-3 syllables."""
    onsets = "b c d f g h k l m n p r s t v z br cl dr fl gr pl sk st tr".split()
    vowels = "a e i o u ai ea oo".split()
    codas = ["", "", "", "n", "r", "s", "l", "x", "m"]
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        w = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(2, 3))) + rng.choice(codas)
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def synthetic_names(n: int, words: list[str], rng: random.Random) -> list[str]:
    """n distinct class names of 1-4 words (NAME_WORD_WEIGHTS)."""
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        k = rng.choices(range(1, len(NAME_WORD_WEIGHTS) + 1), weights=NAME_WORD_WEIGHTS)[0]
        name = " ".join(rng.sample(words, k))
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def build_backbone(device: torch.device, dtype: torch.dtype, seed: int, n_words: int):
    """A random-weight CLIP with ViT-B/16 shapes as a `gram.backbone.Backbone`, and the synthetic words."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.utils import logging as hf_logging

    from gram.backbone import SPECIALS, Backbone, train_tokenizer
    from gram.images import ImageSpec

    hf_logging.set_verbosity_error()
    rng = random.Random(seed)
    template_words = TEMPLATE.replace("{}", " ").replace(".", " . ").split()
    words = synthetic_words(n_words, rng, set(template_words))
    context = VITB16_TEXT["max_position_embeddings"]
    tok = train_tokenizer(words + [" ".join(template_words)], len(SPECIALS) + len(words) + len(template_words), context)
    if len(tok) > VITB16_TEXT["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tok)} ids, more than the model's {VITB16_TEXT['vocab_size']}")
    text = dict(VITB16_TEXT, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    cfg = CLIPConfig(text_config=text, vision_config=VITB16_VISION, projection_dim=VITB16_PROJECTION,
                     logit_scale_init_value=math.log(LOGIT_SCALE))
    torch.manual_seed(seed)
    model = CLIPModel._from_config(cfg, attn_implementation="sdpa")
    # frozen, in eval mode, on the device in the inference dtype, as gram.backbone.load leaves it
    model.requires_grad_(False).eval().to(device=device, dtype=dtype)
    spec = ImageSpec(224, 224, CLIP_MEAN, CLIP_STD, "bicubic")
    info = {
        "kind": "vitb16-random",
        "model": "CLIP ViT-B/16 shapes, random weights (no hub access here; timings do not depend on the weights)",
        "text_config": {k: getattr(cfg.text_config, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                                   "num_hidden_layers", "num_attention_heads",
                                                                   "max_position_embeddings", "hidden_act")},
        "vision_config": {k: getattr(cfg.vision_config, k) for k in ("hidden_size", "intermediate_size",
                                                                       "num_hidden_layers", "num_attention_heads",
                                                                       "patch_size", "image_size", "hidden_act")},
        "projection_dim": VITB16_PROJECTION,
        "logit_scale": round(float(model.logit_scale.exp()), 3),
        "attn_implementation": cfg.text_config._attn_implementation,
        "tokenizer": f"gram.backbone.train_tokenizer over {len(words)} synthetic words and the template "
                     f"({len(tok)} ids)",
        "image_spec": {"size": spec.size, "crop": spec.crop, "resample": spec.resample},
        "seed": seed,
    }
    return Backbone(model, tok, spec, device, dtype), words, info


def random_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------
# memory estimates
# ------------------------------------------------------------------------------------------------
def saved_bytes_per_token(text_cfg: dict, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return SAVED_PER_TOKEN_LAYER * text_cfg["hidden_size"] * text_cfg["num_hidden_layers"] * elem


def reference_estimate(n_classes: int, text_cfg: dict, dtype: torch.dtype) -> int:
    """Bytes the reference keeps for its backward pass: every class's whole sequence."""
    return n_classes * text_cfg["max_position_embeddings"] * saved_bytes_per_token(text_cfg, dtype)


def fast_estimate(batch: int, n_classes: int, prefix: int, suffix: int, text_cfg: dict, dtype: torch.dtype) -> int:
    """Bytes the fast path keeps for one batch's backward pass: the class tokens of every (image, class)
    pair, plus the per-pair copies of the prefix's keys and values that the attention concatenates."""
    elem = torch.empty((), dtype=dtype).element_size()
    tokens = batch * (n_classes * suffix + prefix) * saved_bytes_per_token(text_cfg, dtype)
    kv = batch * n_classes * text_cfg["num_hidden_layers"] * 4 * (prefix + suffix) * text_cfg["hidden_size"] * elem
    return tokens + kv


# ------------------------------------------------------------------------------------------------
# one case
# ------------------------------------------------------------------------------------------------
def run_case(n_classes: int, bb, learner, ctx0: torch.Tensor, all_names: list[str], images: np.ndarray,
             warm_images: np.ndarray, args, dtype: torch.dtype, text_cfg: dict) -> dict:
    from gram.tpt import TestTimeTuner, make_views, tpt_reference, view_generator

    device = bb.device
    names = all_names[:n_classes]
    keys = [f"img{i}" for i in range(len(images))]
    warm_keys = [f"warm{i}" for i in range(len(warm_images))]
    cfg = TptParams(views=args.views, keep=args.keep, steps=args.steps, lr=args.lr,
                    weight_decay=args.weight_decay, batch_size=args.batch_size, max_prompts=args.max_prompts)
    _, eos = learner.prompt_ids(names)
    prefix = 1 + learner.n_ctx
    length_cut = int(eos.max()) + 1
    tuner = TestTimeTuner(learner, ctx0, cfg, image_batch=args.image_batch)
    # the images per batch, as TestTimeTuner.run computes it
    per_batch = (tuner.images_per_batch(n_classes) if hasattr(tuner, "images_per_batch")
                 else max(1, min(cfg.batch_size, cfg.max_prompts // max(1, n_classes))))
    batch = min(per_batch, len(images))
    est_fast = fast_estimate(batch, n_classes, prefix, length_cut - prefix, text_cfg, dtype)
    config = {
        "classes": n_classes,
        "template": TEMPLATE,
        "n_ctx": learner.n_ctx,
        "eos": {"min": int(eos.min()), "max": int(eos.max()), "mean": round(float(eos.float().mean()), 3)},
        "length_reference": learner.context,
        "length_fast": length_cut,
        "tpt": {k: getattr(cfg, k) for k in ("views", "keep", "steps", "lr", "weight_decay", "augment",
                                              "crop_scale", "batch_size", "max_prompts")},
        "images_per_batch": per_batch,
        "batch": batch,
        "image_batch": args.image_batch,
        "seed": args.seed,
    }
    case: dict = {"case": f"c{n_classes}", "config": config}
    log = lambda msg: print(f"c{n_classes}: {msg}", file=sys.stderr, flush=True)  # noqa: E731

    # ---- fast path
    avail = available_bytes(device)
    fast: dict | None = None
    if est_fast > avail:
        reason = (f"estimated {est_fast / GIB:.1f} GiB of saved activations per batch of {batch} images > "
                  f"{avail / GIB:.1f} GiB available; lower --max-prompts or --batch-size")
        log(f"fast path skipped: {reason}")
        case["fast_skipped"] = reason
    else:
        n_warm = args.warmup if args.warmup is not None else (batch if device.type == "cuda" else 1)
        if n_warm:
            log(f"fast path: warm-up on {n_warm} image(s)")
            tuner.run(warm_images[:n_warm], warm_keys[:n_warm], names, args.seed)
        log(f"fast path: {len(images)} image(s), {per_batch} per batch")
        mark = reset_peak(device)
        wall, res = timed(lambda: tuner.run(images, keys, names, args.seed), device)
        memory = read_peak(device, mark)
        n = len(images)
        fast = {
            "images": n,
            "warmup_images": n_warm,
            "wall_s": round(wall, 4),
            "ms_per_image": round(1000 * wall / n, 2),
            "breakdown_s": {k: res[k] for k in ("views_s", "encode_s", "tune_s")},
            "breakdown_ms_per_image": {k.replace("_s", "_ms"): round(1000 * res[k] / n, 2)
                                       for k in ("views_s", "encode_s", "tune_s")},
            "other_ms_per_image": round(1000 * (wall - sum(res[k] for k in ("views_s", "encode_s", "tune_s"))) / n, 2),
            "before": [int(x) for x in res["before"]],
            "after": [int(x) for x in res["after"]],
            "views_cached": res.get("views_cached"),
            "changed": float(np.mean(res["before"] != res["after"])),
            "distinct_before": len(set(res["before"].tolist())),
            "distinct_after": len(set(res["after"].tolist())),
            "memory_estimate_gib": round(est_fast / GIB, 3),
            "memory": memory,
            "loadavg_after": loadavg(),
        }
        log(f"fast path: {fast['ms_per_image']:.0f} ms/image")
    case["fast"] = fast

    # ---- reference loop
    n_ref = min(args.reference_images, len(images))
    est_ref = reference_estimate(n_classes, text_cfg, dtype)
    limit = args.max_reference_classes
    if limit is None:
        limit = 100 if device.type == "cpu" else -1
    avail = available_bytes(device)
    reason = None
    if n_ref == 0:
        reason = "--reference-images 0"
    elif limit >= 0 and n_classes > limit:
        reason = (f"{n_classes} classes > --max-reference-classes {limit} (estimated {est_ref / GIB:.1f} GiB of "
                  f"saved activations for the backward pass of {n_classes} x {learner.context} tokens; "
                  f"{avail / GIB:.1f} GiB available)")
    elif est_ref > avail:
        reason = (f"estimated {est_ref / GIB:.1f} GiB of saved activations for the backward pass of "
                  f"{n_classes} x {learner.context} tokens > {avail / GIB:.1f} GiB available")
    reference: dict | None = None
    if reason is not None:
        log(f"reference skipped: {reason}")
        case["reference_skipped"] = reason
    else:
        def one(image: np.ndarray, key: str) -> tuple[float, float, dict]:
            t_views, views = timed(lambda: make_views(image, bb.spec, cfg.views, view_generator(args.seed, key),
                                                      cfg.augment, tuple(cfg.crop_scale), device), device)
            t_tune, out = timed(lambda: tpt_reference(learner, views, names, ctx0, cfg.steps, cfg.lr,
                                                      cfg.weight_decay, cfg.keep), device)
            return t_views, t_tune, out

        n_warm = 1 if args.warmup is None else min(args.warmup, 1)
        if n_warm:
            log("reference: warm-up on 1 image")
            one(warm_images[0], warm_keys[0])
        log(f"reference: {n_ref} image(s)")
        runs, before, after, encode_calls = [], [], [], []
        mark = reset_peak(device)
        for i in range(n_ref):
            encode: list[float] = []
            with image_tower_clock(device, encode):
                t_views, t_call, out = one(images[i], keys[i])
            encode_calls.append(len(encode))
            enc_s = sum(encode) if encode else None
            runs.append({"key": keys[i], "views_s": round(t_views, 4), "call_s": round(t_call, 4),
                         "encode_s": None if enc_s is None else round(enc_s, 4),
                         "tune_s": None if enc_s is None else round(t_call - enc_s, 4)})
            before.append(int(out["before"]))
            after.append(int(out["after"]))
        memory = read_peak(device, mark)
        total = sum(r["views_s"] + r["call_s"] for r in runs)

        def per_image(field: str) -> float | None:
            vals = [r[field] for r in runs]
            return None if any(v is None for v in vals) else round(1000 * sum(vals) / n_ref, 2)

        reference = {
            "images": n_ref,
            "warmup_images": n_warm,
            "wall_s": round(total, 4),
            "ms_per_image": round(1000 * total / n_ref, 2),
            "breakdown_ms_per_image": {"views_ms": per_image("views_s"), "encode_ms": per_image("encode_s"),
                                       "tune_ms": per_image("tune_s")},
            "runs": runs,
            "before": before,
            "after": after,
            "memory_estimate_gib": round(est_ref / GIB, 3),
            "memory": memory,
            "loadavg_after": loadavg(),
        }
        if not all(encode_calls):
            reference["notes"] = ["the image-tower wrapper saw no call (tpt_reference no longer looks "
                                  "encode_image_prompted up in gram.prompts.encoders): no encode/tune split"]
        log(f"reference: {reference['ms_per_image']:.0f} ms/image")
    case["reference"] = reference

    # ---- both
    if fast is not None and reference is not None:
        n = reference["images"]
        mismatches = []
        for i in range(n):
            fb, fa, rb, ra = fast["before"][i], fast["after"][i], reference["before"][i], reference["after"][i]
            if fb != rb or fa != ra:
                mismatches.append({"image": i, "key": keys[i], "fast_before": fb, "reference_before": rb,
                                   "fast_after": fa, "reference_after": ra})
        case["check"] = {
            "images": n,
            "before_agreement": float(np.mean([fast["before"][i] == reference["before"][i] for i in range(n)])),
            "after_agreement": float(np.mean([fast["after"][i] == reference["after"][i] for i in range(n)])),
            "mismatches": mismatches,
        }
        case["ratio"] = round(reference["ms_per_image"] / fast["ms_per_image"], 3)
        case["ratio_tune"] = (round(reference["breakdown_ms_per_image"]["tune_ms"]
                                    / fast["breakdown_ms_per_image"]["tune_ms"], 3)
                              if reference["breakdown_ms_per_image"]["tune_ms"] is not None
                              and fast["breakdown_ms_per_image"]["tune_ms"] > 0 else None)
    else:
        case["check"] = None
        case["ratio"] = None
        case["ratio_tune"] = None
    return case


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def table(results: list[dict]) -> str:
    def num(x, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    def times(x) -> str:
        return "-" if x is None else f"{x:.2f}x"

    head = (f"{'C':>5} {'L ref>fast':>10} {'B':>3} {'fast n':>6} {'fast ms/img':>11} {'views':>7} {'encode':>8} "
            f"{'tune':>8} {'ref n':>5} {'ref ms/img':>10} {'ref tune':>9} {'ratio':>6} {'tune ratio':>10} "
            f"{'agree b/a':>9}")
    rows = [head, "-" * len(head)]
    for r in results:
        c, f, ref, chk = r["config"], r["fast"], r["reference"], r["check"]
        fb = f["breakdown_ms_per_image"] if f else {}
        agree = f"{chk['before_agreement']:.2f}/{chk['after_agreement']:.2f}" if chk else "-"
        rows.append(
            f"{c['classes']:>5} {str(c['length_reference']) + '>' + str(c['length_fast']):>10} "
            f"{c['batch']:>3} {num(f and f['images'], 'd'):>6} {num(f and f['ms_per_image'], '.0f'):>11} "
            f"{num(fb.get('views_ms'), '.0f'):>7} {num(fb.get('encode_ms'), '.0f'):>8} "
            f"{num(fb.get('tune_ms'), '.0f'):>8} "
            f"{num(ref and ref['images'], 'd'):>5} {num(ref and ref['ms_per_image'], '.0f'):>10} "
            f"{num(ref and ref['breakdown_ms_per_image']['tune_ms'], '.0f'):>9} "
            f"{times(r['ratio']):>6} {times(r['ratio_tune']):>10} {agree:>9}")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = TptParams()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16 only on CUDA (the CPU always runs float32)")
    p.add_argument("--classes", default="10,100,1000", help="comma-separated class counts, one case each")
    p.add_argument("--images", type=int, default=8, help="test images the fast path tunes per case")
    p.add_argument("--reference-images", type=int, default=2,
                   help="how many of those images the reference loop also tunes (it is slow on a CPU)")
    p.add_argument("--max-reference-classes", type=int, default=None,
                   help="skip the reference above this many classes (default 100 on the CPU, no limit on CUDA; "
                        "-1: no limit). It is also skipped when its memory estimate exceeds what is available")
    p.add_argument("--views", type=int, default=d.views, help="views per image (TptParams.views)")
    p.add_argument("--keep", type=float, default=d.keep, help="fraction of views kept (TptParams.keep)")
    p.add_argument("--steps", type=int, default=d.steps, help="AdamW steps per image (TptParams.steps)")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (TptParams.lr)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="TptParams.weight_decay")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images tuned together by the fast path (TptParams.batch_size)")
    p.add_argument("--max-prompts", type=int, default=None,
                   help=f"bound on images x classes per text-encoder call (TptParams.max_prompts; default "
                        f"{d.max_prompts} on CUDA, 2048 on the CPU, where 8192 x ViT-B/16 prompts would need "
                        "about 30 GiB for the backward pass by this script's estimate)")
    p.add_argument("--image-batch", type=int, default=256, help="views per image-tower call in the fast path")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed warm-up images per path and case (default: one fast batch on CUDA, one image "
                        "on the CPU; the reference always warms up on at most one image)")
    p.add_argument("--words", type=int, default=400, help="synthetic words the class names are made of")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, names, images and views")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/tpt-<device>.json)")
    args = p.parse_args(argv)
    if args.max_prompts is None:
        args.max_prompts = d.max_prompts if args.device == "cuda" else 2048
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = device_and_dtype(args)
    out = args.out or ROOT / "benchmarks" / "results" / f"tpt-{device.type}.json"
    counts = [int(c) for c in (s.strip() for s in args.classes.split(",")) if c]
    if not counts:
        raise SystemExit("--classes is empty")
    if args.images < 1:
        raise SystemExit("--images must be at least 1")

    from gram.prompts import CoOp

    t_start = time.time()
    bb, words, model_info = build_backbone(device, dtype, args.seed, args.words)
    learner = CoOp(bb, init=TEMPLATE)
    ctx0 = learner.ctx.detach().clone()  # init: words, as gram.tpt.initial_context gives it
    all_names = synthetic_names(max(counts), words, random.Random(args.seed + 1))
    images = random_images(args.images, args.seed)
    n_warm = max(1, args.warmup or 0, min(args.batch_size, args.images) if device.type == "cuda" else 1)
    warm_images = random_images(n_warm, args.seed + 1)
    text_cfg = model_info["text_config"]
    model_info["names"] = {"words": f"1-{len(NAME_WORD_WEIGHTS)}", "weights": NAME_WORD_WEIGHTS,
                           "examples": all_names[:5]}

    report = {
        "benchmark": "tpt",
        "what": "milliseconds per test image of TPT: the batched TestTimeTuner.run (fast) against the per-image "
                "loop make_views + tpt_reference (reference) in the same run; ratio = reference / fast "
                "ms per image; check = agreement of the before/after predictions on the images both ran",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "environment": environment(device, dtype),
        "model": model_info,
        "images": {"fast": args.images, "reference": min(args.reference_images, args.images),
                   "shape": [IMAGE_SIDE, IMAGE_SIDE, 3], "kind": "uniform random uint8"},
        "weights": "random (no hub access on the measuring machine)",
        "complete": False,
        "results": [],
    }
    for c in counts:
        case = run_case(c, bb, learner, ctx0, all_names, images, warm_images, args, dtype, text_cfg)
        report["results"].append(case)
        report["wall_time_s"] = round(time.time() - t_start, 1)
        write_json(out, report)
    report["complete"] = True
    mismatches = [(r["case"], m) for r in report["results"] if r["check"] for m in r["check"]["mismatches"]]
    report["agreement_ok"] = not mismatches
    report["wall_time_s"] = round(time.time() - t_start, 1)
    write_json(out, report)
    print(table(report["results"]))
    print(f"wall time {report['wall_time_s']:.0f} s; wrote {out}")
    if mismatches:
        for case, m in mismatches:
            print(f"MISMATCH {case} image {m['image']} ({m['key']}): before fast {m['fast_before']} vs reference "
                  f"{m['reference_before']}, after fast {m['fast_after']} vs reference {m['reference_after']}",
                  file=sys.stderr)
        print(f"FAILED: the fast path and the reference disagree on {len(mismatches)} image(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
