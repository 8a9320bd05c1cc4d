"""Atomic outputs, JSON records, file hashes and stage logging. [ours]

Every stage writes through these helpers so that an interrupted run never leaves a half-written
file or directory where a finished one is expected: files go to a temporary sibling and are
renamed into place (`os.replace` is atomic on POSIX); directories are built beside their target
and swapped in at the end.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("gram")


def job_threads() -> int:
    """CPU threads this job may use.

    `OMP_NUM_THREADS` when set: Snakemake sets it to the rule's `threads` for every job (locally and
    inside SLURM jobs), and a user may set it by hand. Otherwise the CPUs this process may run on (a
    SLURM allocation or a `taskset`, not the machine's count).
    """
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value:
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"OMP_NUM_THREADS={value!r}: must be a positive integer") from None
        if n < 1:
            raise ValueError(f"OMP_NUM_THREADS={value!r}: must be a positive integer")
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class DivergedError(RuntimeError):
    """A training loop met a non-finite loss or parameter (nothing of the run is written)."""


def check_finite(what: str, step: int, total: int, loss: float, params=()) -> None:
    """Stop a training loop at its first non-finite loss or parameter.

    Args:
        what: the run, as the error names it (e.g. "tune coop (few-shot, subgroup16, 4 shots, seed 1)").
        step: the 1-based step just taken, of `total`; loss: its loss (a Python float: the loops
            already read it back for their history, so this adds no host sync for the loss).
        params: (name, tensor) pairs to check after the step (one reduction each).

    Raises:
        DivergedError naming the run, the step and the value; the caller has written nothing yet.
    """
    bad = None
    if not math.isfinite(loss):
        bad = f"loss = {loss}"
    else:
        for name, t in params:
            if not bool(t.isfinite().all()):
                bad = f"parameter {name} holds {'nan' if bool(t.isnan().any()) else 'inf'}"
                break
    if bad is not None:
        raise DivergedError(f"{what}: {bad} at step {step} of {total}; the run diverged (is a learning rate too "
                            "high?) and nothing was written")


class DiskFull(OSError):
    """No space left while writing an output (errno ENOSPC); the message names the output. Nothing partial is
    left behind: the temporary file or directory is removed and an older `path` stays as it was."""


def disk_full(path: Path) -> DiskFull:
    err = DiskFull(errno.ENOSPC, f"{path}: no space left on the device while writing it; nothing was written "
                                 "(the partial temporary output was removed): free space and rerun the stage")
    err.filename = str(path)
    return err


_UMASK_LOCK = threading.Lock()


def creation_mode(directory: bool = False) -> int:
    """The mode a plain `open(..., "w")` (0o666) or `mkdir` (0o777) would give under the process umask.
    mkstemp and mkdtemp create 0o600 / 0o700, which a rename would carry into the output, leaving
    results unreadable to the rest of a shared group or cluster."""
    with _UMASK_LOCK:  # the umask can only be read by setting it
        mask = os.umask(0o077)
        os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def make_temp_dir(parent: Path, prefix: str, suffix: str = "") -> Path:
    """mkdtemp in `parent`, with the mode `mkdir` would give (see `creation_mode`)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    os.chmod(tmp, creation_mode(directory=True))
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds.

    Raises:
        DiskFull naming `path` when the device fills up (the temporary file is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, creation_mode())  # after the writer, which may have made the file anew
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC and not isinstance(e, DiskFull):
            raise disk_full(path) from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def save_png(fig, path: str | Path) -> None:
    """Write a matplotlib figure as PNG (110 dpi), atomically; every plot of the reports goes through here."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


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
    """Yield an empty temporary directory; on success it replaces `path` (old contents removed).

    Raises:
        DiskFull naming the file being written (or `path`) when the device fills up (the temporary
        directory is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path.parent, f".{path.name}.", ".tmp")
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
    except OSError as e:
        if e.errno == errno.ENOSPC and not isinstance(e, DiskFull):
            # a file of the directory, named by its final path, when the error says which
            inner = Path(e.filename) if e.filename else None
            raise disk_full(path / inner.relative_to(tmp) if inner and inner.is_relative_to(tmp) else path) from e
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def config_digest(obj: Any) -> str:
    """Short stable hash of a JSON-able object (e.g. a params section)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes, read `chunk` bytes at a time (shards and weights are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# directory manifests: what a stage wrote into a directory output, by content
# --------------------------------------------------------------------------------------------
MANIFEST_SUFFIX = ".manifest.json"  # the manifest of directory D is the file D + this, beside D
MANIFEST_SKIP = {".snakemake_timestamp"}  # written into directory outputs by Snakemake after the job


def manifest_path(directory: str | Path) -> Path:
    """Where the manifest of `directory` lives: `data/x/shards` -> `data/x/shards.manifest.json`."""
    directory = Path(directory)
    return directory.with_name(directory.name + MANIFEST_SUFFIX)


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
    files = {rel: {"sha256": file_sha256(directory / rel), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
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
        if st.st_mtime_ns != want["mtime_ns"] and file_sha256(directory / rel) != want["sha256"]:
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
