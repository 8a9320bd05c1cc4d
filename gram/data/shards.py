"""Image-text corpus shards in the img2dataset webdataset layout. [ours]

A shard is a tar of samples `{key}.{png|jpg}` (image), `{key}.txt` (caption) and `{key}.json`
(metadata), the layout img2dataset produces for CC3M. Shards written here are byte-identical
between runs (fixed order, mtime 0), so DVC and Snakemake content hashes are stable.

Reading a web-scale corpus (`expand_shards`, `ShardPairs`): shards are addressed by a brace pattern
(`data/cc3m/{00000..00331}.tar`), a list of them, or a directory. An address is a local path, a
`file:` URL, or anything webdataset's `gopen` opens: `http(s)://`, `sftp://`, `ftps://`, `scp://`
(through curl), `gs://` (through gsutil), `ais://` and `pipe:COMMAND` (the command's stdout is the
tar). `s3://bucket/key.tar` is read through `pipe:aws s3 cp s3://bucket/key.tar -`, the recipe of
webdataset's documentation, so it needs the AWS CLI. A `pipe:` address runs a command, so shard lists
(`expand_shards`) and corpus manifests (`corpus_shards`) refuse one unless the caller allows it
(`data.paper.allow_pipe: true`; s3:// addresses need no opt-in). A sample without an image or a caption, or whose
image does not decode, is skipped and counted by reason (`SKIP_REASONS`); a shard that cannot be read
as a tar at all (missing, not a tar, truncated, a damaged header) raises `ShardError` naming it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shlex
import tarfile
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Sequence
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
from PIL import Image

SHARD_NAME = "{:05d}.tar"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")  # image members a sample may have, in order of preference
SKIP_REASONS = ("no_image", "no_caption", "undecodable")

log = logging.getLogger("gram.data.shards")


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


class ShardError(RuntimeError):
    """A shard that cannot be read as a tar at all: missing, not a tar, truncated or damaged. A RuntimeError,
    so `gram <stage>` reports it in one line, as it does other bad inputs."""


def is_local(url: str) -> bool:
    """True for a path or `file:` URL, False for an address that webdataset's gopen opens."""
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and url[1:2] == ":")  # `C:` is a drive letter


def local_path(url: str) -> Path:
    """The file of a local address (`is_local`)."""
    return Path(url2pathname(urlparse(url).path)) if url.startswith("file:") else Path(url)


def shard_name(url: str) -> str:
    """The file name of a shard address (`…/00012.tar` -> `00012.tar`); for `pipe:COMMAND`, the last word of
    the command that names a `.tar`."""
    if url.startswith("pipe:"):
        words = [w for w in shlex.split(url[5:]) if ".tar" in w]
        if not words:
            raise ValueError(f"{url}: no word of the command names a .tar, so the shard has no name")
        url = words[-1]
    if is_local(url):
        return local_path(url).name
    return PurePosixPath(urlparse(url).path).name


PIPE_KEY = "data.paper.allow_pipe"  # the params key that opts in to `pipe:` shard addresses


def refuse_pipes(urls: list[str], allow_pipe: bool, where: str) -> list[str]:
    """`urls`, unless one is a `pipe:COMMAND` address and `allow_pipe` is false: then a ValueError naming it,
    `where` it came from and the key that allows it."""
    if not allow_pipe:
        for url in urls:
            if url.startswith("pipe:"):
                raise ValueError(f"{where}: shard address {url!r} runs a command (pipe:), which is refused unless "
                                 f"{PIPE_KEY} is true")
    return urls


def expand_shards(spec: str | Path | Sequence[str | Path], allow_pipe: bool = False) -> list[str]:
    """The shard addresses of a brace pattern, a directory, or a list of these, in order.

    Args:
        spec: `data/cc3m/{00000..00331}.tar`, `https://host/cc3m/{00000..00331}.tar`,
            `pipe:aws s3 cp s3://bucket/{00000..00331}.tar -`, a directory (its `*.tar`, sorted), one path,
            or a list of any of these (expanded one after the other, order kept).
        allow_pipe: accept `pipe:COMMAND` addresses (otherwise an error names the first; `refuse_pipes`).
    Returns:
        Local paths and URLs as strings; URLs pass through untouched (see the module docstring for which
        schemes open). An error names `spec` when nothing is left.
    """
    import braceexpand

    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    urls: list[str] = []
    for item in items:
        for url in braceexpand.braceexpand(str(item)):
            if is_local(url) and local_path(url).is_dir():
                urls += [str(p) for p in shard_paths(local_path(url))]
            else:
                urls.append(url)
    if not urls:
        raise FileNotFoundError(f"{spec}: names no shards")
    return refuse_pipes(urls, allow_pipe, str(spec))


def corpus_shards(data_dir: str | Path, domain: str, allow_pipe: bool = False) -> list[str]:
    """The shards of one corpus domain as the download stage published them.

    `<data_dir>/shards/<domain>/` holds the emoji profile's tar files; the paper profile's download
    stage writes a manifest `<data_dir>/shards/<domain>.json` (`{"spec": ..., "shards": [{"url": ...}]}`)
    that resolves `data.paper.corpus` once, so every later stage reads the same shard list. A `pipe:`
    address in it is an error naming the manifest unless `allow_pipe` (`data.paper.allow_pipe`).
    """
    folder = Path(data_dir) / "shards" / domain
    manifest = folder.with_name(f"{domain}.json")
    if folder.is_dir():
        return [str(p) for p in shard_paths(folder)]
    if manifest.is_file():
        import json

        urls = [s["url"] for s in json.loads(manifest.read_text())["shards"]]
        if not urls:
            raise FileNotFoundError(f"{manifest}: lists no shards of corpus domain {domain!r}")
        return refuse_pipes(urls, allow_pipe, str(manifest))
    raise FileNotFoundError(f"{folder}: no shards of corpus domain {domain!r} (neither a folder nor "
                            f"{manifest.name}; did the download stage run?)")


def open_shard(url: str):
    """A binary stream of one shard (see the module docstring for the schemes)."""
    from webdataset.gopen import gopen

    if is_local(url):
        return open(local_path(url), "rb")
    if url.startswith("s3://"):
        url = f"pipe:aws s3 cp {shlex.quote(url)} -"
    return gopen(url, "rb")


def ended_cleanly(tar) -> bool:
    """Whether a tar read in stream mode stopped at its end-of-archive marker.

    `tarfile` ends the iteration quietly at a truncated, missing or damaged header anywhere past the first
    member, so a cut-off shard would pass for a short one. It stops on the header block at `tar.offset`,
    having read it: a clean end has read a full block of zeros, and what follows (the second end block
    and padding) is zeros too or nothing."""
    stream = getattr(tar, "fileobj", None)
    if stream is None or not hasattr(stream, "tell"):
        return True  # another tarfile: nothing to check with
    if stream.tell() - tar.offset != tarfile.BLOCKSIZE:
        return False  # the stream ended inside or right before a header
    rest = stream.read(tarfile.BLOCKSIZE)
    return rest.count(0) == len(rest)


def member_key(info) -> tuple[str, str] | None:
    """(sample key, extension) of a tar member that belongs to a sample, as webdataset groups them; None
    for what is not a regular file and for `__x__` members."""
    from webdataset.tariterators import base_plus_ext

    if not info.isreg():
        return None
    key, ext = base_plus_ext(info.name)
    base = info.name.rsplit("/", 1)[-1]
    if key is None or (base.startswith("__") and base.endswith("__")):
        return None
    return key, ext


def iter_shard(url: str) -> Iterator[dict]:
    """The raw samples of one shard, as webdataset groups them (bytes per lower-case extension, plus
    `__key__` and `__url__`), read as a stream.

    Raises:
        ShardError naming the shard (and how many samples came before) when it cannot be opened or read
        as a tar, ends before its end-of-archive marker, or repeats a member of a sample.
    """
    url = str(url)
    done = 0
    try:
        stream = open_shard(url)
    except Exception as e:  # noqa: BLE001 - open errors of files, pipes and curl differ in type
        raise ShardError(f"{url}: cannot open the shard ({e})") from e
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        sample: dict | None = None
        for info in tar:
            tar.members = []  # stream mode keeps every header otherwise
            named = member_key(info)
            if named is None:
                continue
            key, ext = named
            data = tar.extractfile(info).read()
            if sample is not None and sample["__key__"] != key:
                yield sample
                done += 1
                sample = None
            if sample is None:
                sample = {"__key__": key, "__url__": url}
            if ext.lower() in sample:
                raise ShardError(f"{url}: sample {key} has two `{ext.lower()}` members (after {done} samples)")
            sample[ext.lower()] = data
        if not ended_cleanly(tar):
            raise ShardError(f"{url}: the shard is truncated or damaged after {done} samples (no end-of-archive "
                             "marker where its last member ends)")
        if sample is not None:
            yield sample
        stream.close()  # a pipe reports its command's failure here
    except ShardError:
        raise
    except Exception as e:  # noqa: BLE001 - tarfile, decompressors and pipes raise many types
        try:
            stream.close()
        except Exception as failed:  # noqa: BLE001 - a failed pipe command (curl, aws) explains the rest
            e = failed
        what = "is not a tar" if done == 0 and isinstance(e, tarfile.ReadError) else "cannot be read"
        raise ShardError(f"{url}: the shard {what} (after {done} samples: {e})") from e
    finally:
        with contextlib.suppress(Exception):
            stream.close()


class ShardPairs:
    """The usable image-caption pairs of one shard, read as a stream.

    Iterating yields (key, image bytes, caption) for every sample with an image member (`IMAGE_EXTS`) and
    a non-blank caption (`txt`, UTF-8, undecodable bytes replaced); every other sample is counted in
    `skipped` under `no_image` or `no_caption`. The images are not decoded here: the reader that decodes
    them counts a failure under `undecodable` (the embed stage does so on its worker threads). `samples`
    counts every sample read, skipped or not. A shard unreadable as a whole raises `ShardError`.
    """

    def __init__(self, url: str | Path):
        self.url = str(url)
        self.samples = 0
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)

    def skip(self, key: str, reason: str) -> None:
        self.skipped[reason] += 1
        log.debug("%s: sample %s skipped (%s)", self.url, key, reason)

    def __iter__(self) -> Iterator[tuple[str, bytes, str]]:
        for s in iter_shard(self.url):
            self.samples += 1
            image = next((s[e] for e in IMAGE_EXTS if e in s), None)
            caption = s["txt"].decode("utf-8", "replace") if "txt" in s else ""
            if image is None:
                self.skip(s["__key__"], "no_image")
            elif not caption.strip():
                self.skip(s["__key__"], "no_caption")
            else:
                yield s["__key__"], image, caption


def decode_rgb(data: bytes, where: str = "") -> np.ndarray:
    """PNG/JPEG/WebP bytes -> HxWx3 uint8, alpha composited onto white.

    Raises ValueError naming `where` for bytes that are no image, or one in a mode with no RGB view."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        if img.mode in ("RGBA", "LA", "P"):
            img = img.convert("RGBA")
            bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, img)
        return np.asarray(img.convert("RGB"))
    except Exception as e:  # PIL raises many types for corrupt data
        raise ValueError(f"{where}: cannot decode image ({e})") from None


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
