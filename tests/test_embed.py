"""Embeddings of corpus shards: exact against the backbone, one file per shard, resumable."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from gram import backbone as B
from gram import embed as E
from gram.tensorio import DamagedFile
from gram.data.shards import iter_samples, load_images, shard_paths


@pytest.fixture()
def shards(tmp_path_factory, tiny_data):
    """Both vendors' shards in one folder (the resumption test needs several)."""
    folder = tmp_path_factory.mktemp("shards")
    paths = []
    for vendor in ("google", "apple"):
        for p in shard_paths(tiny_data / "shards" / vendor):
            paths.append(folder / f"{vendor}-{p.name}")
            shutil.copy2(p, paths[-1])
    assert len(paths) >= 3
    return paths


def test_embeddings_equal_the_backbone_features(tmp_path, shards, tiny_clip_dir):
    bb = B.load(tiny_clip_dir, "cpu")
    report = E.embed_shards(bb, shards, tmp_path, tiny_clip_dir, batch_size=7)
    assert report["computed"] == [p.name for p in shards] and report["kept"] == []
    assert report["pairs"] == sum(1 for _ in iter_samples(shards)) and report["wait_s"] >= 0.0
    keys, img, txt = E.load_embeddings(tmp_path, [f"{p.stem}.safetensors" for p in shards])
    in_order = [s["__key__"] for s in iter_samples(shards)]
    assert keys == in_order  # shard order, then order within the shard
    _, images, meta = load_images(shards[0].parent, keys)
    torch.testing.assert_close(img, bb.encode_images(images), rtol=0, atol=1e-6)
    torch.testing.assert_close(txt, bb.encode_texts([m["caption"] for m in meta]), rtol=0, atol=1e-6)
    assert torch.allclose(img.norm(dim=-1), torch.ones(len(keys))) and torch.allclose(txt.norm(dim=-1),
                                                                                     torch.ones(len(keys)))


def test_a_rerun_computes_only_missing_or_stale_shards(tmp_path, shards, tiny_clip_dir):
    bb = B.load(tiny_clip_dir, "cpu")
    E.embed_shards(bb, shards, tmp_path, tiny_clip_dir)
    files = sorted(tmp_path.glob("*.safetensors"))
    before = {f.name: f.stat().st_mtime_ns for f in files}
    first = E.load_embeddings(tmp_path)

    files[1].unlink()  # as if interrupted before this shard
    (tmp_path / files[2].name).write_bytes(b"not a safetensors file")  # a damaged file is not trusted
    report = E.embed_shards(bb, shards, tmp_path, tiny_clip_dir)
    redone = {files[1].stem, files[2].stem}
    assert {n.removesuffix(".tar") for n in report["computed"]} == redone
    assert {n.removesuffix(".tar") for n in report["kept"]} == {f.stem for f in files} - redone
    for f in files:
        if f.stem not in redone:
            assert f.stat().st_mtime_ns == before[f.name]
    again = E.load_embeddings(tmp_path)
    assert again[0] == first[0] and torch.equal(again[1], first[1]) and torch.equal(again[2], first[2])
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind

    # another backbone makes every file stale
    other = tmp_path.parent / "other_clip"
    shutil.copytree(tiny_clip_dir, other)
    model = B.load(other, "cpu").model
    with torch.no_grad():
        model.logit_scale.add_(1.0)
    model.save_pretrained(other)
    assert E.embed_shards(B.load(other, "cpu"), shards, tmp_path, other)["kept"] == []


def test_bad_inputs_fail_clearly(tmp_path, tiny_clip_dir):
    with pytest.raises(FileNotFoundError, match="no embedding files"):
        E.load_embeddings(tmp_path)
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(DamagedFile, match=re.escape(str(tmp_path / "x.safetensors")) + ": truncated or damaged .*"
                                          r"rerun the embed stage"):
        E.load_embeddings(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no weights to fingerprint"):
        B.backbone_fingerprint(empty)
    with pytest.raises(FileNotFoundError, match="backbone directory does not exist"):
        B.backbone_fingerprint(tmp_path / "nowhere")


def test_shards_with_one_name_are_refused(tmp_path, tiny_data, tiny_clip_dir):
    same = [tiny_data / "shards" / v / "00000.tar" for v in ("google", "apple")]
    with pytest.raises(ValueError, match="same name"):
        E.embed_shards(B.load(tiny_clip_dir, "cpu"), same, tmp_path, tiny_clip_dir)


def test_images_of_any_size_are_embedded_one_by_one(tmp_path, tiny_clip_dir):
    """Corpus images differ in size (CC3M): each is resized on its own, as the backbone would resize it."""
    import io

    import numpy as np
    from PIL import Image

    from gram.data.shards import write_shards

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 64), (64, 64), (50, 33), (90, 70)]]
    samples = []
    for i, a in enumerate(arrays):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        samples.append({"__key__": f"{i:03d}", "png": buf.getvalue(), "txt": f"picture {i}".encode()})
    (shard,) = write_shards(samples, tmp_path / "shards", 10)
    bb = B.load(tiny_clip_dir, "cpu")
    E.embed_shards(bb, [tmp_path / "shards" / shard], tmp_path / "out", tiny_clip_dir, batch_size=3, workers=2)
    keys, img, _ = E.load_embeddings(tmp_path / "out")
    assert keys == ["000", "001", "002", "003"]
    ref = torch.cat([bb.encode_images(a[None]) for a in arrays])
    torch.testing.assert_close(img, ref, rtol=0, atol=1e-6)
