"""Atomic outputs, JSON records and stage logging. [ours]

Every stage writes through these helpers so that an interrupted run never leaves a half-written
file or directory where a finished one is expected: files go to a temporary sibling and are
renamed into place (`os.replace` is atomic on POSIX); directories are built beside their target
and swapped in at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("gram")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (did the stage that writes it run?)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `path` (old contents removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def config_digest(obj: Any) -> str:
    """Short stable hash of a JSON-able object (e.g. a params section)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# directory manifests: what a stage wrote into a directory output, by content
# --------------------------------------------------------------------------------------------
MANIFEST_SUFFIX = ".manifest.json"  # the manifest of directory D is the file D + this, beside D
MANIFEST_SKIP = {".snakemake_timestamp"}  # written into directory outputs by Snakemake after the job


def manifest_path(directory: str | Path) -> Path:
    """Where the manifest of `directory` lives: `data/x/shards` -> `data/x/shards.manifest.json`."""
    directory = Path(directory)
    return directory.with_name(directory.name + MANIFEST_SUFFIX)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(directory: Path) -> dict[str, os.stat_result]:
    out = {}
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            if name not in MANIFEST_SKIP:
                p = Path(root) / name
                out[p.relative_to(directory).as_posix()] = p.stat()
    return out


def write_manifest(directory: str | Path) -> Path:
    """Write `directory`'s manifest (sha256, size and mtime_ns of every file under it), atomically, and
    return its path. Each stage calls it at its end for every directory it outputs: Snakemake depends on
    the manifest, and `verify_manifest` tells when the directory no longer holds what the stage wrote."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory to write a manifest of")
    files = {rel: {"sha256": _sha256(directory / rel), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
             for rel, st in _files(directory).items()}
    path = manifest_path(directory)
    write_json(path, {"directory": directory.name, "files": files})
    return path


def verify_manifest(path: str | Path) -> str | None:
    """None when the directory beside manifest `path` holds what the manifest lists; else why not (one
    line naming the first changed file). Files whose size and mtime_ns match are not hashed again."""
    path = Path(path)
    directory = path.with_name(path.name[: -len(MANIFEST_SUFFIX)])
    try:
        listed = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path}: unreadable manifest ({e})"
    if not directory.is_dir():
        return f"{directory}: missing"
    found = _files(directory)
    for rel in sorted(set(listed) | set(found)):
        want, st = listed.get(rel), found.get(rel)
        if st is None:
            return f"{directory / rel}: deleted"
        if want is None:
            return f"{directory / rel}: added"
        if st.st_size != want["size"]:
            return f"{directory / rel}: size {want['size']} -> {st.st_size}"
        if st.st_mtime_ns != want["mtime_ns"] and _sha256(directory / rel) != want["sha256"]:
            return f"{directory / rel}: content changed (sha256)"
    return None


def drop_stale_manifests(patterns: list[str], root: str | Path = ".") -> list[str]:
    """Verify every manifest matching the glob `patterns` under `root`; for each that no longer matches its
    directory, warn on stderr (one line), remove it and mark the directory as just changed. Snakemake then
    reruns the stage that writes it: a missing output reruns a job only when a job that needs it reruns
    (or it is a target), and the jobs reading the directory rerun because it is newer than their outputs
    (its mtime is `.snakemake_timestamp`'s, which Snakemake writes into directory outputs). Returns the reasons."""
    root, out = Path(root), []
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            why = verify_manifest(path)
            if why is None:
                continue
            path.unlink(missing_ok=True)
            directory = path.with_name(path.name[: -len(MANIFEST_SUFFIX)])
            for marker in (directory / ".snakemake_timestamp", directory):
                if marker.exists():
                    os.utime(marker)
            print(f"gram: {why}: removed {path}, the stage that writes it reruns", file=sys.stderr)
            out.append(why)
    return out


class StderrHandler(logging.StreamHandler):
    """A stream handler writing to whatever `sys.stderr` is when a record is emitted, not to the stream of
    set-up time (which a caller that redirects stderr, or a test harness, may have closed since)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # logging.StreamHandler assigns it; the property always answers sys.stderr
        pass


def setup_logging(logfile: str | Path | None, verbose: bool = False) -> None:
    """Log to stderr and, if given, to `logfile` (appended: a resumed stage keeps its history)."""
    handlers: list[logging.Handler] = [StderrHandler()]
    if logfile:
        Path(logfile).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(logfile))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
