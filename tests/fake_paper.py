"""A tiny stand-in for the paper profile's data, in the real layouts (the paper_smoke profile).

    python tests/fake_paper.py data/paper_smoke

writes, under the given folder:
  fewshot/   ImageNet (6 classes, train/val folders, classnames.txt) with ImageNet-V2/-Sketch and
             -A/-R (3 of the classes each), Caltech101 and DTD (split_zhou JSONs) and FGVCAircraft
             (variant list files), in CoOp's DATASETS.md layout (see gram/data/fewshot.py);
  corpus/cc3m/{00000..00002}.tar   image-text shards in img2dataset's layout ({key}.jpg/.txt/.json);
  clip/      a tiny random CLIP saved with save_pretrained (weights, tokenizer, preprocessor config),
             which the backbone stage loads exactly as it loads `openai/clip-vit-base-patch16`.
Images are JPEGs of varied non-square sizes whose colour depends on the class (or caption), so
decoding, resizing and centre-cropping all do real work. Everything is a function of the seed.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

IMAGENET = [("n01440764", "tench"), ("n01443537", "goldfish"), ("n01484850", "great white shark"),
            ("n01491361", "tiger shark"), ("n01494475", "hammerhead shark"), ("n01496331", "electric ray")]
SUBSETS = {"imagenet-adversarial/imagenet-a": [1, 3, 5], "imagenet-rendition/imagenet-r": [0, 2, 4]}
ZHOU = {"caltech-101": ("101_ObjectCategories", "split_zhou_Caltech101.json",
                        ["face", "leopard", "motorbike", "airplane"]),
        "dtd": ("images", "split_zhou_DescribableTextures.json", ["banded", "blotchy", "braided", "bubbly"])}
AIRCRAFT = ["707-320", "Cessna 172", "F/A-18", "DC-9-30"]
PER_CLASS = {"train": 4, "val": 1, "test": 3}
WORDS = ["fish", "shark", "ray", "face", "cat", "plane", "car", "texture", "flower", "dog", "bird", "boat"]


def jpeg(rng: np.random.Generator, colour: int) -> bytes:
    """A JPEG of random size around 40x30 whose mean colour encodes `colour`."""
    w, h = int(rng.integers(30, 56)), int(rng.integers(24, 44))
    base = np.array([(colour * 67) % 256, (colour * 141) % 256, (colour * 29 + 80) % 256], dtype=np.float64)
    rgb = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def fewshot(root: Path, rng: np.random.Generator) -> None:
    inet = root / "imagenet"
    (inet / "classnames.txt").parent.mkdir(parents=True, exist_ok=True)
    (inet / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in IMAGENET))
    for split, folder in (("train", "train"), ("test", "val")):
        for c, (wnid, _) in enumerate(IMAGENET):
            for i in range(PER_CLASS[split]):
                write(inet / "images" / folder / wnid / f"{wnid}_{i}.JPEG", jpeg(rng, c))
    for c, (wnid, _) in enumerate(IMAGENET):
        for i in range(2):
            write(root / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(c) / f"{i}.jpeg", jpeg(rng, c))
            write(root / "imagenet-sketch" / "images" / wnid / f"sketch_{i}.JPEG", jpeg(rng, c + 20))
    for folder, ids in SUBSETS.items():
        for c in ids:
            for i in range(2):
                write(root / folder / IMAGENET[c][0] / f"{i}.jpg", jpeg(rng, c + 40))
        (root / folder / "README.txt").write_text("not a class folder\n")
    for ds, (images, split_file, classes) in ZHOU.items():
        doc = {}
        for split, n in PER_CLASS.items():
            doc[split] = []
            for c, name in enumerate(classes):
                for i in range(n):
                    rel = f"{name}/{split}_{i}.jpg"
                    write(root / ds / images / rel, jpeg(rng, 7 * c + len(ds)))
                    doc[split].append([rel, c, name])
        (root / ds / split_file).write_text(json.dumps(doc))
    air = root / "fgvc_aircraft"
    air.mkdir(parents=True, exist_ok=True)
    (air / "variants.txt").write_text("\n".join(AIRCRAFT) + "\n")
    for split, n in PER_CLASS.items():
        lines = []
        for c, name in enumerate(AIRCRAFT):
            for i in range(n):
                image_id = f"{100000 + 1000 * c + 10 * i + len(split)}"
                write(air / "images" / f"{image_id}.jpg", jpeg(rng, 11 * c + 3))
                lines.append(f"{image_id} {name}\n")
        (air / f"images_variant_{split}.txt").write_text("".join(lines))


def corpus(out: Path, rng: np.random.Generator, shards: int = 3, per_shard: int = 40) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tar:
            for j in range(per_shard):
                key = f"{s:05d}{j:04d}"
                a, b = rng.choice(len(WORDS), 2, replace=False)
                caption = f"a photo of a {WORDS[a]} and a {WORDS[b]}"
                meta = {"key": key, "caption": caption, "url": f"http://example.invalid/{key}.jpg", "status": "success"}
                for ext, data in (("jpg", jpeg(rng, int(a))), ("txt", caption.encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def clip(out: Path) -> None:
    """A tiny random CLIP with a word-level tokenizer over the fake world's words, saved like a hub model."""
    import dataclasses

    import torch
    from transformers import CLIPModel

    from gram import backbone as B
    from gram import config as C

    torch.manual_seed(0)
    p = dataclasses.replace(C.PretrainParams(), image_size=32, patch=8, vision=C.TowerParams(32, 2, 2, 64),
                            text=C.TowerParams(32, 2, 2, 64), context=24, projection=24, vocab_size=400)
    names = [n for _, n in IMAGENET] + AIRCRAFT + [c for _, _, cs in ZHOU.values() for c in cs]
    texts = names + WORDS + ["a photo of a and the bad art origami large small in video game"]
    tok = B.train_tokenizer(texts, p.vocab_size, p.context)
    model = CLIPModel(B.small_config(p, len(tok)))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    B.save_image_processor(out, p.image_size)


def build(out: str | Path, seed: int = 0) -> Path:
    out = Path(out)
    rng = np.random.default_rng(seed)
    fewshot(out / "fewshot", rng)
    corpus(out / "corpus" / "cc3m", rng)
    clip(out / "clip")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tests/fake_paper.py OUT_DIR  (e.g. data/paper_smoke)")
    print(build(sys.argv[1]))
