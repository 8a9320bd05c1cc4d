"""The download stage: the join, the drop reasons, the splits, the shards and the npm client."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections import Counter

import numpy as np
import pytest

import fake_npm
from conftest import ROOT
from gram import config as C
from gram.data import emoji
from gram.data.datasets import load_dataset, split_images
from gram.data.shards import iter_samples, load_images, shard_paths


def test_norm_code_strips_presentation_selector():
    assert emoji.norm_code("263a-fe0f") == "263A"
    assert emoji.norm_code("0023-FE0F-20E3") == "0023-20E3"
    assert emoji.norm_code("1F600") == "1F600"


def test_join_counts_and_drop_reasons(tiny_data):
    rep = json.loads((tiny_data / "download.json").read_text())
    n = len(fake_npm.EMOJIS)
    assert rep["labels"]["base_emojis"] == n
    assert rep["labels"]["dropped"] == {"no group (regional indicator)": 2, "component (skin tone / hair)": 1}
    g, a = rep["vendors"]["google"], rep["vendors"]["apple"]
    assert g["matched"] == n - 2 and g["dropped"]["no entry in emoji.json"] == 1
    assert g["dropped"]["image file missing from package"] == 1
    assert a["matched"] == n - 2 and a["dropped"]["has_img_apple is false"] == 1
    # kept: emojis drawn by every vendor
    assert rep["in_all_vendors"] == rep["selected"] == n - 3
    assert g["dropped"]["missing in another vendor"] == 1 and a["dropped"]["missing in another vendor"] == 1


def test_fe0f_emoji_is_matched(tiny_data):
    keys, _, meta = load_images(tiny_data / "shards" / "google")
    assert "google_263a-fe0f" in keys
    assert meta[keys.index("google_263a-fe0f")]["hexcode"] == "263A-FE0F"


def test_shards_follow_img2dataset_layout(tiny_data):
    names = Counter()
    for s in iter_samples(shard_paths(tiny_data / "shards" / "apple")):
        names.update(k for k in s if not k.startswith("__"))
        meta = json.loads(s["json"])
        assert set(meta) >= {"vendor", "hexcode", "group", "subgroup", "label", "tags"}
        assert meta["vendor"] == "apple" and s["__key__"] == f"apple_{meta['hexcode'].lower()}"
        assert s["txt"].decode().startswith(meta["label"])  # caption: label first
    assert set(names) == {"png", "txt", "json"} and len(set(names.values())) == 1
    assert len(shard_paths(tiny_data / "shards" / "apple")) == 2  # 69 samples, shard_size 40


def test_alpha_is_composited_on_white(tiny_data):
    _, imgs, _ = load_images(tiny_data / "shards" / "google")
    assert imgs.dtype == np.uint8 and imgs.shape[1:] == (64, 64, 3)
    assert (imgs[:, 0, 0] == 255).all()  # transparent corners became white


def test_download_is_byte_identical_between_runs(tmp_path, fake_packages, tiny_params, tiny_data):
    shutil.copytree(fake_packages, tmp_path / "raw")
    emoji.run(tiny_params[1].data, tmp_path)
    for f in sorted((tiny_data / "shards").rglob("*.tar")) + sorted((tiny_data / "datasets").glob("*.json")):
        other = tmp_path / f.relative_to(tiny_data)
        assert hashlib.sha256(f.read_bytes()).digest() == hashlib.sha256(other.read_bytes()).digest(), f


def test_splits_partition_every_class_and_are_shared_across_domains(tiny_data):
    ds = load_dataset(tiny_data, "subgroup")
    assert len(ds["classes"]) == 9 and ds["classes"][0] == "face smiling"
    per_class = Counter((it["label"], it["split"]) for it in ds["items"])
    for c in range(len(ds["classes"])):
        n = sum(per_class[(c, s)] for s in ("train", "val", "test"))
        assert (per_class[(c, "train")], per_class[(c, "val")], per_class[(c, "test")]) == \
            emoji.split_counts(n, C.SplitParams())
    hexes = [it["hexcode"] for it in ds["items"]]
    assert len(hexes) == len(set(hexes))  # each emoji in exactly one split
    g = split_images(tiny_data, "subgroup", "google", "test")
    a = split_images(tiny_data, "subgroup", "apple", "test")
    assert [k.split("_", 1)[1] for k in g.keys] == [k.split("_", 1)[1] for k in a.keys]
    assert (g.labels == a.labels).all() and not (g.images == a.images).all()
    assert sorted(ds["base"] + ds["new"]) == list(range(9)) and not set(ds["base"]) & set(ds["new"])


@pytest.mark.parametrize("n", range(1, 40))
def test_split_counts(n):
    tr, va, te = emoji.split_counts(n, C.SplitParams(train=0.5, val=0.1))
    assert tr + va + te == n and te >= 1 and min(tr, va) >= 0
    if n >= 2:
        assert tr >= 1


def test_split_depends_on_seed_only(tiny_data):
    emojis = [{"hexcode": e["hexcode"], "subgroup": str(e["subgroup"]), "group": str(e["group"])}
              for e in fake_npm.EMOJIS]
    ds = C.DatasetParams(level="subgroup", min_per_class=1)
    a = emoji.build_dataset("x", emojis, ds, C.SplitParams(seed=0), ["v"])
    b = emoji.build_dataset("x", list(reversed(emojis)), ds, C.SplitParams(seed=0), ["v"])
    c = emoji.build_dataset("x", emojis, ds, C.SplitParams(seed=1), ["v"])
    split = lambda d: {(it["hexcode"], it["split"]) for it in d["items"]}  # noqa: E731
    assert split(a) == split(b) and split(a) != split(c)


def test_min_per_class_drops_small_classes():
    emojis = [{"hexcode": f"{i:X}", "subgroup": "big" if i < 10 else "small", "group": "g"} for i in range(12)]
    d = emoji.build_dataset("x", emojis, C.DatasetParams(level="subgroup", min_per_class=5), C.SplitParams(), ["v"])
    assert d["classes"] == ["big"] and len(d["items"]) == 10


def test_subset_groups_and_caps():
    emojis = [{"hexcode": str(i), "group": "a" if i < 6 else "b", "subgroup": f"s{i % 3}"} for i in range(12)]
    out = emoji.apply_subset(emojis, ["a"], 1, 1)
    assert [e["hexcode"] for e in out] == ["0", "1", "2"]
    assert emoji.apply_subset(emojis, None, 5, None) == []


def test_fetch_runs_the_configured_command(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = emoji.fetch("emoji-datasource-apple@16.0.0", tmp_path, ["python", "tests/fake_npm.py"])
    assert path == tmp_path / "emoji-datasource-apple-16.0.0.tgz" and path.stat().st_size > 0
    mtime = path.stat().st_mtime_ns
    assert emoji.fetch("emoji-datasource-apple@16.0.0", tmp_path, ["false"]) == path  # cached: no call
    assert path.stat().st_mtime_ns == mtime


def test_missing_npm_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`npm-not-installed` not found on PATH.*data\.npm\.command"):
        emoji.fetch("emojibase-data@17.0.0", tmp_path, ["npm-not-installed", "pack"])


def test_failing_client_names_the_package(tmp_path):
    with pytest.raises(RuntimeError, match="emojibase-data@99.0.0"):
        emoji.fetch("emojibase-data@99.0.0", tmp_path, ["false"])
    assert not list(tmp_path.glob("*.tgz"))


def test_unpinned_package_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="NAME@VERSION"):
        emoji.fetch("emojibase-data", tmp_path, ["npm", "pack"])


def test_bad_subset_is_a_clear_error(tmp_path, fake_packages, tiny_params):
    shutil.copytree(fake_packages, tmp_path / "raw")
    cfg = dataclasses.replace(tiny_params[1].data, subset=C.SubsetParams(groups=["flags"]))
    with pytest.raises(ValueError, match="data.subset leaves no emojis"):
        emoji.run(cfg, tmp_path)
    assert not (tmp_path / "shards").exists()


def test_corrupt_cached_package_is_named(tmp_path):
    bad = tmp_path / "emojibase-data-17.0.0.tgz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(ValueError, match=r"(?s)emojibase-data-17\.0\.0\.tgz: not a readable package.*delete it"):
        emoji.read_labels(bad)
