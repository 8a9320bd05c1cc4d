"""Per-stage throughput of the paper profile's GPU work, for the figures of docs/paper-scale.md.

    python benchmarks/paper_scale.py --device cuda --dtype bfloat16

Model: a CLIP with ViT-B/16 shapes and random weights (`benchmarks/tpt.py`'s `build_backbone`; the
timings do not depend on the weights), through gram's own code:
- `image_features`: `Backbone.encode_images` on 224 x 224 uint8 images (what the evaluate and tune
  stages call: uint8 copy to the device, normalisation there, image tower), and the image tower alone on
  normalised pixels already on the device (the ceiling of the embed stage);
- `text_features`: `Backbone.encode_texts` on "a photo of a <class>." prompts;
- `tune_step`: seconds per optimisation step of `gram.tune.tune` for CoOp, VPT and the joint prompt
  at the paper recipe's batch (32 images) with C classes (C = 1000: ImageNet);
- `embed`: `gram.embed.embed_shards` on one shard of 256 x 256 JPEG + caption pairs (img2dataset's
  default size): pairs per second, and the fraction of the encoder's time spent waiting for input;
- `decode`: `gram.data.fewshot.decode` of photo-sized JPEGs (500 x 375) to 224 x 224 in each of the
  `--decode-workers` counts of worker processes (the dataset side of every evaluation and tuning
  job), timed with the pool started; the first call, which starts it, is recorded on its own.
Each case: warm-up runs, then the median of `--repeats` timed runs. Output: JSON (environment and
one record per case) and a table on stdout.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchenv import base_environment, device_and_dtype, sync  # noqa: E402
from tpt import TEMPLATE, build_backbone, random_images, synthetic_names, timed  # noqa: E402


def median_time(fn, device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device)[0] for _ in range(repeats))


def image_cases(bb, args) -> list[dict]:
    from gram.images import normalize_pixels

    out = []
    images = random_images(args.images, args.seed)[:, 16:240, 16:240]  # 224 x 224: no resize, as decoded
    t = median_time(lambda: bb.encode_images(images, args.batch), bb.device, 1, args.repeats)
    out.append({"case": "image_features", "path": "Backbone.encode_images (uint8 copy, preprocessing on the device, tower)",
                "images": len(images), "batch": args.batch, "seconds": t, "per_second": len(images) / t})
    px = normalize_pixels(torch.as_tensor(images[: args.batch]).permute(0, 3, 1, 2).float() / 255, bb.spec)
    px = px.to(bb.device, bb.dtype)

    def tower():
        with torch.no_grad():
            bb.model.get_image_features(pixel_values=px)

    t = median_time(tower, bb.device, 2, args.repeats)
    out.append({"case": "image_features", "path": "image tower alone, pixels on the device", "images": len(px),
                "batch": args.batch, "seconds": t, "per_second": len(px) / t})
    return out


def text_case(bb, words, args) -> dict:
    names = synthetic_names(1000, words, random.Random(args.seed))
    prompts = [TEMPLATE.format(n) for n in names]
    t = median_time(lambda: bb.encode_texts(prompts), bb.device, 1, args.repeats)
    return {"case": "text_features", "path": "Backbone.encode_texts", "texts": len(prompts), "seconds": t,
            "per_second": len(prompts) / t}


def tune_cases(bb, words, args) -> list[dict]:
    from gram.config import MethodParams
    from gram.images import preprocess
    from gram.prompts import make_learner
    from gram.tune import tune

    out = []
    images = random_images(args.tune_batch, args.seed + 1)[:, 16:240, 16:240]
    pixels = preprocess(images, bb.spec)
    recipes = {"coop": MethodParams(kind="coop", init=TEMPLATE, optimizer="sgd", batch_size=args.tune_batch),
               "vpt": MethodParams(kind="vpt", n_tokens=8, deep=True, optimizer="sgd", batch_size=args.tune_batch),
               "joint": MethodParams(kind="joint", init=TEMPLATE, n_tokens=8, deep=True, coupled=True,
                                     optimizer="sgd", batch_size=args.tune_batch)}
    for n_classes in args.classes:
        names = synthetic_names(n_classes, words, random.Random(args.seed + n_classes))
        labels = torch.arange(args.tune_batch) % n_classes
        for kind, m in recipes.items():
            learner = make_learner(bb, m, n_classes, 0)
            steps = args.tune_steps
            t = median_time(lambda: tune(learner, pixels, labels, names, steps, 2e-3, args.tune_batch, "sgd"),
                            bb.device, 1, max(1, args.repeats // 2))
            out.append({"case": "tune_step", "method": kind, "classes": n_classes, "batch": args.tune_batch,
                        "steps": steps, "seconds_per_step": t / steps})
            del learner
            if bb.device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def photo_jpeg(i: int, height: int, width: int, rng) -> bytes:
    """A photo-like JPEG (smooth gradients plus sensor-like noise; quality 90), the i-th of a series."""
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width] / width
    rgb = np.stack([128 + 100 * np.sin(6 * xx + i), 128 + 100 * np.cos(4 * yy), 255 * xx * yy], -1)
    rgb = np.clip(rgb + rng.normal(0, 10, rgb.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def embed_case(bb, args) -> dict:
    """`gram.embed.embed_shards` on one webdataset shard of 256 x 256 JPEG pairs (img2dataset's default
    size): pairs per second end to end and the fraction of the encoder's time spent waiting for input."""
    from gram.data.shards import write_shards
    from gram.embed import embed_shards

    rng = np.random.default_rng(args.seed)
    samples = [{"__key__": f"{i:06d}", "jpg": photo_jpeg(i, 256, 256, rng), "txt": f"a photo of thing {i}".encode()}
               for i in range(args.embed_pairs)]
    with tempfile.TemporaryDirectory() as tmp:
        (shard,) = write_shards(samples, Path(tmp) / "shards", len(samples))
        model_dir = Path(tmp) / "model"  # embed fingerprints the backbone's files; the weights live in `bb`
        model_dir.mkdir()
        (model_dir / "config.json").write_text("{}")
        embed_shards(bb, [Path(tmp) / "shards" / shard], Path(tmp) / "warm", model_dir, args.batch,
                     args.embed_workers)  # warm-up
        sync(bb.device)
        t0 = time.perf_counter()
        rep = embed_shards(bb, [Path(tmp) / "shards" / shard], Path(tmp) / "out", model_dir, args.batch,
                           args.embed_workers)
        sync(bb.device)
        t = time.perf_counter() - t0
    return {"case": "embed", "path": "embed_shards, 256x256 JPEG + caption pairs, one shard",
            "pairs": rep["pairs"], "batch": args.batch, "decode_threads": args.embed_workers, "seconds": t,
            "per_second": rep["pairs"] / t, "decode_s": rep["decode_s"], "encode_s": rep["encode_s"],
            "wait_s": rep["wait_s"], "input_wait_fraction": rep["wait_s"] / max(rep["wait_s"] + rep["encode_s"], 1e-9)}


def decode_cases(args) -> list[dict]:
    from gram.data import fewshot

    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.decode_images):
            (Path(tmp) / f"{i}.jpg").write_bytes(photo_jpeg(i, 375, 500, rng))
            paths.append(f"{i}.jpg")
        listing = fewshot.Listing("bench", "test", Path(tmp), paths, np.zeros(len(paths), dtype=np.int64), ["x"],
                                  "benchmark")
        out = []
        for w in args.decode_workers:
            t0 = time.perf_counter()
            fewshot.decode(listing, 224, workers=w)  # starts the kept process pool
            first = time.perf_counter() - t0
            t = median_time(lambda: fewshot.decode(listing, 224, workers=w), torch.device("cpu"), 0, args.repeats)
            out.append({"case": "decode", "path": "fewshot.decode, 500x375 JPEG -> 224x224, pool warm",
                        "images": len(paths), "processes": w, "seconds": t, "per_second": len(paths) / t,
                        "first_call_seconds": first})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--images", type=int, default=2048, help="images of the image-feature case")
    p.add_argument("--batch", type=int, default=512, help="image batch of the image-feature case")
    p.add_argument("--classes", type=lambda s: [int(x) for x in s.split(",")], default=[100, 1000])
    p.add_argument("--tune-batch", type=int, default=32)
    p.add_argument("--tune-steps", type=int, default=5, help="steps per timed tuning run")
    p.add_argument("--embed-pairs", type=int, default=4096)
    p.add_argument("--embed-workers", type=int, default=16, help="decoding threads of the embed case")
    p.add_argument("--decode-images", type=int, default=1024)
    p.add_argument("--decode-workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8],
                   help="worker process counts to time, comma-separated")
    p.add_argument("--cases", type=lambda s: s.split(","),
                   default=["image_features", "text_features", "tune_step", "embed", "decode"],
                   help="comma-separated cases to run (default: all)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/paper-scale-<device>.json)")
    args = p.parse_args(argv)
    device, dtype = device_and_dtype(args)
    bb, words, info = build_backbone(device, dtype, args.seed, 2000)
    cases = {"image_features": lambda: image_cases(bb, args), "text_features": lambda: [text_case(bb, words, args)],
             "tune_step": lambda: tune_cases(bb, words, args), "embed": lambda: [embed_case(bb, args)],
             "decode": lambda: decode_cases(args)}
    unknown = set(args.cases) - set(cases)
    if unknown:
        p.error(f"unknown case(s) {sorted(unknown)}: choose from {', '.join(cases)}")
    results = [r for name in args.cases for r in cases[name]()]
    env = base_environment(device, dtype)
    import transformers

    env["transformers"] = transformers.__version__
    record = {"environment": env, "model": info, "args": {k: v for k, v in vars(args).items() if k != "out"},
              "results": results}
    out = args.out or Path(__file__).resolve().parent / "results" / f"paper-scale-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    for r in results:
        print(json.dumps(r))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
