"""Random access to the meta-training corpus: the pairs of given rows, read where they lie. [ours]

The meta stage (gram.meta) trains on the pairs its tasks use, a fraction of the corpus. `locate_pairs`
finds them in the shards of every corpus domain (`gram.data.shards.corpus_shards`): a local
uncompressed tar is indexed from its headers (`index_tar`), so a used row costs its location (about 30
bytes) and one seek per read (`read_member`); a shard addressed by URL, `pipe:` or s3:// (or compressed)
cannot be sought, so it is streamed once (`gram.data.shards.ShardPairs`) and the encoded images of its
used rows are kept in memory. `LazyPixels` then reads, decodes and preprocesses the rows a loss asks for.
"""

from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from gram.data.shards import (IMAGE_EXTS, ShardError, ShardPairs, corpus_shards, decode_rgb, ended_cleanly,
                              is_local, local_path, member_key)
from gram.images import preprocess
from gram.io import job_threads


def read_member(path: str, offset: int, size: int) -> bytes:
    """The `size` bytes at `offset` of a local file (a tar member's data, located by `index_tar`).

    Raises:
        ShardError naming the shard when the file ends before them (it changed since it was indexed).
    """
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise ShardError(f"{path}: {size} bytes at offset {offset} are past the end of the shard (did it change "
                         f"since the meta stage indexed it?)")
    return data


def index_tar(path: str | Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """The samples of a local uncompressed tar shard, from its headers alone (tarfile seeks past the data):
    (key, {lower-case extension: (offset of the member's data, its size)}), in shard order, grouped as
    `gram.data.shards.iter_shard` groups them (consecutive members of one key; no `__x__` or non-file members).

    Raises:
        tarfile.ReadError when the file is no uncompressed tar (a compressed shard cannot be sought: read it
        as a stream); ShardError naming the shard when it is truncated or a sample repeats a member.
    """
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    with tarfile.open(path, mode="r:") as tar:
        end = os.fstat(tar.fileobj.fileno()).st_size
        while (info := tar.next()) is not None:
            tar.members = []  # the index below is all that is kept
            named = member_key(info)
            if named is None:
                continue
            key, ext = named
            if info.offset_data + info.size > end:
                raise ShardError(f"{path}: the shard is truncated (member {info.name} ends past the file, after "
                                 f"{len(samples)} samples)")
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            members = samples[-1][1]
            if ext.lower() in members:
                raise ShardError(f"{path}: sample {key} has two `{ext.lower()}` members (after {len(samples) - 1} "
                                 "samples)")
            members[ext.lower()] = (info.offset_data, info.size)
        if not ended_cleanly(tar):
            raise ShardError(f"{path}: the shard is truncated or damaged after {len(samples)} samples (no "
                             "end-of-archive marker where its last member ends)")
    return samples


class LazyPixels:
    """`pixels[rows]` -> the preprocessed images [len(rows), 3, crop, crop] (float32, CPU), read and decoded on
    demand: exactly `gram.images.preprocess(decoded uint8 images of rows, spec)`, whatever the rows (repeats
    too), the order and the mix of image sizes.

    A row of a local tar shard is its location (shard, data offset, size, extension; about 30 bytes a row,
    in numpy arrays) and is read with one seek (`read_member`). A row of a shard that cannot be sought (an
    http(s)://, pipe:, s3:// … address or a compressed tar) keeps its encoded image bytes in memory, as
    the streamed shard cannot be reopened at a position (CC3M at 256 px: some 10-20 kB a row). The last
    `cache_rows` preprocessed rows are kept (an inner loop re-reads its support set every step); misses
    are decoded on `workers` threads.
    """

    def __init__(self, spec, keys: list[str], shards: list[str], local: dict[int, tuple[int, int, int, str]],
                 raw: dict[int, tuple[int, bytes]], cache_rows: int = 256, workers: int = 0):
        """`local`: row -> (index in `shards`, offset, size, extension); `raw`: row -> (index in `shards`,
        image bytes). A row in neither is refused."""
        self.spec, self.keys, self.shards = spec, keys, list(shards)
        self.exts = sorted({e for _, _, _, e in local.values()})
        rows = np.array(sorted(local), dtype=np.int64)
        self._rows = rows  # sorted, for searchsorted
        self._shard = np.array([local[r][0] for r in rows], dtype=np.int32)
        self._offset = np.array([local[r][1] for r in rows], dtype=np.int64)
        self._size = np.array([local[r][2] for r in rows], dtype=np.int64)
        self._ext = np.array([self.exts.index(local[r][3]) for r in rows], dtype=np.int8)
        self._raw = dict(raw)
        self.cache_rows = cache_rows
        self.workers = workers or min(8, job_threads())
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return len(self.keys), 3, self.spec.crop, self.spec.crop

    def location(self, row: int) -> tuple[str, int, int, str] | tuple[str, None, int, None]:
        """(shard, data offset, size, extension) of a row; offset and extension are None for a row held in memory."""
        j = int(np.searchsorted(self._rows, row))
        if j < len(self._rows) and self._rows[j] == row:
            return (self.shards[self._shard[j]], int(self._offset[j]), int(self._size[j]), self.exts[self._ext[j]])
        if row in self._raw:
            shard, data = self._raw[row]
            return self.shards[shard], None, len(data), None
        raise KeyError(f"row {row} ({self.keys[row] if 0 <= row < len(self.keys) else 'out of range'}) is used by "
                       f"no task: the corpus holds only the rows of the tasks")

    def read(self, row: int) -> bytes:
        """The encoded image of one row."""
        shard, offset, size, _ = self.location(row)
        return self._raw[row][1] if offset is None else read_member(shard, offset, size)

    def decode(self, row: int) -> torch.Tensor:
        """One row read, decoded and preprocessed -> [3, crop, crop] (not cached)."""
        rgb = decode_rgb(self.read(row), f"{self.location(row)[0]}:{self.keys[row]}")  # errors name the shard
        # a writable copy (torch wants one); contiguous like a row of a pixel tensor (preprocess keeps the
        # channels-last strides of the decoded image)
        return preprocess(np.array(rgb)[None], self.spec)[0].contiguous()

    def load(self, rows, cache: bool = True) -> torch.Tensor:
        """pixels[rows]; `cache`: keep the decoded rows in (and take them from) the LRU cache."""
        idx = self._as_rows(rows)
        have: dict[int, torch.Tensor] = {}
        if cache:
            for r in dict.fromkeys(idx.tolist()):
                if r in self._cache:
                    self._cache.move_to_end(r)
                    have[r] = self._cache[r]
        todo = [r for r in dict.fromkeys(idx.tolist()) if r not in have]
        if len(todo) > 1 and self.workers > 1:
            with ThreadPoolExecutor(min(self.workers, len(todo))) as pool:
                decoded = list(pool.map(self.decode, todo))
        else:
            decoded = [self.decode(r) for r in todo]
        have.update(zip(todo, decoded))
        if cache and self.cache_rows > 0:
            for r, px in zip(todo, decoded):
                self._cache[r] = px
            while len(self._cache) > self.cache_rows:
                self._cache.popitem(last=False)
        if not len(idx):
            return torch.zeros(0, 3, self.spec.crop, self.spec.crop)
        return torch.stack([have[r] for r in idx.tolist()])  # [n, 3, crop, crop]

    def __getitem__(self, rows) -> torch.Tensor:
        """pixels[rows] for a LongTensor, array, list or slice of rows ([3, crop, crop] for one int)."""
        if isinstance(rows, (int, np.integer)) or (isinstance(rows, torch.Tensor) and rows.ndim == 0):
            return self.load([int(rows)])[0]
        return self.load(rows)

    def _as_rows(self, rows) -> np.ndarray:
        """Rows as a 1-D int64 array, negatives counted from the end; IndexError beyond [-N, N)."""
        n = len(self.keys)
        if isinstance(rows, slice):
            return np.arange(*rows.indices(n), dtype=np.int64)
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu().numpy()
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"rows out of range for a corpus of {n} pairs")
        return np.where(idx < 0, idx + n, idx)


def locate_pairs(data_dir: str | Path, keys: list[str], rows, allow_pipe: bool = False
                 ) -> tuple[list[str], list[str], dict, dict, int]:
    """Where the pairs `keys` (hierarchy order, `<domain>/<key>`) of `rows` lie in the corpus shards.

    A key found in several shards is taken from the last, as a sample is taken only with an image and a
    non-blank caption (as `ShardPairs` does).

    Returns:
        (captions: one per key, "" for the rows not asked for; shards: the addresses, local ones as paths;
        local: row -> (index in shards, data offset, size, image extension); raw: row -> (index in shards,
        image bytes) for the shards that cannot be sought; the number of shards streamed), what
        `LazyPixels` takes.
    Raises:
        FileNotFoundError naming a domain without shards; ValueError when a pair of `rows` is in no shard;
        ShardError naming a shard that cannot be read.
    """
    where = {k: i for i, k in enumerate(keys)}
    wanted = set(int(r) for r in rows)
    captions = [""] * len(keys)
    shards: list[str] = []
    local: dict[int, tuple[int, int, int, str]] = {}  # row -> (shard, offset, size, extension)
    raw: dict[int, tuple[int, bytes]] = {}  # row -> (shard, image bytes): the shards that cannot be sought
    streamed = 0
    for d in sorted({k.split("/", 1)[0] for k in keys}):
        for url in corpus_shards(data_dir, d, allow_pipe):
            s = len(shards)
            shards.append(str(local_path(url)) if is_local(url) else url)
            samples = None
            if is_local(url):
                try:
                    samples = index_tar(shards[s])
                except (tarfile.ReadError, OSError):  # compressed or unreadable: the stream reader says which
                    samples = None
            if samples is None:
                streamed += 1
                for key, data, caption in ShardPairs(url):
                    i = where.get(f"{d}/{key}")
                    if i in wanted:
                        captions[i] = caption
                        raw[i] = (s, data)
                        local.pop(i, None)
                continue
            for key, members in samples:
                i = where.get(f"{d}/{key}")
                if i not in wanted:
                    continue
                ext = next((e for e in IMAGE_EXTS if e in members), None)
                caption = read_member(shards[s], *members["txt"]).decode("utf-8", "replace") if "txt" in members else ""
                if ext is None or not caption.strip():
                    continue  # not a pair: ShardPairs skips it
                captions[i] = caption
                local[i] = (s, *members[ext], ext)
                raw.pop(i, None)
    missing = sorted(wanted - set(local) - set(raw))
    if missing:
        raise ValueError(f"{data_dir}/shards: {len(missing)} pairs of the hierarchy are in no shard "
                         f"(first: {keys[missing[0]]}); rerun the embed and cluster stages on these shards")
    return captions, shards, local, raw, streamed
