"""Embed (library part): frozen image and caption embeddings of corpus shards, one file per shard. [ours]

`embed_shards(bb, shards, out_dir)` writes, for every webdataset shard `<name>.tar`, the file
`<out_dir>/<name>.safetensors` holding `image` [N, E] and `text` [N, E] (L2-normalised, float32;
row i of both belongs to the same image-text pair) and, in its metadata, the sample keys and a
fingerprint of the inputs (the shard's SHA-256 and the backbone's). A file whose fingerprint matches
is kept, so a rerun after an interruption computes only the missing or stale shards; each file is
written atomically, so an interruption never leaves a truncated one. While one shard is encoded the
next one is read and decoded on a worker thread (PNG decoding and tar reading release the GIL for
most of their work), so the device waits less for input.

`load_embeddings(out_dir)` concatenates the per-shard files in shard order: (keys, image, text).
Not yet a pipeline stage: the embed -> cluster -> tasks stages are the meta-training-data issue.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("gram.embed")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def backbone_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 over the backbone's config and weight files (what its embeddings depend on)."""
    h = hashlib.sha256()
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".json", ".safetensors") and p.is_file())
    if not files:
        raise FileNotFoundError(f"{model_dir}: no config or weights to fingerprint (is it a backbone directory?)")
    for p in files:
        h.update(p.name.encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def read_shard(path: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """Keys, decoded images [N, H, W, 3] and captions of one shard."""
    from gram.data.shards import decode_rgb, iter_samples

    keys, images, captions = [], [], []
    for s in iter_samples([path]):
        data = s.get("png", s.get("jpg"))
        if data is None or "txt" not in s:
            raise ValueError(f"{path}: sample {s['__key__']} lacks an image (png/jpg) or a caption (txt)")
        keys.append(s["__key__"])
        images.append(decode_rgb(data, f"{path}:{s['__key__']}"))
        captions.append(s["txt"].decode())
    if not keys:
        return [], np.zeros((0, 1, 1, 3), np.uint8), []
    return keys, np.stack(images), captions


def _existing(out: Path, fingerprint: dict) -> bool:
    """True when `out` exists and was computed from the same shard and backbone."""
    from safetensors import safe_open

    if not out.exists():
        return False
    try:
        with safe_open(str(out), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("fingerprint", "{}"))
    except Exception:  # a foreign or damaged file is recomputed, never trusted
        return False
    return meta == fingerprint


def embed_shards(bb, shards: list[str | Path], out_dir: str | Path, model_dir: str | Path,
                 batch_size: int = 256) -> dict:
    """Embed every shard into `<out_dir>/<shard stem>.safetensors`; returns {"computed": [...], "kept": [...]}.

    Args:
        bb: a loaded `gram.backbone.Backbone`; model_dir: its directory (for the fingerprint).
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    from gram.io import atomic_path

    out_dir = Path(out_dir)
    stems = [Path(p).stem for p in shards]
    if len(set(stems)) != len(stems):
        raise ValueError(f"shards with the same name would share one output file in {out_dir}: "
                         "embed each shard directory into its own folder")
    model = backbone_fingerprint(model_dir)
    todo, kept = [], []
    for p in map(Path, shards):
        fp = {"shard": p.name, "shard_sha256": file_sha256(p), "backbone": model}
        (kept if _existing(out_dir / f"{p.stem}.safetensors", fp) else todo).append((p, fp))
    kept_names = [p.name for p, _ in kept]
    if kept:
        log.info("%d of %d shards already embedded with this backbone; computing %d", len(kept), len(shards),
                 len(todo))
    computed = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read_shard, todo[0][0]) if todo else None
        for i, (path, fp) in enumerate(tqdm(todo, desc="embed", unit="shard")):
            keys, images, captions = pending.result()
            pending = pool.submit(read_shard, todo[i + 1][0]) if i + 1 < len(todo) else None
            img = bb.encode_images(images, batch_size).cpu() if keys else torch.zeros(0, 0)  # [N, E]
            txt = bb.encode_texts(captions, batch_size).cpu() if keys else torch.zeros(0, 0)  # [N, E]
            meta = {"keys": json.dumps(keys), "fingerprint": json.dumps(fp, sort_keys=True)}
            with atomic_path(out_dir / f"{path.stem}.safetensors") as tmp:
                save_file({"image": img.contiguous(), "text": txt.contiguous()}, str(tmp), metadata=meta)
            computed.append(path.name)
    return {"computed": computed, "kept": kept_names}


def load_embeddings(out_dir: str | Path, names: list[str] | None = None) -> tuple[list[str], torch.Tensor,
                                                                                  torch.Tensor]:
    """(keys, image [N, E], text [N, E]) of the per-shard files of `out_dir` (or of `names`), in order."""
    from safetensors import safe_open

    out_dir = Path(out_dir)
    files = [out_dir / n for n in names] if names is not None else sorted(out_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{out_dir}: no embedding files (did the embed step run?)")
    keys, imgs, txts = [], [], []
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata() or {}
            if "keys" not in meta:
                raise ValueError(f"{f}: not an embedding file of gram.embed (no `keys` in its metadata)")
            k = json.loads(meta["keys"])
            if not k:
                continue
            keys += k
            imgs.append(h.get_tensor("image"))
            txts.append(h.get_tensor("text"))
    if not keys:
        return [], torch.zeros(0, 0), torch.zeros(0, 0)
    return keys, torch.cat(imgs), torch.cat(txts)
