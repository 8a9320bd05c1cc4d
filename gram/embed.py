"""Embed stage: frozen image and caption embeddings of the meta-training corpus, one file per shard. [ours]

`embed_shards(bb, shards, out_dir)` writes, for every webdataset shard `<name>.tar`, the file
`<out_dir>/<name>.safetensors` holding `image` [N, E] and `text` [N, E] (L2-normalised, float32;
row i of both belongs to the same image-text pair) and, in its metadata, the sample keys and a
fingerprint of the inputs (the shard's SHA-256 and the backbone's). A file whose fingerprint matches
is kept, so a rerun after an interruption computes only the missing or stale shards; each file is
written atomically, so an interruption never leaves a truncated one.

Input pipeline: an input thread reads the shards in order and has a pool of `workers` threads decode,
resize and centre-crop each image exactly as the backbone's preprocessing does (PIL decoding and
torch's resampling release the GIL), queueing batches of `batch_size` pixels (any image size: each
image is resized on its own) up to `prefetch` batches ahead. The main thread only moves a batch to
the device, normalises it there and runs the encoders, so decoding and resizing stay off its path;
the record gives the seconds it waited for input (`wait_s`) against the seconds it encoded.

The stage (`gram embed`) embeds the shards of every corpus domain (emoji: `data.vendors.meta`) into a
work cache beside its output (`<out parent>/.<out name>.cache/<domain>/`), which survives a failed or
interrupted run (Snakemake and DVC delete a stage's declared outputs before they rerun it), then
publishes the finished files into `<out>/<domain>/` as hard links (a copy where links are not
possible) together with `<out>/embed.json` (counts, timings, input-boundness).

`load_embeddings(out_dir)` concatenates the per-shard files in shard order: (keys, image, text).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def read_shard(path: Path) -> list[tuple[str, bytes, str]]:
    """(key, image bytes, caption) of every sample of one shard, undecoded, in order."""
    from gram.data.shards import iter_samples

    out = []
    for s in iter_samples([path]):
        data = s.get("png", s.get("jpg"))
        if data is None or "txt" not in s:
            raise ValueError(f"{path}: sample {s['__key__']} lacks an image (png/jpg) or a caption (txt)")
        out.append((s["__key__"], data, s["txt"].decode()))
    return out


def _pixels(data: bytes, where: str, spec) -> torch.Tensor:
    """One image: decode, resize and centre-crop as the backbone does (not yet normalised) -> [3, crop, crop]."""
    from gram.backbone import preprocess
    from gram.data.shards import decode_rgb

    return preprocess(torch.tensor(decode_rgb(data, where))[None], spec, normalize=False)[0]


_DONE = object()  # end of a shard in the input queue


def _produce(todo: list[Path], spec, batch_size: int, workers: int, q: queue.Queue, stop: threading.Event,
             pin: bool = False) -> None:
    """Input thread: read every shard, decode and preprocess its images on `workers` threads, and queue
    (shard index, keys, pixels [B, 3, crop, crop], captions, seconds) batches, then _DONE per shard;
    `pin`: in page-locked memory, so the copy to a CUDA device can overlap. An exception is queued for
    the consumer to raise."""
    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i, path in enumerate(todo):
                t0 = time.perf_counter()
                samples = read_shard(path)
                for s in range(0, len(samples), batch_size):
                    chunk = samples[s:s + batch_size]
                    px = list(pool.map(lambda x: _pixels(x[1], f"{path}:{x[0]}", spec), chunk))
                    px = torch.stack(px)
                    item = (i, [k for k, _, _ in chunk], px.pin_memory() if pin else px, [c for _, _, c in chunk],
                            time.perf_counter() - t0)
                    if not put(item):
                        return
                    t0 = time.perf_counter()
                if not put((i, _DONE)):
                    return
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
        put(e)


def _existing(out: Path, fingerprint: dict) -> bool:
    """True when `out` exists and was computed from the same shard and backbone."""
    from gram.tensorio import load_tensors

    if not out.exists():
        return False
    try:
        _, meta = load_tensors(out, [])
    except Exception:  # a foreign or damaged file is recomputed, never trusted
        return False
    return meta.get("fingerprint") == fingerprint


def embed_shards(bb, shards: list[str | Path], out_dir: str | Path, model_dir: str | Path,
                 batch_size: int = 256, workers: int = 2, prefetch: int = 4) -> dict:
    """Embed every shard into `<out_dir>/<shard stem>.safetensors`.

    Args:
        bb: a loaded `gram.backbone.Backbone`; model_dir: its directory (for the fingerprint).
        workers: threads that decode and preprocess images; prefetch: batches queued ahead of the encoder.
    Returns:
        {"computed": [shard names], "kept": [shard names], "pairs": pairs embedded now,
         "decode_s": seconds the worker spent reading and decoding, "encode_s": seconds of encoding and
         writing, "wait_s": seconds the encoder waited for decoded input}.
    """
    from tqdm import tqdm

    from gram.tensorio import save_tensors

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
    if kept:
        log.info("%d of %d shards already embedded with this backbone; computing %d", len(kept), len(shards),
                 len(todo))
    report = {"computed": [], "kept": [p.name for p, _ in kept], "pairs": 0, "decode_s": 0.0, "encode_s": 0.0,
              "wait_s": 0.0}
    if not todo:
        return report
    from gram.backbone import normalize_pixels

    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    producer = threading.Thread(target=_produce, daemon=True, name="embed-input",
                                args=([p for p, _ in todo], bb.spec, batch_size, workers, q, stop,
                                      bb.device.type == "cuda"))
    producer.start()
    bar = tqdm(total=len(todo), desc=f"embed {out_dir.name}", unit="shard")
    try:
        for path, fp in todo:
            keys, imgs, txts = [], [], []
            while True:
                t0 = time.perf_counter()
                item = q.get()
                report["wait_s"] += time.perf_counter() - t0
                if isinstance(item, BaseException):
                    raise item
                if item[1] is _DONE:
                    break
                _, k, px, captions, decode_s = item
                t1 = time.perf_counter()
                with torch.no_grad():
                    pv = normalize_pixels(px.to(bb.device, non_blocking=True), bb.spec).to(bb.dtype)
                    f = bb.model.get_image_features(pixel_values=pv).pooler_output.float()
                imgs.append(torch.nn.functional.normalize(f, dim=-1).cpu())  # [B, E]
                txts.append(bb.encode_texts(captions, batch_size).cpu())  # [B, E]
                keys += k
                report["decode_s"] += decode_s
                report["encode_s"] += time.perf_counter() - t1
            t1 = time.perf_counter()
            img = torch.cat(imgs) if keys else torch.zeros(0, 0)
            txt = torch.cat(txts) if keys else torch.zeros(0, 0)
            save_tensors(out_dir / f"{path.stem}.safetensors", {"image": img, "text": txt},
                         {"keys": keys, "fingerprint": fp})
            report["encode_s"] += time.perf_counter() - t1
            report["computed"].append(path.name)
            report["pairs"] += len(keys)
            bar.update()
    finally:
        stop.set()
        bar.close()
        producer.join(timeout=5)
    return report


def load_embeddings(out_dir: str | Path, names: list[str] | None = None) -> tuple[list[str], torch.Tensor,
                                                                                  torch.Tensor]:
    """(keys, image [N, E], text [N, E]) of the per-shard files of `out_dir` (or of `names`), in order."""
    from gram.tensorio import load_tensors

    out_dir = Path(out_dir)
    files = [out_dir / n for n in names] if names is not None else sorted(out_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{out_dir}: no embedding files (did the embed step run?)")
    keys, imgs, txts = [], [], []
    for f in files:
        t, meta = load_tensors(f)
        if "keys" not in meta:
            raise ValueError(f"{f}: not an embedding file of gram.embed (no `keys` in its metadata)")
        if not meta["keys"]:
            continue
        keys += meta["keys"]
        imgs.append(t["image"])
        txts.append(t["text"])
    if not keys:
        return [], torch.zeros(0, 0), torch.zeros(0, 0)
    return keys, torch.cat(imgs), torch.cat(txts)


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------
def corpus_dirs(data_dir: str | Path, domains: list[str]) -> dict[str, Path]:
    """Shard directory of every corpus domain (`<data_dir>/shards/<domain>`); errors name what is missing."""
    if not domains:
        raise ValueError("data.vendors.meta is empty: there is no meta-training corpus to embed")
    dirs = {d: Path(data_dir) / "shards" / d for d in domains}
    for d, path in dirs.items():
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no shards of corpus domain {d!r} (did the download stage run?)")
    return dirs


def publish(files: list[Path], out_dir: Path) -> None:
    """Hard-link (or copy, across file systems) `files` into the fresh directory `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        try:
            os.link(f, out_dir / f.name)
        except OSError:
            shutil.copy2(f, out_dir / f.name)


def run(cfg, backbone_cfg, domains: list[str], data_dir: str | Path, model_dir: str | Path,
        out: str | Path) -> dict:
    """Embed the corpus of every domain; write `<out>/<domain>/*.safetensors` and `<out>/embed.json`."""
    from gram import backbone as B
    from gram.data.shards import shard_paths
    from gram.io import atomic_dir, write_json

    out = Path(out)
    dirs = corpus_dirs(data_dir, domains)
    cache = out.with_name(f".{out.name}.cache")
    bb = B.load(model_dir, backbone_cfg.device, backbone_cfg.dtype)
    record = {"backbone": str(model_dir), "device": str(bb.device), "dtype": str(bb.dtype).removeprefix("torch."),
              "batch_size": cfg.batch_size, "workers": cfg.workers or os.cpu_count() or 1, "domains": {}}
    t0 = time.perf_counter()
    for domain, shard_dir in dirs.items():
        shards = shard_paths(shard_dir)
        rep = embed_shards(bb, shards, cache / domain, model_dir, cfg.batch_size, cfg.workers or os.cpu_count() or 1)
        keys, img, _ = load_embeddings(cache / domain, [f"{p.stem}.safetensors" for p in shards])
        busy = rep["encode_s"] + rep["wait_s"]
        record["domains"][domain] = {
            "shards": len(shards), "pairs": len(keys), "dim": int(img.shape[1]) if len(keys) else 0,
            "computed": len(rep["computed"]), "kept": len(rep["kept"]),
            "decode_s": round(rep["decode_s"], 3), "encode_s": round(rep["encode_s"], 3),
            "wait_s": round(rep["wait_s"], 3),
            # share of the encoder's time spent waiting for input: ~0 means not input-bound
            "input_wait_fraction": round(rep["wait_s"] / busy, 4) if busy > 0 else 0.0,
            "pairs_per_s": round(rep["pairs"] / busy, 1) if busy > 0 else None}
        log.info("%s: %d pairs in %d shards (%d computed, %d kept); decode %.1f s, encode %.1f s, waited %.1f s",
                 domain, len(keys), len(shards), len(rep["computed"]), len(rep["kept"]), rep["decode_s"],
                 rep["encode_s"], rep["wait_s"])
    record["seconds"] = round(time.perf_counter() - t0, 1)
    with atomic_dir(out) as tmp:
        for domain, shard_dir in dirs.items():
            publish([cache / domain / f"{p.stem}.safetensors" for p in shard_paths(shard_dir)], tmp / domain)
        write_json(tmp / "embed.json", record)
    return record


def main(argv: list[str] | None = None) -> None:
    from gram.cli import stage_parser, stage_setup

    p = stage_parser("embed", __doc__)
    p.add_argument("--data", required=True, help="data directory of the profile, e.g. data/emoji")
    p.add_argument("--backbone", required=True, help="backbone directory, e.g. models/emoji/backbone")
    p.add_argument("--out", required=True, help="output directory, e.g. data/emoji/embed")
    args = p.parse_args(argv)
    _, prof = stage_setup(args)
    run(prof.embed, prof.backbone, prof.data.vendors.meta, args.data, args.backbone, args.out)
