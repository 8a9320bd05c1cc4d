"""Tensor files: safetensors written atomically with one JSON metadata entry. [ours]

safetensors writes several metadata entries in a random order, so a file with two or more is not
byte-reproducible; one sorted JSON entry (`gram`) makes the same content give the same bytes (stable
DVC and Snakemake hashes, byte-equal reruns). Used by the embed, cluster, tasks and prototypes stages.
"""

from __future__ import annotations

import json
from pathlib import Path

from gram.io import atomic_path


def save_tensors(path: str | Path, tensors: dict, meta: dict | None = None) -> None:
    """Write `tensors` (name -> torch.Tensor) as safetensors, atomically, with `meta` as one JSON entry.

    One entry with sorted keys, because safetensors writes several metadata entries in a random order:
    the same content then gives the same bytes (stable DVC/Snakemake hashes, byte-equal reruns)."""
    from safetensors.torch import save_file

    blob = {"gram": json.dumps(meta or {}, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=blob)


class DamagedFile(ValueError):
    """A tensor file that safetensors cannot read: truncated (an interrupted copy, a full disk) or damaged."""


def writer_of(path: Path) -> str:
    """What to rerun for a damaged tensor file, from its fixed name (see each stage module's docstring)."""
    name = path.name
    if name == "state.safetensors":
        return f"delete the checkpoint folder {path.parent} (the stage then starts afresh)"
    for prefix, stage in (("meta.", "meta"), ("hierarchy", "cluster"), ("tasks", "tasks"),
                          ("prototypes.", "prototypes")):
        if name.startswith(prefix):
            return f"rerun the {stage} stage (`gram {stage}`), which writes it"
    return "rerun the stage that writes it"


def damaged(path: Path, e: Exception, rerun: str | None = None) -> DamagedFile:
    """The error for a safetensors file that does not open: names it, says why and what to rerun."""
    return DamagedFile(f"{path}: truncated or damaged safetensors file ({e}); {rerun or writer_of(path)}")


def load_tensors(path: str | Path, names: list[str] | None = None, rerun: str | None = None) -> tuple[dict, dict]:
    """(tensors, meta) of a file written by `save_tensors`; `names` picks tensors ([]: metadata only).

    Raises:
        FileNotFoundError or DamagedFile (a ValueError) naming `path`; `rerun` says what to rerun for a
        damaged file (default: `writer_of(path)`)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (did the stage that writes it run?)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            if "gram" not in raw:
                raise ValueError(f"{path}: not a gram tensor file (no `gram` entry in its metadata)")
            keys = list(f.keys()) if names is None else names
            return {k: f.get_tensor(k) for k in keys}, json.loads(raw["gram"])
    except SafetensorError as e:
        raise damaged(path, e, rerun) from None
