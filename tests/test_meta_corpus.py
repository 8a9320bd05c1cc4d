"""The meta-training corpus (gram/meta.py: load_corpus; gram/data/corpus.py: LazyPixels): the lazily decoded pixels and the frozen
features equal the eager computation the stage used to hold in memory, rows no task uses are never read, a
shard given by address (pipe:) reads the same, and a meta-training run is bit-identical with either corpus."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gram import meta as M
from gram.backbone import load
from gram.data import corpus as CO
from gram.data.shards import ShardError, ShardPairs, decode_rgb, shard_paths, write_shards
from gram.images import preprocess
from gram.prompts.encoders import encode_image_prompted, normalize
from gram.tensorio import load_tensors
from test_meta import stage


def eager_corpus(bb, data_dir, keys: list[str], rows, batch_size: int = 256, allow_pipe: bool = False) -> M.Corpus:
    """The corpus as the stage built it before it streamed: every shard read whole, the used rows decoded into
    one pixel tensor [N, 3, crop, crop], their frozen features encoded in row order, `batch_size` at a time
    (local shard folders only: `allow_pipe` is not used)."""
    where = {k: i for i, k in enumerate(keys)}
    captions, raw, wanted = [""] * len(keys), {}, set(int(r) for r in rows)
    for d in sorted({k.split("/", 1)[0] for k in keys}):
        for path in shard_paths(Path(data_dir) / "shards" / d):
            for key, data, caption in ShardPairs(path):
                i = where.get(f"{d}/{key}")
                if i is not None:
                    captions[i] = caption
                    if i in wanted:
                        raw[i] = data
    spec = bb.spec
    pixels = torch.zeros(len(keys), 3, spec.crop, spec.crop)
    frozen = torch.zeros(len(keys), bb.model.config.projection_dim)
    order = sorted(raw)
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            px = preprocess(np.stack([decode_rgb(raw[i], keys[i]) for i in idx]), spec)
            pixels[idx] = px
            frozen[idx] = normalize(encode_image_prompted(bb.model, px.to(bb.device, bb.dtype), None)).cpu()
    return M.Corpus(keys=keys, captions=captions, pixels=pixels, frozen=frozen)


def member_keys(data_dir) -> dict[tuple[str, int], str]:
    """(shard path, data offset) -> `<domain>/<key>` of every member of the local shards."""
    out = {}
    for folder in (Path(data_dir) / "shards").iterdir():
        for path in shard_paths(folder) if folder.is_dir() else []:
            with tarfile.open(path) as tar:
                for m in tar.getmembers():
                    out[(str(path), m.offset_data)] = f"{folder.name}/{m.name.split('.', 1)[0]}"
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_data, tiny_trained_dir):
    """The tiny profile's embed, cluster and tasks outputs, the hierarchy keys, the task rows and the backbone."""
    root = tmp_path_factory.mktemp("corpus")
    d = {"data": tiny_data, "backbone": tiny_trained_dir, "chc": root / "chc", "tasks": root / "tasks"}
    assert stage("embed", "--data", str(tiny_data), "--backbone", str(tiny_trained_dir), "--out", str(root / "e")) == 0
    assert stage("cluster", "--data", str(tiny_data), "--embed", str(root / "e"), "--out", str(d["chc"])) == 0
    assert stage("tasks", "--chc", str(d["chc"]), "--out", str(d["tasks"])) == 0
    from gram.tasks import load_tasks

    tasks, _ = load_tasks(d["tasks"])
    d["keys"] = (d["chc"] / "keys.txt").read_text().splitlines()
    d["task_rows"] = np.unique(np.concatenate(tasks.support + tasks.query))
    d["bb"] = load(tiny_trained_dir, "cpu", "float32")
    return d


def some_rows(n: int, seed: int) -> np.ndarray:
    """About half of n rows (the rest unused), drawn at random."""
    return np.sort(np.random.default_rng(seed).choice(n, n // 2, replace=False))


def test_lazy_pixels_and_frozen_equal_the_eager_corpus(world):
    keys, bb = world["keys"], world["bb"]
    rows = some_rows(len(keys), 0)
    lazy = M.load_corpus(bb, world["data"], keys, rows, batch_size=7)
    ref = eager_corpus(bb, world["data"], keys, rows, batch_size=7)
    assert isinstance(lazy.pixels, CO.LazyPixels) and lazy.pixels.shape == tuple(ref.pixels.shape)
    assert torch.equal(lazy.frozen, ref.frozen) and lazy.frozen[rows].abs().sum(1).min() > 0
    assert [lazy.captions[r] for r in rows] == [ref.captions[r] for r in rows]
    assert all(c == "" for i, c in enumerate(lazy.captions) if i not in set(rows))  # rows no task uses: unread
    gen = np.random.default_rng(1)
    for size in (1, 5, 16, 40):  # repeated rows, any order, through the cache and around it
        pick = gen.choice(rows, size, replace=True)
        if size == 16:
            pick[3:6] = pick[0]
        for sel in (torch.as_tensor(pick, dtype=torch.long), pick, list(pick)):
            got = lazy.pixels[sel]
            assert got.dtype == torch.float32 and torch.equal(got, ref.pixels[torch.as_tensor(pick)]), size
    assert torch.equal(lazy.pixels[int(rows[2])], ref.pixels[int(rows[2])])
    unused = next(i for i in range(len(keys)) if i not in set(rows))
    with pytest.raises(KeyError, match=f"row {unused} .*is used by no task"):
        lazy.pixels[torch.tensor([int(rows[0]), unused])]


def test_rows_no_task_uses_are_never_read(world, monkeypatch):
    """Every byte read (images and captions) is a member of a used row, and the local shards are not streamed."""
    keys, bb = world["keys"], world["bb"]
    rows = some_rows(len(keys), 2)
    reads: list[tuple[str, int]] = []
    read = CO.read_member
    monkeypatch.setattr(CO, "read_member", lambda path, offset, size: (reads.append((path, offset)),
                                                                      read(path, offset, size))[1])
    monkeypatch.setattr(CO, "ShardPairs", lambda url: pytest.fail(f"{url}: a local shard was streamed"))
    corpus = M.load_corpus(bb, world["data"], keys, rows)
    owner = member_keys(world["data"])
    used = {keys[r] for r in rows}
    assert {owner[r] for r in reads} == used  # each used row's caption and image, nothing else
    assert len(reads) == 2 * len(rows)
    reads.clear()
    corpus.pixels.cache_rows = 0
    pick = rows[[0, 3, 3, 1]]
    corpus.pixels[pick]
    assert sorted(owner[r] for r in reads) == sorted(keys[r] for r in set(pick.tolist()))  # a repeat: one read
    corpus.pixels.cache_rows = 8
    corpus.pixels[pick]
    reads.clear()
    corpus.pixels[pick[::-1].copy()]
    assert reads == []  # from the cache


def test_shards_given_by_address_read_the_same(world, tmp_path):
    """A manifest of `pipe:cat …` addresses (streamed: bytes held in memory) and plain paths (indexed) gives the
    corpus of the shard folders."""
    keys, bb = world["keys"], world["bb"]
    data = tmp_path / "data"
    (data / "shards").mkdir(parents=True)
    for folder in sorted((Path(world["data"]) / "shards").iterdir()):
        if folder.is_dir():
            paths = shard_paths(folder)
            urls = [f"pipe:cat {p}" for p in paths[:-1]] + [str(paths[-1])]
            (data / "shards" / f"{folder.name}.json").write_text(json.dumps({"spec": str(folder),
                                                                              "shards": [{"url": u} for u in urls]}))
    rows = some_rows(len(keys), 3)
    with pytest.raises(ValueError, match=re.escape(f"{data / 'shards'}") + r".*\.json: shard address 'pipe:cat .*"
                                         r"data\.paper\.allow_pipe"):
        M.load_corpus(bb, data, keys, rows)  # a command in a manifest runs only when the params allow it
    by_url = M.load_corpus(bb, data, keys, rows, allow_pipe=True)
    local = M.load_corpus(bb, world["data"], keys, rows)
    assert by_url.captions == local.captions and torch.equal(by_url.frozen, local.frozen)
    for seed in range(3):
        pick = torch.as_tensor(np.random.default_rng(seed).choice(rows, 12), dtype=torch.long)
        assert torch.equal(by_url.pixels[pick], local.pixels[pick])
    where = [by_url.pixels.location(int(r)) for r in rows]
    assert any(w[0].startswith("pipe:") and w[1] is None for w in where)  # held as bytes
    assert any(not w[0].startswith("pipe:") and w[1] is not None for w in where)  # indexed


def _png(rgb: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


def test_mixed_sizes_compressed_shards_repeats_and_missing_pairs(tiny_clip_dir, tmp_path):
    """Images of several sizes and formats (one batch could not stack them), a gzip-compressed shard (cannot be
    sought: streamed), a key in two shards (the last wins), samples that are no pair, and errors naming what is
    missing or damaged."""
    bb = load(tiny_clip_dir, "cpu", "float32")
    gen = np.random.default_rng(0)
    shape = [(40, 30), (32, 32), (50, 64), (33, 47)]
    img = {i: gen.integers(0, 256, (*shape[i % 4], 3), dtype=np.uint8) for i in range(12)}

    def sample(i: int, fmt: str = "PNG") -> dict:
        return {"__key__": f"s{i:02d}", {"PNG": "png", "JPEG": "jpg"}[fmt]: _png(img[i], fmt),
                "txt": f"caption {i}".encode()}

    folder = tmp_path / "data" / "shards" / "web"
    write_shards([sample(i, fmt="JPEG" if i % 3 == 0 else "PNG") for i in range(6)], folder, 3)  # 00000, 00001
    with tarfile.open(folder / "00002.tar", "w:gz") as tar:  # compressed, though named .tar
        for s in [sample(i) for i in range(6, 10)] + [{"__key__": "s01", "png": _png(img[11]), "txt": b"again"}]:
            for ext in ("png", "txt"):
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(s[ext])
                tar.addfile(info, io.BytesIO(s[ext]))
    write_shards([{"__key__": "s10", "txt": b"no image"}, {"__key__": "s11", "png": _png(img[11]), "txt": b"  "}],
                 tmp_path / "more", 5)
    shutil.copy(tmp_path / "more" / "00000.tar", folder / "00003.tar")
    keys = [f"web/s{i:02d}" for i in range(12)]
    rows = np.array([0, 1, 2, 3, 6, 7, 9])
    corpus = M.load_corpus(bb, tmp_path / "data", keys, rows, batch_size=3)
    want_bytes = {i: _png(img[i], "JPEG" if i % 3 == 0 else "PNG") if i < 6 else _png(img[i]) for i in rows}
    want_bytes[1] = _png(img[11])  # s01 again, in the later shard
    pick = np.array([9, 1, 0, 3, 3, 7, 2, 6])
    want = torch.stack([preprocess(np.array(decode_rgb(want_bytes[i]))[None], bb.spec)[0] for i in pick])
    assert torch.equal(corpus.pixels[pick], want)
    assert corpus.captions[1] == "again" and corpus.captions[7] == "caption 7" and corpus.captions[4] == ""
    assert corpus.pixels.location(1)[1] is None and corpus.pixels.location(2)[1] is not None  # streamed, indexed
    for i in (5, 8):  # in a shard, but no task uses them
        with pytest.raises(KeyError):
            corpus.pixels[[i]]
    for row, key in ((10, "web/s10"), (11, "web/s11")):  # no image; a blank caption
        with pytest.raises(ValueError, match=rf"1 pairs of the hierarchy are in no shard \(first: {key}\)"):
            M.load_corpus(bb, tmp_path / "data", keys, np.array([0, row]))
    with pytest.raises(FileNotFoundError, match="no shards of corpus domain 'other'"):
        M.load_corpus(bb, tmp_path / "data", keys + ["other/x"], rows)
    data = (folder / "00000.tar").read_bytes()
    (folder / "00000.tar").write_bytes(data[:2000])  # cut inside a member
    with pytest.raises(ShardError, match="00000.tar"):
        M.load_corpus(bb, tmp_path / "data", keys, rows)


@pytest.mark.slow
def test_meta_training_is_bit_identical_with_the_eager_corpus(world, tiny_params, tmp_path, monkeypatch):
    """`gram.meta.run` of the tiny joint recipe (its loss reads the pixels, its context the frozen features)
    writes the same θ, φ, history and validation as with the eager corpus, and reads only rows of the tasks."""
    prof, recipe = tiny_params[1], "joint"
    args = (world["data"], world["chc"], world["tasks"], world["backbone"])
    validate = M.MetaLearner.validate  # on 4 of the held-out tasks: the run is the same, and 10 times shorter
    monkeypatch.setattr(M.MetaLearner, "validate", lambda self, tasks, ids: validate(self, tasks, ids[:4]))
    reads = []
    read = CO.read_member
    monkeypatch.setattr(CO, "read_member", lambda path, offset, size: (reads.append((path, offset)),
                                                                      read(path, offset, size))[1])
    lazy = M.run(prof, recipe, *args, tmp_path / "lazy", progress=False)
    owner = member_keys(world["data"])
    assert {owner[r] for r in reads} == {world["keys"][r] for r in world["task_rows"]}
    monkeypatch.setattr(M, "load_corpus", eager_corpus)
    eager = M.run(prof, recipe, *args, tmp_path / "eager", progress=False)
    (a, meta_a), (b, meta_b) = (load_tensors(tmp_path / d / M.META) for d in ("lazy", "eager"))
    assert a.keys() == b.keys() and meta_a == meta_b and any(k.startswith("phi.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    history = [json.loads((tmp_path / d / "meta.json").read_text())["history"] for d in ("lazy", "eager")]
    assert history[0] == history[1] and len(history[0]) == prof.meta[recipe].steps
    assert lazy["validation"] == eager["validation"]
