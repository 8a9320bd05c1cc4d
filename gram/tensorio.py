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


def load_tensors(path: str | Path, names: list[str] | None = None) -> tuple[dict, dict]:
    """(tensors, meta) of a file written by `save_tensors`; `names` picks tensors ([]: metadata only)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (did the stage that writes it run?)")
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
        if "gram" not in raw:
            raise ValueError(f"{path}: not a gram tensor file (no `gram` entry in its metadata)")
        keys = list(f.keys()) if names is None else names
        return {k: f.get_tensor(k) for k in keys}, json.loads(raw["gram"])
