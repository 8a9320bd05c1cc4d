"""The opt-in corpus download (`gram img2dataset`): img2dataset against a loopback HTTP server writes
shards that `gram.data.shards` reads, the summary counts successes and failures by reason, a rerun
fetches nothing again (an interrupted shard, only that shard), and a disabled stage or a missing table is refused before any download."""

from __future__ import annotations

import functools
import http.server
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from conftest import params_with
from gram import cli
from gram import config as C
from gram.data import img2dataset as I2D
from gram.data.shards import ShardPairs, decode_rgb, expand_shards, iter_shard

SIZE = 32  # image_size: the shorter side after resize_mode keep_ratio
PER_SHARD = 5  # 12 rows -> shards of 5, 5 and 2
# (width, height) of the served images; each is scaled so that its shorter side becomes SIZE, up or down
GEOMETRY = [(16, 24), (64, 32), (48, 96), (40, 20), (24, 36), (96, 64), (32, 32), (20, 40), (128, 64), (36, 24)]
MISSING, NOT_IMAGE = "/gone.jpg", "/not-an-image.jpg"


def picture(i: int, size: tuple[int, int], fmt: str) -> bytes:
    """Left and right halves in two colours of their own, so that a swapped or mirrored image shows."""
    w, h = size
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:, : w // 2] = (40 + 20 * i, 200 - 15 * i, 90)
    rgb[:, w // 2:] = (220 - 10 * i, 60, 30 + 20 * i)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


class _Server(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.requests.append(self.path)
        if self.path not in self.files:
            self.send_error(404)
            return
        body = self.files[self.path]
        self.send_response(200)
        self.send_header("Content-Type", "image/png" if self.path.endswith(".png") else "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def corpus(tmp_path, monkeypatch):
    """A loopback server of 10 pictures, a 404 and a non-image, and their table: (tsv, urls, captions, server)."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # urllib would send loopback requests to a configured proxy
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    files = {}
    for i, size in enumerate(GEOMETRY):
        ext, fmt = ("png", "PNG") if i % 2 else ("jpg", "JPEG")
        files[f"/img{i}.{ext}"] = picture(i, size, fmt)
    files[NOT_IMAGE] = b"<html>this is a web page, not an image</html>"
    handler = type("Handler", (_Server,), {"files": files, "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    paths = [p for p in files if p != NOT_IMAGE]
    paths[3:3] = [MISSING]  # the failures sit in the first and last shard
    paths.insert(11, NOT_IMAGE)
    urls = [base + p for p in paths]
    captions = {u: f"picture {n}: a café scene ☕ with two halves" for n, u in enumerate(urls)}
    tsv = tmp_path / "cc3m.tsv"
    tsv.write_text("url\tcaption\n" + "".join(f"{u}\t{captions[u]}\n" for u in urls), encoding="utf-8")
    yield tsv, urls, captions, handler
    server.shutdown()
    server.server_close()
    thread.join()


def i2d_params(tmp_path, tsv, **changes) -> str:
    def edit(raw):
        raw["paper"]["data"]["paper"]["img2dataset"].update({
            "enabled": True, "url_list": str(tsv), "input_format": "tsv", "url_col": "url", "caption_col": "caption",
            "image_size": SIZE, "processes": 1, "threads": 2, "samples_per_shard": PER_SHARD,
            "output": str(tmp_path / "cc3m"), "domain": "cc3m", **changes})
    return params_with(tmp_path, edit)


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3]


def keep_ratio(w: int, h: int) -> tuple[int, int]:
    scale = SIZE / min(w, h)
    return round(w * scale), round(h * scale)


@pytest.mark.slow
def test_download_writes_readable_shards_counts_failures_and_resumes(tmp_path, corpus):
    pytest.importorskip("img2dataset")
    tsv, urls, captions, server = corpus
    params = i2d_params(tmp_path, tsv)
    assert cli.main(["img2dataset", "--params", params, "--profile", "paper"]) == 0
    out = tmp_path / "cc3m"
    record = json.loads((tmp_path / "cc3m.img2dataset.json").read_text())
    assert sorted(server.requests) == sorted(map(path_of, urls))  # each URL fetched once
    assert {k: record[k] for k in ("shards", "samples", "successes", "failures", "failed_to_download",
                                   "failed_to_resize", "unfinished")} == {
        "shards": 3, "samples": 12, "successes": 10, "failures": 2, "failed_to_download": 1, "failed_to_resize": 1,
        "unfinished": []}
    assert record["reasons"] == {"HTTP Error 404: Not Found": 1, "Image decoding error": 1}
    assert record["settings"]["image_size"] == SIZE and record["domain"] == "cc3m"

    # every successful sample is readable by gram, with its own caption and picture, resized keeping the ratio
    shards = expand_shards(out)
    assert [s.rsplit("/", 1)[1] for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    served = {u: server.files.get(path_of(u)) for u in urls}
    seen = {}
    for shard in shards:
        url_of = {s["__key__"]: json.loads(s["json"])["url"] for s in iter_shard(shard)}
        pairs = ShardPairs(shard)
        for key, image, caption in pairs:
            url = url_of[key]
            assert caption == captions[url]
            got = decode_rgb(image, key)
            want = decode_rgb(served[url], url)
            h, w = want.shape[:2]
            assert got.shape == (*keep_ratio(w, h)[::-1], 3), url
            want = np.asarray(Image.fromarray(want).resize(got.shape[1::-1], Image.BILINEAR))
            assert np.abs(got.astype(int) - want).mean() < 6, url
            seen[url] = key
        assert pairs.skipped == {"no_image": 0, "no_caption": 0, "undecodable": 0}
    assert sorted(seen) == sorted(u for u in urls if not u.endswith((MISSING, NOT_IMAGE)))

    # a rerun skips the finished shards: nothing is fetched again and the shards stay as they are
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    n = len(server.requests)
    cfg = C.load(params, "paper")[1].data.paper.img2dataset
    again = I2D.run(cfg)
    assert len(server.requests) == n
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
    assert {k: again[k] for k in ("shards", "successes", "failures", "reasons")} == {
        k: record[k] for k in ("shards", "successes", "failures", "reasons")}

    # an interrupted shard (a cut-off tar, no stats yet) is fetched again, and only it
    samples = {s["__key__"]: s["txt"] for s in iter_shard(str(out / "00001.tar"))}
    (out / "00001_stats.json").unlink()
    (out / "00001.tar").write_bytes(before["00001.tar"][:1000])
    I2D.run(cfg)
    assert sorted(server.requests[n:]) == sorted(map(path_of, urls[PER_SHARD:2 * PER_SHARD]))
    assert {s["__key__"]: s["txt"] for s in iter_shard(str(out / "00001.tar"))} == samples
    n = len(server.requests)

    # other shard settings on the same folder are refused before any download
    with pytest.raises(ValueError, match="other settings"):
        I2D.run(C.load(i2d_params(tmp_path, tsv, image_size=64), "paper")[1].data.paper.img2dataset)
    assert len(server.requests) == n


def test_summary_names_unfinished_shards(tmp_path):
    """A shard without stats (a .tar left behind, or a number missing between finished ones) is unfinished."""
    stats = {"count": 2, "successes": 1, "failed_to_download": 1, "failed_to_resize": 0,
             "status_dict": {"success": 1, "timed out": 1}}
    for shard in (0, 3):
        (tmp_path / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
    for shard in (0, 3, 4):
        (tmp_path / f"{shard:05d}.tar").write_bytes(b"")
    record = I2D.summarize(tmp_path)
    assert record["unfinished"] == ["00001", "00002", "00004"]
    assert (record["shards"], record["samples"], record["successes"], record["failures"]) == (2, 4, 2, 2)
    assert record["reasons"] == {"timed out": 2}


def test_disabled_stage_and_missing_or_headerless_table_are_refused(tmp_path, capsys):
    tsv = tmp_path / "cc3m.tsv"
    params = i2d_params(tmp_path, tsv, enabled=False)
    assert cli.main(["img2dataset", "--params", params, "--profile", "paper"]) == 1
    assert "data.paper.img2dataset.enabled" in capsys.readouterr().err

    cfg = C.load(i2d_params(tmp_path, tsv), "paper")[1].data.paper.img2dataset
    with pytest.raises(FileNotFoundError, match="url_list"):
        I2D.run(cfg)
    tsv.write_text("a caption\thttp://example.invalid/a.jpg\n")  # CC3M's own file: caption, url, no header
    with pytest.raises(ValueError, match="header"):
        I2D.run(cfg)
    assert not (tmp_path / "cc3m").exists()
