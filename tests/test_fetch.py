"""`gram fetch-data` (gram.data.fetch) against a loopback HTTP server serving fake archives."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_fewshot_data import build  # the fake CoOp trees of the reader's tests

from gram import cli
from gram.data import fetch as F
from gram.data.fewshot import SPECS, read


# ------------------------------------------------------------------------------------------------
# a file server that counts requests and may refuse Range
# ------------------------------------------------------------------------------------------------
class Server:
    def __init__(self):
        self.files: dict[str, bytes] = {}  # URL path -> content
        self.ranges = True  # honour `Range: bytes=N-`
        self.requests: list[tuple[str, str | None, int]] = []  # (path, Range header, status)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                rng, body = self.headers.get("Range"), outer.files.get(self.path)
                if body is None:
                    status = 404
                elif rng and outer.ranges:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                    status = 206 if start < len(body) else 416
                else:
                    start, status = 0, 200
                # recorded before the reply: the client may return as soon as it has read the status
                outer.requests.append((self.path, rng, status))
                self.send_response(status)
                if status in (200, 206):
                    if status == 206:
                        self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                    self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if status in (200, 206):
                    self.wfile.write(body[start:])

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def serve(self, name: str, data: bytes) -> str:
        self.files[f"/{name}"] = data
        return f"{self.base}/{name}"


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_gz(folder: Path, arcname: str, extra: dict[str, bytes] | None = None) -> bytes:
    """A .tar.gz holding `folder` as `arcname/`, plus raw members `extra` (name -> bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(folder, arcname=arcname)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_of(folder: Path | None, prefix: str = "", extra: dict[str, bytes] | None = None) -> bytes:
    """A .zip of the files under `folder` (if any), their names relative to it, each under `prefix`."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(folder.rglob("*")) if folder else []:
            if f.is_file():
                zf.write(f, prefix + f.relative_to(folder).as_posix())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Path:
    """Reference trees to pack and to compare the fetched listings with."""
    return build(tmp_path_factory.mktemp("reference"), ["dtd", "eurosat", "caltech101", "oxford_pets"])


def listings(root: Path, name: str) -> dict:
    return {s: (read(root, name, s).paths, read(root, name, s).labels.tolist(), read(root, name, s).classes)
            for s in SPECS[name].splits}


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if ".fetch-" in p.name) if root.is_dir() else []


# ------------------------------------------------------------------------------------------------
# (a) fetched trees read exactly like the reference
# ------------------------------------------------------------------------------------------------
def test_fetch_builds_the_coop_layout(tmp_path, fake, server, monkeypatch):
    # DTD: a tar.gz with a top folder merged into the dataset folder, and a split file with a checksum
    dtd_tar = tar_gz(fake / "dtd", "dtd", extra={"dtd/labels/labels_joint_anno.txt": b"x\n"})
    split = (fake / "dtd" / SPECS["dtd"].file).read_bytes()
    monkeypatch.setitem(F.SOURCES, "dtd", F.Source(
        archives=(F.Archive(server.serve("dtd-r1.0.1.tar.gz", dtd_tar), "dtd-r1.0.1.tar.gz", "sha256",
                            sha256(dtd_tar), take="dtd", marker="images"),),
        split=F.Single(server.serve("split.json", split), "sha256", sha256(split))))
    # Caltech101: a zip holding a tar.gz (the CaltechDATA packaging)
    inner = tar_gz(fake / "caltech-101" / "101_ObjectCategories", "101_ObjectCategories")
    zipped = zip_of(None, extra={"caltech-101/101_ObjectCategories.tar.gz": inner,
                                             "caltech-101/show_annotation.m": b"%\n"})
    monkeypatch.setitem(F.SOURCES, "caltech101", F.Source(
        archives=(F.Archive(server.serve("caltech-101.zip", zipped), "caltech-101.zip", "md5",
                            hashlib.md5(zipped).hexdigest(), inner="caltech-101/101_ObjectCategories.tar.gz",
                            take="101_ObjectCategories", into="101_ObjectCategories"),),
        split=F.Single("https://drive.example/caltech"), manual="split by hand"))

    root = tmp_path / "data"
    rec = F.fetch(root, "dtd")
    assert rec["status"] == "fetched" and rec["splits"] == {"train": 6, "val": 2, "test": 2}
    assert rec["archives"] == [{"url": f"{server.base}/dtd-r1.0.1.tar.gz", "file": "dtd-r1.0.1.tar.gz",
                                "algorithm": "sha256", "digest": sha256(dtd_tar), "bytes": len(dtd_tar),
                                "action": "install"}]
    assert listings(root, "dtd") == listings(fake, "dtd")
    assert (root / "dtd" / "labels" / "labels_joint_anno.txt").is_file()  # the rest of the archive comes along
    assert (root / ".downloads" / "dtd-r1.0.1.tar.gz").is_file() and not leftovers(root)

    (root / "caltech-101").mkdir()
    shutil.copy(fake / "caltech-101" / SPECS["caltech101"].file, root / "caltech-101")  # the split, "by hand"
    rec = F.fetch(root, "caltech101", downloads=tmp_path / "dl")
    assert rec["status"] == "fetched" and listings(root, "caltech101") == listings(fake, "caltech101")
    assert sorted(p.name for p in (root / "caltech-101").iterdir()) == ["101_ObjectCategories",
                                                                        "split_zhou_Caltech101.json"]
    assert (tmp_path / "dl" / "caltech-101.zip").is_file() and not leftovers(root)


# ------------------------------------------------------------------------------------------------
# (b) present: no network
# ------------------------------------------------------------------------------------------------
def test_present_dataset_makes_no_request(tmp_path, fake, server, monkeypatch):
    data = tar_gz(fake / "dtd", "dtd")
    monkeypatch.setitem(F.SOURCES, "dtd", F.Source(
        archives=(F.Archive(server.serve("dtd.tar.gz", data), "dtd.tar.gz", "sha256", sha256(data),
                            take="dtd", marker="images"),), split=F.Single("https://drive.example/x"), manual="x"))
    root = build(tmp_path / "data", ["dtd"])
    rec = F.fetch(root, "dtd")
    assert rec == {"dataset": "dtd", "status": "present", "splits": {"train": 6, "val": 2, "test": 2}}
    assert F.fetch(root, "dtd", dry_run=True)["status"] == "present"
    assert server.requests == [] and not (root / ".downloads").exists()


# ------------------------------------------------------------------------------------------------
# (c) checksum mismatch
# ------------------------------------------------------------------------------------------------
def test_checksum_mismatch_deletes_and_names_both_digests(tmp_path, fake, server, monkeypatch):
    data = tar_gz(fake / "dtd", "dtd")
    wrong = sha256(b"another file")
    url = server.serve("dtd.tar.gz", data)
    monkeypatch.setitem(F.SOURCES, "dtd", F.Source(
        archives=(F.Archive(url, "dtd.tar.gz", "sha256", wrong, take="dtd", marker="images"),)))
    root = tmp_path / "data"
    with pytest.raises(F.ChecksumMismatch) as e:
        F.fetch(root, "dtd")
    msg = str(e.value)
    assert url in msg and "dtd.tar.gz" in msg and wrong in msg and sha256(data) in msg
    assert list((root / ".downloads").iterdir()) == []  # neither the file nor a .part
    assert not (root / "dtd").exists() and not leftovers(root)


# ------------------------------------------------------------------------------------------------
# (d) resumed downloads
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ranges", [True, False])
def test_resume_with_range_or_restart(tmp_path, server, ranges):
    data = bytes(range(256)) * 400
    url = server.serve("big.bin", data)
    server.ranges = ranges
    dest = tmp_path / "dl" / "big.bin"
    dest.parent.mkdir()
    half = len(data) // 2
    (tmp_path / "dl" / "big.bin.part").write_bytes(data[:half])
    assert F.download(url, dest, "sha256", sha256(data)) == len(data)
    assert server.requests == [("/big.bin", f"bytes={half}-", 206 if ranges else 200)]
    assert F.file_digest(dest, "sha256") == sha256(data) and not (tmp_path / "dl" / "big.bin.part").exists()
    server.requests.clear()
    assert F.download(url, dest, "sha256", sha256(data)) == len(data)  # already there: verified, not fetched
    assert server.requests == []


def test_whole_part_file_and_http_errors(tmp_path, server):
    data = b"complete" * 100
    url = server.serve("f.bin", data)
    (tmp_path / "f.bin.part").write_bytes(data)
    assert F.download(url, tmp_path / "f.bin", "md5", hashlib.md5(data).hexdigest()) == len(data)
    assert server.requests[-1][2] == 416  # the server says the range is past the end: the part is whole
    with pytest.raises(F.FetchError, match=re.escape(f"{server.base}/missing.bin: HTTP 404")):
        F.download(f"{server.base}/missing.bin", tmp_path / "m.bin", "md5", "0" * 32)
    with pytest.raises(F.FetchError, match=r"http://127\.0\.0\.1:9/x\.bin: cannot connect"):
        F.download("http://127.0.0.1:9/x.bin", tmp_path / "x.bin", "md5", "0" * 32)


# ------------------------------------------------------------------------------------------------
# (e) unsafe archives
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tar.gz", "zip", "link"])
def test_member_outside_the_folder_is_refused(tmp_path, fake, server, monkeypatch, kind):
    evil = {"../evil": b"pwned"}
    if kind == "zip":
        data = zip_of(fake / "dtd", "dtd/", extra=evil)
    elif kind == "tar.gz":
        data = tar_gz(fake / "dtd", "dtd", extra=evil)
    else:  # a symlink pointing out of the folder
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            tf.add(fake / "dtd", arcname="dtd")
            link = tarfile.TarInfo("dtd/images/evil")
            link.type, link.linkname = tarfile.SYMTYPE, "../../../evil"
            tf.addfile(link)
        data = buf.getvalue()
    name = f"dtd.{'zip' if kind == 'zip' else 'tar.gz'}"
    monkeypatch.setitem(F.SOURCES, "dtd", F.Source(
        archives=(F.Archive(server.serve(name, data), name, "sha256", sha256(data), take="dtd", marker="images"),)))
    root = tmp_path / "a" / "data"
    with pytest.raises(F.UnsafeArchive, match=r"'\.\./evil'|'\.\./\.\./\.\./evil'"):
        F.fetch(root, "dtd")
    assert not (root / "dtd").exists() and not leftovers(root)
    assert not any(p.name == "evil" for p in tmp_path.rglob("*"))


# ------------------------------------------------------------------------------------------------
# (f) manual steps
# ------------------------------------------------------------------------------------------------
def test_manual_step_lists_steps_and_layout_and_cli_exits(tmp_path, fake, server, monkeypatch, capsys):
    images = tar_gz(fake / "oxford_pets" / "images", "images")
    drive = "https://drive.google.com/file/d/PETS/view"
    monkeypatch.setitem(F.SOURCES, "oxford_pets", F.Source(
        archives=(F.Archive(server.serve("images.tar.gz", images), "images.tar.gz", "md5",
                            hashlib.md5(images).hexdigest(), take="images", into="images"),),
        split=F.Single(drive), manual=F.SPLIT_WHY))
    root = tmp_path / "data"
    ds = root / "oxford_pets"
    with pytest.raises(F.ManualStep) as e:
        F.fetch(root, "oxford_pets")
    msg = str(e.value)
    assert msg.startswith("oxford_pets: 1 step to do by hand.") and "Google Drive" in msg
    assert f"  1. Download split_zhou_OxfordPets.json" in msg and drive in msg
    assert f"save it as {ds / 'split_zhou_OxfordPets.json'}" in msg
    assert f"{ds}/\n" in msg and "├── images/" in msg and "└── split_zhou_OxfordPets.json" in msg
    assert (ds / "images").is_dir() and len(server.requests) == 1  # the automatic part is in place

    with pytest.raises(SystemExit) as ex:
        cli.main(["fetch-data", "--root", str(root), "--dataset", "oxford_pets"])
    assert ex.value.code == F.MANUAL_EXIT
    err = capsys.readouterr().err
    assert "1. Download split_zhou_OxfordPets.json" in err and "└── split_zhou_OxfordPets.json" in err
    assert "Traceback" not in err and len(server.requests) == 1  # the images were not fetched again

    shutil.copy(fake / "oxford_pets" / "split_zhou_OxfordPets.json", ds)  # the step by hand
    record = tmp_path / "rec.json"
    assert cli.main(["fetch-data", "--root", str(root), "--dataset", "oxford_pets", "--record", str(record)]) == 0
    assert json.loads(record.read_text()) == {"dataset": "oxford_pets", "status": "present",
                                              "splits": {"train": 6, "val": 2, "test": 2}}
    assert "oxford_pets: present (train 6, val 2, test 2)" in capsys.readouterr().out


def test_file_supplied_by_hand_is_checked_not_deleted(tmp_path, fake, monkeypatch):
    cars = tar_gz(fake / "dtd" / "images", "cars_train")  # any images will do
    monkeypatch.setitem(F.SOURCES, "stanford_cars", F.Source(
        archives=(F.Archive("", "cars_train.tgz", "sha256", sha256(cars), take="cars_train", into="cars_train"),),
        split=F.Single("https://drive.example/cars"), manual="host gone"))
    root = tmp_path / "data"
    with pytest.raises(F.ManualStep, match=re.escape(f"put it at {root / '.downloads' / 'cars_train.tgz'}")):
        F.fetch(root, "stanford_cars")
    (root / ".downloads").mkdir(parents=True)
    (root / ".downloads" / "cars_train.tgz").write_bytes(b"a different file")
    with pytest.raises(F.ChecksumMismatch, match="not the published file"):
        F.fetch(root, "stanford_cars")
    assert (root / ".downloads" / "cars_train.tgz").is_file()  # the user's file stays
    (root / ".downloads" / "cars_train.tgz").write_bytes(cars)
    with pytest.raises(F.ManualStep) as e:  # only the split file is left
        F.fetch(root, "stanford_cars")
    assert "1 step" in str(e.value) and "split_zhou_StanfordCars.json" in str(e.value)
    assert (root / "stanford_cars" / "cars_train").is_dir()


# ------------------------------------------------------------------------------------------------
# (g) the real table
# ------------------------------------------------------------------------------------------------
def test_sources_table_is_well_formed(tmp_path):
    assert list(F.SOURCES) == list(SPECS)
    for name, src in F.SOURCES.items():
        spec = SPECS[name]
        for a in src.archives:
            assert a.algorithm in F.DIGEST_HEX, (name, a.file)
            assert re.fullmatch(f"[0-9a-f]{{{F.DIGEST_HEX[a.algorithm]}}}", a.digest), (name, a.file)
            assert a.url == "" or re.match(r"https?://[^/]+/", a.url), (name, a.url)
            assert a.file and "/" not in a.file and a.done, (name, a.file)
            assert F.is_archive(a.file) or a.into, (name, a.file)  # a plain file needs a destination
        assert len({a.file for a in src.archives}) == len(src.archives)
        assert (src.split is not None) == (spec.format == "zhou"), name
        if src.split is not None:
            assert src.split.url.startswith("https://drive.google.com/file/d/"), name  # CoOp's links
            assert bool(src.split.algorithm) == bool(src.split.digest), name
        if F.manual_parts(name):
            assert src.manual.strip(), f"{name} has a manual part but no instructions"
        assert all(h.marker and h.text.strip() for h in src.by_hand), name
        # nothing needs the network to plan; every dataset with nothing on disk lists its steps
        plan = F.fetch(tmp_path, name, dry_run=True)
        assert plan["status"] == "planned" and not list(tmp_path.iterdir())
        assert bool(plan["manual"]) == bool(F.manual_parts(name)), name
    assert F.manual_parts("fgvc_aircraft") == []  # the one fully automatic dataset
    assert F.SOURCES["imagenet"].archives == () and F.SOURCES["ucf101"].archives == ()
