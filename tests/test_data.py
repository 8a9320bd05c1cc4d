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


# ------------------------------------------------------------------------------------------------
# more styles: packages of one image per emoji, emojilib keywords, real 16 shots
# ------------------------------------------------------------------------------------------------
def test_file_code_drops_selector_and_joiner():
    assert emoji.file_code("1f3c3-200d-2640-fe0f") == "1F3C3-2640"
    assert emoji.file_code("1F3C3-2640") == emoji.file_code("1F3C3-200D-2640-FE0F")
    assert emoji.file_code("0023-FE0F-20E3") == "0023-20E3"


def _tgz(path, files: dict[str, bytes]):
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_read_files_keys_by_code_points_and_keeps_the_first_by_name(tmp_path):
    png = fake_npm.draw(fake_npm.EMOJIS[0], "google", 16)
    other = fake_npm.draw(fake_npm.EMOJIS[9], "google", 16)
    tgz = _tgz(tmp_path / "p.tgz", {  # archive order: the FE0F-less duplicate comes last
        "package/img/1f3c3-2640.png": png, "package/img/263a-fe0f.webp": png, "package/img/263a.webp": other,
        "package/img/sprite.png": other, "package/img/sub/1f600.png": other, "package/other/1f601.png": other,
        "package/img/1f600.txt": b"x"})
    found = emoji.read_files(tgz, "img")
    assert set(found) == {"1F3C3-2640", "263A"}
    assert found["263A"] == ("package/img/263a-fe0f.webp", png)  # '263a-fe0f' < '263a.' by name
    emojis = [{"hexcode": "1F3C3-200D-2640-FE0F"}, {"hexcode": "263A-FE0F"}, {"hexcode": "1F600"}]
    matched, dropped = emoji.match_files(emojis, found)
    assert matched == {"1F3C3-200D-2640-FE0F": "package/img/1f3c3-2640.png", "263A-FE0F": "package/img/263a-fe0f.webp"}
    assert dropped == Counter({"no image file": 1})
    with pytest.raises(FileNotFoundError, match=r"p\.tgz.*package/assets/.*data\.npm\.files"):
        emoji.read_files(tgz, "assets")


def test_own_keywords_add_only_new_words():
    e = {"label": "grinning face", "tags": ["face", "grin"]}
    assert emoji.own_keywords(e, ["grinning face", "Face", "smile", ":D", "smile", "happy"]) == ["smile", "happy"]


@pytest.fixture(scope="module")
def styled_data(tmp_path_factory, fake_packages, tiny_params):
    """The tiny world with two one-file-per-emoji vendors (a PNG one at 64 px, a WebP one at 96 px) and
    emojilib keywords."""
    raw = tmp_path_factory.mktemp("styled") / "raw"
    shutil.copytree(fake_packages, raw)
    for spec in ["emoji-assets@11.0.0", "@lobehub/fluent-emoji-3d@1.1.0", "emojilib@4.0.3"]:
        fake_npm.pack(spec, raw)
    d = tiny_params[1].data
    npm = dataclasses.replace(d.npm, images={**d.npm.images, "joypixels": "emoji-assets@11.0.0",
                                             "fluent": "@lobehub/fluent-emoji-3d@1.1.0"},
                              files={"joypixels": "png/64", "fluent": "assets"}, keywords="emojilib@4.0.3")
    report = emoji.run(dataclasses.replace(d, npm=npm), raw.parent)
    return raw.parent, report


def test_file_vendors_join_resize_and_keep_the_shared_emojis(styled_data, tiny_data):
    out, rep = styled_data
    assert rep["vendors"]["joypixels"]["matched"] == len(fake_npm.EMOJIS)
    assert rep["vendors"]["fluent"]["dropped"]["no image file"] == 1
    base = json.loads((tiny_data / "download.json").read_text())
    assert rep["in_all_vendors"] == base["in_all_vendors"] - 1  # the emoji fluent lacks (drawn by the others)
    keys, imgs, metas = load_images(out / "shards" / "fluent")
    assert imgs.shape[1:] == (64, 64, 3) and (imgs[:, 0, 0] == 255).all()  # 96 px webp -> 64 px, alpha on white
    assert fake_npm.NO_FLUENT.lower() not in {k.split("_", 1)[1] for k in keys}
    fe0f = [m for m in metas if m["hexcode"] == fake_npm.EMOJIS[0]["hexcode"]]
    assert len(fe0f) == 1 and keys[metas.index(fe0f[0])] == "fluent_263a-fe0f"


def test_keywords_join_the_metadata_but_not_the_corpus_caption(styled_data):
    out, rep = styled_data
    for s in iter_samples(shard_paths(out / "shards" / "google")):
        meta = json.loads(s["json"])
        e = next(e for e in fake_npm.EMOJIS if e["hexcode"] == meta["hexcode"])
        assert meta["keywords"] == [fake_npm.WORDS_EXTRA[fake_npm.EMOJIS.index(e) % 3]]  # tag, label, ":)" dropped
        assert s["txt"].decode() == emoji.caption(e)
    assert rep["keywords"]["emojis_with_keywords"] == rep["labels"]["base_emojis"]


def test_dataset_train_fraction_and_min_train_make_real_shots():
    emojis = [{"hexcode": f"{i:X}", "subgroup": f"s{n}", "group": "g"}
              for n in (10, 22, 23, 40) for i in range(1000 * n, 1000 * n + n)]
    split = C.SplitParams(train=0.5, val=0.1)
    d = emoji.build_dataset("x", emojis, C.DatasetParams(level="subgroup", train=0.7, min_train=16), split, ["v"])
    assert d["classes"] == ["s22", "s23", "s40"]  # split_counts(22) at 70/10/20 = (16, 2, 4); 10 emojis: 7
    per = Counter((d["classes"][it["label"]], it["split"]) for it in d["items"])
    assert [per[(c, "train")] for c in d["classes"]] == [16, 16, 28]
    assert all(per[(c, "train")] >= 16 for c in d["classes"])
    plain = emoji.build_dataset("x", emojis, C.DatasetParams(level="subgroup"), split, ["v"])
    train = lambda ds: {it["hexcode"] for it in ds["items"] if it["split"] == "train"}  # noqa: E731
    assert train(plain) & {e["hexcode"] for e in emojis if e["subgroup"] != "s10"} <= train(d)  # same order, cut later
    with pytest.raises(ValueError, match=r"dataset 'x'.*>= 50 of them in its train split \(train fraction 0.7\)"):
        emoji.build_dataset("x", emojis, C.DatasetParams(level="subgroup", train=0.7, min_train=50), split, ["v"])


def test_dataset_train_fraction_is_checked_with_val():
    raw = C.read_yaml(ROOT / "tests" / "params" / "tiny.yaml")
    raw["tiny"]["data"]["datasets"]["subgroup16"]["train"] = 0.95
    with pytest.raises(C.ConfigError, match=r"tiny\.data\.datasets\.subgroup16\.train.*leaves no test split"):
        C.from_dict(raw, "tiny.yaml")


def test_files_must_name_an_image_vendor():
    with pytest.raises(C.ConfigError, match=r"`files` names \['openmoji'\]"):
        C.NpmParams(images={"google": "emoji-datasource-google@16.0.0"}, files={"openmoji": "color/72x72"})
