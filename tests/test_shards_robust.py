"""Reading a web-scale corpus: shards addressed by brace patterns and URLs, unusable samples skipped and
counted by reason, unreadable shards named, and the embed stage's skip threshold (it fails keeping its
cache, and a rerun resumes)."""

from __future__ import annotations

import functools
import http.server
import io
import json
import re
import shutil
import tarfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import params_with
from gram import backbone as B
from gram import config as C
from gram import embed as E
from gram.data.shards import ShardError, ShardPairs, expand_shards, shard_name, write_shards
from gram.tensorio import load_tensors

FORMATS = (("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("JPEG", "jpeg"))


def image(i: int, fmt: str) -> bytes:
    """A small random picture of varying height, encoded as `fmt`."""
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20 + i % 7, 24, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def pair(i: int) -> dict:
    """A usable sample as img2dataset writes it, cycling through the image formats."""
    fmt, ext = FORMATS[i % len(FORMATS)]
    return {"__key__": f"{i:06d}", ext: image(i, fmt), "txt": f"a photo of thing {i}".encode(),
            "json": json.dumps({"key": i}).encode()}


def unusable() -> list[dict]:
    """One sample of every skip reason."""
    return [{"__key__": "900000", "jpg": b"\xff\xd8\xff not really a jpeg", "txt": b"broken picture"},
            {"__key__": "900001", "png": image(1, "PNG"), "json": b"{}"},  # no caption
            {"__key__": "900002", "txt": b"a caption without its picture", "json": b"{}"}]


ONE_OF_EACH = {"no_image": 1, "no_caption": 1, "undecodable": 1}


@pytest.fixture(scope="module")
def bb(tiny_clip_dir):
    return B.load(tiny_clip_dir, "cpu")


def test_brace_patterns_lists_and_directories_expand_in_order(tmp_path):
    for n in range(4):
        (tmp_path / f"{n:05d}.tar").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a shard")
    assert expand_shards(f"{tmp_path}/{{00000..00002}}.tar") == [f"{tmp_path}/{n:05d}.tar" for n in range(3)]
    assert expand_shards([f"{tmp_path}/{{00002..00003}}.tar", tmp_path / "00000.tar"]) == [
        f"{tmp_path}/00002.tar", f"{tmp_path}/00003.tar", f"{tmp_path}/00000.tar"]  # list order, then pattern order
    assert expand_shards(tmp_path) == [str(tmp_path / f"{n:05d}.tar") for n in range(4)]  # a directory: sorted
    assert expand_shards(f"{tmp_path}/0000{{3,1}}.tar") == [f"{tmp_path}/00003.tar", f"{tmp_path}/00001.tar"]

    remote = {"https://host/cc3m/{00000..00001}.tar": ["https://host/cc3m/00000.tar", "https://host/cc3m/00001.tar"],
              "s3://bucket/cc3m/{00000..00001}.tar": ["s3://bucket/cc3m/00000.tar", "s3://bucket/cc3m/00001.tar"],
              "pipe:aws s3 cp s3://bucket/{00000..00001}.tar -": ["pipe:aws s3 cp s3://bucket/00000.tar -",
                                                                    "pipe:aws s3 cp s3://bucket/00001.tar -"]}
    for pattern, expected in remote.items():
        assert expand_shards(pattern, allow_pipe=True) == expected  # remote addresses pass through, expanded
        assert [shard_name(u) for u in expected] == ["00000.tar", "00001.tar"]
    assert shard_name(f"file://{tmp_path}/00002.tar") == "00002.tar"

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        expand_shards(empty)
    with pytest.raises(FileNotFoundError, match="names no shards"):
        expand_shards([])


def test_shard_pairs_skip_unusable_samples_and_count_them_by_reason(tmp_path):
    samples = [pair(0), *unusable(), pair(1), {"__key__": "900003", "png": image(3, "PNG"), "txt": b"  \n"},
               pair(2), pair(3)]
    (name,) = write_shards(samples, tmp_path, 100)
    pairs = ShardPairs(tmp_path / name)
    got = list(pairs)
    # the undecodable image is yielded: whoever decodes it counts it (the embed stage, on its workers)
    assert [k for k, _, _ in got] == ["000000", "900000", "000001", "000002", "000003"]
    assert got[3][1] == pair(2)["webp"] and got[4][1] == pair(3)["jpeg"] and got[0][2] == "a photo of thing 0"
    assert pairs.skipped == {"no_image": 1, "no_caption": 2, "undecodable": 0}  # a blank caption is no caption
    assert pairs.samples == len(samples)


def test_skipped_samples_are_absent_and_the_rest_embedded_as_from_a_clean_shard(tmp_path, bb, tiny_clip_dir):
    good = [pair(i) for i in range(10)]
    bad = unusable()
    dirty = good[:1] + bad[:1] + good[1:4] + bad[1:] + good[4:]  # skips straddle the batches of 3
    write_shards(dirty, tmp_path / "dirty", 100)
    write_shards(good, tmp_path / "clean", 100)

    rep = E.embed_shards(bb, tmp_path / "dirty", tmp_path / "out_dirty", tiny_clip_dir, batch_size=3, workers=2)
    ref = E.embed_shards(bb, tmp_path / "clean", tmp_path / "out_clean", tiny_clip_dir, batch_size=3, workers=2)
    assert rep["shards"] == {"00000.tar": {"pairs": 10, "skipped": ONE_OF_EACH}} and rep["pairs"] == 10
    assert ref["shards"] == {"00000.tar": {"pairs": 10, "skipped": dict.fromkeys(ONE_OF_EACH, 0)}}

    keys, img, txt = E.load_embeddings(tmp_path / "out_dirty")
    ref_keys, ref_img, ref_txt = E.load_embeddings(tmp_path / "out_clean")
    assert keys == ref_keys == [s["__key__"] for s in good]
    assert torch.equal(img, ref_img) and torch.equal(txt, ref_txt)

    _, meta = load_tensors(tmp_path / "out_dirty" / "00000.safetensors", [])
    assert meta["skipped"] == ONE_OF_EACH
    _, meta = load_tensors(tmp_path / "out_clean" / "00000.safetensors", [])
    assert set(meta) == {"keys", "fingerprint"}  # a clean shard's file is what it was before skips were counted
    assert set(meta["fingerprint"]) == {"shard", "shard_sha256", "backbone"}

    again = E.embed_shards(bb, tmp_path / "dirty", tmp_path / "out_dirty", tiny_clip_dir)
    assert again["kept"] == ["00000.tar"] and again["shards"] == rep["shards"]  # counts survive a resumed run


def test_a_shard_unreadable_as_a_whole_is_an_error_naming_it(tmp_path, bb, tiny_clip_dir):
    (name,) = write_shards([pair(i) for i in range(6)], tmp_path / "src", 100)
    full = (tmp_path / "src" / name).read_bytes()
    with tarfile.open(tmp_path / "src" / name) as t:
        starts = [m.offset for m in t.getmembers()]  # 3 members per sample: image, json, txt

    def shard(folder: str, data: bytes):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "00001.tar").write_bytes(data)
        return tmp_path / folder / "00001.tar"

    cases = {
        shard("random", np.random.default_rng(0).bytes(3000)): r"is not a tar \(after 0 samples",
        shard("empty", b""): r"is not a tar \(after 0 samples",
        # cut where sample 3's first header would start: tarfile alone would stop there quietly
        shard("cut_between", full[:starts[9]]): r"truncated or damaged after 2 samples",
        shard("cut_inside", full[:starts[10] + 520]): r"cannot be read \(after 3 samples: unexpected end of data",
        shard("bad_header", full[:starts[12]] + b"\x07" * 512 + full[starts[12] + 512:]):
            r"truncated or damaged after 3 samples",
        tmp_path / "missing" / "00001.tar": r"cannot open the shard",
    }
    for path, message in cases.items():
        with pytest.raises(ShardError, match=re.escape(str(path)) + ": .*" + message):
            list(ShardPairs(path))

    # in the stage: the error names the shard, and the shards embedded before it stay embedded
    for path in cases:
        out = tmp_path / "out" / path.parent.name
        with pytest.raises(ShardError, match=re.escape(str(path))):
            E.embed_shards(bb, [tmp_path / "src" / name, path], out, tiny_clip_dir, batch_size=4)
        if path.exists():  # a missing shard fails before anything is computed
            assert [p.name for p in out.glob("*.safetensors")] == ["00000.safetensors"]


def test_too_many_skips_fail_the_stage_keeping_its_cache_and_a_rerun_resumes(tmp_path, tiny_clip_dir):
    corpus = [pair(i) for i in range(27)]
    corpus[12:12] = unusable()  # 30 samples, all three unusable ones in the second shard of 10
    write_shards(corpus, tmp_path / "data" / "shards" / "facebook", 10)
    out = tmp_path / "embed"
    cache = tmp_path / ".embed.cache" / "facebook"

    with pytest.raises(E.TooManySkipped) as err:
        E.run(C.EmbedParams(batch_size=4, workers=2), C.BackboneParams(device="cpu"), ["facebook"],
              tmp_path / "data", tiny_clip_dir, out)
    msg = str(err.value)
    assert "3 of 30 corpus samples (10.00%) were skipped, more than embed.max_skip_fraction = 0.01" in msg
    assert "facebook/00001.tar: 3 skipped (no_image 1, no_caption 1, undecodable 1)" in msg
    assert str(cache.parent) in msg
    assert not out.exists()  # nothing published
    files = sorted(cache.glob("*.safetensors"))
    assert [f.name for f in files] == ["00000.safetensors", "00001.safetensors", "00002.safetensors"]
    before = {f.name: f.stat().st_mtime_ns for f in files}

    # the same stage through its CLI, with a threshold from params.yaml that lets the corpus pass
    params = params_with(tmp_path, lambda raw: raw["tiny"]["embed"].update(max_skip_fraction=0.2), "tiny")
    E.main(["--params", params, "--profile", "tiny", "--data", str(tmp_path / "data"), "--backbone",
            str(tiny_clip_dir), "--out", str(out)])
    assert {f.name: f.stat().st_mtime_ns for f in sorted(cache.glob("*.safetensors"))} == before  # resumed
    rec = json.loads((out / "embed.json").read_text())
    dom = rec["domains"]["facebook"]
    assert dom["computed"] == 0 and dom["kept"] == 3 and dom["pairs"] == 27 and dom["shards"] == 3
    assert dom["skipped"] == {"samples": 30, "total": 3, "by_reason": ONE_OF_EACH,
                              "by_shard": {"00001.tar": ONE_OF_EACH}}
    assert rec["skipped"] == {"samples": 30, "total": 3, "fraction": 0.1, "max_fraction": 0.2,
                              "by_reason": ONE_OF_EACH}
    keys, _, _ = E.load_embeddings(out / "facebook")
    assert keys == [s["__key__"] for s in corpus if not s["__key__"].startswith("9")]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def http_root(tmp_path):
    """A folder served over HTTP on the loopback interface: (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http(s) shards through curl")
def test_shards_over_http_and_pipes_embed_as_local_ones(tmp_path, http_root, bb, tiny_clip_dir):
    root, base = http_root
    corpus = [pair(i) for i in range(9)]
    corpus[3:3] = unusable()
    write_shards(corpus, root, 6)  # 00000.tar (with the unusable ones), 00001.tar
    local = E.embed_shards(bb, f"{root}/{{00000..00001}}.tar", tmp_path / "local", tiny_clip_dir, batch_size=4)
    remote = E.embed_shards(bb, f"{base}/{{00000..00001}}.tar", tmp_path / "http", tiny_clip_dir, batch_size=4)
    piped = E.embed_shards(bb, [f"pipe:cat {root}/00000.tar", f"pipe:cat {root}/00001.tar"], tmp_path / "pipe",
                           tiny_clip_dir, batch_size=4, allow_pipe=True)
    assert local["shards"] == remote["shards"] == piped["shards"]
    assert local["shards"]["00000.tar"]["skipped"] == ONE_OF_EACH
    ref = E.load_embeddings(tmp_path / "local")
    for folder in ("http", "pipe"):
        got = E.load_embeddings(tmp_path / folder)
        assert got[0] == ref[0] and torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    _, meta = load_tensors(tmp_path / "http" / "00001.safetensors", [])
    assert meta["fingerprint"]["url"] == f"{base}/00001.tar"  # a remote shard is known by its URL
    assert E.embed_shards(bb, f"{base}/{{00000..00001}}.tar", tmp_path / "http", tiny_clip_dir)["computed"] == []

    for missing in (f"{base}/00007.tar", f"pipe:cat {root}/00007.tar"):  # curl's 404, cat's missing file
        with pytest.raises(ShardError, match=re.escape(missing) + ": the shard cannot be read .*exit"):
            E.embed_shards(bb, missing, tmp_path / "missing", tiny_clip_dir, allow_pipe=True)
