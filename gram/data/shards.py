"""Image-text corpus shards in the img2dataset webdataset layout. [ours]

A shard is a tar of samples `{key}.{png|jpg}` (image), `{key}.txt` (caption) and `{key}.json`
(metadata), the layout img2dataset produces for CC3M. Shards written here are byte-identical
between runs (fixed order, mtime 0), so DVC and Snakemake content hashes are stable.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

SHARD_NAME = "{:05d}.tar"


def write_shards(samples: Iterable[dict], out_dir: str | Path, shard_size: int) -> list[str]:
    """Write samples (dicts with `__key__` and byte/str values per extension) to numbered shards.

    Returns:
        The shard file names, in order.
    """
    import webdataset as wds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    writer = None
    for i, sample in enumerate(samples):
        if i % shard_size == 0:
            if writer is not None:
                writer.close()
            names.append(SHARD_NAME.format(len(names)))
            writer = wds.TarWriter(str(out_dir / names[-1]), mtime=0, encoder=False)
        writer.write(sample)
    if writer is not None:
        writer.close()
    return names


def shard_paths(shard_dir: str | Path) -> list[Path]:
    """The shards of one directory, in order; an error names the directory if there are none."""
    paths = sorted(Path(shard_dir).glob("*.tar"))
    if not paths:
        raise FileNotFoundError(f"{shard_dir}: no .tar shards (did the download stage run?)")
    return paths


def iter_samples(paths: Iterable[str | Path]) -> Iterator[dict]:
    """Raw samples (bytes per extension, plus `__key__`) of the given shards, in order."""
    import webdataset as wds

    urls = [str(p) for p in paths]
    # every caller wants every sample, also under torchrun (whose RANK/WORLD_SIZE webdataset's default
    # node splitter refuses): no splitting by rank
    yield from wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None)


def decode_rgb(data: bytes, where: str = "") -> np.ndarray:
    """PNG/JPEG bytes -> HxWx3 uint8, alpha composited onto white."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises many types for corrupt data
        raise ValueError(f"{where}: cannot decode image ({e})") from None
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return np.asarray(img.convert("RGB"))


def encode_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def load_images(shard_dir: str | Path, keys: list[str] | None = None) -> tuple[list[str], np.ndarray, list[dict]]:
    """Decode the images of one directory of shards.

    Args:
        shard_dir: directory of `.tar` shards.
        keys: keep only these sample keys, returned in this order (None: all, shard order).
    Returns:
        (keys, images [N, H, W, 3] uint8, metadata dicts)
    """
    wanted = None if keys is None else set(keys)
    found: dict[str, tuple[np.ndarray, dict]] = {}
    order: list[str] = []
    for s in iter_samples(shard_paths(shard_dir)):
        k = s["__key__"]
        if wanted is not None and k not in wanted:
            continue
        img_bytes = s.get("png", s.get("jpg"))
        if img_bytes is None:
            raise ValueError(f"{s.get('__url__', shard_dir)}: sample {k} has no png/jpg")
        meta = json.loads(s["json"]) if "json" in s else {}
        meta.setdefault("caption", s["txt"].decode() if "txt" in s else "")
        found[k] = (decode_rgb(img_bytes, f"{s.get('__url__', shard_dir)}:{k}"), meta)
        order.append(k)
    if keys is not None:
        missing = [k for k in keys if k not in found]
        if missing:
            raise KeyError(f"{shard_dir}: {len(missing)} requested samples are missing, e.g. {missing[:3]}")
        order = list(keys)
    if not order:
        return [], np.zeros((0, 1, 1, 3), np.uint8), []
    return order, np.stack([found[k][0] for k in order]), [found[k][1] for k in order]
