"""Embed stage: frozen image and caption embeddings of the meta-training corpus, one file per shard. [ours]

`embed_shards(bb, shards, out_dir)` writes, for every webdataset shard `<name>.tar`, the file
`<out_dir>/<name>.safetensors` holding `image` [N, E] and `text` [N, E] (L2-normalised, float32;
row i of both belongs to the same image-text pair) and, in its metadata, the sample keys, a
fingerprint of the inputs (the shard's SHA-256, or its URL for a remote shard, and the backbone's)
and, if any sample was skipped, `skipped`: counts by reason. A file whose fingerprint matches is
kept, so a rerun after an interruption computes only the missing or stale shards; each file is
written atomically, so an interruption never leaves a truncated one. `shards` may be paths, brace
patterns or URLs (`gram.data.shards.expand_shards`).

Unusable samples (no image, no caption, an image that does not decode) are skipped and counted per
shard (`gram.data.shards.ShardPairs`): their keys are absent from the file, so every later stage sees
the same keys. A shard that cannot be read as a whole stops the run with a `ShardError` naming it.

Input pipeline: an input thread streams the shards in order and has a pool of `workers` threads
decode each image (PIL releases the GIL while it decodes), queueing batches of `batch_size` uint8
images up to `prefetch` batches ahead (pinned on CUDA), so at most a few batches of a shard are in
memory. The main thread copies a batch to the device as uint8 and resizes, centre-crops and
normalises it there exactly as the backbone's preprocessing does (one call for a batch of one image
size, the usual img2dataset shard; image by image otherwise), then runs the encoders: the CPU only
decodes. The record gives the seconds the encoder waited for input (`wait_s`) against the seconds it
encoded.

The stage (`gram embed`) embeds the shards of every corpus domain (emoji: `data.vendors.meta`) into a
work cache beside its output (`<out parent>/.<out name>.cache/<domain>/`), which survives a failed or
interrupted run (Snakemake and DVC delete a stage's declared outputs before they rerun it), then
publishes the finished files into `<out>/<domain>/` as hard links (a copy where links are not
possible) together with `<out>/embed.json` (counts, skips by domain, shard and reason, timings,
input-boundness). When more than `embed.max_skip_fraction` of all samples were skipped, it publishes
nothing and fails with a summary of the worst shards, keeping the cache, so a rerun (after fixing the
shards or raising the threshold) computes only what is missing.

`load_embeddings(out_dir)` concatenates the per-shard files in shard order: (keys, image, text).
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from gram import backbone as B
from gram.backbone import backbone_fingerprint
from gram.data.shards import (SKIP_REASONS, ShardError, ShardPairs, corpus_shards, decode_rgb, expand_shards,
                              is_local, local_path, shard_name)
from gram.io import atomic_dir, file_sha256, job_threads, write_json, write_manifest
from gram.stage import stage_parser, stage_setup
from gram.tensorio import load_tensors, save_tensors

log = logging.getLogger("gram.embed")


def _rgb(data: bytes, where: str):
    """One image decoded -> [H, W, 3] uint8 (resized later, on the encoder's device); None when the
    bytes do not decode."""
    try:
        return decode_rgb(data, where)
    except ValueError:
        return None


def _batch_images(images: list) -> torch.Tensor | list[torch.Tensor]:
    """Decoded images of one batch as one uint8 tensor [B, H, W, 3] when they share a size (the usual
    img2dataset shard), else a list of [H, W, 3] tensors (each is resized on its own)."""
    if len({im.shape for im in images}) == 1:
        return torch.from_numpy(np.stack(images))
    return [torch.from_numpy(np.array(im)) for im in images]  # writable copies (PIL's are read-only)


def _pin(x, pin: bool):
    if not pin:
        return x
    return [t.pin_memory() for t in x] if isinstance(x, list) else x.pin_memory()


def _pixel_values(bb, x) -> torch.Tensor:
    """A batch from `_batch_images` -> the model's pixel values [B, 3, crop, crop] on its device
    (`Backbone.pixel_values`; image by image when the sizes differ)."""
    if isinstance(x, list):
        return torch.cat([bb.pixel_values(t[None]) for t in x])
    return bb.pixel_values(x)


def _chunks(items, size: int):
    """Lists of `size` consecutive items of an iterable (the last may be shorter)."""
    chunk = []
    for x in items:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _decoded(pairs, batch_size: int, pool: ThreadPoolExecutor):
    """Lists of `batch_size` (key, image [H, W, 3] uint8, caption) of a shard's pairs (the last may be
    shorter), decoded on `pool`; a pair whose image does not decode is counted in `pairs.skipped` and
    left out, and the batch is refilled from the next ones, so the kept pairs are batched (and encoded)
    exactly as in a shard without the skipped ones."""
    ready = []  # decoded pairs not yet handed on, in order
    for chunk in _chunks(pairs, batch_size):
        px = pool.map(lambda x: _rgb(x[1], f"{pairs.url}:{x[0]}"), chunk)
        for (key, _, caption), p in zip(chunk, px):
            if p is None:
                pairs.skip(key, "undecodable")
            else:
                ready.append((key, p, caption))
        while len(ready) >= batch_size:
            yield ready[:batch_size]
            ready = ready[batch_size:]
    if ready:
        yield ready


_DONE = object()  # end of a shard in the input queue


def _produce(todo: list[str], batch_size: int, workers: int, q: queue.Queue, stop: threading.Event,
             pin: bool = False) -> None:
    """Input thread: stream every shard, decode its images on `workers` threads, and queue (shard index,
    keys, uint8 images (`_batch_images`), captions, seconds) batches, then (shard index, _DONE, skip
    counts by reason) per shard; `pin`: in page-locked memory, so the copy to a CUDA device can
    overlap. An exception is queued for the consumer to raise."""
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
            for i, url in enumerate(todo):
                t0 = time.perf_counter()
                pairs = ShardPairs(url)
                for batch in _decoded(pairs, batch_size, pool):
                    px = _pin(_batch_images([im for _, im, _ in batch]), pin)
                    item = (i, [k for k, _, _ in batch], px, [c for _, _, c in batch], time.perf_counter() - t0)
                    if not put(item):
                        return
                    t0 = time.perf_counter()
                if not put((i, _DONE, dict(pairs.skipped))):
                    return
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
        put(e)


def _existing(out: Path, fingerprint: dict) -> dict | None:
    """The metadata of `out` when it exists and was computed from the same shard and backbone, else None."""
    if not out.exists():
        return None
    try:
        _, meta = load_tensors(out, [])
    except Exception:  # a foreign or damaged file is recomputed, never trusted
        return None
    return meta if meta.get("fingerprint") == fingerprint else None


def _fingerprint(url: str, model: str) -> dict:
    """What a shard's embeddings depend on: a local shard's bytes (SHA-256); a remote one is taken to be
    immutable under its URL (reading it only to hash it would double the download)."""
    if not is_local(url):
        return {"shard": shard_name(url), "url": url, "backbone": model}
    try:
        sha = file_sha256(local_path(url))
    except OSError as e:
        raise ShardError(f"{url}: cannot read the shard ({e.strerror or e})") from e
    return {"shard": shard_name(url), "shard_sha256": sha, "backbone": model}


def _dim(path: Path) -> int:
    """Embedding size of a per-shard file, from its header (0 for a shard without pairs)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        shape = f.get_slice("image").get_shape()
    return int(shape[1]) if shape[0] else 0


def shard_stem(url: str) -> str:
    """The per-shard file's stem for a shard address: `…/00012.tar` -> `00012`."""
    return Path(shard_name(url)).stem


def embed_shards(bb, shards, out_dir: str | Path, model_dir: str | Path, batch_size: int = 256,
                 workers: int = 2, prefetch: int = 4, allow_pipe: bool = False) -> dict:
    """Embed every shard into `<out_dir>/<shard stem>.safetensors`.

    Args:
        bb: a loaded `gram.backbone.Backbone`; model_dir: its directory (for the fingerprint).
        shards: paths, URLs, brace patterns or a directory (`gram.data.shards.expand_shards`).
        workers: threads that decode images; prefetch: batches queued ahead of the encoder.
        allow_pipe: accept `pipe:COMMAND` shard addresses (`data.paper.allow_pipe`).
    Returns:
        {"computed": [shard names], "kept": [shard names], "pairs": pairs embedded now,
         "shards": {shard name: {"pairs": n, "skipped": {reason: n}}} of every shard, computed or kept,
         "dim": embedding size (0 without pairs), "decode_s": seconds the worker spent reading and
         decoding, "encode_s": seconds of encoding and writing, "wait_s": seconds the encoder waited for
         decoded input}.
    Raises:
        ShardError naming a shard that cannot be read as a whole (the shards before it are kept).
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    urls = expand_shards(shards, allow_pipe)
    stems = [shard_stem(u) for u in urls]
    if len(set(stems)) != len(stems):
        raise ValueError(f"shards with the same name would share one output file in {out_dir}: "
                         "embed each shard directory into its own folder")
    model = backbone_fingerprint(model_dir)
    report = {"computed": [], "kept": [], "pairs": 0, "shards": {}, "dim": 0, "decode_s": 0.0, "encode_s": 0.0,
              "wait_s": 0.0}
    todo = []
    for url, stem in zip(urls, stems):
        fp = _fingerprint(url, model)
        meta = _existing(out_dir / f"{stem}.safetensors", fp)
        if meta is None:
            todo.append((url, stem, fp))
            continue
        report["kept"].append(fp["shard"])
        report["shards"][fp["shard"]] = {"pairs": len(meta["keys"]),
                                         "skipped": {r: meta.get("skipped", {}).get(r, 0) for r in SKIP_REASONS}}
        if meta["keys"] and not report["dim"]:
            report["dim"] = _dim(out_dir / f"{stem}.safetensors")
    if report["kept"]:
        log.info("%d of %d shards already embedded with this backbone; computing %d", len(report["kept"]),
                 len(urls), len(todo))
    if not todo:
        return report
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    producer = threading.Thread(target=_produce, daemon=True, name="embed-input",
                                args=([u for u, _, _ in todo], batch_size, workers, q, stop,
                                      bb.device.type == "cuda"))
    producer.start()
    bar = tqdm(total=len(todo), desc=f"embed {out_dir.name}", unit="shard")
    try:
        for _, stem, fp in todo:
            keys, imgs, txts = [], [], []
            while True:
                t0 = time.perf_counter()
                item = q.get()
                report["wait_s"] += time.perf_counter() - t0
                if isinstance(item, BaseException):
                    raise item
                if item[1] is _DONE:
                    skipped = item[2]
                    break
                _, k, px, captions, decode_s = item
                t1 = time.perf_counter()
                with torch.no_grad():
                    pv = _pixel_values(bb, px)
                    f = bb.model.get_image_features(pixel_values=pv).pooler_output.float()
                imgs.append(torch.nn.functional.normalize(f, dim=-1).cpu())  # [B, E]
                txts.append(bb.encode_texts(captions, batch_size).cpu())  # [B, E]
                keys += k
                report["decode_s"] += decode_s
                report["encode_s"] += time.perf_counter() - t1
            t1 = time.perf_counter()
            img = torch.cat(imgs) if keys else torch.zeros(0, 0)
            txt = torch.cat(txts) if keys else torch.zeros(0, 0)
            meta = {"keys": keys, "fingerprint": fp}
            if any(skipped.values()):  # a clean shard's file stays as it was before skips were counted
                meta["skipped"] = {r: n for r, n in skipped.items() if n}
            save_tensors(out_dir / f"{stem}.safetensors", {"image": img, "text": txt}, meta)
            report["encode_s"] += time.perf_counter() - t1
            report["computed"].append(fp["shard"])
            report["shards"][fp["shard"]] = {"pairs": len(keys), "skipped": skipped}
            report["pairs"] += len(keys)
            report["dim"] = report["dim"] or (int(img.shape[1]) if keys else 0)
            bar.update()
    finally:
        stop.set()
        bar.close()
        producer.join(timeout=5)
    report["shards"] = {n: report["shards"][n] for n in map(shard_name, urls)}  # shard order
    return report


def load_embeddings(out_dir: str | Path, names: list[str] | None = None) -> tuple[list[str], torch.Tensor,
                                                                                  torch.Tensor]:
    """(keys, image [N, E], text [N, E]) of the per-shard files of `out_dir` (or of `names`), in order."""
    out_dir = Path(out_dir)
    files = [out_dir / n for n in names] if names is not None else sorted(out_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{out_dir}: no embedding files (did the embed step run?)")
    keys, imgs, txts = [], [], []
    for f in files:
        t, meta = load_tensors(f, rerun="rerun the embed stage (`gram embed`), which writes it")
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
def corpus_dirs(data_dir: str | Path, domains: list[str], allow_pipe: bool = False) -> dict[str, list[str]]:
    """Shards of every corpus domain (`gram.data.shards.corpus_shards`); errors name what is missing."""
    if not domains:
        raise ValueError("data.vendors.meta is empty: there is no meta-training corpus to embed")
    return {d: corpus_shards(data_dir, d, allow_pipe) for d in domains}


class TooManySkipped(RuntimeError):
    """More of the corpus was skipped than `embed.max_skip_fraction` allows."""


def skip_record(shards: dict[str, dict]) -> dict:
    """Skips of one domain from `embed_shards`'s per-shard records: {"samples": read, "total": skipped,
    "by_reason": {reason: n}, "by_shard": {shard: {reason: n}} (only shards with skips)}."""
    by_reason = {r: sum(rec["skipped"][r] for rec in shards.values()) for r in SKIP_REASONS}
    total = sum(by_reason.values())
    return {"samples": sum(rec["pairs"] for rec in shards.values()) + total, "total": total,
            "by_reason": by_reason,
            "by_shard": {name: {r: n for r, n in rec["skipped"].items() if n}
                         for name, rec in shards.items() if any(rec["skipped"].values())}}


def check_skips(domains: dict[str, dict], max_fraction: float, where: str, worst: int = 5) -> dict:
    """Totals of `skip_record`s over every domain; raises TooManySkipped with a summary (counts by reason,
    the `worst` shards) when the skipped share of all samples read exceeds `max_fraction`."""
    samples = sum(d["samples"] for d in domains.values())
    total = sum(d["total"] for d in domains.values())
    by_reason = {r: sum(d["by_reason"][r] for d in domains.values()) for r in SKIP_REASONS}
    fraction = total / samples if samples else 0.0
    totals = {"samples": samples, "total": total, "fraction": round(fraction, 6), "max_fraction": max_fraction,
              "by_reason": by_reason}
    if fraction <= max_fraction:
        return totals

    def counts(c: dict) -> str:
        return ", ".join(f"{r} {n}" for r, n in c.items() if n)

    shards = sorted(((sum(c.values()), f"{d}/{name}", c) for d, rec in domains.items()
                     for name, c in rec["by_shard"].items()), key=lambda x: (-x[0], x[1]))
    lines = [f"  {name}: {n} skipped ({counts(c)})" for n, name, c in shards[:worst]]
    if len(shards) > worst:
        lines.append(f"  ... and {len(shards) - worst} more shards with skips")
    raise TooManySkipped(
        f"{total} of {samples} corpus samples ({fraction:.2%}) were skipped, more than embed.max_skip_fraction "
        f"= {max_fraction} ({counts(by_reason)}); the shards with most skips:\n" + "\n".join(lines) +
        f"\nNothing was published; the embedded shards stay in {where}, so a rerun after repairing or dropping "
        "these shards (or raising max_skip_fraction) computes only what is missing.")


def publish(files: list[Path], out_dir: Path) -> None:
    """Hard-link (or copy, across file systems) `files` into the fresh directory `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        try:
            os.link(f, out_dir / f.name)
        except OSError:
            shutil.copy2(f, out_dir / f.name)


def run(cfg, backbone_cfg, domains: list[str], data_dir: str | Path, model_dir: str | Path,
        out: str | Path, allow_pipe: bool = False) -> dict:
    """Embed the corpus of every domain; write `<out>/<domain>/*.safetensors` and `<out>/embed.json`
    (`allow_pipe`: run `pipe:` shard addresses, `data.paper.allow_pipe`).

    Raises:
        TooManySkipped when more than `cfg.max_skip_fraction` of the samples were skipped (nothing is
        published; the cache keeps every embedded shard); ShardError for a shard unreadable as a whole.
    """
    out = Path(out)
    dirs = corpus_dirs(data_dir, domains, allow_pipe)
    cache = out.with_name(f".{out.name}.cache")
    bb = B.load(model_dir, backbone_cfg.device, backbone_cfg.dtype)
    record = {"backbone": str(model_dir), "device": str(bb.device), "dtype": str(bb.dtype).removeprefix("torch."),
              "batch_size": cfg.batch_size, "workers": cfg.workers or job_threads(), "domains": {}}
    t0 = time.perf_counter()
    stems, skips = {}, {}
    for domain, shards in dirs.items():
        stems[domain] = [shard_stem(u) for u in shards]
        rep = embed_shards(bb, shards, cache / domain, model_dir, cfg.batch_size, cfg.workers or job_threads(),
                           allow_pipe=allow_pipe)
        pairs = sum(r["pairs"] for r in rep["shards"].values())
        skips[domain] = skip_record(rep["shards"])
        busy = rep["encode_s"] + rep["wait_s"]
        record["domains"][domain] = {
            "shards": len(shards), "pairs": pairs, "dim": rep["dim"], "skipped": skips[domain],
            "computed": len(rep["computed"]), "kept": len(rep["kept"]),
            "decode_s": round(rep["decode_s"], 3), "encode_s": round(rep["encode_s"], 3),
            "wait_s": round(rep["wait_s"], 3),
            # share of the encoder's time spent waiting for input: ~0 means not input-bound
            "input_wait_fraction": round(rep["wait_s"] / busy, 4) if busy > 0 else 0.0,
            "pairs_per_s": round(rep["pairs"] / busy, 1) if busy > 0 else None}
        log.info("%s: %d pairs in %d shards (%d computed, %d kept), %d samples skipped; decode %.1f s, "
                 "encode %.1f s, waited %.1f s", domain, pairs, len(shards), len(rep["computed"]), len(rep["kept"]),
                 skips[domain]["total"], rep["decode_s"], rep["encode_s"], rep["wait_s"])
    record["skipped"] = check_skips(skips, cfg.max_skip_fraction, str(cache))
    record["seconds"] = round(time.perf_counter() - t0, 1)
    with atomic_dir(out) as tmp:
        for domain, names in stems.items():
            publish([cache / domain / f"{n}.safetensors" for n in names], tmp / domain)
        write_json(tmp / "embed.json", record)
    return record


def main(argv: list[str] | None = None) -> None:
    p = stage_parser("embed", __doc__)
    p.add_argument("--data", required=True, help="data directory of the profile, e.g. data/emoji")
    p.add_argument("--backbone", required=True, help="backbone directory, e.g. models/emoji/backbone")
    p.add_argument("--out", required=True, help="output directory, e.g. data/emoji/embed")
    args = p.parse_args(argv)
    _, prof = stage_setup(args)
    run(prof.embed, prof.backbone, prof.data.vendors.meta, args.data, args.backbone, args.out,
        prof.data.paper.allow_pipe)
    write_manifest(args.out)
